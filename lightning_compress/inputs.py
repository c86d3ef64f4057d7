"""The model-input convention, in one place: what a forward call looks like to every part of the package.

Lightning's ``example_input_array`` is a tensor (one positional input), a tuple/list (positional
inputs) or a dict (keyword inputs). A forward call recorded by a hook may have both. Everything that
*runs* the user's model on an example (FLOPs, latency, export) turns its input into a
:class:`CapturedCall` with :func:`as_call` and runs it with :func:`run`, so keyword-only inputs
(``forward(x, *, mask)``) reach the model everywhere alike.

Example::

    >>> import torch
    >>> call = as_call({"x": torch.zeros(2)})
    >>> call.args, list(call.kwargs)
    ((), ['x'])
    >>> as_call((torch.zeros(1), torch.ones(1))).kwargs
    {}
    >>> run(lambda x, *, scale: x * scale, CapturedCall((torch.ones(1),), {"scale": torch.tensor(3.0)}))
    tensor([3.])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from lightning_utilities.core.apply_func import apply_to_collection


class CapturedCall(NamedTuple):
    """Positional and keyword arguments of one forward call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def as_call(example_input: Any) -> CapturedCall:
    """Lightning's ``example_input_array`` convention: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_input, CapturedCall):
        return example_input
    if isinstance(example_input, Mapping):
        return CapturedCall((), dict(example_input))
    if isinstance(example_input, list | tuple):
        return CapturedCall(tuple(example_input), {})
    return CapturedCall((example_input,), {})


def first_sample(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CapturedCall:
    """A detached copy of the call with every batched tensor cut to its first sample (for FLOPs / export)."""

    def first(t: torch.Tensor) -> torch.Tensor:
        return t[:1].detach().clone() if t.dim() > 0 else t.detach().clone()

    return CapturedCall(
        apply_to_collection(args, torch.Tensor, first), apply_to_collection(kwargs, torch.Tensor, first)
    )


def to_device(example_input: Any, device: torch.device | str) -> CapturedCall:
    """``example_input`` as a :class:`CapturedCall` with every tensor on ``device``."""
    call = as_call(example_input)
    return CapturedCall(
        apply_to_collection(call.args, torch.Tensor, torch.Tensor.to, device),
        apply_to_collection(call.kwargs, torch.Tensor, torch.Tensor.to, device),
    )


def run(model: Callable[..., Any], example_input: Any) -> Any:
    """Call ``model`` on ``example_input`` (any form :func:`as_call` accepts)."""
    call = as_call(example_input)
    return model(*call.args, **call.kwargs)
