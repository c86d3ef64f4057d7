"""Input statistics of layers, recorded with forward pre-hooks: what activation-aware pruning scores need.

Wanda (Sun et al. 2023) scores a weight ``W[i, j]`` by ``|W[i, j]| * ||X_j||_2``, the magnitude times the
L2 norm of input feature ``j`` over every token (every sample, position and pixel) the layer saw. This
module accumulates ``sum(X_j ** 2)`` per input feature between mask updates; the norms are its square
roots. The sums add up across processes (``all_reduce``), so every rank scores alike.

The hooks see a layer's inputs only when the layer itself is called: a module that reads a child's weight
directly (``nn.MultiheadAttention`` and its ``out_proj``) never calls it, and its statistics stay empty —
:meth:`InputNorms.missing` names such layers so a caller can refuse them.

Example::

    >>> import torch
    >>> from torch import nn

from lightning_compress.functional.distributed import collective_device
    >>> layer = nn.Linear(3, 2)
    >>> norms = InputNorms({"fc": layer})
    >>> _ = layer(torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 1.0]]))
    >>> norms.norms()["fc"].tolist()
    [5.0, 0.0, 1.4142135381698608]
    >>> norms.remove()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress.functional.distributed import collective_device


def input_feature_axis(module: nn.Module) -> int:
    """The axis of a layer's input that holds its input features: 1 for convolutions (``[N, C, ...]``), -1 else."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def squared_input_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sum(x_j ** 2)`` over every position of ``x`` for each input feature ``j`` of ``module``, in float32."""
    axis = input_feature_axis(module)
    features = x.detach().float().movedim(axis, -1)
    return features.reshape(-1, features.shape[-1]).pow(2).sum(dim=0)


class InputNorms:
    """Accumulates the per-feature input norms of named layers while they run and ``armed`` is true.

    Which forwards count is the caller's decision, not the module's ``training`` flag: Lightning leaves a
    model passed to ``fit`` in eval mode as it is, so a training-mode rule would silently see nothing there.

    Args:
        layers: ``{name: module}`` to watch.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]
        self._names = list(layers)
        self.armed = True  # e.g. a callback arms it for training batches only (not validation)

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            if not self.armed or not args or not isinstance(args[0], torch.Tensor):
                return
            if torch.compiler.is_compiling():
                return
            sums = squared_input_sums(module, args[0])
            previous = self._sums.get(name)
            self._sums[name] = sums if previous is None else previous.add_(sums)

        return record

    def missing(self) -> list[str]:
        """Watched layers that have not been called since the last :meth:`reset`."""
        return [n for n in self._names if n not in self._sums]

    def all_reduce_(self, group: Any = None) -> None:
        """Add up the sums of every process (a collective: every rank calls it).

        A layer may run on some ranks and not on others (data-dependent control flow): the feature counts
        are agreed first (a MAX over ranks), so every rank reduces the same tensors in the same order,
        contributing zeros for layers it did not see. Layers no rank saw stay :meth:`missing`.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            return
        device = collective_device(group, next((t.device for t in self._sums.values()), None))
        sizes = torch.tensor([self._sums[n].numel() if n in self._sums else 0 for n in self._names], device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        seen = [(n, int(k)) for n, k in zip(self._names, sizes.tolist(), strict=True) if k > 0]
        if not seen:
            return
        flat = torch.cat([self._sums[n] if n in self._sums else torch.zeros(k, device=device) for n, k in seen])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for (name, _), part in zip(seen, flat.split([k for _, k in seen]), strict=True):
            self._sums[name] = part

    def norms(self) -> dict[str, torch.Tensor]:
        """``{name: ||X_j||_2 per input feature}`` since the last :meth:`reset`."""
        return {name: sums.sqrt() for name, sums in self._sums.items()}

    def reset(self) -> None:
        """Forget what was recorded (after a mask update: the next one scores on fresh activations)."""
        self._sums = {}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
