"""Int8 ONNX export: int8 initializers, int8 kernels in onnxruntime, outputs within a bound from the scales."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.functional.int8 import Int8Layer, convert_to_int8
from lightning_compress.functional.qat import prepare_
from lightning_compress.inputs import CapturedCall
from tests.functional.test_qat import cnn, mlp

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def session(path: str) -> tuple[object, list[str]]:
    """A one-thread onnxruntime session and the op types of its optimized graph (what really runs)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = path + ".opt.onnx"
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(path + ".opt.onnx").graph.node]


def requantization_bound(layers: list[Int8Layer]) -> float:
    """Largest output difference between onnxruntime and PyTorch for a chain of statically quantized layers.

    Between layers the two differ only in where a value lands on the next layer's input grid: one step
    ``s`` of that grid per re-quantization (rounding of int32 accumulators vs. fp32 rounding), plus half a
    step of ``s_x * s_w`` where onnxruntime rounds the bias to int32. Each layer multiplies an input
    error by at most its largest absolute row sum (ReLU, max-pooling and reshapes do not grow it).
    """
    error = float(layers[0].input_scale)  # the first QuantizeLinear may round differently too
    for i, layer in enumerate(layers):
        w = layer.dequantized_weight().flatten(1)
        error = error * float(w.abs().sum(1).max()) + 0.5 * float(layer.input_scale) * float(layer.weight_scale.max())
        if i + 1 < len(layers):
            error += float(layers[i + 1].input_scale)
    return error


def test_export_static_mlp_int8_kernels_and_bound(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(256, 64)
    fp32_path = str(tmp_path / "fp32.onnx")
    torch.onnx.export(model, (x,), fp32_path, dynamo=False, input_names=["input"])
    prepare_(model)
    model.train()
    model(x)
    model.eval()
    # target_cpu="avx2": 8-bit codes become uint8 with zero point 128 (exact on every x86 CPU).
    path = export_onnx(model, str(tmp_path / "int8.onnx"), x[:1], target_cpu="avx2")
    weights = [i for i in onnx.load(path).graph.initializer if len(i.dims) == 2]
    assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)
    assert os.path.getsize(fp32_path) / os.path.getsize(path) >= 3.3  # biases and scales stay fp32
    sess, ops = session(path)
    assert not any(op in ("Gemm", "FusedGemm", "MatMul") for op in ops), ops  # no fp32 matmul left
    # Two re-quantized QGemm, and the last layer as a QGemm with float output (no output scale).
    assert ops.count("QGemm") == 3, ops
    got = sess.run(None, {"input": x.numpy()})[0]  # dynamic batch: traced with 1 row, run with 256
    int8 = convert_to_int8(model)
    with torch.no_grad():
        expected = int8(x).numpy()
    difference = np.abs(got - expected)
    assert difference.max() <= requantization_bound([int8[0], int8[2], int8[4]]) + 1e-4
    # The same arithmetic: most outputs agree to fp32 precision; the rest saw a value land one grid step
    # apart on some re-quantization (measured: 8% of outputs, worst 0.0012 on outputs up to 0.37).
    assert np.mean(difference <= 1e-5) >= 0.8


