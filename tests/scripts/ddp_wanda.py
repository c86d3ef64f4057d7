"""Two-process CPU DDP run of GradualPruning(criterion="wanda"); writes each rank's inputs and final weights.

Usage: python ddp_wanda.py OUT_DIR
"""

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import GradualPruning  # noqa: E402
from tests.callbacks.test_pruning_wanda import FrozenMLP  # noqa: E402
from tests.helpers import ddp_trainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = FrozenMLP()
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None
    )
    weight = model.net[0].weight.detach().clone()
    # One update at step 3, on the inputs of steps 0-2 of *both* ranks (each rank sees its half of the data).
    pruning = GradualPruning(
        0.5,
        criterion="wanda",
        schedule="one_shot",
        start_step=3,
        end_step=4,
        include=["net.0"],
        scope="layer",
        update_every_n_steps=1,
    )
    trainer = ddp_trainer(out, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    torch.save(
        {"inputs": seen[:3], "initial": weight, "final": model.net[0].weight.detach().clone()},
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
