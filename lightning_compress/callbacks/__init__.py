"""Lightning-facing callbacks: when, where and how much to compress."""

from lightning_compress.callbacks._coupled import load_shrunk
from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.callbacks.decomposition import TensorDecomposition, load_decomposed
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.callbacks.report import CompressionReporter

__all__ = [
    "CompressionCallback",
    "CompressionReporter",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "TensorDecomposition",
    "load_decomposed",
    "load_shrunk",
]
