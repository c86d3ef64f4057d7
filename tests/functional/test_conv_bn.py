"""conv -> BatchNorm pairs by the data flow: attributes as in torchvision, untraceable code, shared outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.functional.conv_bn import find_conv_bn_pairs
from lightning_compress.functional.int8 import convert_to_int8
from lightning_compress.functional.qat import FoldedBatchNorm2d, prepare_, qat_modules
from tests.zoo.resnet import BasicBlock, ResNet


def resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 1, 1], [8, 16, 32])


def resnet_pairs_by_hand() -> dict[str, str]:
    # Stem conv1/bn1; each BasicBlock conv1/bn1, conv2/bn2; the downsample Sequential of layer2 and layer3.
    pairs = {"conv1": "bn1"}
    for block in ("layer1.0", "layer1.1", "layer2.0", "layer3.0"):
        pairs |= {f"{block}.conv1": f"{block}.bn1", f"{block}.conv2": f"{block}.bn2"}
    for layer in ("layer2", "layer3"):
        pairs[f"{layer}.0.downsample.0"] = f"{layer}.0.downsample.1"
    return pairs


def test_resnet_attribute_pairs_fold_in_qat() -> None:
    model = resnet()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    found = find_conv_bn_pairs(model, convs)
    assert found.pairs == resnet_pairs_by_hand() and not found.unfolded and not found.untraced
    prepare_(model, fold_bn=True)
    modules = dict(model.named_modules())
    for conv, bn in resnet_pairs_by_hand().items():
        assert modules[conv].folded_bn is modules[bn] and type(modules[bn]) is FoldedBatchNorm2d


class Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it) around a Sequential pair and an attribute pair."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(x)
        if x.sum() > 0:  # data-dependent: fx raises
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_model_falls_back_to_sequential_and_names_the_rest() -> None:
    model = Untraceable()
    with pytest.warns(UserWarning, match=r"left unfolded.*'?bn'?: in a module torch.fx could not trace.*<model>"):
        prepare_(model, fold_bn=True)
    assert model.seq[0].folded_bn is model.seq[1]  # the Sequential child traced on its own
    assert model.conv.folded_bn is None and type(model.bn) is nn.BatchNorm2d


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv output has a second reader: folding would change it


def test_conv_output_read_twice_is_not_folded() -> None:
    found = find_conv_bn_pairs(SharedOutput(), ["conv"])
    assert found.pairs == {} and "used only by it" in found.unfolded["bn"]


def test_unfolded_bn_is_folded_exactly_at_conversion() -> None:
    model = resnet()
    with torch.no_grad():  # non-trivial statistics, some negative gammas (sign flip of the codes)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    prepare_(model, fold_bn=False)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        int8 = convert_to_int8(model)
        got = int8(x)
    assert not [m for m in int8.modules() if isinstance(m, nn.BatchNorm2d)]
    # Only the arithmetic order changes (scale * factor folded before the conv): float rounding.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(list(qat_modules(model))) == 12  # the QAT model itself is untouched


def test_convs_before_residual_adds_quantize_their_output() -> None:
    model = resnet()
    prepare_(model, fold_bn=True)
    marked = sorted(n for n, m in qat_modules(model) if m.quantize_output)
    # Counted by hand: each block's conv2 and each downsample conv feed a residual add; every other conv
    # reaches (through its BatchNorm, ReLU, max-pool) only quantized layers.
    blocks = ("layer1.0", "layer1.1", "layer2.0", "layer3.0")
    expected = sorted([f"{b}.conv2" for b in blocks] + ["layer2.0.downsample.0", "layer3.0.downsample.0"])
    assert marked == expected
    x = torch.randn(8, 3, 16, 16)
    model.train()
    model(x)
    assert all(torch.isfinite(dict(model.named_modules())[n].output_range).all() for n in expected)
    model.eval()
    with torch.no_grad():  # the converted model quantizes the same outputs: identical arithmetic
        torch.testing.assert_close(convert_to_int8(model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_checkpoint_without_output_range_loads_strictly() -> None:
    model = resnet()
    prepare_(model, fold_bn=True)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("output_range")}
    fresh = resnet()
    prepare_(fresh, fold_bn=True)
    fresh.load_state_dict(old, strict=True)  # written before output ranges existed
    assert not fresh.layer1[0].conv2.output_observed
