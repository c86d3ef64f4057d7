"""Pruning a trained model alone vs pruning while distilling from its own dense self, in one process.

For each seed: a ``DigitsCNN`` is trained dense (``--pretrain`` epochs), then fine-tuned for ``--epochs``
more with ``GradualPruning`` to ``--sparsity`` (unstructured, global magnitude, cubic schedule over the
first ``--ramp`` epochs) twice from the same trained weights: alone, and with
``KnowledgeDistillation(teacher="self")``, whose teacher is the dense model as it was when the pruning fit
started. Printed: validation accuracy of the dense model and of both pruned models per seed, means and the
paired difference (distilled − alone).

    PYTHONPATH=. python benchmarks/prune_distill.py --seeds 3 --sparsity 0.9
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import warnings

import pytorch_lightning as pl
import torch

from lightning_compress import GradualPruning, KnowledgeDistillation
from lightning_compress.demo import DigitsCNN, DigitsDataModule


def trainer(root: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def accuracy(model: DigitsCNN, data: DigitsDataModule) -> float:
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return hits / total


def prune(dense: DigitsCNN, data: DigitsDataModule, args: argparse.Namespace, distill: bool, root: str) -> float:
    model = copy.deepcopy(dense)
    steps_per_epoch = len(data.train_dataloader())
    callbacks: list[pl.Callback] = [
        GradualPruning(
            target_sparsity=args.sparsity,
            scope="global",
            start_step=0,
            end_step=args.ramp * steps_per_epoch,
            update_every_n_steps=10,
        )
    ]
    if distill:
        callbacks.append(KnowledgeDistillation(teacher="self", alpha=args.alpha, temperature=args.temperature))
    trainer(root, args.epochs, callbacks).fit(model, data)
    return accuracy(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ramp", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            pl.seed_everything(seed, verbose=False)
            data = DigitsDataModule(batch_size=64)
            data.setup("fit")
            dense = DigitsCNN()
            trainer(root, args.pretrain, []).fit(dense, data)
            row = [accuracy(dense, data)]
            for distill in (False, True):
                pl.seed_everything(seed + 100, verbose=False)  # same batches for both fine-tunings
                row.append(prune(dense, data, args, distill, root))
            rows.append(row)
            print(f"seed {seed}: dense {row[0]:.4f}  pruned {row[1]:.4f}  pruned + KD(self) {row[2]:.4f}", flush=True)
    dense_acc, alone, kd = zip(*rows, strict=True)
    diffs = [b - a for a, b in zip(alone, kd, strict=True)]
    setting = f"{args.sparsity:.0%} unstructured, {args.epochs} fine-tuning epochs (ramp {args.ramp})"
    print(f"\n{setting}, {args.seeds} seeds")
    print("| model | val accuracy, mean | per seed |")
    print("| --- | ---: | --- |")
    for name, values in (("dense (start)", dense_acc), ("pruned alone", alone), ("pruned + KD(teacher='self')", kd)):
        print(f"| {name} | {statistics.mean(values):.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
    print(
        f"paired difference KD - alone: mean {statistics.mean(diffs):+.4f}, better in {sum(d > 0 for d in diffs)}"
        f"/{len(diffs)} seeds, worse in {sum(d < 0 for d in diffs)}"
    )


if __name__ == "__main__":
    main()
