"""Compression statistics as pure functions: counts, sparsity, bytes and FLOPs.

Sparsity is counted from the actual zeros in the tensors, never from a mask the code believes in,
so the numbers describe the model a user will ship.

Sharded parameters (FSDP2 DTensors) are counted where they live: each rank counts its shard and one
all-reduce adds the counts up, so no rank ever holds the whole model. Those counts are collectives:
every rank must call them, in the same order.

Example::

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]))
    >>> sparsity(layer.weight)
    0.625
    >>> s = layer_stats(layer)
    >>> (s.params, s.nonzeros, s.dense_bytes, s.sparse_bytes)
    (8, 3, 32, 13)
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.functional import distributed as D


def count_nonzeros(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Number of nonzero entries of each tensor; of the whole tensor for a DTensor.

    Row-sharded DTensors (FSDP2) are counted per shard and summed with one all-reduce for all of them
    (a collective: every rank calls it with the same tensors); other DTensor layouts fall back to
    DTensor's own reduction, one collective each. Plain tensors need no communication.
    """
    counts: list[int] = []
    groups: list[tuple[Any, list[int]]] = []  # (process group, indices counted per shard), in first-seen order
    for i, t in enumerate(tensors):
        if not D.is_dtensor(t):
            counts.append(int(torch.count_nonzero(t.detach())))
            continue
        try:
            group = D.row_sharded_group(t)
        except ValueError:  # tensor parallel or replicated layouts: let DTensor reduce it
            counts.append(int((t.detach() != 0).sum().full_tensor()))
            continue
        counts.append(int(torch.count_nonzero(D.local(t))))
        for known, indices in groups:
            if known is group:
                indices.append(i)
                break
        else:
            groups.append((group, [i]))
    for group, indices in groups:
        device = D.local(tensors[indices[0]]).device
        for i, total in zip(indices, D.sum_ints([counts[i] for i in indices], group, device), strict=True):
            counts[i] = total
    return counts


def count_nonzero(tensor: torch.Tensor) -> int:
    """Number of nonzero entries (of the whole tensor for a DTensor: a collective, see :func:`count_nonzeros`)."""
    return count_nonzeros([tensor])[0]


def sparsity(tensor: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero (0.0 for an empty tensor)."""
    numel = tensor.numel()
    return 0.0 if numel == 0 else 1.0 - count_nonzero(tensor) / numel


def global_sparsity(tensors: Iterable[torch.Tensor]) -> float:
    """Zero fraction over several tensors taken together (weighted by their sizes)."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    return 0.0 if total == 0 else (total - sum(count_nonzeros(tensors))) / total


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 / tensor parallel): its tensors live on several ranks."""
    return any(D.is_dtensor(p) for p in model.parameters())


def bytes_at(numel: int, bits: float) -> int:
    """Bytes needed for ``numel`` values of ``bits`` bits, rounded up to whole bytes."""
    return math.ceil(numel * bits / 8)


def sparse_bytes(numel: int, nonzeros: int, bits: float = 32) -> int:
    """Bytes of a bitmap-compressed tensor: one bit per entry plus the nonzero values.

    This is the size a sparse encoding actually reaches (it beats CSR's 32-bit indices above
    ~3% density), and it is what ``compress/size_bytes`` reports for pruned weights when it is smaller
    than dense storage.
    """
    return min(bytes_at(numel, bits), bytes_at(numel, 1) + bytes_at(nonzeros, bits))


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one module's own parameters (not its children's)."""

    name: str
    type: str
    params: int
    nonzeros: int
    bits: float = 32.0

    @property
    def sparsity(self) -> float:  # noqa: D102
        return 0.0 if self.params == 0 else 1.0 - self.nonzeros / self.params

    @property
    def dense_bytes(self) -> int:
        """Bytes at fp32."""
        return bytes_at(self.params, 32)

    @property
    def sparse_bytes(self) -> int:
        """Bytes at ``bits`` with bitmap sparse encoding when that is smaller."""
        return sparse_bytes(self.params, self.nonzeros, self.bits)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON, with the derived columns."""
        return {
            **asdict(self),
            "sparsity": self.sparsity,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
        }


def layer_stats(module: nn.Module, name: str = "", bits: float = 32.0, skip: Iterable[torch.Tensor] = ()) -> LayerStats:
    """Statistics of the parameters ``module`` owns directly, except those in ``skip`` (counted elsewhere)."""
    skipped = {id(p) for p in skip}
    params = [p for p in module.parameters(recurse=False) if id(p) not in skipped]
    return LayerStats(
        name=name,
        type=type(module).__name__,
        params=sum(p.numel() for p in params),
        nonzeros=sum(count_nonzeros(params)),
        bits=bits,
    )


def model_stats(model: nn.Module, bits: Mapping[str, float] | None = None) -> list[LayerStats]:
    """Per-module statistics for every module owning parameters; ``bits`` maps module name to bit width.

    A tied parameter (one tensor owned by two modules) is counted once, with the first module that owns it.
    Sharded parameters are counted with one all-reduce for the whole model (every rank must call this).
    """
    bits = bits or {}
    seen: set[int] = set()
    owned: list[tuple[str, nn.Module, list[torch.Tensor]]] = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        owned.append((name, m, [p for p in own if id(p) not in seen]))
        seen.update(id(p) for p in own)
    counts = iter(count_nonzeros([p for _, _, params in owned for p in params]))
    return [
        LayerStats(
            name=name,
            type=type(m).__name__,
            params=sum(p.numel() for p in params),
            nonzeros=sum(next(counts) for _ in params),
            bits=bits.get(name, 32.0),
        )
        for name, m, params in owned
    ]


def serialized_bytes(obj: Any) -> int:
    """Bytes that ``torch.save(obj)`` writes: the size on disk, measured rather than estimated."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def module_flops(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    """FLOPs of one forward pass per module (qualified name; ``""`` is the whole model).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as
    two FLOPs. Parent modules include their children.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    # FlopCounterMode calls the whole run "Global" and names modules "<RootClass>.<qualified name>";
    # the bare "<RootClass>" entry repeats the whole model.
    out: dict[str, int] = {}
    for key, by_op in counts.items():
        if key == "Global":
            out[""] = int(sum(by_op.values()))
        elif "." in key:
            out[key.split(".", 1)[1]] = int(sum(by_op.values()))
    return out


def effective_flops(flops: Mapping[str, int], layers: Iterable[LayerStats]) -> int:
    """Whole-model FLOPs when each layer's multiply-adds scale with its weight density.

    This is what a sparse kernel could skip; dense kernels still pay ``flops[""]``.
    """
    total = flops.get("", 0)
    for layer in layers:
        if layer.name in flops and layer.params:
            total -= round(flops[layer.name] * layer.sparsity)
    return total
