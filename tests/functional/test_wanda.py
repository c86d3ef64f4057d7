"""Activation-aware (Wanda) scores and the input statistics they use, against loops in float64."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_compress.functional.activation_stats import InputNorms
from lightning_compress.functional.pruning import wanda_scores


def test_input_norms_of_a_linear_and_a_conv_equal_the_definition() -> None:
    linear, conv = nn.Linear(5, 3), nn.Conv2d(4, 2, 3, padding=1)
    norms = InputNorms({"linear": linear, "conv": conv})
    tokens = [torch.randn(2, 7, 5), torch.randn(3, 5)]  # two calls: sequences, then plain rows
    images = torch.randn(2, 4, 6, 6)
    for x in tokens:
        linear(x)
    conv(images)
    got = norms.norms()
    every_token = torch.cat([t.reshape(-1, 5) for t in tokens]).double()
    for j in range(5):
        assert abs(float(got["linear"][j]) - float(every_token[:, j].pow(2).sum().sqrt())) < 1e-5
    for c in range(4):
        assert abs(float(got["conv"][c]) - float(images[:, c].double().pow(2).sum().sqrt())) < 1e-4
    norms.reset()
    assert norms.missing() == ["linear", "conv"]
    norms.remove()
    linear(tokens[1])
    assert norms.missing() == ["linear", "conv"]  # hooks gone


def test_multihead_attention_out_proj_is_never_called_so_it_is_reported_missing() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    norms = InputNorms({"out_proj": mha.out_proj})
    x = torch.randn(2, 3, 8)
    mha(x, x, x)
    assert norms.missing() == ["out_proj"]


def reference(weight: torch.Tensor, norms: torch.Tensor, groups: int) -> torch.Tensor:
    out, in_per_group = weight.shape[:2]
    scores = torch.empty(weight.shape, dtype=torch.float64)
    for o in range(out):
        for c in range(in_per_group):
            channel = (o // (out // groups)) * in_per_group + c
            scores[o, c] = weight[o, c].double().abs() * float(norms[channel])
    return scores


def test_wanda_scores_for_linear_grouped_conv_and_transposed_linear() -> None:
    torch.manual_seed(0)
    linear = torch.randn(3, 5)
    norms5 = torch.rand(5) * 4
    assert torch.allclose(wanda_scores(linear, norms5).double(), reference(linear, norms5, 1))
    grouped = torch.randn(6, 2, 3, 3)  # Conv2d(4, 6, 3, groups=2): 2 input channels per group
    norms4 = torch.rand(4) * 4
    assert torch.allclose(wanda_scores(grouped, norms4, groups=2).double(), reference(grouped, norms4, 2))
    depthwise = torch.randn(4, 1, 3, 3)  # each filter reads its own channel
    assert torch.allclose(wanda_scores(depthwise, norms4, groups=4).double(), reference(depthwise, norms4, 4))
    conv1d_weight = linear.t().contiguous()  # Hugging Face Conv1D stores [in, out]
    got = wanda_scores(conv1d_weight, norms5, input_axis=0)
    assert torch.allclose(got.t().double(), reference(linear, norms5, 1))


def _rank_batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(20 + rank)
    return [torch.randn(3, 4, generator=g) for _ in range(2)]


def _uneven_norms_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        a, b = nn.Linear(4, 4), nn.Linear(4, 2)
        norms = InputNorms({"a": a, "b": b, "never": nn.Linear(4, 4)})
        for x in _rank_batches(rank):
            a(x)
            if rank == 0:  # b runs on rank 0 only (data-dependent control flow)
                b(x)
        norms.all_reduce_()
        torch.save({"norms": norms.norms(), "missing": norms.missing()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("ddp")
def test_layers_seen_on_some_ranks_only_are_summed_over_all(tmp_path: Any) -> None:
    init = f"file://{os.path.join(tmp_path, 'init')}"
    context = mp.spawn(_uneven_norms_worker, args=(init, str(tmp_path)), nprocs=2, join=False)
    for _ in range(120):  # mismatched collectives would hang: give up after a minute
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two processes did not finish")
    everything = torch.cat(_rank_batches(0) + _rank_batches(1)).double()
    rank0 = torch.cat(_rank_batches(0)).double()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(result["norms"]["a"].double(), everything.pow(2).sum(0).sqrt(), rtol=1e-6, atol=0)
        torch.testing.assert_close(result["norms"]["b"].double(), rank0.pow(2).sum(0).sqrt(), rtol=1e-6, atol=0)
        assert result["missing"] == ["never"]
