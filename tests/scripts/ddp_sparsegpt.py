"""Two-process CPU DDP run of GradualPruning(criterion="sparsegpt"); writes each rank's inputs and weights.

Usage: python ddp_sparsegpt.py OUT_DIR
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
    model = FrozenMLP()  # lr = 0: only the reconstruction moves the weights
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # Inputs of steps 1 and 2 of *both* ranks (each sees its half of the data); reconstruction before step 3.
    pruning = GradualPruning(
        0.5, criterion="sparsegpt", schedule="one_shot", scope="layer", start_step=1, calibration_batches=2,
        include=["net.0", "net.2"],
    )  # fmt: skip
    trainer = ddp_trainer(out, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(
        {"inputs": seen[1:3], "initial": initial, "final": final}, os.path.join(out, f"rank{trainer.global_rank}.pt")
    )


if __name__ == "__main__":
    main(sys.argv[1])
