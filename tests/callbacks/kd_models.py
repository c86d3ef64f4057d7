"""Models for the distillation tests: a two-input student whose forward takes a keyword argument."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def two_input_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x, extra = torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)
    y = (x[:, :3] + extra[:, :3]).argmax(1)
    return TensorDataset(x, extra, y)


class TwoInputNet(pl.LightningModule):
    """``forward(x, extra, *, scale=...)``; ``training_step`` returns a tensor or ``{"loss": ...}``."""

    def __init__(
        self,
        width: int = 16,
        classes: int = 3,
        lr: float = 0.1,
        optimizer: str = "sgd",
        return_dict: bool = False,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.a, self.b = nn.Linear(8, width), nn.Linear(4, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, extra: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.a(x) + self.b(extra)) * scale
        return self.out(torch.relu(self.mid(h)))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, extra, y = batch
        loss = F.cross_entropy(self(x, extra, scale=0.5), y)
        self.log("train_loss", loss)
        return {"loss": loss, "extra_output": 1} if self.hparams.return_dict else loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, extra, y = batch
        self.log("val_loss", F.cross_entropy(self(x, extra, scale=0.5), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        # No shuffling: a resumed run must see the batches an uninterrupted run sees.
        return DataLoader(two_input_data(), batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(two_input_data(32, seed=1), batch_size=16)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
