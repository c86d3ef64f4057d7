"""Two-process CPU DDP run of TensorDecomposition applied mid-fit; each rank writes what it ended with.

Usage: python tests/scripts/ddp_decomposition.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lightning_compress import TensorDecomposition  # noqa: E402
from tests.helpers import ClassifierSteps, ddp_trainer  # noqa: E402


class TinyCNN(ClassifierSteps, pl.LightningModule):
    """conv 3->16, conv 16->32 (stride 2), grouped conv, Linear, classifier; SGD + per-step StepLR."""

    def __init__(self, lr: float = 0.05, scheduler: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 4)
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if not self.hparams.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _data(self, n: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 8, 8, generator=g)
        y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
        return DataLoader(
            TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )

    def train_dataloader(self) -> DataLoader:
        return self._data(64, 0)

    def val_dataloader(self) -> DataLoader:
        return self._data(16, 1)


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    decomposition = TensorDecomposition(rank=0.3, apply_at=3, min_reduction=1.0, measure_latency=False)
    trainer = ddp_trainer(out, [decomposition], max_steps=6, max_epochs=-1)
    model = TinyCNN()
    trainer.fit(model)
    optimizer = trainer.optimizers[0]
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "plans": {k: p.as_dict() for k, p in decomposition.plans.items()},
            "optimizer_params": sorted(id(p) for g in optimizer.param_groups for p in g["params"]),
            "model_params": sorted(id(p) for p in model.parameters()),
            "lr": optimizer.param_groups[0]["lr"],
            "global_step": trainer.global_step,
            "ddp_params": sorted(id(p) for p in trainer.strategy.model.parameters()),
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
