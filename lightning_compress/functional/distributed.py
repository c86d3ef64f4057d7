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

from typing import Any

import torch
import torch.distributed as dist

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _active(group: Any) -> bool:
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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
    sharded = _active(group)

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
