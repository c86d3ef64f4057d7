"""Rebuilding the trainer's optimizers mid-fit after a callback changed the model's parameter set."""

from __future__ import annotations

from typing import Any

from lightning_compress._lightning_internals import optimizers_to_device, rewrap_ddp, strategy_is


def rebuild_optimizers(trainer: Any) -> None:
    """New optimizers / LR schedulers from ``configure_optimizers``, carrying over what still applies.

    An untouched parameter keeps its optimizer state (momentum, Adam moments), every group keeps the
    learning rate it had (schedulers may have moved it), and every scheduler keeps its position. Under
    DDP the wrapper is rebuilt first: its reducer holds the old parameter list.
    """
    strategy = trainer.strategy
    old_optimizers = list(trainer.optimizers)
    old_lrs = [[group["lr"] for group in opt.param_groups] for opt in old_optimizers]
    old_schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    if strategy_is(strategy, "DDPStrategy"):
        rewrap_ddp(strategy)
    strategy.setup_optimizers(trainer)
    optimizers_to_device(strategy.optimizers, strategy.root_device)
    for old, new, lrs in zip(old_optimizers, trainer.optimizers, old_lrs, strict=False):
        for group in new.param_groups:
            for p in group["params"]:
                if p in old.state:
                    new.state[p] = old.state[p]
        if len(new.param_groups) == len(lrs):
            for group, lr in zip(new.param_groups, lrs, strict=True):
                group["lr"] = lr
    for config, state in zip(trainer.lr_scheduler_configs, old_schedulers, strict=False):
        config.scheduler.load_state_dict(state)
