"""Quantization arithmetic: integer ranges, scales, fake-quantization, BatchNorm folding.

Conventions (the ones every int8 runtime accepts):

- **Weights**: symmetric, per output channel, zero point 0, integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (``[-127, 127]`` at 8 bits, ``[-7, 7]`` at 4 bits). Zero maps to zero exactly, so pruned weights stay
  exactly zero through fake-quantization and conversion.
- **Activations**: affine per tensor, unsigned ``[0, 2^b - 1]`` with a zero point (``(0, 255)`` at 8
  bits, one of the ranges ONNX's QuantizeLinear accepts); or the same affine form per token (each row
  over the last dim) with the range it has at run time (dynamic quantization, :func:`fake_quantize_per_token`).

Fake-quantization uses the stable core ops :func:`torch.fake_quantize_per_channel_affine` and
:func:`torch.fake_quantize_per_tensor_affine` (straight-through gradients).

The output channel of a weight is dim 0 (``nn.Linear``, ``nn.Conv*``) unless a function takes ``axis``:
Hugging Face's ``Conv1D`` stores its weight ``[in, out]``, so its output channel is dim 1.
"""

from __future__ import annotations

import torch

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_ACTIVATION_BITS = (8,)
# The smallest scale: an all-zero channel (fully pruned) must not divide by zero.
_EPS = torch.finfo(torch.float32).eps


def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed integer range of ``bits``-bit weights (the most negative code is unused).

    Example::

        >>> weight_qrange(8), weight_qrange(4)
        ((-127, 127), (-7, 7))
    """
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def activation_qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range of ``bits``-bit activations.

    Example::

        >>> activation_qrange(8)
        (0, 255)
    """
    return 0, 2**bits - 1


