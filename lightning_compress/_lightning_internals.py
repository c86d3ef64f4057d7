"""Every private Lightning attribute the package touches, in one file, so an upgrade changes one place.

Each helper says which internal it reads and what it falls back to when the internal moves.
Strategies are recognised by class name, so ``pytorch_lightning``'s and ``lightning.pytorch``'s
classes (two distinct class hierarchies) are both understood.
"""

from __future__ import annotations

from typing import Any

import torch


def is_forward_redirection(module: torch.nn.Module) -> bool:
    """Whether ``module`` is being called through Lightning's forward redirection.

    Under DDP (and other wrapping strategies) Lightning routes ``training_step(batch, batch_idx)``
    through the wrapper by patching the instance's ``forward`` for one call (its private
    ``_ForwardRedirection``); forward hooks on the LightningModule see that call with the *step's*
    arguments. It is not a real forward.
    """
    forward = vars(module).get("forward")
    return "_ForwardRedirection" in getattr(forward, "__qualname__", "")


def loggers_write_now(trainer: Any) -> bool:
    """Whether Lightning sends step metrics to its loggers at this step (``log_every_n_steps``).

    Reads the logger connector's private decision; if that internal moves, answers ``True`` (log
    every step: correct, only slower).
    """
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:
        return True


def strategy_is(strategy: Any, *names: str) -> bool:
    """Whether ``strategy`` is (a subclass of) one of the strategy classes called ``names``."""
    return any(cls.__name__ in names for cls in type(strategy).__mro__)


def is_spawn(strategy: Any) -> bool:
    """Whether ``strategy`` spawns its processes (``ddp_spawn``: weights return through a ``strict=False`` load)."""
    return getattr(strategy, "_start_method", None) == "spawn" or type(strategy).__name__.endswith("SpawnStrategy")


def rewrap_ddp(strategy: Any) -> None:
    """Wrap the LightningModule in a new ``DistributedDataParallel`` after its parameter set changed.

    DDP's reducer holds the old parameter list; Lightning's private ``_setup_model`` /
    ``_register_ddp_hooks`` are what ``DDPStrategy.setup`` itself calls (this also broadcasts rank
    zero's new parameters to every process).
    """
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()


def optimizers_to_device(optimizers: Any, device: torch.device) -> None:
    """Move optimizer state to ``device`` with Lightning Fabric's private ``_optimizers_to_device``."""
    from lightning_fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


FSDP2_SUPPORTED = (
    "single-device training, strategy='ddp', and ModelParallelStrategy with the model sharded by "
    "torch.distributed.fsdp.fully_shard (FSDP2) in configure_model"
)
_FSDP2_HINT = (
    "HINT: strategy=ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1), with "
    "fully_shard(layer) on each layer and fully_shard(self) in the LightningModule's configure_model."
)


def refuse_unsupported_sharding(strategy: Any, callback: str, supported: str = FSDP2_SUPPORTED) -> None:
    """Raise a ``ValueError`` for ``FSDPStrategy`` (FSDP1) and DeepSpeed, naming what ``callback`` supports.

    FSDP1 flattens parameters into ``FlatParameter`` views and DeepSpeed partitions them behind its own
    engine; neither exposes the per-layer tensors the callbacks mask, observe or replace. Called in ``setup``
    (before any step). Strategies are recognised by class name (see :func:`strategy_is`).
    """
    kind = next((name for name in ("FSDPStrategy", "DeepSpeedStrategy") if strategy_is(strategy, name)), None)
    if kind is None:
        return
    why = (
        "FSDP1 flattens each wrapped module's parameters into one FlatParameter"
        if kind == "FSDPStrategy"
        else "DeepSpeed partitions parameters and optimizer state behind its own engine"
    )
    raise ValueError(
        f"{callback} does not support {type(strategy).__name__}: {why}, so the per-layer weights it works on "
        f"are not there to work on. Supported: {supported}. "
        + (_FSDP2_HINT if "ModelParallelStrategy" in supported else "HINT: use strategy='ddp'.")
    )
