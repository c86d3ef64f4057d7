"""Tiny models and trainers shared by the tests: real Lightning runs, a few steps each."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def random_classification(n: int = 128, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


class ClassifierSteps:
    """Cross-entropy training and validation steps shared by the tiny test models."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


class TinyMLP(ClassifierSteps, pl.LightningModule):
    """Linear-ReLU-Linear-ReLU-Linear classifier on random features."""

    def __init__(
        self,
        features: int = 16,
        hidden: int = 32,
        classes: int = 4,
        lr: float = 0.05,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            random_classification(features=self.hparams.features, classes=self.hparams.classes),
            batch_size=16,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            random_classification(n=64, features=self.hparams.features, classes=self.hparams.classes, seed=1),
            batch_size=32,
        )


def trainer(tmp_path: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer writing under ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def ddp_trainer(out: Any, callbacks: list[pl.Callback], strategy: Any = "ddp", **kwargs: Any) -> pl.Trainer:
    """A quiet two-process CPU trainer (gloo) for the scripts under ``tests/scripts``."""
    return trainer(out, callbacks, devices=2, strategy=strategy, **kwargs)
