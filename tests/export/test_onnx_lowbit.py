"""ONNX export of 4-bit group-wise Linear layers (onnxruntime's MatMulNBits) and of quantized embeddings."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.functional.int8 import convert_to_int8, pack_nbits
from lightning_compress.functional.qat import prepare_
from tests.functional.test_lowbit import TokenModel, grouped_mlp


def test_pack_nbits_by_hand() -> None:
    codes = torch.tensor([[-7, 7, 0, 1, -1, 3]], dtype=torch.int8)
    # +8: [1, 15, 8, 9, 7, 11]; low nibble first: 1 + 15*16, 8 + 9*16, 7 + 11*16
    assert pack_nbits(codes, 4).tolist() == [[241, 152, 183]]
    # 2 bits, zero point 2: [-1, 1, 0, 0, 1] -> [1, 3, 2, 2, 3] + padding 2, 2, 2
    assert pack_nbits(torch.tensor([[-1, 1, 0, 0, 1]], dtype=torch.int8), 2).tolist() == [
        [1 + 3 * 4 + 2 * 16 + 2 * 64, 3 + 2 * 4 + 2 * 16 + 2 * 64]
    ]


def test_group_wise_4bit_exports_as_matmul_nbits(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256, bias=False))
    prepare_(model, weight_bits=4, activation_bits=None, group_size=32)
    x = torch.randn(8, 256)
    model.train()
    model(x)
    int8 = convert_to_int8(model)
    path = export_onnx(int8, str(tmp_path / "m.onnx"), x)
    graph = onnx.load(path).graph
    assert [(n.op_type, n.domain) for n in graph.node if n.op_type == "MatMulNBits"] == [
        ("MatMulNBits", "com.microsoft")
    ] * 2
    node = next(n for n in graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"K": 256, "N": 512, "bits": 4, "block_size": 32, "accuracy_level": 0}  # fp32 compute
    # No fp32 copy of a weight: fp32 initializers are the scales and the bias only.
    floats = sorted(int(np.prod(i.dims)) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert floats == sorted([512 * 8, 512, 256 * 16])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = torch.randn(5, 256)  # another batch size: the batch dim is dynamic
    got = session.run(None, {"input": x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, int8(x2).numpy(), atol=1e-5, rtol=1e-5)
    # Size: 4 bits per weight + one fp32 scale per 32 weights (5 bits per weight) + fp32 bias + headers.
    weights = 256 * 512 * 2
    expected = weights * 5 // 8 + 512 * 4
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    size = os.path.getsize(path)
    assert expected <= size < expected * 1.05 + 4096
    assert fp32 / size > 6


def test_int8_embedding_exports_as_int8_gather(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = TokenModel()
    prepare_(model, weight_bits=4, activation_bits=8, modules=["emb", "head"])
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids)
    int8 = convert_to_int8(model)
    path = export_onnx(int8, str(tmp_path / "m.onnx"), ids)
    graph = onnx.load(path).graph
    table = next(i for i in graph.initializer if i.name == "emb.weight_int8")
    assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [10, 8]
    assert not any(list(i.dims) == [10, 8] and i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": ids.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, int8(ids).numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(weight_bits=4, activation_bits=8, group_size=32), "input quantized per tensor"),
        (dict(weight_bits=3, activation_bits=None, group_size=32), "weight_bits=3"),
        (dict(weight_bits=4, activation_bits=None, group_size=8), "group_size=8"),
    ],
)
def test_unsupported_group_wise_export_refused_nothing_written(tmp_path: Any, kwargs: dict, problem: str) -> None:
    pytest.importorskip("onnx")
    model = grouped_mlp()
    prepare_(model, **kwargs)
    x = torch.randn(4, 64)
    model.train()
    model(x)
    with pytest.raises(ValueError, match=rf"not supported yet for \{{'0': '{problem}.*Nothing was written"):
        export_onnx(model, str(tmp_path / "m.onnx"), x)
    assert list(tmp_path.iterdir()) == []


def _token_mlp(bits: int, group_size: int | None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    prepare_(model, weight_bits=bits, group_size=group_size, activation_granularity="token")
    x = torch.randn(2, 5, 64)
    model.train()
    model(x)
    return convert_to_int8(model.eval()), x


def test_per_token_int8_exports_as_integer_matmuls(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    int8, x = _token_mlp(8, None)
    path = export_onnx(int8, str(tmp_path / "m.onnx"), x)
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 2 and not {"MatMul", "Gemm", "QGemm", "DequantizeLinear"} & set(ops)
    # Weights stay int8 (transposed for MatMulInteger); no widened copy of the codes is stored.
    weights = sorted(list(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8)
    assert weights == [[64, 128], [128, 64]]
    assert max(int(np.prod(i.dims)) for i in graph.initializer if i.data_type != onnx.TensorProto.INT8) <= 128
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 5, 64) * 3  # another batch, another range: every row is quantized at run time
    got = session.run(None, {"input": x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, int8(x2).numpy(), atol=1e-5, rtol=1e-5)


def test_per_token_4bit_exports_as_matmul_nbits_with_int8_compute(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    int8, x = _token_mlp(4, 32)
    path = export_onnx(int8, str(tmp_path / "m.onnx"), x)
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 5, 64)
    got = torch.from_numpy(session.run(None, {"input": x2.numpy()})[0]).double()
    # onnxruntime quantizes the input itself (symmetric int8 per row and block of 32 inputs), PyTorch per
    # token: each input error is at most half its step, so the first layer's outputs differ by at most
    # sum_k |W_nk| (s_token / 2 + amax_block / 254). Checked on the first layer alone, where it is exact.
    first = int8[0]
    rows = x2.reshape(-1, 64).double()
    s_token = (rows.amax(1).clamp(min=0) - rows.amin(1).clamp(max=0)) / 255
    s_block = rows.reshape(-1, 2, 32).abs().amax(2) / 127
    per_input = s_token[:, None] / 2 + s_block.repeat_interleave(32, 1) / 2
    bound = per_input @ first.dequantized_weight().double().abs().t()
    head = nn.Sequential(*list(int8)[:1])
    path1 = export_onnx(head, str(tmp_path / "first.onnx"), x)
    got1 = torch.from_numpy(ort.InferenceSession(path1).run(None, {"input": x2.numpy()})[0]).double().reshape(-1, 128)
    with torch.no_grad():
        ref1 = head(x2).double().reshape(-1, 128)
    assert bool(((got1 - ref1).abs() <= bound + 1e-5).all())
    assert float((got1 - ref1).abs().max()) > 0  # int8 compute really ran (fp32 compute would match exactly)
    with torch.no_grad():
        np.testing.assert_allclose(got.numpy(), int8(x2).double().numpy(), atol=0.05)


def test_per_token_export_below_opset_15_refused_nothing_written(tmp_path: Any) -> None:
    pytest.importorskip("onnx")
    int8, x = _token_mlp(8, None)
    with pytest.raises(ValueError, match=r"per-token layers \['0', '2'\] need opset_version >= 15.*got 13"):
        export_onnx(int8, str(tmp_path / "m.onnx"), x, opset_version=13)
    assert list(tmp_path.iterdir()) == []
