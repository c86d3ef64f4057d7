"""Lightning-facing callbacks: when, where and how much to compress."""

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.callbacks.decomposition import TensorDecomposition, load_decomposed
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.pruning import GradualPruning

__all__ = ["CompressionCallback", "GradualPruning", "KnowledgeDistillation", "TensorDecomposition", "load_decomposed"]
