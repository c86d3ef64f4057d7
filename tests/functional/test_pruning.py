import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.functional import pruning as F


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item()


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("unstructured", F.Structure("unstructured")),
        ("channels", F.Structure("channels")),
        ("2:4", F.Structure("n:m", n=2, m=4)),
        ("block:1x4", F.Structure("block", block=(1, 4))),
        ("4x2", F.Structure("block", block=(4, 2))),
    ],
)
def test_parse_structure(spec: str, expected: F.Structure) -> None:
    assert F.parse_structure(spec) == expected


@pytest.mark.parametrize("spec", ["2:2", "0:4", "columns", "block:0x4", "1x"])
def test_parse_structure_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="structure"):
        F.parse_structure(spec)


@pytest.mark.parametrize("structure", ["unstructured", "channels", "block:2x4", "2:4"])
def test_groups_round_trip(structure: str) -> None:
    s = F.parse_structure(structure)
    t = torch.randn(8, 4, 3, 3) if structure != "block:2x4" else torch.randn(8, 16)
    assert torch.equal(F.from_groups(F.to_groups(t, s), s, t.shape), t)


def test_unstructured_layer_matches_reference_topk() -> None:
    w = torch.randn(16, 32)
    mask = F.layer_masks({"w": w.abs()}, {}, {"w": 0.7}, F.parse_structure("unstructured"))["w"]
    k = round(0.7 * w.numel())
    reference = torch.ones_like(mask)
    reference.view(-1)[w.abs().view(-1).argsort()[:k]] = False
    assert torch.equal(mask, reference)


def test_channels_prunes_lowest_norm_rows() -> None:
    w = torch.randn(10, 6)
    w[3] *= 0.01
    w[7] *= 0.02
    mask = F.layer_masks({"w": w.abs()}, {}, {"w": 0.2}, F.parse_structure("channels"))["w"]
    assert (~mask).all(dim=1).nonzero().flatten().tolist() == [3, 7]
    assert mask[[0, 1, 2, 4, 5, 6, 8, 9]].all()


def test_n_m_keeps_largest_n_of_every_m_and_is_exact() -> None:
    w = torch.randn(6, 16)
    mask = F.layer_masks({"w": w.abs()}, {}, {"w": 0.5}, F.parse_structure("2:4"))["w"]
    groups = mask.reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    kept = w.abs().reshape(-1, 4).topk(2, dim=1).indices.sort(1).values
    assert torch.equal(groups.nonzero()[:, 1].reshape(-1, 2), kept)
    assert sparsity_of(mask) == 0.5


def test_gradual_n_m_converts_a_share_of_runs_and_masks_only_grow() -> None:
    w = torch.randn(4, 32)
    s = F.parse_structure("2:4")
    half = F.layer_masks({"w": w.abs()}, {}, {"w": 0.25}, s)["w"]
    assert sparsity_of(half) == 0.25
    full = F.layer_masks({"w": torch.randn(4, 32).abs()}, {"w": half}, {"w": 0.5}, s)["w"]
    assert sparsity_of(full) == 0.5
    assert not (full & ~half).any()  # nothing pruned came back


def test_block_masks_whole_blocks() -> None:
    w = torch.randn(4, 8)
    mask = F.layer_masks({"w": w.abs()}, {}, {"w": 0.5}, F.parse_structure("block:2x4"))["w"]
    blocks = mask.reshape(2, 2, 2, 4).permute(0, 2, 1, 3).reshape(4, 8)
    assert all(b.all() or not b.any() for b in blocks)
    assert sparsity_of(mask) == 0.5


def test_global_scope_ranks_across_layers() -> None:
    small = torch.full((4, 4), 0.01) + torch.rand(4, 4) * 0.001
    large = torch.ones(4, 4) + torch.rand(4, 4)
    masks = F.global_masks({"a": small, "b": large}, {}, 0.5, F.parse_structure("unstructured"))
    # 16 of 32 go: the 15 lowest of `a` (its best weight always stays) and the lowest of `b`.
    expected_a = torch.zeros(16, dtype=torch.bool)
    expected_a[small.flatten().argmax()] = True
    expected_b = torch.ones(16, dtype=torch.bool)
    expected_b[large.flatten().argmin()] = False
    assert torch.equal(masks["a"].flatten(), expected_a)
    assert torch.equal(masks["b"].flatten(), expected_b)


