"""compile_int8: oneDNN int8 kernels run, with the QAT scales, and match the fake-quantized model."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from lightning_compress.functional.int8_compile import CompiledInt8Model, compile_int8, reference_int8_model
from lightning_compress.functional.qat import prepare_
from tests.functional.test_qat import cnn

# One worker compiles the module's model once (torch.compile takes seconds).
pytestmark = pytest.mark.xdist_group("int8_compile")


def kernel_calls(code: list[str]) -> dict[str, int]:
    """Calls in Inductor's generated code (comments, which name the source ops, are skipped)."""
    lines = [line for src in code for line in src.splitlines() if not line.lstrip().startswith("#")]
    names = {
        "qconv": r"onednn\.qconv(2d)?_pointwise",
        "qlinear": r"onednn\.qlinear_pointwise",
        # fp32 conv / matmul kernels Inductor would call if a pattern were not matched
        "float": r"extern_kernels\.(mm|addmm|bmm|convolution)\(|aten\.(convolution|mm|addmm)\.|mkldnn\._linear",
    }
    return {k: sum(bool(re.search(p, line)) for line in lines) for k, p in names.items()}


def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = cnn()  # conv-BN-ReLU-maxpool-conv-ReLU-flatten-Linear
    prepare_(model, fold_bn=True)
    model.train()
    for _ in range(3):  # observe ranges as training does
        model(torch.randn(32, 1, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def compiled() -> tuple[nn.Module, CompiledInt8Model, list[str]]:
    model = trained_cnn()
    int8, code = run_and_get_code(compile_int8, model, torch.randn(16, 1, 8, 8))
    return model, int8, code


def test_int8_kernels_run(compiled: tuple[nn.Module, CompiledInt8Model, list[str]]) -> None:
    _, _, code = compiled
    assert len(code) == 1  # one graph: no break leaves part of the model outside the int8 kernels
    assert kernel_calls(code) == {"qconv": 2, "qlinear": 1, "float": 0}


def test_matches_fake_quant_within_scale_steps(compiled: tuple[nn.Module, CompiledInt8Model, list[str]]) -> None:
    model, int8, _ = compiled
    x = torch.randn(16, 1, 8, 8) * 1.5  # beyond the observed range too: clamping must agree
    with torch.no_grad():
        expected = model(x)
    actual = int8(x)
    # The kernels requantize in their own arithmetic order: an activation code on a rounding tie may land
    # one step over. Bound: every input code of the last Linear off by up to 2 steps of its QAT scale.
    last = model[-1]
    input_scale, _ = last.activation_qparams()
    bound = 2 * float(input_scale) * last.weight.detach().abs().sum(1).max()
    assert (actual - expected).abs().max() <= bound
    assert (actual.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_new_batch_size_compiles_to_int8_too(compiled: tuple[nn.Module, CompiledInt8Model, list[str]]) -> None:
    model, int8, _ = compiled
    x = torch.randn(3, 1, 8, 8)
    actual, code = run_and_get_code(int8, x)
    assert kernel_calls(code) == {"qconv": 2, "qlinear": 1, "float": 0}
    with torch.no_grad():
        torch.testing.assert_close(actual, model(x), atol=1e-2, rtol=0)


def test_linear_against_integer_arithmetic() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.27, -0.5, 0.0, 0.3], [0.0, 0.254, -0.13, 0.1], [0.5, 0.5, 0.5, -0.5]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    prepare_(model)
    model.train()
    model(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]))  # input range [-1, 2]
    # Away from rounding ties (x / s_x = 26.35, -61.2, 164.05, 212.5 -> clamped; -102, 1.1, 44.2, -28.05).
    x = torch.tensor([[0.31, -0.72, 1.93, 2.5], [-1.2, 0.013, 0.52, -0.33]])
    int8 = compile_int8(model.eval(), x)
    # Closed form in float64: uint8 input codes (scale 3/255, zero point 85), int8 weight codes
    # (scale max|w| / 127 per row; weights chosen away from rounding ties), integer dot products, then the scales.
    s_x, z_x = 3 / 255, 85
    q_x = torch.clamp(torch.round(x.double() / s_x) + z_x, 0, 255)
    w = model[0].weight.detach().double()
    s_w = w.abs().amax(1) / 127
    q_w = torch.round(w / s_w[:, None])
    expected = s_x * s_w * ((q_x - z_x) @ q_w.T) + model[0].bias.detach().double()
    torch.testing.assert_close(int8(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_errors_before_compiling() -> None:
    with pytest.raises(ValueError, match="no QAT layer"):
        compile_int8(cnn(), torch.randn(2, 1, 8, 8))
    model = trained_cnn()
    with pytest.raises(ValueError, match=r"cannot run example_input \(positional \[\(2, 3, 8, 8\)\]"):
        compile_int8(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"CPU \(oneDNN\) kernels; the model is on \['meta'\]"):
        compile_int8(trained_cnn().to("meta"), torch.randn(2, 1, 8, 8))
    weight_only = nn.Sequential(nn.Linear(4, 4))
    prepare_(weight_only, activation_bits=None)
    with pytest.raises(ValueError, match=r"\{'0': 'input not quantized"):
        reference_int8_model(weight_only)
    grouped = nn.Sequential(nn.Linear(32, 4))
    prepare_(grouped, group_size=16)
    grouped.train()
    grouped(torch.randn(2, 32))
    with pytest.raises(ValueError, match="group_size=16"):
        compile_int8(grouped, torch.randn(2, 32))
    per_token = nn.Sequential(nn.Linear(32, 4))
    prepare_(per_token, activation_granularity="token")
    with pytest.raises(ValueError, match=r"\{'0': 'per-token input ranges"):
        compile_int8(per_token, torch.randn(2, 32))
