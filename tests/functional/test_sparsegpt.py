"""SparseGPT-style reconstruction against float64 references computed here, independently of the code."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_compress.functional.sparsegpt import sparsegpt_prune_, sparsegpt_weight, stages


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with unequal feature scales and strong correlations: where reconstruction should pay."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, features // 2, generator=g, dtype=torch.float64)
    mix = torch.randn(features // 2, features, generator=g, dtype=torch.float64)
    # Scales in shuffled order: SparseGPT prunes the same share of every column block, so scales sorted by
    # column would force half of the large-scale columns out (a known property of the method, not a bug).
    scales = torch.logspace(-1, 1, features, dtype=torch.float64)[torch.randperm(features, generator=g)]
    return (base @ mix + 0.1 * torch.randn(n, features, generator=g, dtype=torch.float64)) * scales


def _layer(out: int, features: int, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out, bias=False).double()


def _error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


def _lowest_per_group(score: torch.Tensor, drop: int, group: int) -> torch.Tensor:
    """Keep-mask dropping the ``drop`` lowest scores of every run of ``group`` along each row (a plain loop)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        for c in range(0, score.shape[1], group):
            order = sorted(range(c, c + group), key=lambda j: float(score[r, j]))
            for j in order[:drop]:
                keep[r, j] = False
    return keep


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_reconstruction_error_is_at_most_that_of_magnitude_and_wanda_masks(structure: str) -> None:
    x = _correlated_inputs(256, 32)
    layer = _layer(8, 32)
    w = layer.weight.detach().clone()
    masks = sparsegpt_prune_(layer, [x], 0.5, structure=structure, block_size=16)
    w_hat = layer.weight.detach()
    feature_norms = x.pow(2).sum(0).sqrt()
    if structure == "unstructured":
        magnitude = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values  # layer-wide half
        wanda = _lowest_per_group(w.abs() * feature_norms, 16, 32)  # Wanda compares within each output row
    else:
        magnitude = _lowest_per_group(w.abs(), 2, 4)
        wanda = _lowest_per_group(w.abs() * feature_norms, 2, 4)
    assert int(masks["weight"].sum()) == int(magnitude.sum()) == int(wanda.sum()) == w.numel() // 2
    ours = _error(w_hat, w, x)
    assert ours <= _error(w * magnitude, w, x)
    assert ours <= _error(w * wanda, w, x)
    assert bool((w_hat[~masks["weight"]] == 0).all())


def test_two_four_pattern_is_exact_and_pruned_weights_are_exactly_zero() -> None:
    layer = nn.Linear(64, 16)
    x = torch.randn(4, 10, 64)  # tokens of sequences: every position counts
    masks = sparsegpt_prune_(layer, [x, x[:2]], 0.5, structure="2:4", block_size=32)
    keep = masks["weight"]
    assert keep.shape == layer.weight.shape
    assert keep.reshape(16, 16, 4).sum(-1).eq(2).all()
    assert bool((layer.weight[~keep] == 0).all()) and bool((layer.weight[keep] != 0).all())


def test_pruning_the_first_column_is_the_obs_closed_form() -> None:
    x = _correlated_inputs(64, 6, seed=3)
    w = torch.tensor([[1e-4, 0.9, -1.1, 0.7, 1.3, -0.8], [-2e-4, -1.2, 0.6, 1.0, -0.9, 1.4]], dtype=torch.float64)
    h = 2 * x.T @ x / 64
    new, keep = sparsegpt_weight(w, h, 2 / 12, block_size=6, damp=0.01)
    # OBS (Hassibi & Stork): removing w_q moves the row by δ = -w_q / [H⁻¹]_qq · H⁻¹[q, :].
    hinv = torch.linalg.inv(h + 0.01 * torch.diag(h).mean() * torch.eye(6, dtype=torch.float64))
    expected = w - w[:, :1] / hinv[0, 0] * hinv[0:1, :]
    assert keep[:, 0].eq(False).all() and keep[:, 1:].all()
    assert torch.allclose(new, expected, atol=1e-12, rtol=0)
    assert bool((new[:, 0] == 0).all())


def test_pruning_the_last_column_changes_no_other_weight() -> None:
    x = _correlated_inputs(64, 6, seed=4)
    w = torch.tensor([[0.9, -1.1, 0.7, 1.3, -0.8, 1e-4]], dtype=torch.float64)
    new, keep = sparsegpt_weight(w, 2 * x.T @ x / 64, 1 / 6, block_size=6, damp=0.01)
    assert keep.tolist() == [[True] * 5 + [False]]
    assert torch.equal(new[:, :5], w[:, :5]) and new[0, 5] == 0


