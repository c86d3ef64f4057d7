"""Writing compressed models in deployment formats (ONNX). Needs the ``[onnx]`` extra at call time."""

from lightning_compress.export.onnx import export_onnx

__all__ = ["export_onnx"]
