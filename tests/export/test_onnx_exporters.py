"""export_onnx(exporter=...): the dynamo exporter gives the same int8 kernels; "auto" falls back only on failure."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_compress import export_onnx
from lightning_compress.functional.qat import calibrate_, prepare_
from tests.export.test_int8_graph import FLOAT_MATMULS, optimized_ops
from tests.zoo.hf import hf_gpt2
from tests.zoo.resnet import BasicBlock, ResNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
# One worker: the dynamo exporter's first call in a process builds its operator registry (seconds).
pytestmark = pytest.mark.xdist_group("onnx_dynamo")


def exporter_used(path: str) -> str:
    return next(p.value for p in onnx.load(path).metadata_props if p.key == "lightning_compress.exporter")


def test_dynamo_graph_runs_the_same_int8_kernels_as_legacy(tmp_path) -> None:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1], [4])  # stem conv-BN-ReLU-maxpool, one residual block, avg-pool, fc
    x = torch.randn(16, 3, 16, 16)
    prepare_(model, fold_bn=True)
    calibrate_(model, [x])
    model.eval()
    outputs, kernels = {}, {}
    for exporter in ("legacy", "dynamo"):
        path = export_onnx(model, str(tmp_path / f"{exporter}.onnx"), x[:1], exporter=exporter, target_cpu="vnni")
        assert exporter_used(path) == exporter
        sess, ops = optimized_ops(path)
        outputs[exporter] = sess.run(None, {"input": x.numpy()})[0]
        kernels[exporter] = {k: v for k, v in ops.items() if k.startswith("QLinear") or k in ("QGemm", "NhwcMaxPool")}
        assert not [op for op in FLOAT_MATMULS if ops[op]], (exporter, ops)
    # Counted by hand: 3 convs, 1 residual add, 1 average pool, 1 linear, 1 max-pool.
    expected = {"QLinearConv": 3, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1, "QGemm": 1, "NhwcMaxPool": 1}
    assert kernels["legacy"] == kernels["dynamo"] == expected
    np.testing.assert_allclose(outputs["dynamo"], outputs["legacy"], rtol=0, atol=1e-6)


def test_auto_exports_gpt2_with_dynamo_where_legacy_fails(tmp_path) -> None:
    case = hf_gpt2()
    model = case.module.eval()
    model.model.config.use_cache = False  # the packed-sequence check runs torch.diff: aten::diff in legacy
    x = case.example_input
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    prepare_(model, modules=layers)
    calibrate_(model, [x])
    model.eval()
    legacy_path = tmp_path / "legacy.onnx"
    with pytest.raises(Exception, match="aten::diff"):
        export_onnx(model, str(legacy_path), x, exporter="legacy")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, str(tmp_path / "auto.onnx"), x)
    assert any("legacy (TorchScript) exporter failed" in str(w.message) for w in caught)
    assert exporter_used(path) == "dynamo"
    sess, ops = optimized_ops(path)
    assert ops["MatMulIntegerToFloat"] == len(layers) == 8, ops  # every Conv1D runs an int8 matmul
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def test_exporter_argument_is_checked_before_anything_is_written(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    prepare_(model)
    with pytest.raises(ValueError, match=r"exporter must be one of \['auto', 'dynamo', 'legacy'\], got 'torchscript'"):
        export_onnx(model, str(tmp_path / "m.onnx"), torch.zeros(1, 4), exporter="torchscript")
    with pytest.raises(ValueError, match="opset >= 18, got opset_version=17"):
        export_onnx(model, str(tmp_path / "m.onnx"), torch.zeros(1, 4), exporter="dynamo", opset_version=17)
    assert not list(tmp_path.iterdir())
