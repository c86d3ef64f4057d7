"""QuantizationAwareTraining with group-wise weight scales and quantized embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import QuantizationAwareTraining, convert_to_int8
from lightning_compress.functional.int8 import Int8Embedding, Int8Layer
from tests.helpers import TinyMLP, trainer


@pytest.mark.parametrize(
    ("group_size", "match"),
    [
        (0, "group_size must be a positive integer or None, got 0"),
        (-32, "got -32"),
        (32.0, "got 32.0"),
        (True, "got True"),
        ("32", "got '32'"),
    ],
)
def test_bad_group_size_rejected_in_init(group_size: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(group_size=group_size)


def test_group_size_not_dividing_a_layer_refused_in_setup(tmp_path) -> None:
    model = TinyMLP(features=16, hidden=32)  # net.4 has 32 inputs, net.0 has 16
    t = trainer(tmp_path, [QuantizationAwareTraining(weight_bits=4, group_size=32)], max_steps=1)
    with pytest.raises(ValueError, match=r"net\.0 \(16 input features\).*group_size=32 must divide"):
        t.fit(model)
    assert t.global_step == 0 and type(model.net[0]) is nn.Linear


def test_grouped_fit_metrics_convert_and_export(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = TinyMLP(features=16, hidden=32)
    out = tmp_path / "export"
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=None, group_size=16, export_dir=str(out))
    t = trainer(tmp_path, [qat], max_steps=4)
    t.fit(model)
    assert tuple(model.net[0].weight_scale.shape) == (32, 1)
    assert tuple(model.net[2].weight_scale.shape) == (32, 2)
    # Reference size: 4-bit weights, one fp32 scale per [row, group of 16 inputs], fp32 biases.
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    weights = [model.net[i].weight for i in (0, 2, 4)]
    size = fp32 - sum(w.numel() * 4 for w in weights) + sum(w.numel() / 2 + w.numel() / 16 * 4 for w in weights)
    assert float(t.callback_metrics["compress/size_bytes"]) == pytest.approx(size)
    assert qat.last_report is not None and qat.last_report.sections["quantization"]["group_size"] == 16
    int8 = convert_to_int8(model)
    assert all(isinstance(int8.net[i], Int8Layer) and int8.net[i].group_size == 16 for i in (0, 2, 4))
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(int8(x), model(x))
    # export_dir: the PyTorch int8 model and the MatMulNBits ONNX model, which runs in onnxruntime.
    assert (out / "model_int8.pt").exists()
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 3
    session = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], int8(x).numpy(), atol=1e-5)


def test_grouped_export_dir_warns_for_unsupported_onnx(tmp_path) -> None:
    out = tmp_path / "export"
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, group_size=16, export_dir=str(out))
    with pytest.warns(UserWarning, match="MatMulNBits.*input quantized per tensor"):
        trainer(tmp_path, [qat], max_steps=2).fit(TinyMLP(features=16, hidden=32))
    assert sorted(p.name for p in out.iterdir()) == ["model_int8.pt"]


class TokenClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 20, (64, 6), generator=g)
        return DataLoader(TensorDataset(ids, (ids < 10).sum(1).gt(3).long()), batch_size=16)


def test_embedding_only_when_named_in_types(tmp_path) -> None:
    model = TokenClassifier()
    qat = QuantizationAwareTraining()
    trainer(tmp_path, [qat], max_steps=2).fit(model)
    assert type(model.emb) is nn.Embedding
    report = qat.last_report
    assert report is not None
    assert {"layer": "emb", "reason": "Embedding: not quantized (add 'Embedding' to types)"} in report.sections[
        "quantization"
    ]["fp32_layers"]


def test_embedding_qat_fit_convert(tmp_path) -> None:
    model = TokenClassifier()
    qat = QuantizationAwareTraining(weight_bits=4, types=["Embedding", "Linear"], overrides={"head": 8})
    t = trainer(tmp_path, [qat], max_steps=4)
    t.fit(model)
    assert type(model.emb).__name__ == "QATEmbedding" and model.emb.activation_bits is None
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    # embedding: 4-bit codes + one scale per row; head: 8-bit + one scale per output channel
    size = fp32 - (20 * 16 + 2 * 16) * 4 + 20 * 16 / 2 + 20 * 4 + 2 * 16 + 2 * 4
    assert float(t.callback_metrics["compress/size_bytes"]) == pytest.approx(size)
    int8 = convert_to_int8(model)
    assert isinstance(int8.emb, Int8Embedding) and int(int8.emb.weight_int8.abs().max()) <= 7
    ids = torch.randint(0, 20, (3, 6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(int8(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_resume_group_wise_and_embedding_scales_strictly(tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(
            weight_bits=4, activation_bits=None, group_size=8, types=["Embedding", "Linear"]
        )

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [qat(), ckpt_cb], max_steps=3, enable_checkpointing=True).fit(TokenClassifier())
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert tuple(saved["head.weight_scale"].shape) == (2, 2) and tuple(saved["emb.weight_scale"].shape) == (20,)
    resumed = TokenClassifier()
    t = trainer(tmp_path, [qat()], max_steps=4)
    t.fit(resumed, ckpt_path=str(path))
    assert t.global_step == 4 and tuple(resumed.head.weight_scale.shape) == (2, 2)
    # Another group size gives scales of another shape: strict loading refuses the checkpoint.
    other = QuantizationAwareTraining(weight_bits=4, activation_bits=None, group_size=16, types=["Embedding", "Linear"])
    with pytest.raises(RuntimeError, match="weight_scale"):
        trainer(tmp_path, [other], max_steps=5).fit(TokenClassifier(), ckpt_path=str(path))
