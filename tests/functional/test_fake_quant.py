"""Quantization arithmetic against hand-built cases and float64 references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.fake_quant import (
    activation_qparams,
    activation_qrange,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    fold_batchnorm,
    quantize_weight,
    weight_qrange,
    weight_scale,
)


def reference_weight_fake_quant(w: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Symmetric per-channel fake-quantization in float64, from the definition."""
    qmax = 2 ** (bits - 1) - 1
    w64 = w.double().movedim(axis, 0)
    scale = w64.abs().flatten(1).amax(1) / qmax
    shape = (-1,) + (1,) * (w64.dim() - 1)
    q = torch.clamp(torch.round(w64 / scale.reshape(shape)), -qmax, qmax)
    return (q * scale.reshape(shape)).movedim(0, axis)


def test_integer_ranges_by_hand() -> None:
    assert weight_qrange(8) == (-127, 127)
    assert weight_qrange(4) == (-7, 7)
    assert weight_qrange(2) == (-1, 1)
    assert activation_qrange(8) == (0, 255)


def test_weight_quantization_hand_built() -> None:
    # Row 0: max |w| = 1.27 -> scale 0.01, codes exactly w / 0.01. Row 1: max 0.635 -> scale 0.005.
    w = torch.tensor([[1.27, -0.5, 0.004, 0.0], [0.635, 0.0125, -0.0074, 0.3]])
    codes, scale = quantize_weight(w, 8)
    torch.testing.assert_close(scale, torch.tensor([0.01, 0.005]))
    # 0.004 / 0.01 = 0.4 -> 0; 0.0125 / 0.005 = 2.5 -> 2 (round half to even); -0.0074 / 0.005 = -1.48 -> -1
    assert codes.tolist() == [[127, -50, 0, 0], [127, 2, -1, 60]]
    assert codes.dtype == torch.int8
    fake = fake_quantize_weight(w, scale, 8)
    torch.testing.assert_close(fake, torch.tensor([[1.27, -0.5, 0.0, 0.0], [0.635, 0.01, -0.005, 0.3]]))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_fake_quant_matches_float64_reference(bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 5, 3)
    expected = reference_weight_fake_quant(w, bits).float()
    got = fake_quantize_weight(w, weight_scale(w, bits), bits)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    codes, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) == qmax  # every row's largest weight maps to ±qmax
    torch.testing.assert_close(dequantize_weight(codes, scale), expected, atol=1e-6, rtol=1e-6)


def test_weight_along_axis_1_for_in_out_storage() -> None:
    # Hugging Face Conv1D stores [in, out]: the scale is per column.
    w = torch.tensor([[1.27, -0.11], [0.5, 0.2]])
    torch.testing.assert_close(weight_scale(w, 8, axis=1), torch.tensor([0.01, 0.2 / 127]))
    codes, scale = quantize_weight(w, 8, axis=1)
    assert codes.tolist() == [[127, -70], [50, 127]]  # -0.11 / (0.2/127) = -69.85 -> -70
    expected = reference_weight_fake_quant(w, 8, axis=1).float()
    torch.testing.assert_close(fake_quantize_weight(w, scale, 8, axis=1), expected)
    torch.testing.assert_close(dequantize_weight(codes, scale, axis=1), expected)


def test_zero_channel_gets_a_tiny_scale_not_nan() -> None:
    scale = weight_scale(torch.zeros(2, 3), 8)
    assert torch.all(scale > 0) and torch.all(scale < 1e-6)
    assert torch.equal(fake_quantize_weight(torch.zeros(2, 3), scale, 8), torch.zeros(2, 3))


def test_fake_quant_straight_through_gradient_and_exact_zero() -> None:
    w = torch.randn(4, 8)
    w[:, ::2] = 0.0
    w.requires_grad_(True)
    out = fake_quantize_weight(w, weight_scale(w, 8), 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # symmetric scale never clips: gradient passes everywhere
    assert torch.all(out[:, ::2] == 0)  # zero point 0: pruned weights stay exactly zero


def test_activation_qparams_hand_built() -> None:
    # [-0.5, 2.0] over 255 steps: scale 2.5/255, zero point 0.5 / (2.5/255) = 51 exactly.
    scale, zp = activation_qparams(torch.tensor(-0.5), torch.tensor(2.0), 8)
    assert float(scale) == pytest.approx(2.5 / 255, rel=1e-6)
    assert int(zp) == 51 and zp.dtype == torch.int32
    # A range that does not contain 0 is widened to contain it: [1, 3] -> [0, 3], zero point 0.
    scale, zp = activation_qparams(torch.tensor(1.0), torch.tensor(3.0), 8)
    assert int(zp) == 0 and float(scale) == pytest.approx(3.0 / 255, rel=1e-6)
    # All negative: [-3, -1] -> [-3, 0], zero point at the top of the range.
    scale, zp = activation_qparams(torch.tensor(-3.0), torch.tensor(-1.0), 8)
    assert int(zp) == 255 and float(scale) == pytest.approx(3.0 / 255, rel=1e-6)


def test_activation_fake_quant_hand_built() -> None:
    scale, zp = torch.tensor(0.1), torch.tensor(10, dtype=torch.int32)  # represents [-1.0, 24.5]
    x = torch.tensor([-2.0, -1.0, 0.0, 0.04, 0.05, 0.26, 24.5, 30.0])
    # clamp(round(x/0.1) + 10, 0, 255) - 10, times 0.1; 0.05/0.1 = 0.5 rounds to 0 (half to even)
    expected = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 0.3, 24.5, 24.5])
    torch.testing.assert_close(fake_quantize_activation(x, scale, zp, 8), expected)


def test_fold_batchnorm_hand_built() -> None:
    # factor = gamma / sqrt(var + eps) = [2 / sqrt(4), 1 / sqrt(0.25)] = [1, 2] (eps 0)
    w, b = fold_batchnorm(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([0.5, -1.0]),
        running_mean=torch.tensor([1.0, 2.0]),
        running_var=torch.tensor([4.0, 0.25]),
        gamma=torch.tensor([2.0, 1.0]),
        beta=torch.tensor([0.0, 10.0]),
        eps=0.0,
    )
    assert w.tolist() == [[1.0, 2.0], [6.0, 8.0]]
    assert b.tolist() == [0.5 - 1.0, 10.0 + (-1.0 - 2.0) * 2.0]


def test_fold_batchnorm_matches_conv_then_bn() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=0.1)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 7, 7)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), atol=1e-5, rtol=1e-5)
