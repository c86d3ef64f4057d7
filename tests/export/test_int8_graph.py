"""Whole networks in int8 in onnxruntime: count the kernels of the optimized graph, not the ONNX file's."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from lightning_compress import convert_to_int8, export_onnx
from lightning_compress.functional.qat import calibrate_, prepare_
from tests.functional.test_qat import cnn
from tests.zoo.mobilenet import MobileNetV3
from tests.zoo.resnet import BasicBlock, Bottleneck, ResNet

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FLOAT_MATMULS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def optimized_ops(path: str) -> tuple[object, Counter]:
    """A session and the op types onnxruntime really runs (its optimized graph, saved to disk)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = path + ".opt.onnx"
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess, Counter(n.op_type for n in onnx.load(path + ".opt.onnx").graph.node)


def quantized(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    prepare_(model, fold_bn=True)
    calibrate_(model, [x])
    return model


# (model, input, residual adds, average pools) counted by hand from the zoo definitions
CASES = {
    "digits_cnn": (cnn, (1, 8, 8), 0, 0),
    "resnet_basic": (lambda: ResNet(BasicBlock, [2, 1, 1], [8, 16, 32]), (3, 16, 16), 4, 1),
    "resnet_bottleneck": (lambda: ResNet(Bottleneck, [1, 1], [4, 8]), (3, 16, 16), 2, 1),
    "mobilenet_v3": (MobileNetV3, (3, 16, 16), 2, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_whole_network_runs_int8_kernels(name: str, tmp_path) -> None:
    build, shape, adds, pools = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(32, *shape)
    quantized(model, x)
    sess, ops = optimized_ops(export_onnx(model, str(tmp_path / "m.onnx"), x[:1], target_cpu="vnni"))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # Every conv and linear layer runs an int8 kernel; none is left in fp32.
    assert not [op for op in FLOAT_MATMULS if ops[op]], ops
    assert ops["QLinearConv"] == convs, ops
    assert ops["QGemm"] == linears, ops
    assert ops["QLinearAdd"] == adds and ops["QLinearGlobalAveragePool"] == pools, ops
    assert not ops["BatchNormalization"], ops
    if name.startswith(("digits", "resnet")):
        # Max-pooling on uint8 (the NHWC int8 kernel); nothing is dequantized between the first Q and the head.
        assert ops["NhwcMaxPool"] == 1 and not ops["MaxPool"], ops
        assert not ops["DequantizeLinear"], ops
    else:
        # Hardswish / Hardsigmoid / the squeeze-excite product are fp32 islands between int8 layers.
        assert ops["HardSigmoid"] and ops["DequantizeLinear"], ops
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = convert_to_int8(model)(x).numpy()
    # The int8 graph differs from the fake-quantized model only by int32 rounding of re-quantizations and
    # by the residual branches reading the quantized copy of their input (half a step of its scale).
    assert float(np.mean(got.argmax(1) == expected.argmax(1))) >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max() + 1e-6


def test_bad_example_input_is_named_and_nothing_is_written(tmp_path) -> None:
    model = quantized(cnn(), torch.randn(8, 1, 8, 8))
    with pytest.raises(
        ValueError, match=r"cannot run example_input \(positional \[\(1, 3, 8, 8\)\].*Nothing was written"
    ):
        export_onnx(model, str(tmp_path / "m.onnx"), torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    model = quantized(cnn(), torch.randn(8, 1, 8, 8))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed half-way")

    monkeypatch.setattr("lightning_compress.export.onnx._rewrite", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        export_onnx(model, str(path), torch.randn(1, 1, 8, 8))
    assert os.listdir(tmp_path) == ["m.onnx"] and path.read_bytes() == b"previous model"
