"""Group-wise weight scales and embedding QAT, against independent float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.functional.fake_quant import (
    dequantize_weight_grouped,
    fake_quantize_weight_grouped,
    group_weight_scale,
    quantize_weight_grouped,
)
from lightning_compress.functional.int8 import Int8Embedding, Int8Layer, convert_to_int8, quantized_size_bytes
from lightning_compress.functional.qat import QATEmbedding, QATLinear, finalize_, prepare_, qat_modules


def reference_group_fake_quant(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loop: per row, per block of ``group`` columns, scale = max|w| / qmax, round half to even."""
    w = weight.double()
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    scales = torch.empty(w.shape[0], w.shape[1] // group, dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            block = w[r, g * group : (g + 1) * group]
            s = max(float(block.abs().max()) / qmax, float(torch.finfo(torch.float32).eps))
            scales[r, g] = s
            out[r, g * group : (g + 1) * group] = torch.round(block / s).clamp(-qmax, qmax) * s
    return out, scales


def test_group_scales_and_codes_by_hand() -> None:
    # 4-bit (qmax 7), groups of 2: [7, -1 | 0.5, 0] -> scales [1, 0.5/7]; [0, 0 | -3.5, 1.75] -> [eps, 0.5]
    w = torch.tensor([[7.0, -1.0, 0.5, 0.0], [0.0, 0.0, -3.5, 1.75]])
    scale = group_weight_scale(w, 4, group_size=2)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(scale, torch.tensor([[1.0, 0.5 / 7], [eps, 0.5]]))
    codes, _ = quantize_weight_grouped(w, 4, 2)
    # 1.75 / 0.5 = 3.5 -> 4 (round half to even)
    assert codes.tolist() == [[7, -1, 7, 0], [0, 0, -7, 4]]
    torch.testing.assert_close(
        dequantize_weight_grouped(codes, scale), torch.tensor([[7.0, -1.0, 0.5, 0.0], [0.0, 0.0, -3.5, 2.0]])
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_group_fake_quant_matches_float64_reference(bits: int, axis: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 64)  # [out, in]
    expected, expected_scale = reference_group_fake_quant(w, bits, 16)
    stored = w if axis == 0 else w.t().contiguous()  # axis 1: Hugging Face Conv1D layout [in, out]
    scale = group_weight_scale(stored, bits, 16, axis=axis)
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    fq = fake_quantize_weight_grouped(stored, scale, bits, 16, axis=axis)
    fq = fq if axis == 0 else fq.t()
    torch.testing.assert_close(fq.double(), expected, rtol=1e-5, atol=1e-6)


def test_group_fake_quant_straight_through_gradient() -> None:
    w = torch.tensor([[7.0, -1.0, 0.5, 0.0]], requires_grad=True)
    fake_quantize_weight_grouped(w, torch.tensor([[1.0, 0.5 / 7]]), 4, 2).sum().backward()
    assert w.grad is not None and w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_group_size_must_divide_input() -> None:
    with pytest.raises(ValueError, match="does not divide the 10 input features"):
        group_weight_scale(torch.randn(3, 10), 4, 4)


def grouped_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("activation_bits", [None, 8])
def test_prepare_grouped_linear_forward_and_int8_conversion_exact(activation_bits: int | None) -> None:
    model = grouped_mlp()
    prepare_(model, weight_bits=4, activation_bits=activation_bits, group_size=32)
    layer = model[0]
    assert isinstance(layer, QATLinear) and layer.group_size == 32
    assert tuple(layer.weight_scale.shape) == (32, 2) and tuple(model[2].weight_scale.shape) == (4, 1)
    x = torch.randn(16, 64)
    model.train()
    model(x)
    model.eval()
    expected, expected_scale = reference_group_fake_quant(layer.weight.detach(), 4, 32)
    torch.testing.assert_close(layer.weight_scale.double(), expected_scale, rtol=1e-6, atol=0)
    int8 = convert_to_int8(model)
    converted = int8[0]
    assert isinstance(converted, Int8Layer) and converted.group_size == 32
    assert converted.weight_int8.dtype == torch.int8 and tuple(converted.weight_scale.shape) == (32, 2)
    assert int(converted.weight_int8.abs().max()) <= 7
    torch.testing.assert_close(converted.dequantized_weight().double(), expected, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(int8(x), model(x))  # same arithmetic, bit for bit
    finalize_(model)
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "weight_scale")


def test_grouped_size_accounting_counts_one_scale_per_group() -> None:
    model = grouped_mlp()
    prepare_(model, weight_bits=4, activation_bits=None, group_size=32)
    dense, effective, mean_bits = quantized_size_bytes(model)
    params = 64 * 32 + 32 + 32 * 4 + 4
    assert dense == params * 4
    # 4-bit weights + one fp32 scale per [row, group] + fp32 biases
    assert effective == (64 * 32 * 4) // 8 + 32 * 2 * 4 + (32 * 4 * 4) // 8 + 4 * 1 * 4 + (32 + 4) * 4
    assert mean_bits == 4.0


def test_prepare_refuses_group_size_that_does_not_divide_or_conv() -> None:
    model = nn.Sequential(nn.Linear(48, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'1 \(8 input features\)'.*group_size=16"):
        prepare_(model, group_size=16)
    assert type(model[0]) is nn.Linear  # nothing swapped
    conv = nn.Sequential(nn.Conv2d(32, 4, 1))
    with pytest.raises(ValueError, match="Conv2d: group-wise scales are for Linear / Conv1D only"):
        prepare_(conv, group_size=16)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def test_embedding_not_quantized_by_default() -> None:
    model = TokenModel()
    prepare_(model)
    assert [n for n, _ in qat_modules(model)] == ["head"]


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_per_row_fake_quant_and_int8_lookup(bits: int) -> None:
    model = TokenModel()
    prepare_(model, weight_bits=bits, activation_bits=8, modules=["emb", "head"])
    assert isinstance(model.emb, QATEmbedding) and model.emb.activation_bits is None
    ids = torch.tensor([[1, 2, 0, 9], [3, 3, 4, 5]])
    model.train()
    model(ids)
    model.eval()
    # float64 reference: one symmetric scale per row (token)
    table = model.emb.weight.detach().double()
    qmax = 2 ** (bits - 1) - 1
    row_scale = (table.abs().amax(1) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    expected_table = torch.round(table / row_scale[:, None]).clamp(-qmax, qmax) * row_scale[:, None]
    with torch.no_grad():
        torch.testing.assert_close(model.emb(ids).double(), expected_table[ids], rtol=1e-6, atol=1e-7)
    int8 = convert_to_int8(model)
    emb = int8.emb
    assert isinstance(emb, Int8Embedding) and emb.weight_int8.dtype == torch.int8
    assert tuple(emb.weight_scale.shape) == (10,)
    with torch.no_grad():
        assert torch.equal(emb(ids), model.emb(ids))
        assert torch.equal(int8(ids), model(ids))
    torch.testing.assert_close(emb.weight.double(), expected_table, rtol=1e-6, atol=1e-7)
    # stored: one byte per code + one fp32 scale per row (fp32 table: 10 * 8 * 4 bytes)
    assert sum(t.nbytes for t in emb.state_dict().values()) == 10 * 8 + 10 * 4
    finalize_(model)
    assert type(model.emb) is nn.Embedding


def test_embedding_with_max_norm_refused() -> None:
    model = nn.Sequential(nn.Embedding(5, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="max_norm"):
        prepare_(model, modules=["0"])