def test_global_channels_never_empty_a_layer_and_compare_layers_by_relative_norm() -> None:
    # Layer `a` has tiny filters (norms 0.01..0.04), `b` large ones (norms 1..4): ranked raw, all of `a` would go.
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None].expand(4, 3) * 0.01
    b = torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None].expand(4, 3) * 1.0
    masks = F.global_masks({"a": a, "b": b}, {}, 0.5, F.parse_structure("channels"))
    # Relative to its layer's mean both layers look alike: each loses its two weakest filters.
    assert masks["a"][:, 0].tolist() == [False, False, True, True]
    assert masks["b"][:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("structure", ["unstructured", "channels", "block:1x3"])
def test_no_sparsity_empties_a_tensor(structure: str) -> None:
    scores = {"one": torch.rand(1, 3), "many": torch.rand(6, 3)}
    for masks in (
        F.layer_masks(scores, {}, {"one": 0.99, "many": 0.99}, F.parse_structure(structure)),
        F.global_masks(scores, {}, 0.99, F.parse_structure(structure)),
    ):
        assert all(m.any() for m in masks.values())


def test_check_fits_names_layer_and_hint() -> None:
    with pytest.raises(ValueError, match=r"'conv1.weight'.*9 inputs.*HINT: exclude it"):
        F.check_fits(F.parse_structure("2:4"), "conv1.weight", (8, 1, 3, 3))
    with pytest.raises(ValueError, match="1x4 blocks"):
        F.check_fits(F.parse_structure("1x4"), "fc.weight", (8, 6))


def test_taylor_falls_back_to_magnitude_without_gradients() -> None:
    w = torch.randn(3, 3)
    assert torch.equal(F.element_scores(w, "taylor", taylor=torch.zeros(3, 3)), w.abs())
    acc = torch.rand(3, 3)
    assert torch.equal(F.element_scores(w, "taylor", taylor=acc), acc)


def test_random_is_reproducible_with_a_seeded_generator() -> None:
    w = torch.randn(5, 5)
    a = F.element_scores(w, "random", generator=torch.Generator().manual_seed(3))
    b = F.element_scores(w, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.sampled_from([4, 8, 12]),
    s1=st.floats(0.0, 0.95),
    s2=st.floats(0.0, 0.95),
    structure=st.sampled_from(["unstructured", "channels", "block:1x4"]),
    scope=st.sampled_from(["layer", "global"]),
    seed=st.integers(0, 1000),
)
def test_masks_reach_target_and_only_grow(rows, cols, s1, s2, structure, scope, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = {"a": torch.rand(rows, cols, generator=g), "b": torch.rand(rows + 1, cols, generator=g)}
    s = F.parse_structure(structure)
    first = _masks(scores, {}, s1, s, scope)
    second = _masks({k: torch.rand(v.shape, generator=g) for k, v in scores.items()}, first, s2, s, scope)
    for name in scores:
        assert not (second[name] & ~first[name]).any(), "a pruned weight came back"
    if structure == "unstructured" and scope == "layer":
        for name, score in scores.items():
            pruned = (~first[name]).sum().item()
            # within one weight per layer; every tensor keeps at least one weight
            assert abs(pruned - min(s1 * score.numel(), score.numel() - 1)) <= 0.5 + 1e-9
    if structure == "unstructured" and scope == "global":
        total = sum(v.numel() for v in scores.values())
        pruned = sum((~m).sum().item() for m in first.values())
        assert abs(pruned - min(s1 * total, total - len(scores))) <= 0.5 + 1e-9


def _masks(scores, old, level, structure, scope):
    if scope == "global":
        return F.global_masks(scores, old, level, structure)
    return F.layer_masks(scores, old, dict.fromkeys(scores, level), structure)


# ----------------------------------------------------------------------------- hand-built cases
def test_ties_go_to_the_lowest_index_and_the_count_is_exact() -> None:
    scores = torch.ones(2, 5)  # every score equal
    mask = F.layer_masks({"w": scores}, {}, {"w": 0.4}, F.parse_structure("unstructured"))["w"]
    assert mask.flatten().tolist() == [False] * 4 + [True] * 6


def test_norm_argument_changes_the_channel_ranking() -> None:
    # row 0: L1 = 4, L2 = 2; row 1: L1 = L2 = 2.1. L1 prunes row 1, L2 prunes row 0.
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.1, 0.0, 0.0, 0.0]])
    channels = F.parse_structure("channels")
    l1 = F.layer_masks({"w": scores}, {}, {"w": 0.5}, channels, norm=1.0)["w"]
    l2 = F.layer_masks({"w": scores}, {}, {"w": 0.5}, channels, norm=2.0)["w"]
    assert l1.all(dim=1).tolist() == [True, False]
    assert l2.all(dim=1).tolist() == [False, True]


