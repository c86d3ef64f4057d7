"""``lightning_compress.functional.quantization`` is the namespace the README documents: it re-exports."""

from __future__ import annotations

import lightning_compress
from lightning_compress.export import onnx as onnx_export
from lightning_compress.functional import fake_quant, int8, qat, quantization


def test_documented_names_are_the_implementations() -> None:
    for module in (fake_quant, int8, qat):
        for name in quantization.__all__:
            if hasattr(module, name) and not name.startswith("_"):
                assert getattr(quantization, name) is getattr(module, name), name
    assert quantization.export_onnx is onnx_export.export_onnx is lightning_compress.export_onnx
    assert quantization.convert_to_int8 is int8.convert_to_int8 is lightning_compress.convert_to_int8
    for name in ("prepare_", "calibrate_", "finalize_", "convert_to_int8", "export_onnx", "Int8Layer"):
        assert name in quantization.__all__
