"""lightning_compress: compress neural networks while they train, as PyTorch Lightning callbacks."""

from lightning_compress.__about__ import __version__
from lightning_compress.callbacks import CompressionCallback, GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.functional.quantization import convert_to_int8, export_onnx
from lightning_compress.report import CompressionReport

__all__ = [
    "CompressionCallback", "CompressionReport", "GradualPruning", "QuantizationAwareTraining", "__version__",
    "convert_to_int8", "export_onnx",
]
