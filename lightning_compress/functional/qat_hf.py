"""QAT class for Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``.

A module of its own because defining the class imports ``transformers``;
:func:`lightning_compress.functional.qat.qat_class` imports it only when a model has such a layer.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from lightning_compress.functional.qat import _QATMixin


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Conv1D.forward with the given weight: x @ weight + bias over the last dim.
    out = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[1])


class QATConv1D(_QATMixin, Conv1D):
    """``transformers`` ``Conv1D`` with fake-quantized input and weight, one scale per output column."""

    weight_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._qat_forward(x, _conv1d)
