"""ONNX export of quantized embeddings (int8 initializers) and the refusal of group-wise scales."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lightning_compress import export_onnx
from lightning_compress.functional.int8 import convert_to_int8
from lightning_compress.functional.qat import prepare_
from tests.functional.test_lowbit import TokenModel, grouped_mlp


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


def test_group_wise_export_refused_nothing_written(tmp_path: Any) -> None:
    pytest.importorskip("onnx")
    model = grouped_mlp()
    prepare_(model, weight_bits=4, group_size=32)
    x = torch.randn(4, 64)
    model.train()
    model(x)
    with pytest.raises(ValueError, match=r"group-wise weight scales yet \(layers \['0', '2'\]\)"):
        export_onnx(model, str(tmp_path / "m.onnx"), x)
    assert list(tmp_path.iterdir()) == []
