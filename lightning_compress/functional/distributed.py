"""Exact selections over tensors sharded across processes (FSDP2 DTensors), without gathering them.

A global magnitude threshold needs only the global k-th value, not the weights: a bisection over the
float32 bit patterns finds it with 32 all-reduces of one integer each, whatever the model size. Ties at
the threshold are broken by (rank, local index), so the result equals selecting the ``k`` lowest of all
ranks' values concatenated in rank order — the selection a single process would make on the full
tensor when each rank holds consecutive rows (FSDP2's ``Shard(0)``). The same bisection selects over
several tensors at once (:func:`lowest_each`) without concatenating them, which is how a global ranking
stays within one bool per weight of extra memory on one process too.

Every function here is a collective when a process group is given: every rank must call it.

Example::

    >>> import torch
    >>> values = torch.tensor([0.5, -1.0, 2.0, 0.5, 3.0])
    >>> lowest(values, 3).tolist()  # one process: the 3 lowest, ties to the lower index
    [True, True, False, True, False]
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch build without distributed support: nothing can be a DTensor

    class DTensor:  # type: ignore[no-redef]
        """Placeholder: no tensor is an instance of it."""

    Shard = None  # type: ignore[assignment,misc]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def active(group: Any) -> bool:
    """Whether ``group`` is a process group of more than one process (``None``: one process, no collective)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter, gradient or optimizer state)."""
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of ``tensor`` (the tensor itself when it is not a DTensor), detached.

    The result shares storage with the parameter: an in-place change to it changes the DTensor (measured
    for FSDP2's ``Shard(0)`` parameters, gradients and optimizer state). No communication.
    """
    if isinstance(tensor, DTensor):
        with torch.no_grad():  # to_local() of a parameter would otherwise record an autograd node
            return tensor.to_local()
    return tensor.detach()


def row_sharded_group(tensor: torch.Tensor) -> Any:
    """The process group ``tensor`` is split over by rows (a 1-D mesh, ``Shard(0)``); ``None`` when it is not a DTensor.

    Raises:
        ValueError: for any other DTensor layout (tensor parallelism, 2-D meshes, replicated DTensors),
            naming the placements received and the one accepted.
    """
    if not isinstance(tensor, DTensor):
        return None
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"expected a DTensor sharded by rows over one mesh dimension (placements (Shard(dim=0),), as "
            f"fully_shard makes it), got placements {placements} on a {mesh.ndim}-D mesh."
        )
    return mesh.get_group()


def rank(group: Any) -> int:
    """The rank of this process in ``group`` (0 without a group)."""
    return dist.get_rank(group) if active(group) else 0


def collective_device(group: Any, device: torch.device | str | None = None) -> torch.device:
    """Where the small tensors of a collective over ``group`` must live: ``device`` when given.

    Otherwise the CPU when the group's backend takes CPU tensors (gloo, mpi, or a mixed ``"cpu:gloo,cuda:nccl"``
    group), the current CUDA device for NCCL, which refuses CPU tensors.
    """
    if device is not None:
        return torch.device(device)
    backend = str(dist.get_backend(group)).lower()
    if any(name in backend for name in ("gloo", "mpi")) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_ints(values: Sequence[int], group: Any, device: torch.device | str | None = None) -> list[int]:
    """Element-wise sum of ``values`` over the ranks of ``group``: one all-reduce for all of them.

    With ``group=None`` (or one process) returns ``values`` unchanged. A collective otherwise, through a tensor
    on ``device`` (by default the one the group's backend accepts, see :func:`collective_device`).
    """
    if not active(group) or not values:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=collective_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [int(v) for v in t]


def sum_floats(values: Sequence[float], group: Any, device: torch.device | str | None = None) -> list[float]:
    """Element-wise float64 sum of ``values`` over the ranks of ``group`` (one all-reduce). A collective."""
    if not active(group) or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(v) for v in t]


def gather_ints(values: Sequence[int], group: Any, device: torch.device | str | None = None) -> list[list[int]]:
    """Every rank's ``values`` (same length on all ranks), in rank order. A collective."""
    if not active(group):
        return [[int(v) for v in values]]
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=collective_device(group, device))
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [[int(v) for v in t] for t in out]


def gather_rows(values: torch.Tensor, group: Any) -> tuple[torch.Tensor, int]:
    """All ranks' 1-D ``values`` concatenated in rank order, and where this rank's part starts. A collective.

    For small per-group summaries (one score per channel), not for weights: every rank receives all of it.
    Lengths may differ between ranks (uneven shards, empty shards).
    """
    flat = values.reshape(-1)
    if not active(group):
        return flat, 0
    sizes = [row[0] for row in gather_ints([flat.numel()], group, flat.device)]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def rank_of_max(value: float, group: Any, device: torch.device | str | None = None) -> tuple[int, float]:
    """The lowest rank of ``group`` holding the largest ``value``, and that value. A collective.

    Without a group: ``(0, value)``.
    """
    if not active(group):
        return 0, float(value)
    mine = torch.tensor([value], dtype=torch.float64, device=collective_device(group, device))
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    values = [float(t) for t in out]
    best = max(values)
    return values.index(best), best