@torch.no_grad()
def test_a_model_is_pruned_stage_by_stage_and_beats_magnitude_on_its_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24), nn.GELU(), nn.Linear(24, 8)).double()
    x = _correlated_inputs(128, 24, seed=5)
    dense = model(x)
    magnitude = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    for w in magnitude:
        w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    reference = copy.deepcopy(model)  # independent of the model pruned below
    masks = sparsegpt_prune_(model, [x[:64], x[64:]], 0.5, block_size=8)
    assert sorted(masks) == ["0.weight", "2.weight", "4.weight"]
    assert all(int(m.sum()) == m.numel() // 2 for m in masks.values())
    ours = float((model(x) - dense).norm())
    for layer, w in zip([m for m in reference if isinstance(m, nn.Linear)], magnitude, strict=True):
        layer.weight.data.copy_(w)
    assert ours < float((reference(x) - dense).norm())
    assert model.training  # mode restored


def test_stages_group_numbered_blocks() -> None:
    assert stages(["wte", "h.0.attn.q", "h.0.mlp.fc", "h.1.attn.q", "lm_head"]) == [
        ["wte"],
        ["h.0.attn.q", "h.0.mlp.fc"],
        ["h.1.attn.q"],
        ["lm_head"],
    ]


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (nn.Linear(8, 4), {"structure": "channels"}, "structure 'unstructured' or an N:M"),
        (nn.Linear(8, 4), {"structure": "2:4", "block_size": 6}, "block_size must be a multiple of M=4"),
        (nn.Sequential(nn.Conv2d(2, 4, 3)), {"types": ["Conv2d"]}, "Conv2d"),
        (nn.Linear(8, 4), {"damp": -1.0}, "damp"),
    ],
)
def test_unsupported_arguments_are_refused(model: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune_(model, [torch.randn(2, 8)], 0.5, **kwargs)


def test_a_layer_whose_forward_never_runs_is_refused_by_name() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x)[0]

    model = Attention()
    before = model.mha.out_proj.weight.detach().clone()
    with pytest.raises(ValueError, match=r"saw no input of \['mha.out_proj'\]"):
        sparsegpt_prune_(model, [torch.randn(2, 3, 8)], 0.5)
    assert torch.equal(model.mha.out_proj.weight, before)


class _Blocks(nn.Module):
    """Numbered blocks (one SparseGPT stage each); ``blocks.2`` runs only on batches of more than ``rows`` rows."""

    def __init__(self, rows: int = 10**9) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)]).double()
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.blocks[1](torch.relu(self.blocks[0](x))))
        return self.blocks[2](x) if x.shape[0] > self.rows else x


def test_a_layer_no_input_reaches_is_refused_before_any_weight_changes() -> None:
    model = _Blocks()  # blocks.2 never runs; blocks.0 and blocks.1 come first, in stages of their own
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"saw no input of \['blocks.2'\]"):
        sparsegpt_prune_(model, [torch.randn(4, 8, dtype=torch.float64)], 0.5, block_size=8)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_two_four_with_a_per_layer_mapping_leaves_a_zero_layer_dense() -> None:
    model = _Blocks(rows=0)
    before = copy.deepcopy(model.state_dict())
    x = _correlated_inputs(32, 8, seed=2)
    # blocks.2 is not in the mapping: dense as well.
    shares = {"blocks.0.weight": 0.5, "blocks.1.weight": 0.0}
    masks = sparsegpt_prune_(model, [x], shares, structure="2:4", block_size=8)
    assert masks["blocks.0.weight"].reshape(8, 2, 4).sum(-1).eq(2).all()
    assert bool((model.blocks[0].weight[~masks["blocks.0.weight"]] == 0).all())
    for layer in ("blocks.1", "blocks.2"):
        assert masks[f"{layer}.weight"].all()
        assert torch.equal(model.get_parameter(f"{layer}.weight"), before[f"{layer}.weight"])


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        (0.3, r"sparsity with structure '2:4' must be 0.5 \(pruned 2:4\) or 0 \(left dense\), got 0.3"),
        ({"blocks.0.weight": 0.5, "blocks.1.weight": 0.25}, r"sparsity\['blocks.1.weight'\] with structure '2:4'"),
    ],
)
def test_two_four_refuses_any_other_sparsity_before_any_weight_changes(sparsity: Any, message: str) -> None:
    model = _Blocks(rows=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune_(model, [torch.randn(4, 8, dtype=torch.float64)], sparsity, structure="2:4", block_size=8)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _rank_inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    # Rank 0's batches have 6 rows (blocks.2 runs on them), rank 1's have 2 (blocks.2 never runs there).
    return [torch.randn(6 if rank == 0 else 2, 8, generator=g, dtype=torch.float64) for _ in range(2)]


def _uneven_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = _Blocks(rows=4)
        masks = sparsegpt_prune_(model, _rank_inputs(rank), 0.5, block_size=8)
        try:  # blocks.2 runs on no rank: every rank refuses, none waits for the others
            sparsegpt_prune_(_Blocks(rows=100), _rank_inputs(rank), 0.5, block_size=8)
            refused = ""
        except ValueError as err:
            refused = str(err)
        torch.save({"state": model.state_dict(), "masks": masks, "refused": refused}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("ddp")
def test_a_layer_that_runs_on_one_rank_only_is_reconstructed_from_the_inputs_of_all_ranks(tmp_path: Any) -> None:
    init = f"file://{os.path.join(tmp_path, 'init')}"
    context = mp.spawn(_uneven_worker, args=(init, str(tmp_path)), nprocs=2, join=False)
    for _ in range(120):  # a mismatched collective would hang: give up after a minute
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two processes did not finish")
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    expected = _Blocks(rows=4)  # one process, every rank's inputs: the same Hessians
    expected_masks = sparsegpt_prune_(expected, _rank_inputs(0) + _rank_inputs(1), 0.5, block_size=8)
    for result in (r0, r1):
        for name, value in expected.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, rtol=0, atol=1e-12)
        assert all(torch.equal(result["masks"][n], m) for n, m in expected_masks.items())
        assert "saw no input of ['blocks.2']" in result["refused"]
