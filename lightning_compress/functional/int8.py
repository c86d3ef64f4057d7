"""Int8 conversion: a QAT-prepared model becomes a deployable copy with int8 weight codes.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.functional.qat import prepare_
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> prepare_(model)
    >>> y = model(torch.randn(4, 8))  # observe ranges
    >>> int8 = convert_to_int8(model)
    >>> int8[0].weight_int8.dtype, tuple(int8[0].weight_scale.shape)
    (torch.int8, (8,))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.conv_bn import find_conv_bn_pairs
from lightning_compress.functional.fake_quant import (
    activation_qparams,
    activation_qrange,
    batchnorm_factor,
    dequantize_weight,
    dequantize_weight_grouped,
    fake_quantize_per_token,
    group_weight_scale,
    per_token_qparams,
    quantize_weight,
    quantize_weight_grouped,
    weight_scale,
)
from lightning_compress.functional.qat import FOLDED_BN_TYPES, _QATMixin, keep_own_forward, qat_modules, qat_pools


class _DequantizeWeight(torch.autograd.Function):
    """``codes * scale`` per output channel; exports to ONNX as ``DequantizeLinear`` of int8 initializers."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return dequantize_weight(codes, scale)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero_point: Any) -> Any:  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


def pack_nbits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[..., k]`` packed as onnxruntime's ``MatMulNBits`` stores them.

    Unsigned with zero point ``2^(bits-1)``, ``8 / bits`` codes per byte along the last dim, the first in
    the low bits.

    Example::

        >>> pack_nbits(torch.tensor([[-7, 7, 0, 1]], dtype=torch.int8), 4).tolist()  # 1 | 15 << 4, 8 | 9 << 4
        [[241, 152]]
    """
    per_byte = 8 // bits
    unsigned = codes.to(torch.int32) + 2 ** (bits - 1)
    if unsigned.shape[-1] % per_byte:  # pad with the zero point (code 0)
        pad = per_byte - unsigned.shape[-1] % per_byte
        unsigned = torch.cat([unsigned, unsigned.new_full((*unsigned.shape[:-1], pad), 2 ** (bits - 1))], -1)
    unsigned = unsigned.reshape(*unsigned.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (unsigned << shifts).sum(-1).to(torch.uint8)


class _MatMulNBits(torch.autograd.Function):
    """``x @ (codes * scale).T`` with group-wise scales; exports as onnxruntime's ``com.microsoft::MatMulNBits``."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        codes: torch.Tensor,
        scale: torch.Tensor,
        packed: torch.Tensor,
        zero_points: torch.Tensor,
        bits: int,
        group_size: int,
        accuracy_level: int,
    ) -> torch.Tensor:
        return F.linear(x, dequantize_weight_grouped(codes, scale))

    @staticmethod
    def symbolic(  # noqa: D102
        g: Any,
        x: Any,
        codes: Any,
        scale: Any,
        packed: Any,
        zero_points: Any,
        bits: int,
        group_size: int,
        accuracy_level: int,
    ) -> Any:
        out_features, in_features = codes.type().sizes()
        y = g.op(
            "com.microsoft::MatMulNBits",
            x,
            packed,
            scale,
            zero_points,
            K_i=in_features,
            N_i=out_features,
            bits_i=bits,
            block_size_i=group_size,
            accuracy_level_i=accuracy_level,
        )
        x_sizes = x.type().varyingSizes()
        if x_sizes is not None:  # the exporter cannot infer a custom op's output shape: [..., N]
            y.setType(x.type().with_sizes([*x_sizes[:-1], out_features]))
        return y


def matmul_nbits_problem(layer: Int8Layer) -> str | None:
    """Why a group-wise :class:`Int8Layer` cannot export as ``MatMulNBits``, or ``None`` when it can."""
    if layer.weight_bits != 4:
        return f"weight_bits={layer.weight_bits} (4 only)"
    g = layer.group_size
    if g is None or g < 16 or g & (g - 1):
        return f"group_size={g} (a power of two >= 16)"
    if layer.activation_bits is not None and layer.activation_granularity != "token":
        return "input quantized per tensor (weight-only or per-token inputs only)"
    return None


