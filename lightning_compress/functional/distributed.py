"""Exact selections over tensors sharded across processes (FSDP2 DTensors), without gathering them.

A global magnitude threshold needs only the global k-th value, not the weights: a bisection over the
float32 bit patterns finds it with 32 all-reduces of one integer each, whatever the model size. Ties at
the threshold are broken by (rank, local index), so the result equals selecting the ``k`` lowest of all
ranks' values concatenated in rank order — the selection a single process would make on the full
tensor when each rank holds consecutive rows (FSDP2's ``Shard(0)``).

Every function here is a collective when a process group is given: every rank must call it.

Example::

    >>> import torch
    >>> values = torch.tensor([0.5, -1.0, 2.0, 0.5, 3.0])
    >>> lowest(values, 3).tolist()  # one process: the 3 lowest, ties to the lower index
    [True, True, False, True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
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


def sum_ints(values: Sequence[int], group: Any) -> list[int]:
    """Element-wise sum of ``values`` over the ranks of ``group``: one all-reduce for all of them.

    With ``group=None`` (or one process) returns ``values`` unchanged. A collective otherwise.
    """
    if not active(group) or not values:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [int(v) for v in t]


def sum_floats(values: Sequence[float], group: Any) -> list[float]:
    """Element-wise float64 sum of ``values`` over the ranks of ``group`` (one all-reduce). A collective."""
    if not active(group) or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(v) for v in t]


def gather_ints(values: Sequence[int], group: Any) -> list[list[int]]:
    """Every rank's ``values`` (same length on all ranks), in rank order. A collective."""
    if not active(group):
        return [[int(v) for v in values]]
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64)
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
    sizes = [row[0] for row in gather_ints([flat.numel()], group)]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def rank_of_max(value: float, group: Any) -> tuple[int, float]:
    """The lowest rank of ``group`` holding the largest ``value``, and that value. A collective.

    Without a group: ``(0, value)``.
    """
    if not active(group):
        return 0, float(value)
    mine = torch.tensor([value], dtype=torch.float64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    values = [float(t) for t in out]
    best = max(values)
    return values.index(best), best


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float32 ``values`` (-inf lowest, +inf highest; NaN not allowed)."""
    bits = values.detach().float().contiguous().view(torch.int32).long()
    # Negative floats order backwards in their bit pattern: flip their magnitude bits.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _global_sum(value: int, group: Any, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t)


def lowest(values: torch.Tensor, k: int, group: Any = None) -> torch.Tensor:
    """Boolean selector of this rank's share of the ``k`` lowest values over every rank's ``values``.

    Args:
        values: this rank's values (1-D; any length, also 0).
        k: how many to select over all ranks together (clamped to ``[0, total]``).
        group: the process group the values are sharded over; ``None`` (or one process) selects locally.

    Returns:
        A bool tensor shaped like ``values``: ``True`` for the selected entries held here.
    """
    keys = _ordered_keys(values.reshape(-1))
    device = keys.device
    sharded = active(group)

    def count(condition: torch.Tensor) -> int:
        local = int(condition.sum())
        return _global_sum(local, group, device) if sharded else local

    total = count(torch.ones_like(keys, dtype=torch.bool))
    k = max(0, min(k, total))
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    # Smallest key t with count(keys <= t) >= k: the k-th lowest value.
    lo, hi = _INT32_MIN, _INT32_MAX
    while lo < hi:
        mid = (lo + hi) // 2
        if count(keys <= mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    below = keys < lo
    ties = keys == lo
    need = k - count(below)
    local_ties = int(ties.sum())
    if sharded:
        # Ties go to the lowest ranks first, then to the lowest local index.
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, torch.tensor([local_ties], dtype=torch.int64, device=device), group=group)
        before = sum(int(c) for c in counts[: dist.get_rank(group)])
        need = max(0, min(need - before, local_ties))
    chosen = below.clone()
    chosen[ties.nonzero().flatten()[:need]] = True
    return chosen.reshape(values.shape)
