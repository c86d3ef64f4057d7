"""Quantization as pure torch: fake-quantization for training, int8 conversion, module swaps.

Conventions (the ones every int8 runtime accepts):

- **Weights**: symmetric, per output channel, zero point 0, integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (``[-127, 127]`` at 8 bits, ``[-7, 7]`` at 4 bits). Zero maps to zero exactly, so pruned weights stay
  exactly zero through fake-quantization and conversion.
- **Activations**: affine per tensor, unsigned ``[0, 2^b - 1]`` with a zero point (``(0, 255)`` at 8
  bits, one of the ranges ONNX's QuantizeLinear accepts), from an EMA of the observed min/max.

Fake-quantization uses the stable core ops :func:`torch.fake_quantize_per_channel_affine` and
:func:`torch.fake_quantize_per_tensor_affine` (straight-through gradients).

Quantized layers are the user's own ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` objects with their class
switched in place to a subclass (:class:`QATLinear`, ...) that adds observer buffers. Parameter objects,
names, hooks and references held elsewhere (an optimizer, a pruning callback) stay valid, the user's
``forward`` is never touched, and :func:`finalize_` switches the class back.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> names = prepare_(model, weight_bits=8, activation_bits=8)
    >>> names
    ['0', '2']
    >>> y = model(torch.randn(4, 8))  # observes activation ranges, fake-quantizes
    >>> int8 = convert_to_int8(model)
    >>> int8[0].weight_int8.dtype, tuple(int8[0].weight_scale.shape)
    (torch.int8, (8,))
    >>> finalize_(model)
    >>> type(model[0]).__name__
    'Linear'
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_ACTIVATION_BITS = (8,)
QUANTIZABLE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")
_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------- math
def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed integer range of ``bits``-bit weights (the most negative code is unused)."""
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def activation_qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range of ``bits``-bit activations."""
    return 0, 2**bits - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w| / qmax`` (dim 0 is the output channel).

    Example::

        >>> weight_scale(torch.tensor([[1.0, -2.54], [0.0, 0.0]]), 8)
        tensor([2.0000e-02, 1.1921e-07])
    """
    amax = weight.detach().abs().flatten(1).amax(1)
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


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake-quantization along dim 0 (straight-through gradient)."""
    qmin, qmax = weight_qrange(bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero, 0, qmin, qmax)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor affine fake-quantization (straight-through gradient inside the range)."""
    qmin, qmax = activation_qrange(bits)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def quantize_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (``int8`` storage) and per-channel scales of ``weight``.

    Example::

        >>> q, s = quantize_weight(torch.tensor([[0.5, -1.0, 0.0]]), 8)
        >>> q
        tensor([[  64, -127,    0]], dtype=torch.int8)
    """
    scale = weight_scale(weight, bits) if scale is None else scale
    qmin, qmax = weight_qrange(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    codes = torch.round(weight.detach() / scale.reshape(shape)).clamp(qmin, qmax).to(torch.int8)
    return codes, scale.detach().float().clone()


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
    gamma = torch.ones_like(running_var) if gamma is None else gamma
    beta = torch.zeros_like(running_var) if beta is None else beta
    bias = torch.zeros_like(running_mean) if bias is None else bias
    factor = gamma / torch.sqrt(running_var + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * factor.reshape(shape), beta + (bias - running_mean) * factor


# ------------------------------------------------------------------------------ training-time modules
class _QATMixin:
    """Observer state and fake-quantization shared by :class:`QATLinear` and the QAT convolutions.

    Buffers (saved in the model's ``state_dict``, so a checkpoint restores them exactly):
    ``weight_scale`` (per output channel) and ``activation_range`` (``[min, max]``, ``inf`` until the
    first observation). Plain attributes set by :func:`prepare_` / the callback: ``weight_bits``,
    ``activation_bits``, ``ema_decay``, ``fake_quant_enabled``, ``observer_enabled``, ``bn_frozen``.
    """

    weight: nn.Parameter
    bias: torch.Tensor | None
    weight_scale: torch.Tensor
    activation_range: torch.Tensor
    training: bool

    def _init_qat(self, weight_bits: int, activation_bits: int | None, ema_decay: float) -> None:
        out_channels = self.weight.shape[0]
        device = self.weight.device
        self.register_buffer("weight_scale", torch.ones(out_channels, device=device))  # type: ignore[attr-defined]
        # The activation range exists even for weight-only layers, so the state_dict's keys do not depend
        # on the bit configuration and checkpoints load strictly across it.
        self.register_buffer(  # type: ignore[attr-defined]
            "activation_range", torch.tensor([float("inf"), float("-inf")], device=device)
        )
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.ema_decay = ema_decay
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.bn_frozen = False
        self.folded_bn: nn.modules.batchnorm._BatchNorm | None = None

    # ------------------------------------------------------------------ observers
    @property
    def activation_observed(self) -> bool:
        """Whether an activation range has been observed yet."""
        return bool(torch.isfinite(self.activation_range).all())

    @torch.no_grad()
    def _observe_activation(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        new = torch.stack([lo, hi])
        if not self.activation_observed:
            self.activation_range.copy_(new)
        else:
            self.activation_range.lerp_(new, 1.0 - self.ema_decay)

    def activation_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the layer input from the observed range."""
        assert self.activation_bits is not None
        return activation_qparams(self.activation_range[0], self.activation_range[1], self.activation_bits)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is None or not self.fake_quant_enabled:
            return x
        if self.training and self.observer_enabled:
            self._observe_activation(x)
        if not self.activation_observed:
            return x
        scale, zero_point = self.activation_qparams()
        return fake_quantize_activation(x, scale, zero_point, self.activation_bits)

    def _quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return weight
        if self.training and self.observer_enabled:
            with torch.no_grad():
                self.weight_scale.copy_(weight_scale(weight, self.weight_bits))
        return fake_quantize_weight(weight, self.weight_scale, self.weight_bits)

    # ------------------------------------------------------------------ weights as deployed
    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as deployed: with the BatchNorm folded in when one is attached."""
        bn = self.folded_bn
        if bn is None:
            return self.weight, self.bias
        assert bn.running_mean is not None and bn.running_var is not None
        return fold_batchnorm(self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

    def _qat_forward(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        x = self._quantize_input(x)
        bn = self.folded_bn
        if bn is None:
            return op(x, self._quantize_weight(self.weight), self.bias)
        if self.bn_frozen or not self.training:
            # Inference form: exactly the conv that conversion produces.
            weight, bias = self.folded_weight_bias()
            return op(x, self._quantize_weight(weight), bias)
        # Training with batch statistics (Jacob et al. 2018; torch.ao's ConvBn): quantize the weight
        # folded with the running statistics, undo the scaling on the output, then let BatchNorm
        # normalise with batch statistics and update its running estimates.
        assert bn.running_var is not None
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        y = op(x, self._quantize_weight(self.weight * factor.reshape(shape)), None)
        y = y / factor.reshape((1, -1) + (1,) * (y.dim() - 2))
        if self.bias is not None:
            y = y + self.bias.reshape((1, -1) + (1,) * (y.dim() - 2))
        return _batch_norm_train(bn, y)


def _batch_norm_train(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> torch.Tensor:
    # Same bookkeeping as _BatchNorm.forward in training mode.
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight (see :class:`_QATMixin` for the state)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._qat_forward(input, F.linear)


class QATConv1d(_QATMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input and weight, optionally with a folded BatchNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._qat_forward(input, self._conv_forward)


class QATConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight, optionally with a folded BatchNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._qat_forward(input, self._conv_forward)


class FoldedBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm whose work is done by the preceding QAT conv: its own forward is the identity.

    Its parameters and running statistics stay where they were (same ``state_dict`` keys).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return input


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """2-d version of :class:`FoldedBatchNorm1d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return input


_QAT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
}
_FOLDED_BN_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FoldedBatchNorm1d,
    nn.BatchNorm2d: FoldedBatchNorm2d,
}


def is_qat(module: nn.Module) -> bool:
    """Whether ``module`` is a swapped QAT layer."""
    return isinstance(module, _QATMixin)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, _QATMixin]]:
    """``(name, module)`` of every QAT layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _QATMixin):
            yield name, module


def conv_bn_pairs(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Conv → BatchNorm pairs that can be folded: adjacent in an ``nn.Sequential``, channels matching.

    Only ``nn.Sequential`` adjacency is trusted: there the conv's output feeds the BatchNorm and nothing
    else. Pairs anywhere else in a custom ``forward`` are left unfolded (still quantized).
    """
    wanted = set(names)
    pairs: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
            full_a = f"{parent_name}.{a_name}" if parent_name else a_name
            full_b = f"{parent_name}.{b_name}" if parent_name else b_name
            conv_ok = type(a) in (nn.Conv1d, nn.Conv2d, QATConv1d, QATConv2d) and full_a in wanted
            bn_ok = type(b) in (nn.BatchNorm1d, nn.BatchNorm2d) and b.track_running_stats
            if conv_ok and bn_ok and b.num_features == a.out_channels:
                pairs[full_a] = full_b
    return pairs


def prepare_(
    model: nn.Module,
    *,
    weight_bits: int | Mapping[str, int] = 8,
    activation_bits: int | None = 8,
    modules: Iterable[str] | None = None,
    fold_bn: bool = False,
    ema_decay: float = 0.99,
) -> list[str]:
    """Swap ``model``'s Linear / Conv1d / Conv2d layers to their QAT classes, in place.

    Args:
        model: the model; its layers keep their parameter objects and names.
        weight_bits: bits of every weight, or ``{module name: bits}`` for each layer in ``modules``.
        activation_bits: bits of each layer's input, or ``None`` for weight-only quantization.
        modules: names of the layers to quantize (all supported layers by default).
        fold_bn: fold a BatchNorm that directly follows a conv in an ``nn.Sequential`` into it.
        ema_decay: weight of the old value in the EMA of activation min/max.

    Returns:
        The names of the quantized layers.
    """
    named = dict(model.named_modules())
    names = [n for n, m in named.items() if type(m) in _QAT_CLASS] if modules is None else list(modules)
    bits_of = weight_bits if isinstance(weight_bits, Mapping) else dict.fromkeys(names, weight_bits)
    for name in names:
        module = named[name]
        if isinstance(module, _QATMixin):
            # Already prepared (a repeated fit): keep the observed state, take the new configuration.
            module.weight_bits, module.activation_bits = int(bits_of[name]), activation_bits
            module.ema_decay = ema_decay
            continue
        if type(module) not in _QAT_CLASS:
            raise TypeError(f"{name!r} is a {type(module).__name__}; quantizable: {sorted(QUANTIZABLE_TYPES)}.")
        module.__class__ = _QAT_CLASS[type(module)]
        module._init_qat(int(bits_of[name]), activation_bits, ema_decay)  # type: ignore[operator]
    if fold_bn:
        for conv_name, bn_name in conv_bn_pairs(model, names).items():
            conv, bn = named[conv_name], named[bn_name]
            bn.__class__ = _FOLDED_BN_CLASS[type(bn)]
            # A plain attribute (object.__setattr__), not a submodule: the BatchNorm stays registered
            # only where it was, so state_dict keys do not change.
            object.__setattr__(conv, "folded_bn", bn)
    return names


def finalize_(model: nn.Module) -> None:
    """Inverse of :func:`prepare_`: plain ``nn.Linear`` / ``nn.Conv*`` / ``nn.BatchNorm*`` again.

    Weights keep their float values (not fake-quantized), observer buffers are dropped.
    """
    inverse = {v: k for k, v in {**_QAT_CLASS, **_FOLDED_BN_CLASS}.items()}
    for _, module in list(model.named_modules()):
        if type(module) in inverse:
            if isinstance(module, _QATMixin):
                for key in ("weight_scale", "activation_range"):
                    delattr(module, key)
                for key in (
                    "weight_bits",
                    "activation_bits",
                    "ema_decay",
                    "fake_quant_enabled",
                    "observer_enabled",
                    "bn_frozen",
                    "folded_bn",
                ):
                    module.__dict__.pop(key, None)
            module.__class__ = inverse[type(module)]


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> int:
    """Post-training quantization: observe ranges on ``batches`` without training, then freeze.

    Runs the model in train mode for the observers, with BatchNorm statistics untouched (folded
    BatchNorms use their running statistics), and leaves observers frozen and the model in eval mode.
    Each batch is a tensor, a tuple/list whose first element is the input, or a dict of keyword inputs.

    Returns:
        The number of batches seen.
    """
    layers = [m for _, m in qat_modules(model)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    for bn in bns:
        bn.eval()
    for m in layers:
        m.observer_enabled, m.bn_frozen = True, True
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        if isinstance(batch, Mapping):
            model(**batch)
        elif isinstance(batch, list | tuple):
            model(batch[0])
        else:
            model(batch)
        seen += 1
    for m in layers:
        m.observer_enabled = False
    model.eval()
    return seen


# ------------------------------------------------------------------------------------ int8 modules
class _DequantizeWeight(torch.autograd.Function):
    """``codes * scale`` per output channel; exports to ONNX as ``DequantizeLinear`` of int8 initializers."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return codes.float() * scale.reshape((-1,) + (1,) * (codes.dim() - 1))

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero_point: Any) -> Any:  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class Int8Layer(nn.Module):
    """A quantized Linear / Conv1d / Conv2d as deployed: int8 weight codes + fp32 per-channel scales.

    In PyTorch the weights are *stored* in int8 and dequantized (``codes * scale``) at each call, then the
    fp32 kernel runs: the gain is size (``state_dict`` ~4x smaller), not speed. PyTorch's int8 CPU paths
    were not used on purpose: ``torch._weight_int8pack_mm`` measured ~30x slower than the fp32 matmul on
    an AVX2 CPU (64x1024 @ 1024x1024), and the fbgemm ``quantized`` ops need quantized tensors, which
    torch 2.13 deprecates. With ``activation_bits`` the input is quantize-dequantized with the scale
    observed in training, so outputs match the fake-quantized model. Exported to ONNX
    (:func:`export_onnx`) the weights stay int8 initializers and onnxruntime runs int8 kernels.

    Buffers: ``weight_int8`` (int8 codes, 4-bit codes are stored one per byte), ``weight_scale``,
    ``bias`` (fp32 or absent), ``input_scale`` / ``input_zero_point`` when activations are quantized.
    """

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
    ) -> None:
        super().__init__()
        self.kind = kind
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits if activation_qparams is not None else None
        self.conv_args = dict(conv_args or {})
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        scale_, zero_ = activation_qparams or (None, None)
        self.register_buffer("input_scale", None if scale_ is None else torch.tensor(float(scale_)))
        self.register_buffer("input_zero_point", None if zero_ is None else torch.tensor(int(zero_), dtype=torch.int32))

    @property
    def in_features(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[1])

    @property
    def out_features(self) -> int:  # noqa: D102
        return int(self.weight_int8.shape[0])

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32 values (``codes * scale``)."""
        zero_point = torch.zeros(self.weight_scale.shape, dtype=torch.int8, device=self.weight_scale.device)
        return _DequantizeWeight.apply(self.weight_int8, self.weight_scale, zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.activation_bits is not None:
            qmin, qmax = activation_qrange(self.activation_bits)
            x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, self.input_zero_point, qmin, qmax)
        if self.kind == "linear":
            return F.linear(x, self.dequantized_weight(), self.bias)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, self.dequantized_weight(), self.bias, **self.conv_args)

    def extra_repr(self) -> str:  # noqa: D102
        shape = "x".join(map(str, self.weight_int8.shape))
        bits = f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        return f"{self.kind}, weight={shape}, {bits}"


def _to_int8_layer(module: _QATMixin) -> Int8Layer:
    weight, bias = module.folded_weight_bias()
    weight = weight.detach()
    scale = module.weight_scale if module.fake_quant_enabled else weight_scale(weight, module.weight_bits)
    if not bool((module.weight_scale != 1).any()):  # never observed (e.g. QAT never started)
        scale = weight_scale(weight, module.weight_bits)
    codes, scale = quantize_weight(weight, module.weight_bits, scale)
    act = None
    if module.activation_bits is not None and module.activation_observed:
        s, z = module.activation_qparams()
        act = (float(s), int(z))
    if isinstance(module, nn.Linear):
        return Int8Layer("linear", codes, scale, bias, module.weight_bits, act, module.activation_bits)
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={module.padding_mode!r} is not supported by the int8 conversion.")
    conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    return Int8Layer(kind, codes, scale, bias, module.weight_bits, act, module.activation_bits, conv_args)


@torch.no_grad()
def convert_to_int8(model: nn.Module) -> nn.Module:
    """A deployable copy of a QAT-prepared ``model`` with int8 weights; ``model`` itself is unchanged.

    Every QAT layer becomes an :class:`Int8Layer` (int8 codes + per-channel scales, the observed input
    quantization), a folded BatchNorm becomes ``nn.Identity``. The copy is in eval mode; its
    ``state_dict`` holds int8 tensors, about 4x smaller on disk than fp32.

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
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _QATMixin):
                setattr(module, child_name, _to_int8_layer(child))
            elif type(child) in (FoldedBatchNorm1d, FoldedBatchNorm2d):
                setattr(module, child_name, nn.Identity())
    return out


def int8_layers(model: nn.Module) -> dict[str, Int8Layer]:
    """The :class:`Int8Layer` modules of a converted model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Layer)}


def quantized_size_bytes(model: nn.Module) -> tuple[int, int, float]:
    """``(fp32 bytes, effective bytes, mean weight bits)`` of a QAT-prepared model's parameters.

    Effective bytes count each quantized weight at its bit width plus one fp32 scale per channel,
    everything else (biases, normalisation, unquantized layers) at 32 bits.
    """
    dense = sum(p.numel() * 4 for p in model.parameters())
    effective = dense
    bits_total = numel_total = 0
    for _, m in qat_modules(model):
        n = m.weight.numel()
        effective += -n * 4 + (n * m.weight_bits + 7) // 8 + m.weight.shape[0] * 4
        bits_total += n * m.weight_bits
        numel_total += n
    return dense, effective, (bits_total / numel_total if numel_total else 32.0)


# ------------------------------------------------------------------------------------------ ONNX
def export_onnx(
    model: nn.Module,
    path: str,
    example_input: Any,
    *,
    opset_version: int = 17,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    weight_dtype: str = "auto",
) -> str:
    """Write ``model`` as an int8 ONNX model that onnxruntime runs with int8 kernels.

    ``model`` is a QAT-prepared model (converted here with :func:`convert_to_int8`) or an already
    converted one. Weights are written as **int8 initializers** behind ``DequantizeLinear`` (per output
    channel), inputs of quantized layers as ``QuantizeLinear`` → ``DequantizeLinear`` with the observed
    scales (the QDQ format). onnxruntime fuses these into ``QGemm`` / ``QLinearConv`` where an
    operator's output is itself re-quantized; a Linear whose output stays float (the last layer, or every
    layer of a weight-only model) is rewritten to ``MatMulInteger`` with the same scales (weight-only:
    with ``DynamicQuantizeLinear`` of its input, as onnxruntime's ``quantize_dynamic`` does).

    Args:
        model: QAT-prepared or converted model.
        path: output ``.onnx`` file.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        opset_version: ONNX opset (per-channel ``DequantizeLinear`` needs >= 13).
        input_names: names of the graph inputs (default ``input``, ``input_1``, ...).
        output_names: names of the graph outputs (default ``output``, ...).
        dynamic_batch: make dim 0 of every input and output dynamic.
        weight_dtype: how weight codes are stored. onnxruntime's uint8 x int8 kernels are the fastest,
            but on x86 CPUs without VNNI they add pairs of products in 16-bit registers, which
            saturate for weights beyond ±64 (visible output errors). ``"auto"`` (default) keeps a
            layer's codes ``int8`` when they fit in ±64 (7-bit weights: ``weight_bits<=7``) and
            otherwise stores them as ``uint8`` with zero point 128 (the same values; exact uint8 x uint8
            kernels, somewhat slower). ``"int8"`` / ``"uint8"`` force one storage for every layer.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``example_input`` is missing or the model was not prepared for quantization.
    """
    import onnx  # the [onnx] extra

    if weight_dtype not in ("auto", "uint8", "int8"):
        raise ValueError(f"weight_dtype must be 'auto', 'uint8' or 'int8', got {weight_dtype!r}.")
    if example_input is None:
        raise ValueError(
            "export_onnx needs example_input (a tensor, tuple or dict) to trace the model. "
            "HINT: one real batch, e.g. next(iter(dataloader))[0][:1]."
        )
    if not int8_layers(model):
        model = convert_to_int8(model)
    model = model.eval()
    if isinstance(example_input, Mapping):
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dict(example_input)
    elif isinstance(example_input, list | tuple):
        args, kwargs = tuple(example_input), {}
    else:
        args, kwargs = (example_input,), {}
    default_names = [("input" if i == 0 else f"input_{i}") for i in range(len(args))] + list(kwargs)
    input_names = input_names or default_names
    if kwargs:
        # The TorchScript exporter passes inputs positionally: adapt keyword(-only) inputs.
        model, args = _KeywordAdapter(model, tuple(kwargs), len(args)), (*args, *kwargs.values())
    with torch.no_grad():
        outputs = model(*args)
    n_out = len(outputs) if isinstance(outputs, list | tuple) else 1
    output_names = output_names or [("output" if i == 0 else f"output_{i}") for i in range(n_out)]
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
    import warnings

    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is deprecated in favour of the dynamo exporter,
        # which needs the extra `onnxscript` package; it is the one that works with the plain [onnx] extra.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            path,
            dynamo=False,
            opset_version=opset_version,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    graph_model = onnx.load(path)
    if weight_dtype != "int8":
        _weights_to_uint8_(graph_model, keep_int8_within=64 if weight_dtype == "auto" else -1)
    _hoist_quantize_(graph_model)
    _integer_matmuls_(graph_model)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, path)
    return path


class _KeywordAdapter(nn.Module):
    def __init__(self, model: nn.Module, keys: tuple[str, ...], positional: int) -> None:
        super().__init__()
        self.model, self.keys, self.positional = model, keys, positional

    def forward(self, *inputs: Any) -> Any:
        args, rest = inputs[: self.positional], inputs[self.positional :]
        return self.model(*args, **dict(zip(self.keys, rest, strict=True)))


def _integer_matmuls_(model: Any) -> None:
    """Rewrite float-output ``Gemm`` over an int8 ``DequantizeLinear`` weight to ``MatMulInteger``.

    onnxruntime fuses ``DQ → Gemm → (Relu) → Q`` into an int8 ``QGemm``; a Gemm whose output is not
    re-quantized would run in fp32 after dequantizing its weight on every call. This turns it into
    ``MatMulInteger(x_q, W_q^T) * (x_scale * w_scale) + b``: the same arithmetic, int8 kernels.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    _constants_to_initializers_(model)
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def requantized(output: str) -> bool:
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "Relu":
            users = consumers.get(users[0].output[0], [])
        return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)

    def attr(node: Any, name: str, default: Any) -> Any:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    for node in list(graph.node):
        if node.op_type != "Gemm" or requantized(node.output[0]):
            continue
        if attr(node, "transA", 0) or not attr(node, "transB", 0) or attr(node, "alpha", 1.0) != 1.0:
            continue
        w_dq = producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
            continue
        codes = numpy_helper.to_array(inits[w_dq.input[0]])
        if codes.dtype not in (np.int8, np.uint8) or w_dq.input[1] not in inits or w_dq.input[2] not in inits:
            continue
        w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32)
        w_zero = numpy_helper.to_array(inits[w_dq.input[2]])
        prefix = node.output[0] + "_int"
        new_inits = [
            numpy_helper.from_array(np.ascontiguousarray(codes.T), prefix + "_wT"),
            numpy_helper.from_array(w_zero, prefix + "_wzp"),
        ]
        new_nodes = []
        a_dq = producer.get(node.input[0])
        if (
            a_dq is not None
            and a_dq.op_type == "DequantizeLinear"
            and a_dq.input[1] in inits
            and len(a_dq.input) > 2
            and a_dq.input[2] in inits
        ):
            x_q, x_zp = a_dq.input[0], a_dq.input[2]
            x_scale = float(numpy_helper.to_array(inits[a_dq.input[1]]))
            new_inits.append(numpy_helper.from_array((w_scale * x_scale).astype(np.float32), prefix + "_scale"))
            scaled = prefix + "_scaled"
            new_nodes += [
                helper.make_node("MatMulInteger", [x_q, prefix + "_wT", x_zp, prefix + "_wzp"], [prefix + "_i32"]),
                helper.make_node("Cast", [prefix + "_i32"], [prefix + "_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [prefix + "_f", prefix + "_scale"], [scaled]),
            ]
        else:
            # Weight-only: quantize the input per call (onnxruntime fuses this into DynamicQuantizeMatMul).
            new_inits.append(numpy_helper.from_array(w_scale, prefix + "_scale"))
            new_nodes += [
                helper.make_node(
                    "DynamicQuantizeLinear",
                    [node.input[0]],
                    [prefix + "_xq", prefix + "_xs", prefix + "_xzp"],
                ),
                helper.make_node(
                    "MatMulInteger",
                    [prefix + "_xq", prefix + "_wT", prefix + "_xzp", prefix + "_wzp"],
                    [prefix + "_i32"],
                ),
                helper.make_node("Cast", [prefix + "_i32"], [prefix + "_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [prefix + "_f", prefix + "_xs"], [prefix + "_fx"]),
                helper.make_node("Mul", [prefix + "_fx", prefix + "_scale"], [prefix + "_scaled"]),
            ]
            scaled = prefix + "_scaled"
        if len(node.input) > 2 and node.input[2]:
            new_nodes.append(helper.make_node("Add", [scaled, node.input[2]], [node.output[0]]))
        else:
            new_nodes.append(helper.make_node("Identity", [scaled], [node.output[0]]))
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(index + offset, new)
        graph.initializer.extend(new_inits)
    _remove_dead_(model)


# Ops through which per-tensor quantization commutes exactly (monotonic or pure data movement):
# Q(maxpool(x)) == maxpool(Q(x)), Q(flatten(x)) == flatten(Q(x)).
_COMMUTES_WITH_QUANTIZE = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _hoist_quantize_(model: Any) -> None:
    """Copy a layer-input ``Q → DQ`` up through pooling/reshapes to the producing ``Relu`` / conv.

    In ``conv → relu → maxpool → flatten → Q → DQ → gemm`` the conv's output is not re-quantized where
    onnxruntime looks for it, so the conv would run in fp32. The same ``Q → DQ`` (same scale) placed
    right after the relu gives identical values (quantization commutes with max-pooling and reshapes)
    and lets onnxruntime fuse ``QLinearConv`` and run the pooling on uint8.
    """
    from onnx import helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        tensor = q.input[0]
        node = producer.get(tensor)
        moved = False
        while node is not None and node.op_type in _COMMUTES_WITH_QUANTIZE and len(consumers.get(tensor, [])) == 1:
            tensor = node.input[0]
            node = producer.get(tensor)
            moved = True
        if not moved or node is None or node.op_type not in ("Relu", "Conv"):
            continue
        if len(consumers.get(tensor, [])) != 1:
            continue
        hoisted = tensor + "_hoisted"
        qn = helper.make_node("QuantizeLinear", [hoisted, *q.input[1:]], [hoisted + "_q"])
        dqn = helper.make_node("DequantizeLinear", [hoisted + "_q", *q.input[1:]], [tensor])
        node.output[list(node.output).index(tensor)] = hoisted
        index = list(graph.node).index(node) + 1
        graph.node.insert(index, dqn)
        graph.node.insert(index, qn)


def _weights_to_uint8_(model: Any, keep_int8_within: int = -1) -> None:
    """Store int8 weight codes as ``uint8`` with zero point 128 (the same values, still symmetric).

    On x86 CPUs without VNNI, onnxruntime's uint8 x int8 kernels add pairs of products in 16-bit
    registers (``VPMADDUBSW``): 2 x 255 x 127 overflows int16 and visibly corrupts outputs, while
    2 x 255 x 64 does not. uint8 x uint8 kernels never saturate. The codes are shifted by 128 (exact).
    Layers whose codes all lie within ``±keep_int8_within`` stay int8.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    _constants_to_initializers_(model)
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes_name, zero_name = node.input[0], node.input[2]
        if codes_name not in inits or zero_name not in inits:
            continue
        codes, zero = numpy_helper.to_array(inits[codes_name]), numpy_helper.to_array(inits[zero_name])
        if codes.dtype != np.int8 or zero.dtype != np.int8 or np.any(zero != 0):
            continue
        if codes.size and int(np.abs(codes.astype(np.int16)).max()) <= keep_int8_within:
            continue
        shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
        for name, array in ((codes_name, shifted), (zero_name, np.full(zero.shape, 128, np.uint8))):
            graph.initializer.remove(inits[name])
            inits[name] = numpy_helper.from_array(array, name)
            graph.initializer.append(inits[name])


def _constants_to_initializers_(model: Any) -> None:
    """Turn ``Constant`` nodes and ``Identity`` copies of initializers into initializers (in place)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    names = {i.name for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = helper.get_attribute_value(node.attribute[0])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            names.add(node.output[0])
            graph.node.remove(node)
        elif node.op_type == "Identity" and node.input[0] in names:
            source = next(i for i in graph.initializer if i.name == node.input[0])
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(source), node.output[0]))
            names.add(node.output[0])
            graph.node.remove(node)


def _remove_dead_(model: Any) -> None:
    """Drop nodes whose outputs nobody reads and initializers no node reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        changed = bool(dead)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