# onnxruntime's MatMulNBits ``accuracy_level``: 0 computes in fp32 on dequantized weights; 4 quantizes
# the input to int8 itself (per row and block of ``block_size`` inputs, at run time) and runs int8 dot
# products. Level 4 is the export of per-token dynamic activations: finer blocks than one range per token.
NBITS_WEIGHT_ONLY, NBITS_INT8_INPUT = 0, 4


class _MatMulInteger(torch.autograd.Function):
    """``uint8 [M, K] @ int8 [K, N]`` accumulated in int32; exports as ONNX ``MatMulInteger`` (no zero points).

    onnxruntime's ``MatMulInteger`` takes one zero point for the whole input, so a per-row zero point is
    subtracted afterwards (``zero_point * column sums``) by the caller.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # float64 holds every int32 sum of uint8 * int8 products exactly (K < 2^37).
        return (a.double() @ b.double()).to(torch.int32)

    @staticmethod
    def symbolic(g: Any, a: Any, b: Any) -> Any:  # noqa: D102
        return g.op("MatMulInteger", a, b)


class _QuantizeRows(torch.autograd.Function):
    """uint8 codes of each row of ``x [M, K]`` with its own scale and zero point; exports as ``QuantizeLinear``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # x * (1 / scale), as torch's fake-quantization kernels compute it.
        return torch.clamp(torch.round(x * (1.0 / scale)[:, None]) + zero_point[:, None], 0, 255).to(torch.uint8)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any) -> Any:  # noqa: D102
        uint8 = g.op("Cast", zero_point, to_i=2)  # TensorProto.UINT8
        return g.op("QuantizeLinear", x, scale, uint8, axis_i=0)


class _LikeRowsOf(torch.autograd.Function):
    """``y [M, N]`` reshaped to ``x``'s leading dims and ``N``; exports as one ``Shape``-driven ``Reshape``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def symbolic(g: Any, y: Any, x: Any) -> Any:  # noqa: D102
        lead = g.op("Shape", x, end_i=-1)
        last = g.op("Shape", y, start_i=-1)
        return g.op("Reshape", y, g.op("Concat", lead, last, axis_i=0))


def _like_rows_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _LikeRowsOf.apply(y, x)


def per_token_int8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    column_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with each input row quantized to uint8 at run time and int8 weight codes, in integers.

    The same numbers as :func:`~lightning_compress.functional.fake_quant.fake_quantize_per_token` followed
    by a float linear on the dequantized weight, computed as the ONNX export runs it: ``MatMulInteger`` of
    the uint8 input and the int8 codes, minus ``zero_point * column sums of the codes``, times
    ``input scale * weight scale``. ``column_sums`` (int32 ``codes.sum(1)``) can be precomputed, so an
    export stores ``[out]`` int32 sums instead of summing a widened copy of the codes at run time.

    Example::

        >>> codes = torch.tensor([[1, -2], [3, 0]], dtype=torch.int8)
        >>> per_token_int8_linear(torch.tensor([[0.0, 2.55]]), codes, torch.tensor([1.0, 0.5]), None, 8)
        tensor([[-5.1000,  0.0000]])
    """
    if bits != 8:
        raise ValueError(f"per_token_int8_linear quantizes inputs to uint8: bits must be 8, got {bits}.")
    # Rows as a matrix for QuantizeLinear's per-row scale: a constant-shape Reshape in, and the output
    # reshaped like the input by one Reshape (shapes stay out of the exported arithmetic).
    rows = x.reshape(-1, int(codes.shape[1]))
    row_scale, zero_point = per_token_qparams(rows, bits)
    acc = _MatMulInteger.apply(_QuantizeRows.apply(rows, row_scale, zero_point), codes.t())
    column_sums = codes.to(torch.int32).sum(1) if column_sums is None else column_sums
    acc = acc - zero_point[:, None] * column_sums  # int32: exact
    y = acc.float() * (row_scale[:, None] * scale)
    if bias is not None:
        y = y + bias
    return _like_rows_of(y, x)


