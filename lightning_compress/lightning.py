"""The callbacks for the unified ``lightning`` package (``import lightning as L``).

``pytorch_lightning`` and ``lightning.pytorch`` define different ``Callback`` classes, and each
Trainer accepts only its own. The classes in :mod:`lightning_compress` are built on
``pytorch_lightning``; the ones here are the same callbacks, also registered as
``lightning.pytorch.Callback`` so that ``lightning.pytorch.Trainer`` and ``lightning.pytorch.cli``
accept them. Use them in YAML as ``class_path: lightning_compress.lightning.GradualPruning``.

Requires the ``lightning`` package (``pip install lightning``).

Example::

    >>> import lightning.pytorch as lp
    >>> from lightning_compress.lightning import GradualPruning
    >>> trainer = lp.Trainer(callbacks=[GradualPruning(0.5)], logger=False, enable_checkpointing=False)
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback as _Callback

from lightning_compress import callbacks as _callbacks


class GradualPruning(_callbacks.GradualPruning, _Callback):  # noqa: D101
    __doc__ = _callbacks.GradualPruning.__doc__


class QuantizationAwareTraining(_callbacks.QuantizationAwareTraining, _Callback):  # noqa: D101
    __doc__ = _callbacks.QuantizationAwareTraining.__doc__


class KnowledgeDistillation(_callbacks.KnowledgeDistillation, _Callback):  # noqa: D101
    __doc__ = _callbacks.KnowledgeDistillation.__doc__


class TensorDecomposition(_callbacks.TensorDecomposition, _Callback):  # noqa: D101
    __doc__ = _callbacks.TensorDecomposition.__doc__


class CompressionReporter(_callbacks.CompressionReporter, _Callback):  # noqa: D101
    __doc__ = _callbacks.CompressionReporter.__doc__


__all__ = [
    "CompressionReporter",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "TensorDecomposition",
]
