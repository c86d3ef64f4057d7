"""lightning_compress: compress neural networks while they train, as PyTorch Lightning callbacks."""

from lightning_compress.__about__ import __version__
from lightning_compress.callbacks import (
    CompressionCallback,
    GradualPruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    TensorDecomposition,
    load_decomposed,
    load_shrunk,
)
from lightning_compress.functional.quantization import convert_to_int8, export_onnx
from lightning_compress.functional.sparse import load_sparse, save_sparse
from lightning_compress.report import CompressionReport

__all__ = [
    "CompressionCallback",
    "CompressionReport",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "TensorDecomposition",
    "__version__",
    "convert_to_int8",
    "export_onnx",
    "load_decomposed",
    "load_shrunk",
    "load_sparse",
    "save_sparse",
]