def test_global_channels_compare_groups_relative_to_their_layer_whatever_their_size() -> None:
    # Row norms a: 1,2,3,4 (16 weights each), b: 400,300,200,100 (4 each). Divided by their layer's mean:
    # a 0.4,0.8,1.2,1.6 and b 1.6,1.2,0.8,0.4; each layer's best row is kept whatever happens.
    # 50% of 80 weights = 40: a0 (16), b3 (4), a1 (16), b2 (4) add up to exactly 40.
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None].expand(4, 16) / 4.0
    b = torch.tensor([400.0, 300.0, 200.0, 100.0])[:, None].expand(4, 4) / 2.0
    masks = F.global_masks({"a": a, "b": b}, {}, 0.5, F.parse_structure("channels"))
    assert masks["a"].any(dim=1).tolist() == [False, False, True, True]
    assert masks["b"].any(dim=1).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("sparsity", "a_rows", "b_rows"),
    [(0.48, [False, True], [False, True, True]), (0.52, [False, True], [False, False, True])],
)
def test_global_mixed_group_sizes_prune_to_the_nearest_count(sparsity, a_rows, b_rows) -> None:
    # Relative to their layer's mean, a's rows score 0.5, 1.5 (16 weights each) and b's 0.5, 0.5, 2.0 (4 each);
    # a1 and b2 are each layer's best and stay. Candidates in order: a0 (16), b0 (4), b1 (4): cumulative
    # 16, 20, 24 of 44 weights. 48% = 21.1 is nearest 20 (two groups); 52% = 22.9 is nearest 24 (three).
    scores = {"a": torch.tensor([[1.0] * 16, [3.0] * 16]), "b": torch.tensor([[1.0] * 4, [1.0] * 4, [4.0] * 4])}
    masks = F.global_masks(scores, {}, sparsity, F.parse_structure("channels"))
    assert masks["a"].any(dim=1).tolist() == a_rows
    assert masks["b"].any(dim=1).tolist() == b_rows


def test_gradual_n_m_converts_the_cheapest_runs_first() -> None:
    # Converting a run to 2:4 costs the sum of its 2 smallest scores: run A costs 2, run B costs 6.
    scores = torch.tensor([[1.0, 1.0, 10.0, 10.0, 3.0, 3.0, 3.0, 3.0]])
    mask = F.layer_masks({"w": scores}, {}, {"w": 0.25}, F.parse_structure("2:4"))["w"]
    assert mask.int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]


def test_check_fits_needs_rows_to_divide_by_the_block_height() -> None:
    with pytest.raises(ValueError, match=r"as a 3x8 matrix.*2x4 blocks"):
        F.check_fits(F.parse_structure("block:2x4"), "fc.weight", (3, 8))
    F.check_fits(F.parse_structure("block:2x4"), "fc.weight", (4, 8))  # fits: no error


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_overwriting_the_scores_gives_the_same_masks(scope: str) -> None:
    # The callback hands its fresh scores over (one float per weight less); the masks must not change.
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, 7, generator=g).round(decimals=1)}
    old = {k: torch.rand(v.shape, generator=g) > 0.3 for k, v in scores.items()}
    structure = F.parse_structure("unstructured")

    def masks(overwrite: bool) -> dict[str, torch.Tensor]:
        given = {k: v.clone() for k, v in scores.items()}
        if scope == "global":
            return F.global_masks(given, old, 0.6, structure, overwrite_scores=overwrite)
        return F.layer_masks(given, old, dict.fromkeys(given, 0.6), structure, overwrite_scores=overwrite)

    kept, overwritten = masks(False), masks(True)
    for name in scores:
        assert torch.equal(kept[name], overwritten[name]), name
        assert not (kept[name] & ~old[name]).any()  # masks only grow
