"""Two-process CPU DDP run of GradualPruning(criterion="wanda"); writes each rank's inputs and final weights.

Usage: python ddp_wanda.py OUT_DIR
"""

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tests.callbacks.test_pruning_wanda import one_update_setup  # noqa: E402
from tests.helpers import ddp_trainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    # One update at step 3, on the inputs of steps 0-2 of *both* ranks (each rank sees its half of the data).
    model, seen, pruning = one_update_setup()
    weight = model.net[0].weight.detach().clone()
    trainer = ddp_trainer(out, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    torch.save(
        {"inputs": seen[:3], "initial": weight, "final": model.net[0].weight.detach().clone()},
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
