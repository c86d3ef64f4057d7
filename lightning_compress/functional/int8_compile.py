"""A QAT-trained model as PyTorch int8 kernels: PT2E's quantized graph built from the QAT scales, lowered by Inductor.

:func:`convert_to_int8` stores int8 weights but runs fp32 kernels. :func:`compile_int8` writes each int8
layer the way PT2E's ``convert_pt2e`` writes a quantized layer (``quantized_decomposed``
quantize/dequantize ops around an fp32 conv/linear, the "reference representation") with the scales and
zero points learned in QAT, and compiles it with ``torch.compile``. Inductor's x86 quantization passes
(``torch/_inductor/fx_passes/quantization.py``, active with ``freezing``) recognise that pattern and run
oneDNN int8 kernels (``onednn.qconv_pointwise`` / ``onednn.qlinear_pointwise``, ReLU and the next layer's
input quantization fused in).

Why not PT2E's ``X86InductorQuantizer`` (torchao) or torchao's ``quantize_``: both choose their own
scales (``prepare_pt2e`` calibrates fresh observers and places quantizers by its own rules;
``Int8DynamicActivationInt8WeightConfig`` quantizes activations per call and covers Linear only), so the
deployed model would not be the one QAT trained. The reference representation is all Inductor needs, and
its ops ship with torch itself (``torch.ao.quantization.fx._decomposed``), so no extra package is needed.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.functional.qat import prepare_
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> prepare_(model)
    >>> _ = model(torch.randn(8, 16))  # training observes ranges
    >>> int8 = compile_int8(model.eval(), torch.randn(8, 16))  # doctest: +SKIP
    >>> int8(torch.randn(8, 16)).shape  # doctest: +SKIP
    torch.Size([8, 4])
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config

from lightning_compress.functional.fake_quant import activation_qrange, weight_qrange
from lightning_compress.functional.int8 import Int8Layer, convert_to_int8, int8_layers
from lightning_compress.functional.qat import _PoolObserver, qat_modules, qat_pools
from lightning_compress.inputs import as_call, run

_QD = torch.ops.quantized_decomposed
# oneDNN's int8 kernels read uint8 activations in [0, 255]: a narrower activation range would be clamped
# differently from training after the kernels fuse the requantization.
_ACTIVATION_BITS = 8
# Generated-code names of the int8 kernels Inductor emits for the patterns below.
INT8_KERNELS: tuple[str, ...] = ("onednn.qconv_pointwise", "onednn.qconv2d_pointwise", "onednn.qlinear_pointwise")


def int8_kernel_calls(code: list[str]) -> int:
    """Calls of oneDNN int8 conv / linear kernels in Inductor's generated code (comments skipped).

    ``code`` as ``torch._inductor.utils.run_and_get_code(compile_int8, model, x)`` returns it.
    """
    lines = [line for src in code for line in src.splitlines() if not line.lstrip().startswith("#")]
    return sum(any(kernel in line for kernel in INT8_KERNELS) for line in lines)


class ReferenceInt8Layer(Int8Layer):
    """An :class:`Int8Layer` whose forward is PT2E's quantized pattern (what Inductor lowers to int8 kernels).

    ``quantize_per_tensor`` / ``dequantize_per_tensor`` of the input with the QAT scale and zero point,
    ``dequantize_per_channel`` of the int8 weight codes, the fp32 op, and the output quantization where QAT
    quantizes the output. Eager, it computes what the fake-quantized layer computes.
    """

    input_qparams: tuple[float, int] | None
    output_qparams: tuple[float, int] | None

    def freeze_qparams(self) -> None:
        """Copy the activation scales / zero points to Python numbers (read by :meth:`forward`).

        Also adds the (symmetric, all-zero) weight zero points. Inductor's patterns match constant scales
        (and fold them into the kernels); reading a buffer's value with ``float()`` inside the compiled
        forward would break the graph there instead.
        """
        has_input = self.input_scale is not None and self.input_zero_point is not None
        self.input_qparams = (float(self.input_scale), int(self.input_zero_point)) if has_input else None
        has_output = self.output_scale is not None and self.output_zero_point is not None
        self.output_qparams = (float(self.output_scale), int(self.output_zero_point)) if has_output else None
        # A buffer, not zeros made in forward: the compiled graph would rebuild them at every call.
        zero = torch.zeros_like(self.weight_scale, dtype=torch.int64)
        self.register_buffer("weight_zero_point", zero, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.input_qparams is not None:  # None: weight-only (ONNX export only; compile_int8 refuses it)
            x = _quantize_dequantize(x, self.input_qparams)
        qmin, qmax = weight_qrange(self.weight_bits)
        weight = _QD.dequantize_per_channel(
            self.weight_int8, self.weight_scale, self.weight_zero_point, 0, qmin, qmax, torch.int8
        )
        if self.kind == "linear":
            y = F.linear(x, weight, self.bias)
        else:
            conv = F.conv1d if self.kind == "conv1d" else F.conv2d
            y = conv(x, weight, self.bias, **self.conv_args)
        if self.output_qparams is not None:
            y = _quantize_dequantize(y, self.output_qparams)
        return y


def _quantize_dequantize(x: torch.Tensor, qparams: tuple[float, int]) -> torch.Tensor:
    """PT2E's activation quantizer: ``quantize_per_tensor`` then ``dequantize_per_tensor`` (uint8)."""
    qmin, qmax = activation_qrange(_ACTIVATION_BITS)
    args = (*qparams, qmin, qmax, torch.uint8)
    return _QD.dequantize_per_tensor(_QD.quantize_per_tensor(x, *args), *args)