def _key(value: float) -> int:
    """The order-preserving integer key of a float32 value (see :func:`_value`)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", value))
    # Negative floats order backwards in their bit pattern: flip their magnitude bits.
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _value(key: int) -> float:
    """The float32 value of an integer key: keys order as the floats do (``-inf`` lowest, ``+inf`` highest)."""
    (value,) = struct.unpack("<f", struct.pack("<i", key ^ 0x7FFFFFFF if key < 0 else key))
    return value


def _global_sum(value: int, group: Any, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t)


_KEY_RANGE = (_key(-math.inf), _key(math.inf))  # no NaN key lies between these


# Comparisons run on slices of this many values: their bool temporaries stay small (1 MiB) and in cache.
_CHUNK = 2**20


def _chunks(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return values.reshape(-1).split(_CHUNK)


def lowest(values: torch.Tensor, k: int, group: Any = None) -> torch.Tensor:
    """Boolean selector of this rank's share of the ``k`` lowest values over every rank's ``values``.

    Args:
        values: this rank's values (any shape, also empty; no NaN).
        k: how many to select over all ranks together (clamped to ``[0, total]``).
        group: the process group the values are sharded over; ``None`` (or one process) selects locally.

    Returns:
        A bool tensor shaped like ``values``: ``True`` for the selected entries held here.
    """
    return lowest_each([values], k, group)[0]


def lowest_each(values: Sequence[torch.Tensor], k: int, group: Any = None) -> list[torch.Tensor]:
    """The ``k`` lowest entries over several tensors (and every rank's share of them), without concatenating them.

    Selecting over the concatenation would copy every value once more (and a sort or ``kthvalue`` several
    times); a bisection on the threshold only counts, tensor by tensor: about 32 passes, each holding one
    bool temporary of one tensor. Ties at the threshold go to the lowest rank, then the earliest tensor in
    ``values``, then the lowest index: on one process exactly what a stable sort of the concatenation
    selects.

    Args:
        values: this rank's tensors (any shapes, also empty; no NaN).
        k: how many to select over all tensors and ranks together (clamped to ``[0, total]``).
        group: the process group the values are sharded over; ``None`` (or one process) selects locally.

    Returns:
        One bool tensor per entry of ``values``, shaped like it: ``True`` for the selected entries.

    Example::

        >>> a, b = torch.tensor([0.3, 0.1]), torch.tensor([[0.2, 0.1], [5.0, -1.0]])
        >>> [t.int().tolist() for t in lowest_each([a, b], 2)]  # -1.0, then the tied 0.1 of the first tensor
        [[0, 1], [[0, 0], [0, 1]]]
    """
    if not values:
        return []
    sharded = active(group)
    device = values[0].device
    # Float32 comparisons are exact for float32 / float16 / bfloat16 scores; others are converted.
    values = [v.detach() if v.dtype == torch.float32 else v.detach().float() for v in values]

    def count(select: Callable[[torch.Tensor], torch.Tensor]) -> int:
        mine = sum(int(torch.count_nonzero(select(c))) for v in values for c in _chunks(v))
        return _global_sum(mine, group, device) if sharded else mine

    total = sum(v.numel() for v in values)
    total = _global_sum(total, group, device) if sharded else total
    k = max(0, min(k, total))
    if k == 0:
        return [torch.zeros_like(v, dtype=torch.bool) for v in values]
    # Smallest key t with count(values <= value(t)) >= k: the k-th lowest value. Compared as floats, so no
    # tensor of keys is ever built.
    lo, hi = _KEY_RANGE
    while lo < hi:
        mid = (lo + hi) // 2
        threshold = _value(mid)
        if count(lambda v: v <= threshold) >= k:  # noqa: B023 (used right away)
            hi = mid
        else:
            lo = mid + 1
    threshold = _value(lo)
    need = k - count(lambda v: v < threshold)
    ties = [sum(int(torch.count_nonzero(c == threshold)) for c in _chunks(v)) for v in values]
    if sharded:
        # Ties go to the lowest ranks first: skip what the ranks before this one hold.
        before = sum(row[0] for row in gather_ints([sum(ties)], group, device)[: dist.get_rank(group)])
        need = max(0, need - before)
    out = []
    for v, tied in zip(values, ties, strict=True):
        chosen = v < threshold
        take = min(need, tied)
        _select_first_ties(chosen, v, threshold, take)
        need -= take
        out.append(chosen)
    return out


def _select_first_ties(chosen: torch.Tensor, values: torch.Tensor, threshold: float, take: int) -> None:
    """Mark the first ``take`` entries of ``values`` equal to ``threshold`` (index order) in ``chosen``."""
    flat, start = chosen.view(-1), 0
    for c in _chunks(values):
        if take <= 0:
            return
        here = (c == threshold).nonzero().flatten()[:take]
        flat[here + start] = True
        take -= here.numel()
        start += c.numel()
