from typing import Any

import lightning.pytorch as lp
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn

import lightning_compress
from lightning_compress import lightning as unified


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


def public_callbacks() -> list[str]:
    """The expectation, taken from the main package (not from the module under test): every public callback."""
    names = {
        name
        for module in (lightning_compress, lightning_compress.callbacks)
        for name in module.__all__
        if isinstance(getattr(module, name), type)
        and issubclass(getattr(module, name), pl.Callback)
        and getattr(module, name) is not lightning_compress.CompressionCallback
    }
    return sorted(names)


# The smallest valid arguments of each callback, so that a CLI can build it.
INIT_ARGS: dict[str, dict[str, Any]] = {"KnowledgeDistillation": {"teacher": "self"}}


def test_public_callbacks_are_the_four_techniques_and_the_reporter() -> None:
    assert public_callbacks() == [
        "CompressionReporter",
        "GradualPruning",
        "KnowledgeDistillation",
        "QuantizationAwareTraining",
        "TensorDecomposition",
    ]
    assert sorted(unified.__all__) == public_callbacks()  # no twin missing, none extra


def cli_with(class_path: str, name: str) -> LightningCLI:
    config = {
        "trainer": {
            "callbacks": [{"class_path": class_path, "init_args": INIT_ARGS.get(name, {})}],
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        }
    }
    return LightningCLI(Unified, args=config, run=False, save_config_callback=None)


@pytest.mark.parametrize("name", public_callbacks())
def test_every_public_callback_has_a_twin_that_lightning_pytorch_accepts(name: str) -> None:
    original = getattr(lightning_compress, name)
    twin = getattr(unified, name, None)
    assert twin is not None, f"lightning_compress.lightning has no {name}"
    assert issubclass(twin, lp.Callback) and issubclass(twin, original)
    # lightning.pytorch's CLI builds the twin from its class_path ...
    cli = cli_with(f"lightning_compress.lightning.{name}", name)
    built = [cb for cb in cli.trainer.callbacks if isinstance(cb, original)]
    assert len(built) == 1 and type(built[0]) is twin and isinstance(built[0], lp.Callback)
    # ... and refuses the pytorch_lightning class, which is why the twin exists.
    with pytest.raises(SystemExit):
        cli_with(f"lightning_compress.{name}", name)


def test_unified_trainer_runs_pruning_and_qat_together(tmp_path) -> None:
    pruning = unified.GradualPruning(0.5, end_step=4, update_every_n_steps=1)
    qat = unified.QuantizationAwareTraining(start_step=1)
    model, trainer = fit(tmp_path, [pruning, qat])
    weights = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
    assert int((weights == 0).sum()) == 80  # half of 16 x 8 + 2 x 16
    assert float(trainer.callback_metrics["compress/sparsity"]) == 0.5
    assert trainer.callback_metrics["compress/weight_bits"] == 8
    assert (tmp_path / "compression_report.json").exists()


def test_unified_trainer_runs_distillation_and_decomposition(tmp_path) -> None:
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    kd = unified.KnowledgeDistillation(teacher=teacher)
    decomposition = unified.TensorDecomposition(rank=2, include=["net.0"], min_reduction=1.0, measure_latency=False)
    model, trainer = fit(tmp_path, [kd, decomposition], log_every_n_steps=1)
    assert "compress/distill_loss" in trainer.callback_metrics
    assert isinstance(model.net[0], nn.Sequential)
