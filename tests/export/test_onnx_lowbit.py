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
    assert attrs == {"K": 256, "N": 512, "bits": 4, "block_size": 32}
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
        (dict(weight_bits=4, activation_bits=8, group_size=32), "quantized input"),
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
