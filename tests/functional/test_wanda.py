"""Activation-aware (Wanda) scores and the input statistics they use, against loops in float64."""

from __future__ import annotations

import torch
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
