"""lightning_compress: compress neural networks while they train, as PyTorch Lightning callbacks."""

from lightning_compress.__about__ import __version__
from lightning_compress.callbacks import (
    CompressionCallback,
    CompressionReporter,
    GradualPruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    TensorDecomposition,
    load_decomposed,
    load_shrunk,
)
from lightning_compress.export.onnx import export_onnx
from lightning_compress.functional.compressed import load_compressed, save_compressed
from lightning_compress.functional.int8 import convert_to_int8
from lightning_compress.functional.int8_compile import compile_int8
from lightning_compress.functional.sparse import load_sparse, save_sparse
from lightning_compress.report import CompressionReport

__all__ = [
    "CompressionCallback",
    "CompressionReporter",
    "CompressionReport",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "TensorDecomposition",
    "__version__",
    "compile_int8",
    "convert_to_int8",
    "export_onnx",
    "load_compressed",
    "load_decomposed",
    "load_shrunk",
    "load_sparse",
    "save_compressed",
    "save_sparse",
]