def prepare_matmul_nbits_(layer: Int8Layer) -> None:
    """Attach the packed codes and zero points ``MatMulNBits`` reads (buffers, so they export as initializers).

    Only for the export: :func:`~lightning_compress.export.onnx.export_onnx` calls it on its own copy.
    """
    assert layer.group_size is not None
    out_features, in_features = layer.weight_int8.shape
    blocks = in_features // layer.group_size
    packed = pack_nbits(layer.weight_int8, layer.weight_bits).reshape(out_features, blocks, -1)
    zero_points = pack_nbits(torch.zeros(out_features, blocks, dtype=torch.int8), layer.weight_bits)
    layer.register_buffer("nbits_packed", packed, persistent=False)
    layer.register_buffer("nbits_zero_points", zero_points, persistent=False)


def prepare_per_token_export_(layer: Int8Layer) -> None:
    """Attach the int32 column sums of the codes that the integer per-token linear subtracts (export only).

    Only for the export: :func:`~lightning_compress.export.onnx.export_onnx` calls it on its own copy.
    """
    layer.register_buffer("token_column_sums", layer.weight_int8.to(torch.int32).sum(1), persistent=False)


class Int8Layer(nn.Module):
    """A quantized Linear / Conv1d / Conv2d as deployed: int8 weight codes + fp32 per-channel scales.

    In PyTorch the weights are *stored* in int8 and dequantized (``codes * scale``) at each call, then the
    fp32 kernel runs: the gain is size (``state_dict`` ~4x smaller), not speed. For int8 kernels in
    PyTorch, :func:`~lightning_compress.functional.int8_compile.compile_int8` compiles these layers to
    oneDNN's (``torch.compile``). With ``activation_bits`` the input is quantize-dequantized with the scale
    observed in training, so outputs match the fake-quantized model. Exported to ONNX
    (:func:`~lightning_compress.export.onnx.export_onnx`) the weights stay int8 initializers and
    onnxruntime runs int8 kernels.

    Buffers: ``weight_int8`` (int8 codes ``[out, in, ...]``, 4-bit codes are stored one per byte),
    ``weight_scale`` (``[out]``, or ``[out, in / group_size]`` with group-wise scales), ``bias`` (fp32 or
    absent), ``input_scale`` / ``input_zero_point`` when activations are quantized per tensor. With
    ``activation_granularity="token"`` each input row is quantized with its own run-time range instead, and
    the ONNX export computes in integers (``MatMulInteger``, or ``MatMulNBits`` at ``accuracy_level=4``
    for 4-bit group-wise weights).

    Modules that read their children's weights directly (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``'s fast path) find ``weight`` (the dequantized values, in the layout of
    the layer it replaced: ``[in, out]`` for a Hugging Face ``Conv1D``) and ``bias``. The layer also keeps
    fused fast paths from bypassing its forward (:func:`~lightning_compress.functional.qat.keep_own_forward`).
    """

    # Class default: Int8Layers pickled before per-token inputs existed load and run as they did.
    activation_granularity = "tensor"

    def __init__(
        self,
        kind: str,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        weight_bits: int,
        activation_qparams: tuple[float, int] | None,
        activation_bits: int | None,
        conv_args: dict[str, Any] | None = None,
        weight_layout: str = "out_in",
        output_qparams: tuple[float, int] | None = None,
        group_size: int | None = None,
        activation_granularity: str = "tensor",
    ) -> None:
        super().__init__()
        self.kind = kind
        # Set for group-wise scales (``weight_scale`` is ``[out, in / group_size]``, linear layers only).
        self.group_size = group_size
        self.weight_layout = weight_layout
        self.weight_bits = weight_bits
        # "token": every input row is quantized with its own range at run time, no stored qparams.
        self.activation_granularity = activation_granularity
        dynamic = activation_granularity == "token"
        self.activation_bits = activation_bits if activation_qparams is not None or dynamic else None
        self.conv_args = dict(conv_args or {})
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        input_scale, input_zero_point = activation_qparams or (None, None)
        self.register_buffer("input_scale", None if input_scale is None else torch.tensor(float(input_scale)))
        self.register_buffer(
            "input_zero_point",
            None if input_zero_point is None else torch.tensor(int(input_zero_point), dtype=torch.int32),
        )
        output_scale, output_zero_point = (
            output_qparams if self.activation_bits is not None and output_qparams else (None, None)
        )
        self.register_buffer("output_scale", None if output_scale is None else torch.tensor(float(output_scale)))
        self.register_buffer(
            "output_zero_point",
            None if output_zero_point is None else torch.tensor(int(output_zero_point), dtype=torch.int32),
        )
        keep_own_forward(self)

    @property
    def in_features(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[1])

    @property
    def out_features(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the replaced layer's layout (for modules that read ``.weight``)."""
        weight = self.dequantized_weight()
        return weight.t() if self.weight_layout == "in_out" else weight

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32 values (``codes * scale``)."""
        if self.group_size is not None:
            return dequantize_weight_grouped(self.weight_int8, self.weight_scale)
        zero_point = torch.zeros(self.weight_scale.shape, dtype=torch.int8, device=self.weight_scale.device)
        return _DequantizeWeight.apply(self.weight_int8, self.weight_scale, zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dynamic = self.activation_bits is not None and self.activation_granularity == "token"
        nbits = self.kind == "linear" and getattr(self, "nbits_packed", None) is not None
        if dynamic and torch.onnx.is_in_onnx_export() and not nbits:
            # The export computes in integers; in PyTorch the float form below is faster and equal.
            sums = getattr(self, "token_column_sums", None)
            return per_token_int8_linear(x, self.weight_int8, self.weight_scale, self.bias, self.activation_bits, sums)
        if dynamic and not (nbits and torch.onnx.is_in_onnx_export()):  # MatMulNBits quantizes its input itself
            x = fake_quantize_per_token(x, self.activation_bits)
        elif self.activation_bits is not None and not dynamic:
            qmin, qmax = activation_qrange(self.activation_bits)
            x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, self.input_zero_point, qmin, qmax)
        if nbits:
            y = _MatMulNBits.apply(
                x,
                self.weight_int8,
                self.weight_scale,
                self.nbits_packed,
                self.nbits_zero_points,
                self.weight_bits,
                self.group_size,
                NBITS_INT8_INPUT if dynamic else NBITS_WEIGHT_ONLY,
            )
            if self.bias is not None:
                y = y + self.bias
        elif self.kind == "linear":
            y = F.linear(x, self.dequantized_weight(), self.bias)
        else:
            conv = F.conv1d if self.kind == "conv1d" else F.conv2d
            y = conv(x, self.dequantized_weight(), self.bias, **self.conv_args)
        if self.output_scale is not None and self.activation_bits is not None:
            # As in QAT (``quantize_output``): a conv output that an int8 runtime keeps in int8.
            qmin, qmax = activation_qrange(self.activation_bits)
            y = torch.fake_quantize_per_tensor_affine(y, self.output_scale, self.output_zero_point, qmin, qmax)
        return y

    def extra_repr(self) -> str:  # noqa: D102
        shape = "x".join(map(str, self.weight_int8.shape))
        bits = f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        groups = f", group_size={self.group_size}" if self.group_size is not None else ""
        tokens = ", per-token activations" if self.activation_granularity == "token" else ""
        return f"{self.kind}, weight={shape}, {bits}{groups}{tokens}"


class Int8Embedding(nn.Module):
    """A quantized ``nn.Embedding`` as deployed: int8 codes ``[num_embeddings, dim]`` + one fp32 scale per row.

    A lookup gathers the codes and scales of the looked-up rows only and dequantizes those
    (``codes[idx] * scale[idx]``): the full fp32 table is never built. ``weight`` (the whole dequantized
    table) exists for code that reads it.

    Example::

        >>> emb = Int8Embedding(torch.tensor([[2, -1], [4, 0]], dtype=torch.int8), torch.tensor([0.5, 0.25]), 8)
        >>> emb(torch.tensor([1, 0]))
        tensor([[ 1.0000,  0.0000],
                [ 1.0000, -0.5000]])
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, weight_bits: int) -> None:
        super().__init__()
        self.weight_bits = weight_bits
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())

    @property
    def num_embeddings(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[0])

    @property
    def embedding_dim(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table (for code that reads ``.weight``)."""
        return dequantize_weight(self.weight_int8, self.weight_scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        codes = F.embedding(input, self.weight_int8)
        return codes.float() * F.embedding(input, self.weight_scale.unsqueeze(1))

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_bits={self.weight_bits}"


def _deployed_scale(module: _QATMixin, weight: torch.Tensor) -> torch.Tensor:
    """The weight scale the fake-quantized model uses, or a fresh one where it never quantized."""
    # weight_scale starts at ones and is only written while fake-quantization observes: a layer whose
    # QAT never started (start_step not reached) or was disabled gets the scale of its final weight.
    never_observed = not bool((module.weight_scale != 1).any())
    if not module.fake_quant_enabled or never_observed:
        if module.group_size is not None:
            return group_weight_scale(weight, module.weight_bits, module.group_size)
        return weight_scale(weight, module.weight_bits)
    return module.weight_scale


def _to_int8_layer(module: _QATMixin, bn: nn.modules.batchnorm._BatchNorm | None = None) -> nn.Module:
    if isinstance(module, nn.Embedding):  # no bias, no BatchNorm: one scale per row
        table = module.weight.detach()
        codes, scale = quantize_weight(table, module.weight_bits, _deployed_scale(module, table))
        return Int8Embedding(codes, scale, module.weight_bits)
    weight, bias = module.folded_weight_bias()
    # Codes are stored [out, in, ...]: a Conv1D ([in, out]) becomes a plain linear, one export path.
    weight = weight.detach().movedim(module.weight_axis, 0)
    if module.group_size is not None:
        codes, scale = quantize_weight_grouped(
            weight, module.weight_bits, module.group_size, _deployed_scale(module, weight)
        )
        return _grouped_layer(module, codes, scale, bias)
    codes, scale = quantize_weight(weight, module.weight_bits, _deployed_scale(module, weight))
    if bn is not None:
        codes, scale, bias = _fold_after_quantization(codes, scale, bias, bn)
    act, out = _input_qparams(module), None
    if module.activation_bits is not None and module.quantize_output and module.output_observed:
        s, z = activation_qparams(module.output_range[0], module.output_range[1], module.activation_bits)
        out = (float(s), int(z))
    if module.weight_axis == 1 or isinstance(module, nn.Linear):  # a Conv1D ([in, out]) is a Linear too
        return Int8Layer(
            "linear",
            codes,
            scale,
            bias,
            module.weight_bits,
            act,
            module.activation_bits,
            weight_layout="in_out" if module.weight_axis == 1 else "out_in",
            output_qparams=out,
            activation_granularity=module.activation_granularity,
        )
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={module.padding_mode!r} is not supported by the int8 conversion.")
    conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    return Int8Layer(
        kind, codes, scale, bias, module.weight_bits, act, module.activation_bits, conv_args, output_qparams=out
    )


def _grouped_layer(module: _QATMixin, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int8Layer:
    """The :class:`Int8Layer` of a group-wise Linear / ``Conv1D`` (no BatchNorm, no output quantization)."""
    return Int8Layer(
        "linear",
        codes,
        scale,
        bias,
        module.weight_bits,
        _input_qparams(module),
        module.activation_bits,
        weight_layout="in_out" if module.weight_axis == 1 else "out_in",
        group_size=module.group_size,
        activation_granularity=module.activation_granularity,
    )


def _input_qparams(module: _QATMixin) -> tuple[float, int] | None:
    """The observed ``(scale, zero_point)`` of a layer's input; ``None`` for weight-only, per-token or unobserved."""
    if module.activation_bits is None or module.activation_granularity == "token" or not module.activation_observed:
        return None
    s, z = module.activation_qparams()
    return float(s), int(z)


def _fold_after_quantization(
    codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm into an already quantized conv, exactly.

    The fake-quantized model computes ``f * (conv(x, codes * s) + b - mean) + beta`` per channel with
    ``f = gamma / sqrt(var + eps)``: the codes stay, the scale becomes ``s * |f|`` (a negative ``f``
    flips the codes' sign, exact in the symmetric range) and the bias ``beta + (b - mean) * f``.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    factor = batchnorm_factor(bn.running_var, bn.weight, bn.eps).detach().float()
    sign = torch.where(factor < 0, -1, 1).to(torch.int8).reshape((-1,) + (1,) * (codes.dim() - 1))
    codes = torch.where(factor.reshape(sign.shape) == 0, 0, codes * sign).to(torch.int8)
    new_scale = (scale * factor.abs()).clamp_min(torch.finfo(torch.float32).eps)
    beta = torch.zeros_like(factor) if bn.bias is None else bn.bias.detach().float()
    bias = torch.zeros_like(factor) if bias is None else bias.detach().float()
    return codes, new_scale, beta + (bias - bn.running_mean.float()) * factor


@torch.no_grad()
def convert_to_int8(model: nn.Module) -> nn.Module:
    """A deployable copy of a QAT-prepared ``model`` with int8 weights; ``model`` itself is unchanged.

    Every QAT layer becomes an :class:`Int8Layer` (int8 codes + per-channel scales, the observed input
    quantization), a folded BatchNorm becomes ``nn.Identity``. A BatchNorm that was not folded during
    training but follows a quantized conv in the data flow (``prepare_(fold_bn=False)``) is folded here,
    exactly (into the per-channel scales and the bias, see :func:`_fold_after_quantization`), so no
    BatchNorm is left between int8 layers after export. The copy is in eval mode; its ``state_dict``
    holds int8 tensors, about 4x smaller on disk than fp32.

    Raises:
        ValueError: if ``model`` has no QAT layer.
    """
    if not any(True for _ in qat_modules(model)):
        raise ValueError(
            "convert_to_int8 needs a model prepared for quantization "
            "(QuantizationAwareTraining or prepare_); "
            "this model has no QAT layer."
        )
    out = copy.deepcopy(model).eval()
    convs = [n for n, m in qat_modules(out) if isinstance(m, nn.Conv1d | nn.Conv2d) and m.folded_bn is None]
    named = dict(out.named_modules())
    late_pairs = find_conv_bn_pairs(out, convs).pairs if convs else {}
    late_bns = {named[bn_name]: conv_name for conv_name, bn_name in late_pairs.items()}
    for module_name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{module_name}.{child_name}" if module_name else child_name
            if isinstance(child, _QATMixin):
                bn = named[late_pairs[full]] if full in late_pairs else None
                setattr(module, child_name, _to_int8_layer(child, bn))  # type: ignore[arg-type]
            elif isinstance(child, FOLDED_BN_TYPES) or child in late_bns:
                setattr(module, child_name, nn.Identity())
    for _, pool in qat_pools(out):
        # Observed average pools stay, frozen: they quantize their input as in training and as onnxruntime.
        pool.observer_enabled = False
    return out


def int8_embeddings(model: nn.Module) -> dict[str, Int8Embedding]:
    """The :class:`Int8Embedding` modules of a converted model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Embedding)}


def int8_layers(model: nn.Module) -> dict[str, Int8Layer]:
    """The :class:`Int8Layer` modules of a converted model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Layer)}


def quantized_size_bytes(model: nn.Module) -> tuple[int, int, float]:
    """``(fp32 bytes, effective bytes, mean weight bits)`` of a QAT-prepared model's parameters.

    Effective bytes count each quantized weight at its bit width plus one fp32 scale per channel (per
    group with group-wise scales, per row for embeddings), everything else (biases, normalisation,
    unquantized layers) at 32 bits.
    """
    dense = sum(p.numel() * 4 for p in model.parameters())
    effective = dense
    bits_total = numel_total = 0
    for _, m in qat_modules(model):
        n = m.weight.numel()
        effective += -n * 4 + (n * m.weight_bits + 7) // 8 + m.weight_scale.numel() * 4
        bits_total += n * m.weight_bits
        numel_total += n
    return dense, effective, (bits_total / numel_total if numel_total else 32.0)