def test_export_weight_only_mlp_uses_dynamic_quantization(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(256, 16)
    prepare_(model, activation_bits=None)
    model.train()
    model(x)
    model.eval()
    sess, ops = session(export_onnx(model, str(tmp_path / "w.onnx"), x[:1]))
    assert ops.count("DynamicQuantizeLinear") + ops.count("DynamicQuantizeMatMul") >= 3, ops
    assert not any(op in ("Gemm", "FusedGemm", "MatMul") for op in ops), ops
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    # onnxruntime quantizes each layer's input per call (PyTorch's weight-only model does not): an
    # approximation, so only the decisions are compared.
    assert float((got.argmax(1) == expected.argmax(1)).mean()) >= 0.95


def test_weight_only_linear_on_token_sequences_runs_int8(tmp_path) -> None:
    """``F.linear`` on [batch, tokens, features] exports as MatMul, not Gemm: it must reach int8 kernels too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(4, 10, 16)
    prepare_(model, activation_bits=None)
    model.train()
    model(x)
    model.eval()
    sess, ops = session(export_onnx(model, str(tmp_path / "w.onnx"), x[:1]))
    assert ops.count("DynamicQuantizeMatMul") == 2, ops  # onnxruntime fused our int8 form, as quantize_dynamic's
    assert not any(op in ("Gemm", "FusedGemm", "MatMul", "MatMulNBits") for op in ops), ops
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    # Per-call input quantization (per tensor, 8 bits) against PyTorch's float inputs: within a few
    # percent of the output range on this small net, far from what a transposed or unscaled weight gives.
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_weight_only_inputs_float_keeps_the_pytorch_numbers(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(4, 10, 16)
    x[:, ::5] *= 30  # outlier tokens: per-tensor input rounding would cost the other tokens
    prepare_(model, activation_bits=None)
    model.train()
    model(x)
    model.eval()
    sess, ops = session(export_onnx(model, str(tmp_path / "w.onnx"), x[:1], weight_only_inputs="float"))
    assert not any(op.startswith("DynamicQuantize") or op == "MatMulInteger" for op in ops), ops
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"weight_only_inputs must be one of \['dynamic', 'float'\], got 'int8'"):
        export_onnx(model, str(tmp_path / "bad.onnx"), x[:1], weight_only_inputs="int8")
    assert not (tmp_path / "bad.onnx").exists()


def test_export_conv_with_keyword_inputs_and_captured_call(tmp_path) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = cnn()
            self.extra = nn.Linear(3, 10)

        def forward(self, image: torch.Tensor, *, side: torch.Tensor) -> torch.Tensor:
            return self.body(image) + self.extra(side)

    torch.manual_seed(0)
    model = TwoInputs()
    prepare_(model, fold_bn=True)
    image, side = torch.randn(16, 1, 8, 8), torch.randn(16, 3)
    model.train()
    model(image, side=side)
    model.eval()
    with torch.no_grad():
        expected = model(image, side=side).numpy()
    for name, example in (
        ("dict", {"image": image[:2], "side": side[:2]}),
        ("call", CapturedCall((image[:2],), {"side": side[:2]})),  # positional and keyword at once
    ):
        sess, ops = session(export_onnx(model, str(tmp_path / f"{name}.onnx"), example))
        # Both convs run as int8 QLinearConv: the second one's input Q/DQ was hoisted through MaxPool.
        assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops, ops
        names = [i.name for i in sess.get_inputs()]
        assert names == (["image", "side"] if name == "dict" else ["input", "side"])
        got = sess.run(None, dict(zip(names, (image.numpy(), side.numpy()), strict=True)))[0]
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_export_requires_example_input(tmp_path) -> None:
    model = mlp()
    prepare_(model)
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(model, str(tmp_path / "m.onnx"), None)
    assert not (tmp_path / "m.onnx").exists()


def test_export_weight_storage(tmp_path) -> None:
    model = mlp()
    prepare_(model, weight_bits={"0": 7, "2": 8, "4": 7})
    model.train()
    model(torch.randn(8, 16))

    def dtypes(weight_dtype: str, target_cpu: str = "auto") -> tuple[list[int], dict[str, str]]:
        path = export_onnx(
            model, str(tmp_path / "m.onnx"), torch.randn(1, 16), weight_dtype=weight_dtype, target_cpu=target_cpu
        )
        saved = onnx.load(path)
        metadata = {p.key.removeprefix("lightning_compress."): p.value for p in saved.metadata_props}
        return [i.data_type for i in saved.graph.initializer if len(i.dims) == 2], metadata

    int8, uint8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8
    assert dtypes("int8")[0] == [int8, int8, int8]
    assert dtypes("uint8")[0] == [uint8, uint8, uint8]
    # No VNNI: 7-bit codes fit the 16-bit sums of the signed kernels, 8-bit ones are stored uint8.
    stored, metadata = dtypes("auto", "avx2")
    assert sorted(stored) == sorted([int8, uint8, int8])
    assert metadata["target_cpu"] == "avx2" and "saturate" in metadata["storage_reason"]
    stored, metadata = dtypes("auto", "vnni")  # 32-bit accumulation: int8 everywhere
    assert stored == [int8, int8, int8] and metadata["weight_storage"] == "int8"
    # "auto" follows this machine's flags, read here independently of the library.
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("needs /proc/cpuinfo to check the automatic choice")
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    stored, metadata = dtypes("auto")
    has_vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    assert metadata["target_cpu"] == ("vnni" if has_vnni else "avx2")
    assert stored == [int8, int8, int8] if has_vnni else sorted(stored) == sorted([int8, uint8, int8])
    for bad in ({"weight_dtype": "int4"}, {"target_cpu": "avx512"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            export_onnx(model, str(tmp_path / "x.onnx"), torch.randn(1, 16), **bad)
        assert not (tmp_path / "x.onnx").exists()


def test_conv1d_prepare_convert_export(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4)
    )
    prepare_(model, fold_bn=True)
    x = torch.randn(32, 3, 12)
    model.train()
    model(x)
    model.eval()
    int8 = convert_to_int8(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(int8(x), expected, atol=1e-4, rtol=1e-4)
    sess, _ = session(export_onnx(model, str(tmp_path / "c1.onnx"), x[:1]))
    got = sess.run(None, {"input": x.numpy()})[0]
    bound = requantization_bound([int8[0], int8[4]])
    assert np.abs(got - expected.numpy()).max() <= bound + 1e-4