def _channel_shape(dim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of a ``dim``-dimensional tensor."""
    return tuple(-1 if d == axis else 1 for d in range(dim))


def weight_scale(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w| / qmax``; ``axis`` is the output-channel dim.

    Example::

        >>> weight_scale(torch.tensor([[1.0, -2.54], [0.0, 0.0]]), 8)
        tensor([2.0000e-02, 1.1921e-07])
    """
    amax = weight.detach().abs().movedim(axis, 0).flatten(1).amax(1)
    return (amax / weight_qrange(bits)[1]).clamp_min(_EPS)


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``(scale, zero_point)`` covering ``[lo, hi]`` (widened to contain 0, so 0 is exact).

    Example::

        >>> s, z = activation_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8)
        >>> round(float(s), 6), int(z)
        (0.015686, 64)
    """
    qmin, qmax = activation_qrange(bits)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale.reshape(()).float(), zero_point.reshape(())


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric fake-quantization along ``axis`` (straight-through gradient)."""
    qmin, qmax = weight_qrange(bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero, axis, qmin, qmax)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor affine fake-quantization (straight-through gradient inside the range)."""
    qmin, qmax = activation_qrange(bits)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def per_token_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``(scale, zero_point)`` of each token (row over the last dim) of ``x``, from its own min/max.

    Dynamic quantization (torchao's per-token int8 activations): nothing is observed, every row gets the
    range it has at run time, widened to contain 0 as :func:`activation_qparams` does. Shapes: ``x.shape[:-1]``.

    Example::

        >>> s, z = per_token_qparams(torch.tensor([[-1.0, 3.0], [0.0, 2.55]]), 8)
        >>> [round(v, 6) for v in s.tolist()], z.tolist()
        ([0.015686, 0.01], [64, 0])
    """
    qmin, qmax = activation_qrange(bits)
    lo, hi = torch.aminmax(x.detach().float(), dim=-1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize each token of ``x`` with its own run-time range (straight-through gradient).

    Example::

        >>> fake_quantize_per_token(torch.tensor([[0.0, 1.0, 2.55]]), 8)
        tensor([[0.0000, 1.0000, 2.5500]])
    """
    qmin, qmax = activation_qrange(bits)
    scale, zero_point = per_token_qparams(x, bits)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.fake_quantize_per_channel_affine(rows, scale.reshape(-1), zero_point.reshape(-1), 0, qmin, qmax)
    return out.reshape(x.shape)


def quantize_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (``int8`` storage) and per-channel scales of ``weight`` (channels along ``axis``).

    Example::

        >>> q, s = quantize_weight(torch.tensor([[0.5, -1.0, 0.0]]), 8)
        >>> q
        tensor([[  64, -127,    0]], dtype=torch.int8)
    """
    scale = weight_scale(weight, bits, axis) if scale is None else scale
    qmin, qmax = weight_qrange(bits)
    per_channel = scale.reshape(_channel_shape(weight.dim(), axis))
    codes = torch.round(weight.detach() / per_channel).clamp(qmin, qmax).to(torch.int8)
    return codes, scale.detach().float().clone()


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``codes * scale`` with one scale per channel along ``axis``, as fp32.

    Example::

        >>> dequantize_weight(torch.tensor([[2, -1]], dtype=torch.int8), torch.tensor([0.5, 0.25]), axis=1)
        tensor([[ 1.0000, -0.2500]])
    """
    return codes.float() * scale.reshape(_channel_shape(codes.dim(), axis))


def batchnorm_factor(running_var: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Per-channel multiplier ``gamma / sqrt(var + eps)`` that an inference-mode BatchNorm applies."""
    gamma = torch.ones_like(running_var) if gamma is None else gamma
    return gamma / torch.sqrt(running_var + eps)


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a conv followed by an inference-mode BatchNorm, as one conv.

    Example::

        >>> w, b = fold_batchnorm(torch.ones(2, 1, 1), None, torch.zeros(2), torch.full((2,), 4.0),
        ...                       torch.ones(2), torch.tensor([1.0, 2.0]), 0.0)
        >>> w.flatten().tolist(), b.tolist()
        ([0.5, 0.5], [1.0, 2.0])
    """
    beta = torch.zeros_like(running_var) if beta is None else beta
    bias = torch.zeros_like(running_mean) if bias is None else bias
    factor = batchnorm_factor(running_var, gamma, eps)
    return weight * factor.reshape(_channel_shape(weight.dim(), 0)), beta + (bias - running_mean) * factor


def _check_group_size(weight: torch.Tensor, group_size: int, axis: int) -> int:
    """Input features per output channel; ``group_size`` must divide them."""
    if weight.dim() != 2:
        raise ValueError(f"group-wise scales need a 2-d (Linear) weight, got shape {tuple(weight.shape)}.")
    in_features = weight.shape[1 - axis]
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {in_features} input features.")
    return in_features


def _grouped(weight: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``weight`` as ``[out, in / group_size, group_size]`` (output channels along ``axis``)."""
    _check_group_size(weight, group_size, axis)
    w = weight.movedim(axis, 0)
    return w.reshape(w.shape[0], -1, group_size)


def group_weight_scale(weight: torch.Tensor, bits: int, group_size: int, axis: int = 0) -> torch.Tensor:
    """Group-wise symmetric scales ``max|w| / qmax``, one per output channel and group of input features.

    The groups are ``group_size`` consecutive input features (torchao's int4 weight-only layout): the
    result has shape ``[out, in / group_size]``. ``axis`` is the output-channel dim of the 2-d weight
    (1 for Hugging Face's ``Conv1D``).

    Example::

        >>> group_weight_scale(torch.tensor([[7.0, -1.0, 0.5, 0.0]]), 4, group_size=2)
        tensor([[1.0000, 0.0714]])
    """
    amax = _grouped(weight.detach(), group_size, axis).abs().amax(-1)
    return (amax / weight_qrange(bits)[1]).clamp_min(_EPS)


def fake_quantize_weight_grouped(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, axis: int = 0
) -> torch.Tensor:
    """Group-wise symmetric fake-quantization (straight-through gradient); ``scale`` is ``[out, in / g]``."""
    qmin, qmax = weight_qrange(bits)
    grouped = _grouped(weight, group_size, axis)
    flat = grouped.reshape(-1, group_size)  # one "channel" per group
    zero = torch.zeros(flat.shape[0], dtype=torch.int32, device=weight.device)
    fq = torch.fake_quantize_per_channel_affine(flat, scale.reshape(-1).float(), zero, 0, qmin, qmax)
    return fq.reshape(grouped.shape[0], -1).movedim(0, axis)


def quantize_weight_grouped(
    weight: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (``int8`` storage, ``[out, in]``) and ``[out, in / g]`` scales of a ``[out, in]`` weight.

    Example::

        >>> q, s = quantize_weight_grouped(torch.tensor([[7.0, -1.0, 0.5, 0.0]]), 4, group_size=2)
        >>> q
        tensor([[ 7, -1,  7,  0]], dtype=torch.int8)
    """
    scale = group_weight_scale(weight, bits, group_size) if scale is None else scale
    qmin, qmax = weight_qrange(bits)
    grouped = _grouped(weight.detach(), group_size, 0)
    codes = torch.round(grouped / scale.unsqueeze(-1)).clamp(qmin, qmax).to(torch.int8)
    return codes.reshape(weight.shape), scale.detach().float().clone()


def dequantize_weight_grouped(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` with one scale per output channel and group of input features (``[out, in]``).

    Example::

        >>> dequantize_weight_grouped(torch.tensor([[2, -1, 4, 1]], dtype=torch.int8), torch.tensor([[0.5, 0.25]]))
        tensor([[ 1.0000, -0.5000,  1.0000,  0.2500]])
    """
    out, groups = scale.shape
    return (codes.float().reshape(out, groups, -1) * scale.unsqueeze(-1)).reshape(codes.shape)
