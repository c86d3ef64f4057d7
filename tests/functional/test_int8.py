"""Int8 conversion: codes, scales and sizes, and the converted model against the fake-quantized one."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_compress.functional.int8 import Int8Layer, convert_to_int8, int8_layers, quantized_size_bytes
from lightning_compress.functional.qat import QATConv2d, prepare_, qat_modules
from tests.functional.test_qat import cnn, mlp


def saved_bytes(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("fold_bn", [True, False])
def test_convert_matches_fake_quant(fold_bn: bool) -> None:
    torch.manual_seed(0)
    model = cnn()
    prepare_(model, fold_bn=fold_bn)
    x = torch.randn(64, 1, 8, 8)
    model.train()
    model(x)
    model.eval()
    int8 = convert_to_int8(model)
    assert model[0].__class__ is QATConv2d  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), atol=1e-4, rtol=1e-4)
    assert {m.weight_int8.dtype for m in int8_layers(int8).values()} == {torch.int8}
    # Folded in training (fold_bn=True) or exactly at conversion (fold_bn=False): no BatchNorm is left.
    assert isinstance(int8[1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert not int8.training


def test_int8_layer_codes_scales_and_forward_by_hand() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.254, -0.127]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2]))
    prepare_(model, activation_bits=None)
    model.train()
    model(torch.zeros(1, 3))
    layer = convert_to_int8(model)[0]
    assert isinstance(layer, Int8Layer)
    assert layer.weight_int8.tolist() == [[127, -50, 0], [0, 127, -64]]  # -0.127 / 0.002 = -63.5 -> -64
    torch.testing.assert_close(layer.weight_scale, torch.tensor([0.01, 0.002]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # 1.27 - 1.0 + 0 + 0.1 = 0.37; 0 + 0.254*2 - 0.128*3 - 0.2 = -0.076
    torch.testing.assert_close(layer(x), torch.tensor([[0.37, -0.076]]), atol=1e-6, rtol=1e-6)


def test_linear_int8_state_dict_is_about_4x_smaller() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    fp32_bytes = saved_bytes(model.state_dict())
    prepare_(model)
    model.train()
    model(torch.randn(32, 256))
    int8 = convert_to_int8(model)
    # 2 x 256 x 256 weights at 1 byte + biases, scales and input qparams at 4: 133,128 vs 526,336 bytes
    # of tensor data; torch.save adds a few KB of framing to both.
    assert 3.8 <= fp32_bytes / saved_bytes(int8.state_dict()) <= 4.0


def test_quantized_size_bytes_closed_form() -> None:
    model = mlp()  # weights 16x32, 32x32, 32x4; biases 32, 32, 4
    prepare_(model, weight_bits={"0": 8, "2": 4, "4": 2})
    dense, effective, mean_bits = quantized_size_bytes(model)
    assert dense == 4 * (512 + 1024 + 128 + 32 + 32 + 4)
    weights = 512 * 8 // 8 + 1024 * 4 // 8 + 128 * 2 // 8
    scales = 4 * (32 + 32 + 4)
    assert effective == weights + scales + 4 * (32 + 32 + 4)
    assert mean_bits == pytest.approx((512 * 8 + 1024 * 4 + 128 * 2) / (512 + 1024 + 128))


def test_pruned_zeros_survive_conversion_and_4bit_range() -> None:
    torch.manual_seed(0)
    model = cnn()
    with torch.no_grad():
        for m in (model[0], model[4], model[7]):
            m.weight.view(m.weight.shape[0], -1)[:, ::2] = 0.0
    prepare_(model, weight_bits={"0": 8, "4": 4, "7": 4}, fold_bn=True)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    int8 = convert_to_int8(model)
    for i in (0, 4, 7):
        codes = int8[i].weight_int8.view(int8[i].weight_int8.shape[0], -1)
        assert torch.all(codes[:, ::2] == 0) and torch.all(codes[:, 1::2].abs().sum(1) > 0)
    assert int(int8[4].weight_int8.abs().max()) == 7 and int(int8[0].weight_int8.abs().max()) == 127


def test_layer_whose_qat_never_started_gets_the_scale_of_its_weight() -> None:
    model = nn.Sequential(nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.635, -0.1]]))
    prepare_(model, activation_bits=None)
    for _, m in qat_modules(model):
        m.fake_quant_enabled = False  # start_step never reached: scale still the initial ones
    layer = convert_to_int8(model)[0]
    torch.testing.assert_close(layer.weight_scale, torch.tensor([0.005]))
    assert layer.weight_int8.tolist() == [[127, -20]]


def test_convert_requires_prepared_model() -> None:
    with pytest.raises(ValueError, match="no QAT layer"):
        convert_to_int8(mlp())