class ReferencePool(nn.Module):
    """An observed average pool of a QAT model: its input quantized with the QAT scale, then the float pool.

    The QAT pool decides from its buffers at each call whether to quantize, which would split the compiled
    graph there; here that decision and the scale are fixed when the model is built.
    """

    def __init__(self, pool: nn.Module, qparams: tuple[float, int] | None) -> None:
        super().__init__()
        self.pool = pool
        self.qparams = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.pool(x if self.qparams is None else _quantize_dequantize(x, self.qparams))


def _reference_pool(pool: _PoolObserver) -> ReferencePool:
    qparams = None
    if pool.fake_quant_enabled and pool.activation_observed:
        scale, zero_point = pool.activation_qparams()
        qparams = (float(scale), int(zero_point))
    plain = copy.copy(pool)
    plain.__class__ = type(pool).__bases__[-1]  # (_PoolObserver, the float pool), as finalize_ does
    return ReferencePool(plain, qparams)


class CompiledInt8Model(nn.Module):
    """The result of :func:`compile_int8`: inference only, every call runs the compiled graph without autograd.

    Attributes:
        reference: the eager model with :class:`ReferenceInt8Layer` layers (what was compiled).
        compiled: the ``torch.compile`` module.
    """

    def __init__(self, reference: nn.Module, compiled: nn.Module) -> None:
        super().__init__()
        self.reference = reference
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        # Dynamo hands the weights to Inductor as constants (which the int8 patterns need) only while
        # ``freezing`` is set when it traces, and only without grad: a new input shape is traced here, too.
        # Set and restored by hand: ``inductor_config.patch`` costs ~13 us a call.
        prior = inductor_config.freezing
        inductor_config.freezing = True
        try:
            with torch.no_grad():
                return self.compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = prior


def _per_token(layer: Int8Layer) -> bool:
    """Whether the layer quantizes each input row with its own run-time range (no static input scale)."""
    return layer.activation_granularity == "token"


