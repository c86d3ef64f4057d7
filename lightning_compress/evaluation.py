"""Run a LightningModule's own ``validation_step`` outside Lightning's loop and collect what it logs.

Used where Lightning's validation loop cannot run or must not: inside ``fit``'s hooks (``trainer.validate``
is refused there, and re-entering the loop would call every callback's validation hooks and log to the
loggers) and in the sensitivity sweep, which evaluates hundreds of variants of one model.

``self.log`` is redirected into a local collector for the duration of the call: a logged tensor is
averaged over batches weighted by its ``batch_size`` (Lightning's epoch-level default; the size is
inferred from the batch when not given), a logged torchmetrics ``Metric`` is computed once at the end and
reset. Nothing reaches loggers or callbacks.

Example::

    >>> import torch, pytorch_lightning as pl
    >>> class Mean(pl.LightningModule):
    ...     def validation_step(self, batch, batch_idx):
    ...         self.log("value", batch.float().mean())
    >>> validation_metrics(Mean(), [[torch.tensor([1, 3]), torch.tensor([5, 7])]])
    {'value': 4.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


def validation_metrics(
    pl_module: pl.LightningModule,
    dataloaders: Sequence[Iterable[Any]],
    *,
    limits: Sequence[float] | None = None,
    to_device: Callable[[Any], Any] | None = None,
    replacement: nn.Module | None = None,
) -> dict[str, float]:
    """``{metric: value}`` logged by ``pl_module.validation_step`` over ``dataloaders``, in eval mode, no grad.

    Args:
        pl_module: the LightningModule whose ``validation_step`` runs.
        dataloaders: one iterable of batches per validation dataloader.
        limits: the number of batches to take from each (default: all).
        to_device: moves a batch to the model's device (default: as it is).
        replacement: evaluate this module's children in place of ``pl_module``'s own (e.g. those of
            ``convert_to_int8(pl_module)``), swapped in for the duration of the call.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    current_size = [0]

    def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        from torchmetrics import Metric

        if isinstance(value, Metric):
            metrics[name] = value
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                log(k, v, batch_size=batch_size)
            return
        size = float(batch_size or current_size[0] or 1)
        sums[name] = sums.get(name, 0.0) + float(value) * size
        weights[name] = weights.get(name, 0.0) + size

    original_children: dict[str, nn.Module] = {}
    device = pl_module.device
    was_training = pl_module.training
    saved_log = vars(pl_module).get("log")
    try:
        if replacement is not None:
            for child_name, child in replacement.named_children():
                original_children[child_name] = getattr(pl_module, child_name)
                setattr(pl_module, child_name, child.to(device))
        pl_module.eval()
        pl_module.log = log  # type: ignore[method-assign]
        with torch.no_grad():
            for dl_idx, loader in enumerate(dataloaders):
                limit = limits[dl_idx] if limits is not None and dl_idx < len(limits) else math.inf
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = to_device(batch) if to_device is not None else batch
                    current_size[0] = batch_size_of(batch)
                    if len(dataloaders) > 1:
                        pl_module.validation_step(batch, batch_idx, dl_idx)
                    else:
                        pl_module.validation_step(batch, batch_idx)
        out = {k: sums[k] / weights[k] for k in sums if weights[k]}
        for name, metric in metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        return out
    finally:
        if saved_log is not None:
            pl_module.log = saved_log  # type: ignore[method-assign]
        else:
            vars(pl_module).pop("log", None)
        for child_name, child in original_children.items():
            setattr(pl_module, child_name, child)
        pl_module.train(was_training)


def batch_size_of(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch`` (0 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            size = batch_size_of(item)
            if size:
                return size
    return 0
