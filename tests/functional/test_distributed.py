"""Exact k-lowest selection across processes, checked against a stable sort of all values together."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.functional.distributed import lowest


def reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest by a stable float64 sort (ties to the lower index)."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[values.double().argsort(stable=True)[: max(0, min(k, values.numel()))]] = True
    return chosen


floats = st.floats(allow_nan=False, width=32) | st.sampled_from([0.0, -0.5, 0.5, float("inf"), float("-inf")])


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, max_size=40), st.integers(-2, 45))
def test_one_process_equals_a_stable_sort(values: list[float], k: int) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    expected = reference(t, k)
    got = lowest(t, k)
    # Equal values may be -0.0 and +0.0; compare what was selected, by value and count.
    assert int(got.sum()) == int(expected.sum())
    assert sorted(t[got].tolist()) == sorted(t[expected].tolist())


KS = [0, 1, 7, 12, 20]


def _worker(rank: int, init: str, shards: list[torch.Tensor], out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(shards))
    try:
        torch.save([lowest(shards[rank], k, group=dist.group.WORLD) for k in KS], f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("ddp")
def test_two_processes_select_what_one_process_selects_on_the_whole(tmp_path: Any) -> None:
    # Heavy ties (0.5 on both ranks), already-pruned (-inf) and protected (+inf) entries, an uneven split.
    whole = torch.tensor(
        [0.5, -float("inf"), 2.0, 0.5, 0.1, float("inf"), 0.5, 3.0, 0.5, -1.0]
        + [0.5, 0.2, 0.5, 4.0, 0.5, 0.5, 1.0, 0.0, 0.5, float("inf")]
    )
    shards = [whole[:7].clone(), whole[7:].clone()]
    init = f"file://{os.path.join(tmp_path, 'init')}"
    mp.spawn(_worker, args=(init, shards, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    for k, a, b in zip(KS, rank0, rank1, strict=True):
        assert torch.equal(torch.cat([a, b]), reference(whole, k)), k