def _unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Int8 layers the int8 kernels cannot run as trained, by name, with the reason."""
    problems = {}
    for name, layer in int8_layers(model).items():
        if layer.group_size is not None:
            problems[name] = f"group_size={layer.group_size} (one scale per output channel only)"
        elif _per_token(layer):
            problems[name] = "per-token input ranges (one static input scale per layer only)"
        elif layer.activation_bits is None:
            problems[name] = "input not quantized (activation_bits=None or never observed)"
        elif layer.activation_bits != _ACTIVATION_BITS:
            problems[name] = f"activation_bits={layer.activation_bits} (8 only)"
    return problems


def to_reference_(int8: nn.Module) -> None:
    """Swap the layers of a :func:`convert_to_int8` model in place to PT2E's quantized pattern.

    Every :class:`Int8Layer` becomes a :class:`ReferenceInt8Layer` (same buffers), every observed average
    pool a :class:`ReferencePool`. Used for :func:`compile_int8` and for the ``torch.export``-based ONNX
    exporter (which translates the ``quantized_decomposed`` ops to ``QuantizeLinear`` /
    ``DequantizeLinear``).

    Raises:
        ValueError: for layers with group-wise weight scales (no per-channel pattern), naming them.
    """
    # Per-token (run-time) input ranges have no static scale for PT2E's per-tensor pattern either.
    problems = {
        name: ("group-wise weight scales" if layer.group_size is not None else "per-token input ranges")
        for name, layer in int8_layers(int8).items()
        if layer.group_size is not None or _per_token(layer)
    }
    if problems:
        raise ValueError(
            f"Layers {problems} cannot be written as PT2E's static per-channel / per-tensor pattern. "
            "HINT: export_onnx(..., exporter='legacy') writes them (MatMulNBits); convert_to_int8 runs them."
        )
    for layer in int8_layers(int8).values():
        layer.__class__ = ReferenceInt8Layer  # same buffers, the forward Inductor recognises
        layer.freeze_qparams()
    for name, pool in list(qat_pools(int8)):
        parent, _, child = name.rpartition(".")
        setattr(int8.get_submodule(parent), child, _reference_pool(pool))


def reference_int8_model(model: nn.Module) -> nn.Module:
    """:func:`convert_to_int8` of ``model`` in PT2E's quantized pattern (:func:`to_reference_`), eager.

    Raises:
        ValueError: if ``model`` was not prepared for quantization, or a layer cannot run as int8 kernels
            (group-wise scales, unquantized or non-8-bit inputs), naming the layers.
    """
    if not any(True for _ in qat_modules(model)):
        raise ValueError(
            "compile_int8 needs a model prepared for quantization (QuantizationAwareTraining or prepare_), "
            "trained or calibrated; this model has no QAT layer."
        )
    int8 = convert_to_int8(model)
    problems = _unsupported_layers(int8)
    if problems:
        raise ValueError(
            f"compile_int8 runs layers with per-channel weight scales and 8-bit quantized inputs; not: {problems}. "
            "HINT: QuantizationAwareTraining(activation_bits=8, group_size=None), trained or calibrated so the "
            "input ranges are observed; or convert_to_int8 / export_onnx for the other settings."
        )
    to_reference_(int8)
    return int8


def compile_int8(model: nn.Module, example_input: Any) -> CompiledInt8Model:
    """A CPU inference model of a QAT-prepared ``model`` that runs oneDNN int8 kernels with the QAT scales.

    Weights: the int8 codes and per-channel scales :func:`convert_to_int8` deploys (BatchNorm folded).
    Activations: the input scale / zero point each layer observed in training (and its output's, where QAT
    quantizes the output). Nothing is recalibrated. The graph is compiled (Inductor, ``freezing``) on
    ``example_input``; each new input shape compiles once more (a few seconds). Needs a C++ compiler.
    ``model`` is unchanged.

    Args:
        model: a QAT-prepared model (``QuantizationAwareTraining`` or ``prepare_``), on the CPU.
        example_input: one forward call's input (a tensor, tuple or dict) of the shape to serve.

    Returns:
        A :class:`CompiledInt8Model` (inference only, no autograd).

    Raises:
        ValueError: if ``model`` was not prepared, has a layer the int8 kernels cannot run (named), is not on
            the CPU, or cannot run ``example_input``.
        RuntimeError: if ``torch.compile`` fails (e.g. no C++ compiler).
    """
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"compile_int8 builds CPU (oneDNN) kernels; the model is on {sorted(devices)}. HINT: .cpu()")
    reference = reference_int8_model(model).eval()
    call = as_call(example_input)
    try:
        with torch.no_grad():
            run(reference, call)
    except Exception as err:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in call.args]
        raise ValueError(
            f"compile_int8: the model cannot run example_input (positional {shapes}, keywords "
            f"{sorted(call.kwargs)}): {type(err).__name__}: {err}. HINT: one batch of the shape to serve."
        ) from err
    # dynamic=False: Inductor's int8 patterns are matched on static shapes; a new shape recompiles.
    compiled = CompiledInt8Model(reference, torch.compile(reference, dynamic=False))
    try:
        run(compiled, call)  # compile now, not at the user's first request
    except Exception as err:
        raise RuntimeError(
            f"compile_int8: torch.compile failed: {type(err).__name__}: {err}. HINT: Inductor needs a C++ "
            "compiler on the CPU (g++ or clang, `CXX`); convert_to_int8 gives the eager int8 model."
        ) from err
    return compiled
