"""GradualPruning vs Lightning's ModelPruning on the digits CNN, side by side in one process.

Both prune the same weights (every Conv2d/Linear) of the same model on the same data for the same
epochs, toward the same *total* sparsity on the same cubic schedule: ModelPruning's per-epoch
``amount`` ("fraction of what remains") is converted from the cubic total-sparsity schedule, and it
prunes at each epoch end; GradualPruning updates every ``--every`` optimizer steps.

Printed per target: final measured sparsity, validation accuracy over seeds, and the ratio of the
steady-state training step time to plain training without any callback. A run's step time is the
median of its consecutive ``on_train_batch_end`` intervals (first epoch skipped); a configuration's
is the fastest of its runs (like ``timeit``), since on a shared machine noise only ever adds time.

    python benchmarks/pruning_vs_modelpruning.py --epochs 10 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning

from lightning_compress import GradualPruning
from lightning_compress.demo import DigitsCNN, DigitsDataModule
from lightning_compress.functional.stats import global_sparsity
from lightning_compress.schedules import Cubic


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None  # do not count validation / epoch boundaries

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch > 0:
            self.times.append(now - self._last)
        self._last = now


class HookClock:
    """Wall time spent inside wrapped callables: the callback's own cost, free of run-to-run noise."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def modelpruning_amounts(target: float, end_epoch: int):
    """Per-epoch 'fraction of remaining' amounts that follow the cubic total-sparsity schedule."""
    cubic = Cubic()

    def total(epoch: int) -> float:  # sparsity after pruning at the end of `epoch`
        return cubic(epoch + 1, start=0, end=end_epoch, initial=0.0, final=target)

    def amount(epoch: int) -> float:
        before = total(epoch - 1) if epoch > 0 else 0.0
        return 0.0 if total(epoch) <= before else (total(epoch) - before) / (1.0 - before)

    return amount


def run(kind: str, target: float, epochs: int, end_epoch: int, seed: int) -> dict:
    """One training run; ``kind`` is ``"plain"``, ``"ModelPruning"`` or ``"every=N"`` (GradualPruning)."""
    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN()
    weights = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    callbacks: list[pl.Callback] = [StepTimer()]
    clock = HookClock()
    original_prune_hook = torch.nn.utils.prune.BasePruningMethod.__call__
    if kind.startswith("every="):
        every = int(kind.split("=")[1])
        ours = GradualPruning(target, end_epoch=end_epoch, update_every_n_steps=every, types=["Conv2d", "Linear"])
        # every place it spends time: schedule + mask updates, gradient masking, post-step masking
        for hook in ("on_train_batch_start", "on_before_optimizer_step", "_after_optimizer_step"):
            setattr(ours, hook, clock.wrap(getattr(ours, hook)))
        callbacks.insert(0, ours)
    elif kind == "ModelPruning":
        theirs = ModelPruning(
            "l1_unstructured",
            parameters_to_prune=weights,
            amount=modelpruning_amounts(target, end_epoch),
            use_global_unstructured=True,
            make_pruning_permanent=True,
            verbose=0,
        )
        # its pruning at epoch end, and torch.nn.utils.prune's forward pre-hooks (weight = orig * mask)
        theirs.on_train_epoch_end = clock.wrap(theirs.on_train_epoch_end)
        torch.nn.utils.prune.BasePruningMethod.__call__ = clock.wrap(original_prune_hook)
        callbacks.insert(0, theirs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="bench-pruning-"),
    )
    try:
        trainer.fit(model, DigitsDataModule(seed=seed))
    finally:
        torch.nn.utils.prune.BasePruningMethod.__call__ = original_prune_hook
    val = trainer.validate(model, DigitsDataModule(seed=seed), verbose=False)[0]
    return {
        "hook_ms": clock.seconds * 1e3 / trainer.global_step,
        "sparsity": global_sparsity(getattr(m, n) for m, n in weights),
        "acc": val["val_acc"],
        "step": statistics.median(callbacks[-1].times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--end-epoch", type=int, default=7)
    parser.add_argument(
        "--every", type=int, nargs="+", default=[10, 23], help="GradualPruning update_every_n_steps values to run"
    )
    parser.add_argument("--repeats", type=int, default=5, help="seeds (runs per configuration)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the per-run reports out of the output

    kinds = [f"every={n}" for n in args.every] + ["ModelPruning"]
    results: dict[tuple[str, float], list[dict]] = {}
    for seed in range(args.repeats):  # interleaved, so machine noise spreads over all configurations
        for kind, target in [("plain", 0.0)] + [(k, t) for t in args.targets for k in kinds]:
            results.setdefault((kind, target), []).append(run(kind, target, args.epochs, args.end_epoch, seed))

    def med(kind: str, target: float, key: str) -> float:
        return statistics.median(r[key] for r in results[(kind, target)])

    def step(kind: str, target: float) -> float:
        return min(r["step"] for r in results[(kind, target)])

    plain = step("plain", 0.0)
    print(
        f"\nplain training: {plain * 1e3:.2f} ms/step (best of {args.repeats} runs), val acc "
        f"{med('plain', 0.0, 'acc'):.4f} (median of {args.repeats} seeds), torch threads=1\n"
    )
    print(
        "| target | callback | final sparsity | val acc mean ± std | val acc min..max "
        "| − ModelPruning, paired by seed | step time / plain | callback ms/step (share of plain step) |"
    )
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for target in args.targets:
        theirs = [r["acc"] for r in results[("ModelPruning", target)]]
        for kind in kinds:
            accs = [r["acc"] for r in results[(kind, target)]]
            diffs = [a - b for a, b in zip(accs, theirs, strict=True)]
            paired = (
                ""
                if kind == "ModelPruning" or len(diffs) < 2
                else (f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f}")
            )
            name = "ModelPruning (per epoch)" if kind == "ModelPruning" else f"GradualPruning ({kind} steps)"
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            hook = med(kind, target, "hook_ms")
            print(
                f"| {target:.0%} | {name} | {med(kind, target, 'sparsity'):.4f} | {statistics.mean(accs):.4f} ± "
                f"{spread:.4f} | {min(accs):.4f}..{max(accs):.4f} | {paired} "
                f"| {step(kind, target) / plain:.3f} | {hook:.3f} ({hook / (plain * 1e3):.1%}) |"
            )


if __name__ == "__main__":
    main()
