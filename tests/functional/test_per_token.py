"""Dynamic per-token input quantization, against float64 references built row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.fake_quant import fake_quantize_per_token, per_token_qparams
from lightning_compress.functional.int8 import Int8Layer, convert_to_int8, per_token_int8_linear
from lightning_compress.functional.qat import QATLinear, prepare_, qat_modules


def reference_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """float64 loop over rows: range widened to contain 0, scale (hi - lo) / 255, affine uint8 codes."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    qmax = 2**bits - 1
    for r, row in enumerate(rows):
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        s = max((hi - lo) / qmax, float(torch.finfo(torch.float32).eps))
        z = min(max(round(-lo / s), 0), qmax)
        out[r] = (torch.clamp(torch.round(row / s) + z, 0, qmax) - z) * s
    return out.reshape(x.shape)


def test_per_token_qparams_by_hand() -> None:
    # row 0: [-1, 3] -> scale 4/255, zero point round(255/4) = 64; row 1: [0.5, 2.55] -> widened to [0, 2.55]
    scale, zero_point = per_token_qparams(torch.tensor([[-1.0, 3.0], [0.5, 2.55]]), 8)
    torch.testing.assert_close(scale, torch.tensor([4 / 255, 0.01]))
    assert zero_point.tolist() == [64, 0]


def test_fake_quantize_per_token_matches_float64_rows() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * torch.tensor([0.01, 1.0, 100.0]).reshape(3, 1, 1)  # rows of very different ranges
    got = fake_quantize_per_token(x, 8)
    torch.testing.assert_close(got.double(), reference_per_token(x), rtol=1e-5, atol=1e-7)
    # Each row has its own range: a per-tensor range would wipe out the small rows entirely.
    assert bool((got[0] != 0).any())


def test_fake_quantize_per_token_straight_through_gradient() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    fake_quantize_per_token(x, 8).sum().backward()
    assert x.grad is not None and bool((x.grad == 1).all())  # every value lies inside its own row's range


def test_qat_linear_quantizes_each_token_and_observes_nothing() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    prepare_(model, activation_granularity="token")
    layer = model[0]
    assert isinstance(layer, QATLinear) and layer.activation_granularity == "token"
    x = torch.randn(6, 16)
    model.train()
    y = layer(x)
    assert not layer.activation_observed  # dynamic: no range is stored
    w = layer.weight.double()
    scale = w.abs().amax(1) / 127
    w_q = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    expected = reference_per_token(x) @ w_q.t() + layer.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_granularity_refuses_convs_and_swaps_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"activation_granularity='token'.*\['0'\] are convolutions"):
        prepare_(model, activation_granularity="token")
    assert not list(qat_modules(model))
    with pytest.raises(ValueError, match=r"activation_granularity must be one of \['tensor', 'token'\], got 'row'"):
        prepare_(model, activation_granularity="row")


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 16)])
def test_int8_conversion_keeps_per_token_inputs(bits: int, group_size: int | None) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
    prepare_(model, weight_bits=bits, group_size=group_size, activation_granularity="token")
    x = torch.randn(2, 7, 32)
    model.train()
    model(x)
    model.eval()
    int8 = convert_to_int8(model)
    layer = int8[0]
    assert isinstance(layer, Int8Layer) and layer.activation_granularity == "token" and layer.input_scale is None
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), rtol=1e-5, atol=1e-5)
        if group_size is None:  # the first layer against float64 from the trained weight, built here
            w = model[0].weight.double()
            scale = w.abs().amax(1) / 127
            w_q = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
            expected = reference_per_token(x) @ w_q.t() + model[0].bias.double()
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        # Doubling one sample changes no other sample's output: ranges are per token, not per batch.
        x2 = x.clone()
        x2[0] *= 50
        torch.testing.assert_close(int8(x2)[1], int8(x)[1], rtol=0, atol=0)


def test_integer_per_token_linear_matches_float64() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 5, 24)
    codes = torch.randint(-127, 128, (10, 24), dtype=torch.int8)
    scale = torch.rand(10) * 0.01 + 1e-3
    bias = torch.randn(10)
    expected = reference_per_token(x) @ (codes.double() * scale.double()[:, None]).t() + bias.double()
    got = per_token_int8_linear(x, codes, scale, bias, 8)
    assert got.shape == (2, 5, 10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # And equal to the float path the PyTorch model runs.
    float_path = F.linear(fake_quantize_per_token(x, 8), codes.float() * scale[:, None], bias)
    torch.testing.assert_close(got, float_path, rtol=1e-5, atol=1e-5)


def test_int8_layer_pickled_without_the_granularity_attribute_still_runs() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 4))
    prepare_(model)
    model.train()
    model(torch.randn(3, 8))
    int8 = convert_to_int8(model.eval())
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = int8(x)
    del int8[0].__dict__["activation_granularity"]  # as an Int8Layer saved before the attribute existed
    with torch.no_grad():
        torch.testing.assert_close(int8(x), expected, rtol=0, atol=0)
