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

from lightning_compress.functional.distributed import lowest, lowest_each


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


# ---- pruning masks of row-sharded tensors (FSDP2's Shard(0)) equal one process's masks on the full tensors


def _full_problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores of three layers with uneven row counts and different input sizes, and masks from an earlier step."""
    g = torch.Generator().manual_seed(7)
    scores = {
        "a": torch.randn(10, 12, generator=g).abs(),
        "b": torch.randn(7, 12, generator=g).abs(),  # splits 4 + 3 rows
        "c": torch.randn(3, 8, generator=g).abs(),  # splits 2 + 1 rows; channel groups of 8, not 12
    }
    masks = {k: torch.rand(v.shape, generator=g) > 0.2 for k, v in scores.items()}
    return scores, masks


CASES = [  # (structure, scope, sparsity) with the earlier masks shaped for the structure
    ("unstructured", "global", 0.6),
    ("unstructured", "layer", 0.5),
    ("channels", "global", 0.5),
    ("channels", "layer", 0.4),
    ("2:4", "global", 0.3),
    ("2:4", "layer", 0.5),
    ("block:1x4", "global", 0.5),
]


def _masks_for(scores: dict[str, torch.Tensor], old: dict[str, torch.Tensor], case: tuple, group: Any) -> dict:
    from lightning_compress.functional import pruning as P

    spec, scope, level = case
    structure = P.parse_structure(spec)
    # An earlier mask of the right structure: one step of the same update from nothing, at half the level.
    current = P.global_masks(scores, {}, level / 2, structure, group=group) if structure.kind != "unstructured" else old
    if scope == "global":
        return P.global_masks(scores, current, level, structure, group=group)
    return P.layer_masks(scores, current, {k: level for k in scores}, structure, group=group)


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank].clone() if rank < len(t.chunk(world)) else t[:0].clone()


def _pruning_worker(rank: int, init: str, out: str) -> None:
    from lightning_compress.functional.pruning import element_scores

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        scores, old = _full_problem()
        mine = {k: _shard(v, rank, 2) for k, v in scores.items()}
        my_old = {k: _shard(v, rank, 2) for k, v in old.items()}
        results = [_masks_for(mine, my_old, case, dist.group.WORLD) for case in CASES]
        first = 0 if rank == 0 else 4
        drawn = element_scores(
            torch.zeros(3, 5), "random", generator=torch.Generator().manual_seed(1), shard=(torch.Size([7, 5]), first)
        )
        torch.save({"masks": results, "random": drawn}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("ddp")
def test_sharded_pruning_masks_equal_one_process_masks(tmp_path: Any) -> None:
    init = f"file://{os.path.join(tmp_path, 'init')}"
    mp.spawn(_pruning_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    scores, old = _full_problem()
    for case, m0, m1 in zip(CASES, rank0["masks"], rank1["masks"], strict=True):
        expected = _masks_for(scores, old, case, None)
        for name, full in expected.items():
            assert m0[name].shape[0] + m1[name].shape[0] == full.shape[0], (case, name)
            assert torch.equal(torch.cat([m0[name], m1[name]]), full), (case, name)
    # The random criterion: each rank's rows of one full draw.
    full = torch.rand(7, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rank0["random"], full[:3]) and torch.equal(rank1["random"], full[4:7])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(floats, max_size=12), min_size=1, max_size=4), st.integers(-2, 50))
def test_several_tensors_select_what_a_stable_sort_of_their_concatenation_selects(
    parts: list[list[float]], k: int
) -> None:
    tensors = [torch.tensor(p, dtype=torch.float32) for p in parts]
    whole = torch.cat(tensors)
    expected = reference(whole, k)
    got = torch.cat(lowest_each(tensors, k))
    # Ties broken alike: earliest tensor, then lowest index (-0.0 and +0.0 are equal values to both).
    assert torch.equal(got, expected)


def test_selection_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Values are compared in slices; with 3-value slices, ties and the threshold fall across slice edges.
    import lightning_compress.functional.distributed as D

    monkeypatch.setattr(D, "_CHUNK", 3)
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        tensors = [torch.randint(0, 4, (int(n),), generator=g).float() for n in torch.randint(0, 9, (3,), generator=g)]
        whole = torch.cat(tensors)
        k = trial % (whole.numel() + 2)
        assert torch.equal(torch.cat(lowest_each(tensors, k)), reference(whole, k)), (tensors, k)
