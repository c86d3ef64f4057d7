"""A small, download-free task for examples, tests and benchmarks: scikit-learn's bundled digits.

``load_digits`` ships inside scikit-learn (1,797 8x8 grey images, 10 classes), so everything here runs
offline. Install with ``pip install "lightning-compress[examples]"``.

Example::

    >>> import torch
    >>> model = DigitsCNN()
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as ``[N, 1, 8, 8]`` float images in ``[0, 1]``; a fixed 80/20 split.

    Args:
        batch_size: training and validation batch size.
        seed: seed of the train/validation split.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:  # noqa: D102
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        cut = int(0.8 * len(y))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return DataLoader(self.val_set, batch_size=256)


class DigitsCNN(pl.LightningModule):
    """A small CNN for 8x8 digits (two 3x3 convs with BatchNorm, then a classifier).

    It is an ordinary LightningModule: the compression callbacks need nothing from it.

    Args:
        width: channels of the first conv (the second has twice as many).
        hidden: width of the hidden Linear layer.
        lr: Adam learning rate.
    """

    def __init__(self, width: int = 32, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.head(self.features(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: D102
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
