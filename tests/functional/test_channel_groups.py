"""Coupled channel groups and their removal, checked against hand counts and the masked model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from lightning_compress.functional import shrink as S  # noqa: E402


class Residual(nn.Module):
    """conv-bn -> two branches summed (conv-bn and an identity), -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv(x)) + x)
        return self.head(x.mean((2, 3)))


def randomise_bn(model: nn.Module) -> None:
    # Non-trivial running statistics and affine terms, so a live γ/β or stale statistic would show.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_residual_sum_is_one_group_with_bn_and_consumers() -> None:
    model = Residual().eval()
    groups, kept = S.channel_groups(model, torch.randn(1, 3, 8, 8))
    by_name = {g.name: g for g in groups}
    # stem and conv write into one sum: one group of 8 channels holding both convs, both BNs and the head input
    assert list(by_name) == ["stem"] or list(by_name) == ["conv"]
    (group,) = groups
    assert group.size == 8
    sides = {(m.module, m.role) for m in group.members}
    assert sides == {("stem", "out"), ("bn0", "out"), ("conv", "out"), ("bn1", "out"), ("conv", "in"), ("head", "in")}
    assert kept == {"head": "its channels are the model's output"}


def test_masked_equals_shrunk_and_params_by_hand() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    randomise_bn(model)
    x = torch.randn(4, 3, 8, 8)
    groups, _ = S.channel_groups(model, x)
    keep = {groups[0].name: torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)}  # 4 of 8 kept
    S.apply_masks_(model, groups, keep)
    with torch.no_grad():
        masked = model(x)
        S.shrink_(model, groups, keep)
        shrunk = model(x)
    assert (masked - shrunk).abs().max() <= 1e-5
    # By hand, 4 channels: stem 4*3*9, bn0 2*4, conv 4*4*9 + 4, bn1 2*4, head 2*4 + 2
    assert sum(p.numel() for p in model.parameters()) == 108 + 8 + 148 + 8 + 10
    assert (model.stem.out_channels, model.conv.in_channels, model.bn1.num_features, model.head.in_features) == (
        4,
        4,
        4,
        4,
    )
    assert model.bn0.running_mean.shape == (4,)


def test_unmasked_bn_would_change_outputs() -> None:
    # Why γ/β are part of the group: zeroing conv rows alone leaves BN's β alive, and removal then differs.
    torch.manual_seed(0)
    model = Residual().eval()
    randomise_bn(model)
    x = torch.randn(4, 3, 8, 8)
    groups, _ = S.channel_groups(model, x)
    keep = {groups[0].name: torch.tensor([1, 0] * 4, dtype=torch.bool)}
    with torch.no_grad():
        model.stem.weight[~keep[groups[0].name]] = 0
        model.conv.weight[~keep[groups[0].name]] = 0
        rows_only = model(x)
        S.shrink_(model, groups, keep)
        assert (rows_only - model(x)).abs().max() > 1e-3


def test_depthwise_and_squeeze_excite() -> None:
    from tests.zoo import ZOO

    case = ZOO["mobilenet_v3"]()
    model = case.module.eval()
    randomise_bn(model)
    groups, kept = S.channel_groups(model, case.example_input)
    g = torch.Generator().manual_seed(0)
    keep = {gr.name: torch.rand(gr.size, generator=g) > 0.5 for gr in groups}
    for v in keep.values():
        v[0] = True
    S.apply_masks_(model, groups, keep)
    with torch.no_grad():
        masked = model(case.example_input)
        S.shrink_(model, groups, keep)
        assert (masked - model(case.example_input)).abs().max() <= 1e-5
    depthwise = model.model.features[2].block[1][0]
    assert (
        depthwise.groups
        == depthwise.in_channels
        == depthwise.out_channels
        == int(keep["model.features.2.block.1.0"].sum())
    )


def test_keep_from_masks_needs_every_slice_masked() -> None:
    model = Residual().eval()
    groups, _ = S.channel_groups(model, torch.randn(1, 3, 8, 8))
    keep = {groups[0].name: torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)}
    masks = S.param_masks(model, groups, keep)
    assert not S.keep_from_masks(model, groups, masks)[groups[0].name][7]
    masks["bn1.bias"][7] = True  # one live β keeps the channel
    assert S.keep_from_masks(model, groups, masks)[groups[0].name][7]


def test_choose_channels_global_keeps_one_per_group_and_only_grows() -> None:
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([100.0, 200.0])}
    keep = S.choose_channels(scores, {}, 0.99)
    assert int(keep["a"].sum()) == 1 and int(keep["b"].sum()) == 1
    current = {"a": torch.tensor([False, True, True]), "b": torch.tensor([True, True])}
    assert not S.choose_channels(scores, current, 0.0)["a"][0]


def test_layernorm_groups_and_attention_heads_stay_whole() -> None:
    from tests.zoo import ZOO

    case = ZOO["vit_tiny"]()
    groups, kept = S.channel_groups(case.module, case.example_input)
    assert sorted(g.name for g in groups) == ["model.blocks.0.mlp.fc1", "model.blocks.1.mlp.fc1"]
    assert "LayerNorm" in kept["model.blocks.1.mlp.fc2"]
    assert "qkv" in kept["model.blocks.0.attn.qkv"]


def test_resize_to_state_dict_then_strict_load() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    groups, _ = S.channel_groups(model, x)
    keep = {groups[0].name: torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)}
    S.apply_masks_(model, groups, keep)
    S.shrink_(model, groups, keep)
    fresh = Residual().eval()
    assert S.resize_to_state_dict_(fresh, model.state_dict()) == ["stem", "bn0", "conv", "bn1", "head"]
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_untraceable_model_names_the_failure() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + None  # type: ignore[operator]

    with pytest.raises(RuntimeError, match="could not trace Bad on the example input: TypeError"):
        S.channel_groups(Bad(), torch.randn(1, 4))


def test_bad_keep_is_refused() -> None:
    model = Residual().eval()
    groups, _ = S.channel_groups(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="at least one True"):
        S.shrink_(model, groups, {groups[0].name: torch.zeros(8, dtype=torch.bool)})


def test_kept_widths_round_up_to_a_multiple_without_reviving() -> None:
    from lightning_compress.functional.shrink import choose_channels

    scores = {"a": torch.arange(1.0, 21.0)}  # 20 channels, channel i scores i + 1
    # 50% per layer keeps 10 (scores 11..20); rounded up to 16: scores 5..20.
    keep = choose_channels(scores, {}, 0.5, scope="layer", multiple=8)["a"]
    assert keep.tolist() == [False] * 4 + [True] * 16
    # Channels 0..3 were removed earlier: 90% keeps 2, rounded up to 8 of the 16 still live (scores 13..20).
    earlier = torch.tensor([False] * 4 + [True] * 16)
    keep = choose_channels(scores, {"a": earlier}, 0.9, scope="layer", multiple=8)["a"]
    assert keep.tolist() == [False] * 12 + [True] * 8
    # Only 5 live: rounding stops there, nothing removed before comes back.
    earlier = torch.tensor([False] * 15 + [True] * 5)
    keep = choose_channels(scores, {"a": earlier}, 0.9, scope="layer", multiple=8)["a"]
    assert keep.tolist() == [False] * 15 + [True] * 5
