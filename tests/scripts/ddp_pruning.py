"""Two-process CPU DDP run of GradualPruning; writes each rank's final weights.

Two pruning callbacks run side by side: ``taylor`` on the hidden layers (scores from all-reduced
gradients) and ``random`` on the head (a step-seeded generator), so both criteria are checked for
identical masks on both ranks.

Usage: python ddp_pruning.py OUT_DIR STRATEGY   (STRATEGY: ddp or ddp_spawn)
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import GradualPruning  # noqa: E402
from tests.helpers import TinyMLP, ddp_trainer  # noqa: E402


class SaveWeights(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"weights": weights}, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(out: str, strategy: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    hidden = GradualPruning(0.7, criterion="taylor", end_step=6, update_every_n_steps=2, include=["net.0", "net.2"])
    # Under "ddp" every rank runs this script, so LOCAL_RANK gives each process its own random seed: identical
    # masks on both ranks then show that rank zero's masks are broadcast, not merely recomputed alike.
    seed = 3 + int(os.environ.get("LOCAL_RANK", "0"))
    head = GradualPruning(
        0.5, criterion="random", end_step=6, update_every_n_steps=2, include=["net.4"], name="head", seed=seed
    )
    model = TinyMLP()
    trainer = ddp_trainer(out, [hidden, head, SaveWeights(out)], strategy=strategy)
    trainer.fit(model)
    if trainer.global_rank == 0:
        # For ddp_spawn this is the parent process: it must end with the pruned weights.
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "parent.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
