"""Two-process CPU DDP run of GradualPruning; writes each rank's masks and the final weights.

Usage: python ddp_pruning.py OUT_DIR STRATEGY   (STRATEGY: ddp or ddp_spawn)
"""

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import GradualPruning  # noqa: E402
from tests.helpers import TinyMLP, ddp_trainer  # noqa: E402


class SaveMasks(pl.Callback):
    def __init__(self, pruning: GradualPruning, out: str) -> None:
        self.pruning, self.out = pruning, out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "masks": self.pruning._masks,
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def main(out: str, strategy: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    # taylor scores come from all-reduced gradients; random uses a step-seeded generator
    pruning = GradualPruning(0.7, criterion="taylor", end_step=6, update_every_n_steps=2)
    model = TinyMLP()
    trainer = ddp_trainer(out, [pruning, SaveMasks(pruning, out)], strategy=strategy)
    trainer.fit(model)
    if trainer.global_rank == 0:
        # For ddp_spawn this is the parent process: it must end with the pruned weights.
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "parent.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
