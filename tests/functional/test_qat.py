"""QAT layers: the swap and its inverse, observers, BatchNorm folding, PTQ calibration."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.qat import (
    FoldedBatchNorm2d,
    QATConv2d,
    calibrate_,
    finalize_,
    prepare_,
    qat_modules,
)
from lightning_compress.inputs import CapturedCall


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )


def reference_input_fake_quant(h: torch.Tensor) -> torch.Tensor:
    """uint8 affine fake-quantization of ``h`` with the range of ``h`` itself (widened to 0), float64."""
    h64 = h.detach().double()
    lo, hi = min(float(h64.min()), 0.0), max(float(h64.max()), 0.0)
    scale = (hi - lo) / 255
    zero_point = round(-lo / scale)
    return ((torch.clamp(torch.round(h64 / scale) + zero_point, 0, 255) - zero_point) * scale).float()


def reference_weight_fake_quant(w: torch.Tensor) -> torch.Tensor:
    w64 = w.detach().double()
    scale = w64.abs().amax(1, keepdim=True) / 127
    return (torch.clamp(torch.round(w64 / scale), -127, 127) * scale).float()


def test_prepare_forward_matches_manual_reference() -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(8, 16)
    prepare_(model)
    model.train()
    out = model(x)
    # Reference: every Linear sees a fake-quantized input (range observed on this very batch) and weight.
    h = x
    for layer in (model[0], model[2], model[4]):
        h = F.linear(reference_input_fake_quant(h), reference_weight_fake_quant(layer.weight), layer.bias)
        if layer is not model[4]:
            h = h.relu()
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)


def test_ema_of_the_observed_range() -> None:
    layer = nn.Sequential(nn.Linear(2, 2))
    prepare_(layer, ema_decay=0.75)
    layer.train()
    layer(torch.tensor([[-1.0, 3.0]]))  # first observation: taken as is
    assert layer[0].activation_range.tolist() == [-1.0, 3.0]
    layer(torch.tensor([[-5.0, 7.0]]))  # then 0.75 * old + 0.25 * new
    assert layer[0].activation_range.tolist() == [-2.0, 4.0]
    layer.eval()
    layer(torch.tensor([[-100.0, 100.0]]))  # eval never observes
    assert layer[0].activation_range.tolist() == [-2.0, 4.0]


def test_prepare_finalize_round_trip() -> None:
    model = cnn()
    reference = copy.deepcopy(model)
    weights = list(model.parameters())
    keys = set(model.state_dict())
    assert prepare_(model, fold_bn=True) is None
    names = [n for n, _ in qat_modules(model)]
    assert names == ["0", "4", "7"]
    assert list(model.parameters()) == weights  # the same Parameter objects (optimizers, other callbacks)
    buffers = ("weight_scale", "activation_range", "output_range")
    assert set(model.state_dict()) == keys | {f"{n}.{b}" for n in names for b in buffers}
    assert isinstance(model[1], FoldedBatchNorm2d) and model[0].folded_bn is model[1]
    model.train()
    model(torch.randn(4, 1, 8, 8))
    finalize_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert set(model.state_dict()) == keys
    assert not hasattr(model[0], "weight_bits") and not hasattr(model[0], "folded_bn")
    reference.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    reference.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


def test_folded_bn_training_and_inference_forms() -> None:
    torch.manual_seed(1)
    model = cnn()
    reference = copy.deepcopy(model)
    prepare_(model, fold_bn=True)
    for _, m in qat_modules(model):
        m.fake_quant_enabled = False  # isolate the folding arithmetic from the rounding
    x = torch.randn(16, 1, 8, 8)
    model.train()
    reference.train()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)  # batch stats still update
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_folded_bn_quantizes_the_folded_weight() -> None:
    torch.manual_seed(2)
    model = cnn()
    model[1].running_var.uniform_(0.2, 4.0)
    model[1].weight.data.uniform_(0.5, 2.0)
    prepare_(model, fold_bn=True)
    conv, bn = model[0], model[1]
    conv.bn_frozen = True  # running statistics: the observed scale belongs to the deployed weight
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model[:3](x)  # observe the input range and the folded weight's scale
    model.eval()
    # Deployed form: conv with weight * gamma / sqrt(var + eps), fake-quantized per output channel.
    factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded = (conv.weight.double() * factor[:, None, None, None]).float()
    scale = folded.double().abs().flatten(1).amax(1) / 127
    per_channel = scale[:, None, None, None]
    wq = torch.clamp(torch.round(folded.double() / per_channel), -127, 127) * per_channel
    bias = (bn.bias.double() + (conv.bias.double() - bn.running_mean.double()) * factor).float()
    expected = F.conv2d(reference_input_fake_quant(x), wq.float(), bias, padding=1)
    torch.testing.assert_close(model[:2](x), expected, atol=1e-5, rtol=1e-5)


def test_calibrate_is_ptq() -> None:
    torch.manual_seed(0)
    model = mlp()
    prepare_(model, ema_decay=0.0)  # decay 0: the range of the last batch
    batches = [(torch.randn(8, 16) * (i + 1), torch.zeros(8)) for i in range(3)]
    assert calibrate_(model, batches, num_batches=2) is None
    x = batches[1][0]  # the second (last seen) batch's input, not its targets
    torch.testing.assert_close(model[0].activation_range, torch.stack([x.min(), x.max()]))
    assert not model.training and not model[0].observer_enabled
    frozen = model[0].activation_range.clone()
    model.train()
    model(torch.randn(8, 16) * 100)
    assert torch.equal(model[0].activation_range, frozen)


def test_calibrate_accepts_keyword_batches_and_calls() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
            return self.linear(x * gate)

    model = Gated()
    prepare_(model, ema_decay=0.0)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    calibrate_(model, [{"x": x, "gate": torch.full_like(x, 2.0)}])
    assert model.linear.activation_range.tolist() == [-4.0, 6.0]
    calibrate_(model, [CapturedCall((x,), {"gate": torch.full_like(x, 3.0)})])
    assert model.linear.activation_range.tolist() == [-6.0, 9.0]


def test_prepare_refuses_unsupported_type_by_name() -> None:
    model = nn.Sequential(nn.Conv3d(1, 1, 1))
    try:
        prepare_(model, modules=["0"])
    except TypeError as err:
        assert "'0' is a Conv3d" in str(err) and "Linear" in str(err)
    else:
        raise AssertionError("Conv3d was accepted")
    assert type(model[0]) is nn.Conv3d and not isinstance(model[0], QATConv2d)
