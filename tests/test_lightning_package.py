import lightning.pytorch as lp
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.stats import sparsity
from lightning_compress.lightning import GradualPruning


class Unified(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        return torch.utils.data.DataLoader(data, batch_size=16)


def test_unified_lightning_trainer_accepts_and_runs_the_callbacks(tmp_path) -> None:
    pruning = GradualPruning(0.5, end_step=4, update_every_n_steps=1)
    assert isinstance(pruning, lp.Callback) and isinstance(pruning, pl.Callback)
    model = Unified()
    trainer = lp.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert sparsity(torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])) == pytest.approx(
        0.5, abs=0.01
    )
    assert trainer.callback_metrics["compress/sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "compression_report.json").exists()
