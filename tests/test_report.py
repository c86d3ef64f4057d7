import json

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import CompressionReport, GradualPruning
from lightning_compress.report import CapturedCall, as_call
from tests.helpers import trainer


class TwoInputs(pl.LightningModule):
    """forward(x, *, mask=...): positional and keyword inputs, no example_input_array."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * gate)

    def training_step(self, batch, batch_idx):
        x, g, y = batch
        return nn.functional.cross_entropy(self(x, gate=g), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.ones(32, 8), torch.randint(0, 2, (32,)))
        return torch.utils.data.DataLoader(data, batch_size=8)


def test_flops_counted_on_captured_positional_and_keyword_inputs(tmp_path) -> None:
    pruning = GradualPruning(0.5, end_step=2, update_every_n_steps=1)
    trainer(tmp_path, [pruning], max_epochs=1).fit(TwoInputs())
    with open(tmp_path / "compression_report.json") as fh:
        report = json.load(fh)
    # one sample: 2 * (6*8 + 8*2) FLOPs for the two matmuls
    assert report["summary"]["flops"] == 2 * (6 * 8 + 8 * 2)
    # half the weights are zero; biases stay, so a little over half the multiply-adds remain
    assert report["summary"]["flops"] // 2 <= report["summary"]["effective_flops"] < report["summary"]["flops"]
    assert pruning.last_report is not None and pruning.last_report.summary["sparsity"] > 0


def test_example_input_conventions() -> None:
    x = torch.zeros(1)
    assert as_call(x) == CapturedCall((x,), {})
    assert as_call((x, x)).args == (x, x)
    assert as_call({"x": x}).kwargs == {"x": x}


def test_report_renders_and_writes_atomically(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
    report = CompressionReport.from_model(
        model, bits={"1": 8}, sections={"demo": {"note": "x", "rows": [{"a": 1, "b": 2.5}]}}
    )
    assert report.summary["nonzero_params"] == 4 + 10
    layer1 = next(layer for layer in report.layers if layer.name == "1")
    assert layer1.bits == 8 and layer1.sparse_bytes == 10  # 10 params at 8 bits
    md = report.to_markdown()
    assert "| 0 | Linear | 20 | 4 | 80.00% |" in md and "## demo" in md and "| 1 | 2.5 |" in md
    json_path, md_path = report.write(tmp_path / "out")
    with open(json_path) as fh:
        assert json.load(fh)["sections"]["demo"]["note"] == "x"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compression_report.json", "compression_report.md"]
