"""Two-process CPU DDP runs of GradualPruning(shrink=True, shrink_at_step=...): channels, then heads.

Writes each rank's final state dict (after the mid-fit removal and more training): ``rank{r}.pt`` for the
ResNet's channels, ``rank{r}_heads.pt`` for a small BERT's attention heads (a second fit in the same
processes, so no second start-up).
Usage: python ddp_shrink.py OUT_DIR
"""

import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import GradualPruning  # noqa: E402
from tests.helpers import ddp_trainer  # noqa: E402
from tests.zoo import ZOO  # noqa: E402
from tests.zoo.hf import TinyBert  # noqa: E402


class Save(pl.Callback):
    def __init__(self, out: str, suffix: str = "") -> None:
        self.out, self.suffix = out, suffix

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            os.path.join(self.out, f"rank{trainer.global_rank}{self.suffix}.pt"),
        )


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    case = ZOO["resnet_basic"]()
    pruning = GradualPruning(
        0.5, structure="channels", shrink=True, shrink_at_step=6, end_step=4, update_every_n_steps=2, criterion="taylor"
    )
    trainer = ddp_trainer(out, [pruning, Save(out)], max_epochs=-1, max_steps=10, limit_val_batches=0)
    trainer.fit(case.module, case.train_loader)

    pl.seed_everything(0)
    heads = GradualPruning(
        0.5, structure="heads", shrink=True, shrink_at_step=6, end_step=4, update_every_n_steps=2, criterion="taylor"
    )
    trainer = ddp_trainer(out, [heads, Save(out, "_heads")], max_epochs=-1, max_steps=10, limit_val_batches=0)
    trainer.fit(TinyBert(), ZOO["hf_bert"]().train_loader)


if __name__ == "__main__":
    main(sys.argv[1])
