"""Quantization-aware training layers: the class swap, observers, BatchNorm folding, PTQ calibration.

Quantized layers are the user's own ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` objects with their class
switched in place to a subclass (:class:`QATLinear`, ...) that adds observer buffers. Parameter objects,
names, hooks and references held elsewhere (an optimizer, a pruning callback) stay valid, the user's
``forward`` is never touched, and :func:`finalize_` switches the class back.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> prepare_(model, weight_bits=8, activation_bits=8)
    >>> [name for name, _ in qat_modules(model)]
    ['0', '2']
    >>> y = model(torch.randn(4, 8))  # observes activation ranges, fake-quantizes
    >>> finalize_(model)
    >>> type(model[0]).__name__
    'Linear'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress._validation import check_choice
from lightning_compress.functional.fake_quant import (
    activation_qparams,
    batchnorm_factor,
    fake_quantize_activation,
    fake_quantize_per_token,
    fake_quantize_weight,
    fake_quantize_weight_grouped,
    fold_batchnorm,
    group_weight_scale,
    weight_scale,
)
from lightning_compress.inputs import CapturedCall, as_call, run

# Class names quantized by default; "Conv1D" is Hugging Face's transposed Linear (GPT-2).
QUANTIZABLE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv1D")
# Quantized only when asked for by name (weight-only, per row): not a default, so existing configurations
# keep their float embeddings.
OPTIONAL_TYPES: tuple[str, ...] = ("Embedding",)
# Types whose weight can have group-wise scales (2-d weights with an input dimension).
GROUPABLE_TYPES: tuple[str, ...] = ("Linear", "Conv1D")
# How a layer's input is quantized: one observed range per tensor (static), or each token's own range
# at run time (dynamic, Linear / Conv1D only: a conv's input has no token axis).
ACTIVATION_GRANULARITIES: tuple[str, ...] = ("tensor", "token")

# Plain attributes (not buffers) that prepare_ sets on a swapped layer and finalize_ removes.
_QAT_ATTRIBUTES = (
    "weight_bits",
    "activation_bits",
    "ema_decay",
    "fake_quant_enabled",
    "observer_enabled",
    "bn_frozen",
    "folded_bn",
    "quantize_output",
    "group_size",
    "activation_granularity",
    "training_batch",
)
_QAT_BUFFERS = ("weight_scale", "activation_range", "output_range")
# Buffers added after checkpoints were first written: a checkpoint without them still loads strictly.
_LATER_BUFFERS = ("output_range",)


class _QATMixin:
    """Observer state and fake-quantization shared by :class:`QATLinear` and the QAT convolutions.

    Buffers (saved in the model's ``state_dict``, so a checkpoint restores them exactly):
    ``weight_scale`` (per output channel), ``activation_range`` (input ``[min, max]``, ``inf`` until the
    first observation) and ``output_range`` (the output's ``[min, max]``, observed and fake-quantized
    only where ``quantize_output`` is set: convs whose output no quantized layer reads directly, e.g.
    before a residual add or a Hardswish, which an int8 runtime runs in int8 only with a quantized
    output). Plain attributes set by :func:`prepare_` / the callback: ``weight_bits``,
    ``activation_bits``, ``ema_decay``, ``fake_quant_enabled``, ``observer_enabled``, ``bn_frozen``,
    ``folded_bn``, ``quantize_output``.
    """

    weight: nn.Parameter
    bias: torch.Tensor | None
    weight_scale: torch.Tensor
    activation_range: torch.Tensor
    training: bool
    # Dim of the weight that indexes output channels (1 for Hugging Face's Conv1D, stored [in, out]).
    weight_axis: int = 0
    # Input features per weight scale (group-wise scales, shape [out, in / group_size]); None: per channel.
    group_size: int | None = None
    # "tensor": the input range is observed in training; "token": every row is quantized with its own range.
    activation_granularity: str = "tensor"
    # Set by QuantizationAwareTraining around each training batch: observe even in eval mode (with grad enabled).
    training_batch: bool = False

    def _init_qat(
        self, weight_bits: int, activation_bits: int | None, ema_decay: float, group_size: int | None = None
    ) -> None:
        out_channels = self.weight.shape[self.weight_axis]
        device = self.weight.device
        if group_size is not None:
            in_features = self.weight.shape[1 - self.weight_axis]
            scale_shape: tuple[int, ...] = (out_channels, in_features // group_size)
        else:
            scale_shape = (out_channels,)
        self.group_size = group_size
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))  # type: ignore[attr-defined]
        # The activation range exists even for weight-only layers, so the state_dict's keys do not depend
        # on the bit configuration and checkpoints load strictly across it.
        self.register_buffer(  # type: ignore[attr-defined]
            "activation_range", torch.tensor([float("inf"), float("-inf")], device=device)
        )
        self.register_buffer(  # type: ignore[attr-defined]
            "output_range", torch.tensor([float("inf"), float("-inf")], device=device)
        )
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.ema_decay = ema_decay
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.bn_frozen = False
        self.folded_bn: nn.modules.batchnorm._BatchNorm | None = None
        self.quantize_output = False
        keep_own_forward(self)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ observers
    def _observes(self) -> bool:
        # A training forward of the module, or of a training batch the callback marked: Lightning leaves a
        # model passed to `fit` in eval mode as it is (Hugging Face's from_pretrained returns one), and a
        # `training`-only rule would then never observe, leaving every weight scale at 1. Within a training batch,
        # only forwards that record gradients: another callback's replays there (SparseGPT's calibration passes,
        # run in eval mode under no_grad) are not training data.
        return self.observer_enabled and (self.training or (self.training_batch and torch.is_grad_enabled()))

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

    @property
    def output_observed(self) -> bool:
        """Whether an output range has been observed yet."""
        return bool(torch.isfinite(self.output_range).all())

    def _quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        # Only convs whose output an int8 runtime must quantize (prepare_ decides from the data flow).
        if not self.quantize_output or self.activation_bits is None or not self.fake_quant_enabled:
            return y
        if self._observes():
            with torch.no_grad():
                lo, hi = torch.aminmax(y.detach().float())
                new = torch.stack([lo, hi])
                if not self.output_observed:
                    self.output_range.copy_(new)
                else:
                    self.output_range.lerp_(new, 1.0 - self.ema_decay)
        if not self.output_observed:
            return y
        scale, zero_point = activation_qparams(self.output_range[0], self.output_range[1], self.activation_bits)
        return fake_quantize_activation(y, scale, zero_point, self.activation_bits)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before output_range existed load strictly, with the range unobserved.
        for key in _LATER_BUFFERS:
            state_dict.setdefault(prefix + key, getattr(self, key).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is None or not self.fake_quant_enabled:
            return x
        if self.activation_granularity == "token":
            return fake_quantize_per_token(x, self.activation_bits)
        if self._observes():
            self._observe_activation(x)
        if not self.activation_observed:
            return x
        scale, zero_point = self.activation_qparams()
        return fake_quantize_activation(x, scale, zero_point, self.activation_bits)

    def _quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return weight
        if self.group_size is not None:
            if self._observes():
                with torch.no_grad():
                    self.weight_scale.copy_(
                        group_weight_scale(weight, self.weight_bits, self.group_size, self.weight_axis)
                    )
            return fake_quantize_weight_grouped(
                weight, self.weight_scale, self.weight_bits, self.group_size, self.weight_axis
            )
        if self._observes():
            with torch.no_grad():
                self.weight_scale.copy_(weight_scale(weight, self.weight_bits, self.weight_axis))
        return fake_quantize_weight(weight, self.weight_scale, self.weight_bits, self.weight_axis)

    # ------------------------------------------------------------------ weights as deployed
    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as deployed: with the BatchNorm folded in when one is attached."""
        bn = self.folded_bn
        if bn is None:
            return self.weight, self.bias
        assert bn.running_mean is not None and bn.running_var is not None
        return fold_batchnorm(self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

    def _qat_forward(self, x: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = self._quantize_input(x)
        bn = self.folded_bn
        if bn is None:
            y = op(x, self._quantize_weight(self.weight), self.bias)
        elif self.bn_frozen or not self.training:
            # Inference form: exactly the conv that conversion produces.
            weight, bias = self.folded_weight_bias()
            y = op(x, self._quantize_weight(weight), bias)
        else:
            y = self._forward_with_batch_statistics(x, op, bn)
        return self._quantize_output(y)

    def _forward_with_batch_statistics(
        self, x: torch.Tensor, op: Callable[..., torch.Tensor], bn: nn.modules.batchnorm._BatchNorm
    ) -> torch.Tensor:
        # Jacob et al. 2018, torch.ao's ConvBn: quantize the weight folded with the *running* statistics
        # (what will be deployed), undo the scaling on the output, then let BatchNorm normalise with the
        # batch statistics and update its running estimates.
        assert bn.running_var is not None
        factor = batchnorm_factor(bn.running_var, bn.weight, bn.eps)
        weight_shape = (-1,) + (1,) * (self.weight.dim() - 1)
        y = op(x, self._quantize_weight(self.weight * factor.reshape(weight_shape)), None)
        output_shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y / factor.reshape(output_shape)
        if self.bias is not None:
            y = y + self.bias.reshape(output_shape)
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


class QATEmbedding(_QATMixin, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized weight: weight-only, one symmetric scale per row (token).

    The input holds indices, so ``activation_bits`` is always ``None``. ``max_norm`` (which rewrites the
    weight in place at each lookup) is refused by :func:`prepare_`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weight = self._quantize_weight(self.weight)
        return F.embedding(input, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)


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


class _PoolObserver:
    """Input observer and fake-quantization of an average pool (the int8 runtime pools quantized values).

    onnxruntime averages in int8 (``QLinearGlobalAveragePool``) only when the pool's input is quantized;
    that input (after a residual add, a Hardswish) is read by no quantized layer, so nothing else
    observes it. The pool fake-quantizes its input in training so the model learns what deployment does.
    Buffer: ``activation_range``; attributes as :class:`_QATMixin`'s (no weights).
    """

    activation_range: torch.Tensor
    training: bool
    activation_granularity = "tensor"  # a pool's input range is always observed
    training_batch = False
    _observes = _QATMixin._observes

    def _init_observer(self, activation_bits: int, ema_decay: float) -> None:
        self.register_buffer(  # type: ignore[attr-defined]
            "activation_range", torch.tensor([float("inf"), float("-inf")])
        )
        self.activation_bits = activation_bits
        self.ema_decay = ema_decay
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.bn_frozen = False

    activation_observed = _QATMixin.activation_observed
    activation_qparams = _QATMixin.activation_qparams
    _observe_activation = _QATMixin._observe_activation
    _quantize_input = _QATMixin._quantize_input


class QATAdaptiveAvgPool2d(_PoolObserver, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with an observed, fake-quantized input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return super().forward(self._quantize_input(input))


class QATAvgPool2d(_PoolObserver, nn.AvgPool2d):
    """``nn.AvgPool2d`` with an observed, fake-quantized input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return super().forward(self._quantize_input(input))


_POOL_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.AdaptiveAvgPool2d: QATAdaptiveAvgPool2d,
    nn.AvgPool2d: QATAvgPool2d,
}
_POOL_ATTRIBUTES = (
    "activation_bits",
    "ema_decay",
    "fake_quant_enabled",
    "observer_enabled",
    "bn_frozen",
    "training_batch",
)


def qat_pools(model: nn.Module) -> Iterator[tuple[str, _PoolObserver]]:
    """``(name, module)`` of every observed average pool in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _PoolObserver):
            yield name, module


def pool_names(model: nn.Module) -> list[str]:
    """Names of the average pools :func:`prepare_` can observe (exact ``AdaptiveAvgPool2d`` / ``AvgPool2d``)."""
    return [n for n, m in model.named_modules() if type(m) in _POOL_CLASS]


_QAT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Embedding: QATEmbedding,
}
_FOLDED_BN_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FoldedBatchNorm1d,
    nn.BatchNorm2d: FoldedBatchNorm2d,
}
FOLDED_BN_TYPES: tuple[type[nn.Module], ...] = tuple(_FOLDED_BN_CLASS.values())


def _keep_forward_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence is what matters (see :func:`keep_own_forward`)."""


def keep_own_forward(module: nn.Module) -> None:
    """Make containers with fused fast paths call ``module``'s own forward.

    ``nn.TransformerEncoderLayer`` in eval mode under ``no_grad`` hands ``linear1.weight`` etc. to one
    fused kernel and never calls ``linear1``: a QAT layer would silently run unquantized there, an int8
    layer without its input quantization. PyTorch skips that fast path when any submodule has a forward
    hook, so a no-op pre-hook keeps these layers' forward in the computation (a few µs per call).
    """
    if _keep_forward_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keep_forward_hook)


def _release_forward(module: nn.Module) -> None:
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _keep_forward_hook]:
        del module._forward_pre_hooks[key]


def qat_class(module: nn.Module) -> type[nn.Module] | None:
    """The QAT class ``module`` is swapped to, or ``None`` when its exact type is not supported.

    Exact types only: a user subclass may have its own forward, which the swap would bypass.
    """
    cls = _QAT_CLASS.get(type(module))
    if cls is None and type(module).__name__ == "Conv1D" and type(module).__module__ == "transformers.pytorch_utils":
        from lightning_compress.functional.qat_hf import QATConv1D  # needs transformers, present here

        cls = QATConv1D
    return cls


def is_qat(module: nn.Module) -> bool:
    """Whether ``module`` is a swapped QAT layer."""
    return isinstance(module, _QATMixin)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, _QATMixin]]:
    """``(name, module)`` of every QAT layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _QATMixin):
            yield name, module


def conv_bn_pairs(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Conv → BatchNorm pairs that can be folded, found by the data flow (see :mod:`.conv_bn`).

    Example::

        >>> conv_bn_pairs(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()), ["0"])
        {'0': '1'}
    """
    from lightning_compress.functional.conv_bn import find_conv_bn_pairs

    return find_conv_bn_pairs(model, names).pairs


def prepare_(
    model: nn.Module,
    *,
    weight_bits: int | Mapping[str, int] = 8,
    activation_bits: int | None = 8,
    modules: Iterable[str] | None = None,
    fold_bn: bool = False,
    ema_decay: float = 0.99,
    pools: Iterable[str] | None = None,
    group_size: int | None = None,
    activation_granularity: str = "tensor",
) -> None:
    """Swap ``model``'s Linear / Conv1d / Conv2d layers to their QAT classes, in place.

    :func:`qat_modules` lists the swapped layers afterwards.

    Args:
        model: the model; its layers keep their parameter objects and names.
        weight_bits: bits of every weight, or ``{module name: bits}`` for each layer in ``modules``.
        activation_bits: bits of each layer's input, or ``None`` for weight-only quantization.
        modules: names of the layers to quantize (all supported layers by default).
        fold_bn: fold every BatchNorm that follows a quantized conv in the data flow into it (found by
            tracing with ``torch.fx``; see :func:`~lightning_compress.functional.conv_bn.find_conv_bn_pairs`).
            BatchNorms left unfolded are listed in a warning.
        ema_decay: weight of the old value in the EMA of activation min/max.
        pools: names of ``nn.AdaptiveAvgPool2d`` / ``nn.AvgPool2d`` modules whose input is observed and
            fake-quantized too, so an int8 runtime can average in int8 (:class:`QATAdaptiveAvgPool2d`);
            by default all of them when ``activation_bits`` is set and ``modules`` is not given.
        group_size: one weight scale per output channel and group of ``group_size`` consecutive input
            features (Linear and Hugging Face ``Conv1D`` only; must divide their input size) instead of one
            per output channel. Embeddings keep one scale per row.
        activation_granularity: ``"tensor"`` (default): each layer's input has one range, observed during
            training (static quantization, what int8 conv runtimes need). ``"token"``: each row of the input
            (a token) is quantized with its own min/max at run time (dynamic quantization, torchao's
            int8-dynamic-activation schemes); Linear and Hugging Face ``Conv1D`` only, no pools observed.

    Raises:
        TypeError: if a layer in ``modules`` is not of a quantizable type.
        ValueError: if ``group_size`` is given for a conv or does not divide a layer's input size, an
            embedding uses ``max_norm``, or ``activation_granularity="token"`` selects a conv. Nothing is
            swapped then.
    """
    check_choice("activation_granularity", activation_granularity, ACTIVATION_GRANULARITIES)
    named = dict(model.named_modules())
    if modules is None:  # embeddings only by name: quantizing them is not a default
        names = [n for n, m in named.items() if n and qat_class(m) and not isinstance(m, nn.Embedding)]
    else:
        names = list(modules)
    for name in names:
        if qat_class(named[name]) is None and not isinstance(named[name], _QATMixin):
            raise TypeError(
                f"{name!r} is a {type(named[name]).__name__}; "
                f"quantizable: {sorted(QUANTIZABLE_TYPES + OPTIONAL_TYPES)}."
            )
    check_group_size_(named, names, group_size)
    if activation_granularity == "token" and activation_bits is not None:
        check_token_granularity_(named, names)
    bits_of = weight_bits if isinstance(weight_bits, Mapping) else dict.fromkeys(names, weight_bits)
    for name in names:
        module = named[name]
        embedding = isinstance(module, nn.Embedding)
        layer_activation_bits = None if embedding else activation_bits
        layer_group_size = None if embedding else group_size
        if isinstance(module, _QATMixin):
            # Already prepared (a repeated fit): keep the observed state, take the new configuration.
            if module.group_size != layer_group_size:
                raise ValueError(
                    f"{name!r} was prepared with group_size={module.group_size}, got {layer_group_size}: the "
                    "weight scales have another shape. HINT: finalize_ the model first."
                )
            module.weight_bits, module.activation_bits = int(bits_of[name]), layer_activation_bits
            module.ema_decay = ema_decay
            module.activation_granularity = activation_granularity
            continue
        module.__class__ = qat_class(module)  # type: ignore[assignment]
        module._init_qat(int(bits_of[name]), layer_activation_bits, ema_decay, layer_group_size)  # type: ignore[operator]
        module.activation_granularity = activation_granularity
    static = activation_bits is not None and activation_granularity == "tensor"
    # By default every pool when the whole model is quantized statically; a chosen subset of layers: none.
    pool_list = (pool_names(model) if static and modules is None else []) if pools is None else list(pools)
    for name in pool_list:
        pool = named[name]
        if isinstance(pool, _PoolObserver):
            pool.ema_decay = ema_decay
            continue
        if type(pool) not in _POOL_CLASS:
            raise TypeError(f"pools: {name!r} is a {type(pool).__name__}, not an AdaptiveAvgPool2d / AvgPool2d.")
        if activation_bits is None:
            continue
        pool.__class__ = _POOL_CLASS[type(pool)]
        pool._init_observer(activation_bits, ema_decay)  # type: ignore[operator]
    if fold_bn:
        from lightning_compress.functional.conv_bn import find_conv_bn_pairs

        found = find_conv_bn_pairs(model, names)
        if found.unfolded:
            # Never silently: an unfolded BatchNorm costs accuracy parity and int8 speed after export.
            warnings.warn(f"prepare_(fold_bn=True): {found.message()}", stacklevel=2)
        for conv_name, bn_name in found.pairs.items():
            conv, bn = named[conv_name], named[bn_name]
            bn.__class__ = _FOLDED_BN_CLASS[type(bn)]
            # A plain attribute (object.__setattr__), not a submodule: the BatchNorm stays registered
            # only where it was, so state_dict keys do not change.
            object.__setattr__(conv, "folded_bn", bn)
    if activation_bits is not None:
        _mark_output_quantization(model)


def check_group_size_(named: Mapping[str, nn.Module], names: Iterable[str], group_size: int | None) -> None:
    """Refuse layers that ``group_size`` cannot apply to, and embeddings with ``max_norm``, naming them.

    Raises:
        ValueError: listing every offending layer.
    """
    problems = []
    for name in names:
        module = named[name]
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                problems.append(f"{name} (Embedding with max_norm, which rewrites the weight at each lookup)")
            continue
        if group_size is None:
            continue
        axis = getattr(module, "weight_axis", 1 if type(module).__name__ == "Conv1D" else 0)
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            problems.append(f"{name} ({type(module).__name__}: group-wise scales are for Linear / Conv1D only)")
        elif module.weight.shape[1 - axis] % group_size:
            problems.append(f"{name} ({module.weight.shape[1 - axis]} input features)")
    if problems:
        hint = f"group_size={group_size} must divide the input size of every layer; " if group_size else ""
        raise ValueError(f"Cannot quantize {problems}. HINT: {hint}exclude these layers or choose another group_size.")


def check_token_granularity_(named: Mapping[str, nn.Module], names: Iterable[str]) -> None:
    """Refuse convolutions for per-token input quantization, naming them (a conv's input has no token rows).

    Raises:
        ValueError: listing the conv layers among ``names``.
    """
    convs = [n for n in names if isinstance(named[n], nn.Conv1d | nn.Conv2d)]
    if convs:
        raise ValueError(
            f"activation_granularity='token' quantizes each row of a Linear's input; {convs} are convolutions. "
            "HINT: exclude them, or choose types=['Linear', 'Conv1D'], or use activation_granularity='tensor'."
        )


def _mark_output_quantization(model: nn.Module) -> None:
    from lightning_compress.functional.conv_bn import convs_needing_output_quantization

    layers = dict(qat_modules(model))
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv1d | nn.Conv2d) and m.activation_bits]
    if not convs:
        return
    quantizing = [n for n, m in layers.items() if m.activation_bits] + [n for n, _ in qat_pools(model)]
    folded = [n for n, m in model.named_modules() if isinstance(m, FOLDED_BN_TYPES)]
    needed = convs_needing_output_quantization(model, convs, quantizing, folded)
    if needed is None:
        warnings.warn(
            "prepare_: torch.fx could not trace the model, so no conv output is quantized; after ONNX export, "
            "onnxruntime runs convs whose output feeds a residual add or a non-ReLU activation in fp32.",
            stacklevel=3,
        )
        needed = set()
    for name in convs:
        layers[name].quantize_output = name in needed


def finalize_(model: nn.Module) -> None:
    """Inverse of :func:`prepare_`: plain ``nn.Linear`` / ``nn.Conv*`` / ``nn.Embedding`` / ``nn.BatchNorm*``.

    Weights keep their float values (not fake-quantized), observer buffers are dropped.
    """
    for module in list(model.modules()):
        if isinstance(module, _QATMixin):
            for key in _QAT_BUFFERS:
                delattr(module, key)
            for key in _QAT_ATTRIBUTES:
                module.__dict__.pop(key, None)
            _release_forward(module)
            module.__class__ = type(module).__bases__[-1]  # (_QATMixin, the float class)
        elif isinstance(module, FOLDED_BN_TYPES):
            module.__class__ = type(module).__bases__[0]
        elif isinstance(module, _PoolObserver):
            del module.activation_range
            for key in _POOL_ATTRIBUTES:
                module.__dict__.pop(key, None)
            module.__class__ = type(module).__bases__[-1]


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> None:
    """Post-training quantization: observe ranges on ``batches`` without training, then freeze.

    Runs the model in train mode for the observers, with BatchNorm statistics untouched (folded
    BatchNorms use their running statistics), and leaves observers frozen and the model in eval mode.

    Args:
        model: a model prepared with :func:`prepare_`.
        batches: dataloader batches: a tensor (the input), a tuple/list whose first element is the
            model input (the rest are targets), a dict of keyword inputs, or a
            :class:`~lightning_compress.inputs.CapturedCall`.
        num_batches: stop after this many batches (all by default).
    """
    layers: list[Any] = [m for _, m in qat_modules(model)] + [m for _, m in qat_pools(model)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    for bn in bns:
        bn.eval()
    for m in layers:
        m.observer_enabled, m.bn_frozen = True, True
    for seen, batch in enumerate(batches):
        if num_batches is not None and seen >= num_batches:
            break
        run(model, _batch_input(batch))
    for m in layers:
        m.observer_enabled = False
    model.eval()


def _batch_input(batch: Any) -> CapturedCall:
    """The model call of a dataloader batch: ``(x, y, ...)`` feeds ``x`` as the one positional input."""
    if isinstance(batch, CapturedCall):  # checked first: a CapturedCall is a tuple too
        return batch
    if isinstance(batch, list | tuple):
        return CapturedCall((batch[0],), {})
    return as_call(batch)
