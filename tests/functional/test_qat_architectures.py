"""Layers inside modules that read weights directly (nn.TransformerEncoderLayer) and Hugging Face Conv1D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.functional.int8 import Int8Layer, convert_to_int8
from lightning_compress.functional.qat import _release_forward, finalize_, prepare_, qat_modules


def encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()


def test_fast_path_does_not_bypass_qat_layers() -> None:
    layer = encoder_layer()
    prepare_(layer, modules=["linear1", "linear2"])
    x = torch.randn(3, 5, 16)
    layer.train()
    layer(x)  # observe ranges
    layer.eval()
    with torch.enable_grad():
        slow = layer(x)  # parameters require grad: PyTorch's own Python path, through linear1/linear2
    with torch.no_grad():
        fast_candidate = layer(x)  # eligible for the fused kernel, which would skip fake-quantization
    torch.testing.assert_close(fast_candidate, slow.detach(), atol=1e-5, rtol=1e-5)
    int8 = convert_to_int8(layer)
    with torch.no_grad():
        torch.testing.assert_close(int8(x), slow.detach(), atol=1e-4, rtol=1e-4)


def test_fused_fast_path_reads_the_dequantized_weights() -> None:
    layer = encoder_layer()
    prepare_(layer, modules=["linear1", "linear2"], activation_bits=None)  # weight-only: no input rounding
    layer.train()
    layer(torch.randn(2, 5, 16))
    int8 = convert_to_int8(layer)
    linear1 = int8.linear1
    assert isinstance(linear1, Int8Layer)
    expected = linear1.weight_int8.double() * linear1.weight_scale.double()[:, None]
    torch.testing.assert_close(linear1.weight.double(), expected)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        through_forward = int8(x)
        for module in (int8.linear1, int8.linear2):
            _release_forward(module)  # let the fused kernel take the layers' .weight / .bias
        fused = int8(x)
    torch.testing.assert_close(fused, through_forward, atol=1e-5, rtol=1e-5)


def test_hf_conv1d_per_output_column() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4))  # nf=6 outputs, nx=4 inputs: weight [4, 6]
    prepare_(model, activation_bits=None)
    assert [type(m).__name__ for _, m in qat_modules(model)] == ["QATConv1D"]
    x = torch.randn(2, 3, 4)
    model.train()
    out = model(x)
    w = model[0].weight.detach().double()  # [in, out]
    scale = w.abs().amax(0) / 127  # one scale per output column
    torch.testing.assert_close(model[0].weight_scale.double(), scale)
    wq = torch.clamp(torch.round(w / scale), -127, 127) * scale
    torch.testing.assert_close(out.double(), x.double() @ wq + model[0].bias.double(), atol=1e-5, rtol=1e-5)

    int8 = convert_to_int8(model)
    assert isinstance(int8[0], Int8Layer) and tuple(int8[0].weight.shape) == (4, 6)  # Conv1D's layout
    torch.testing.assert_close(int8[0].weight.double(), wq, atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), atol=1e-5, rtol=1e-5)
    finalize_(model)
    assert type(model[0]) is Conv1D and not model[0]._forward_pre_hooks
