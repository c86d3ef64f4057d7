import lightning.pytorch as lp
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import lightning_compress
from lightning_compress import lightning as unified
from lightning_compress.functional.stats import sparsity


class Unified(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        return torch.utils.data.DataLoader(data, batch_size=16)


def fit(tmp_path, callbacks: list, **kwargs) -> tuple[Unified, lp.Trainer]:
    model = Unified()
    trainer = lp.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model)
    return model, trainer


@pytest.mark.parametrize("name", unified.__all__)
def test_every_callback_has_a_unified_twin(name: str) -> None:
    twin = getattr(unified, name)
    assert issubclass(twin, lp.Callback) and issubclass(twin, pl.Callback)
    assert issubclass(twin, getattr(lightning_compress, name))


def test_unified_trainer_runs_pruning_and_qat_together(tmp_path) -> None:
    pruning = unified.GradualPruning(0.5, end_step=4, update_every_n_steps=1)
    qat = unified.QuantizationAwareTraining(start_step=1)
    model, trainer = fit(tmp_path, [pruning, qat])
    weights = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
    assert sparsity(weights) == pytest.approx(0.5, abs=0.01)
    assert trainer.callback_metrics["compress/sparsity"] == pytest.approx(0.5, abs=0.01)
    assert trainer.callback_metrics["compress/weight_bits"] == 8
    assert (tmp_path / "compression_report.json").exists()


def test_unified_trainer_runs_distillation_and_decomposition(tmp_path) -> None:
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    kd = unified.KnowledgeDistillation(teacher=teacher)
    decomposition = unified.TensorDecomposition(rank=2, include=["net.0"], min_reduction=1.0, measure_latency=False)
    model, trainer = fit(tmp_path, [kd, decomposition], log_every_n_steps=1)
    assert "compress/distill_loss" in trainer.callback_metrics
    assert isinstance(model.net[0], nn.Sequential)
