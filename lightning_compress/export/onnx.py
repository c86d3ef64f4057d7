"""Int8 ONNX export of a quantized model: trace to the QDQ format, then rewrite for int8 kernels.

Why a module of its own and not ``functional/``: ``functional`` is pure torch math; this is a file
format, with protobuf graph rewriting (:mod:`lightning_compress.export.onnx_graph`) and file I/O, and it
needs the optional ``onnx`` package (imported when :func:`export_onnx` runs, so the rest of the package
works without it).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from lightning_compress._validation import check_choice
from lightning_compress.export.cpu import WEIGHT_DTYPES, WeightStorage, weight_storage
from lightning_compress.functional.int8 import (
    convert_to_int8,
    int8_embeddings,
    int8_layers,
    matmul_nbits_problem,
    prepare_matmul_nbits_,
    prepare_per_token_export_,
)
from lightning_compress.inputs import CapturedCall, as_call, run

__all__ = ["EXPORTERS", "WEIGHT_DTYPES", "WEIGHT_ONLY_INPUTS", "export_onnx"]

# "legacy": torch.onnx's TorchScript exporter; "dynamo": the torch.export-based one (needs onnxscript).
EXPORTERS = ("auto", "dynamo", "legacy")
# Weight-only layers' inputs in the ONNX graph: rounded to 8 bits per call (int8 kernels), or kept float.
WEIGHT_ONLY_INPUTS = ("dynamic", "float")
# The dynamo exporter's operator library (onnxscript's torchlib) targets opset 18.
_DYNAMO_MIN_OPSET = 18


def export_onnx(
    model: nn.Module,
    path: str,
    example_input: Any,
    *,
    opset_version: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    weight_dtype: str = "auto",
    target_cpu: str = "auto",
    exporter: str = "auto",
    weight_only_inputs: str = "dynamic",
) -> str:
    """Write ``model`` as an int8 ONNX model that onnxruntime runs with int8 kernels.

    ``model`` is a QAT-prepared model (converted here with :func:`convert_to_int8`) or an already
    converted one. Weights are written as **int8 initializers** behind ``DequantizeLinear`` (per output
    channel), inputs of quantized layers as ``QuantizeLinear`` → ``DequantizeLinear`` with the observed
    scales (the QDQ format), and so are the outputs of convs that QAT quantized (before a residual add or
    a Hardswish), the inputs of observed average pools, and residual adds. The graph is then rewritten
    so that onnxruntime keeps whole networks in int8: ``QLinearConv`` → int8 ``MaxPool`` →
    ``QLinearConv``, ``QLinearAdd`` for residual sums (the identity branch reads the quantized copy of the
    block input, within half a step of its observed scale), ``QLinearGlobalAveragePool``. Ops without
    int8 kernels between quantized layers (Hardswish, Hardsigmoid, the squeeze-excite multiplication,
    LayerNorm, GELU, softmax) stay **fp32 islands**: they read ``DequantizeLinear`` and their result is
    quantized again for the next layer, which keeps running in int8. A Linear whose output is
    re-quantized becomes ``QGemm``; a Linear whose output stays float (the last layer, or every
    layer of a weight-only model) is rewritten to ``MatMulInteger`` with the same scales (weight-only:
    with ``DynamicQuantizeLinear`` of its input, as onnxruntime's ``quantize_dynamic`` does).

    Args:
        model: QAT-prepared or converted model.
        path: output ``.onnx`` file.
        example_input: one forward call's input: a tensor, a tuple of positional inputs, a dict of
            keyword inputs, or a :class:`~lightning_compress.inputs.CapturedCall` with both. Keyword
            inputs become graph inputs after the positional ones.
        opset_version: ONNX opset (per-channel ``DequantizeLinear`` needs >= 13); default 17 with the
            legacy exporter, 18 with the dynamo exporter (its minimum).
        input_names: names of the graph inputs (default ``input``, ``input_1``, ..., then the keywords).
        output_names: names of the graph outputs (default ``output``, ...).
        dynamic_batch: make dim 0 of every input and output dynamic.
        weight_dtype: how weight codes are stored: ``"auto"`` (default) decides from ``target_cpu``
            (:func:`~lightning_compress.export.cpu.weight_storage`): signed int8 on CPUs whose int8
            products accumulate in 32 bits (x86 with VNNI / AMX, arm64); on x86 without VNNI, int8 for
            layers whose codes fit in ±64 and ``uint8`` with zero point 128 for the others (there
            onnxruntime's int8 kernels add pairs of products in 16-bit registers, which saturate).
            ``"int8"`` / ``"uint8"`` force one storage for every layer.
        target_cpu: the CPU the model will run on: ``"auto"`` (the one running the export), ``"vnni"``,
            ``"avx2"`` (exact on every x86 CPU) or ``"arm64"``. The choice and its reason are written to
            the model's ``metadata_props`` (``lightning_compress.weight_storage``, ``...target_cpu``,
            ``...storage_reason``).

        exporter: which ``torch.onnx`` exporter traces the model: ``"legacy"`` (TorchScript-based,
            ``dynamo=False``), ``"dynamo"`` (``torch.export``-based, needs ``onnxscript``; the int8 layers are
            traced as PT2E's ``quantized_decomposed`` ops, which it writes as ``QuantizeLinear`` /
            ``DequantizeLinear``), or ``"auto"``: the legacy exporter, and the dynamo exporter only if the
            legacy one fails on the model (e.g. ``aten::diff`` in current Hugging Face GPT-2), with a
            ``UserWarning`` naming the legacy error. Both graphs go through the same int8 rewriting
            (tests check the same int8 kernels run); the one used is written to ``metadata_props``
            (``lightning_compress.exporter``). Group-wise (``MatMulNBits``) layers export with the legacy
            exporter only.
        weight_only_inputs: what weight-only layers (``activation_bits=None``) do with their input:
            ``"dynamic"`` (default) rounds it to 8 bits per tensor at run time and runs int8 kernels, as
            onnxruntime's ``quantize_dynamic`` (faster, not bit-equal to the PyTorch model); ``"float"``
            keeps it float against the dequantized weight (the PyTorch model's numbers, fp32 kernels).

    Returns:
        ``path``.

    Raises:
        ValueError: if ``example_input`` is missing, ``weight_dtype`` / ``target_cpu`` / ``exporter``
            unknown (or an opset below 18 asked of the dynamo exporter), the model was not prepared for
            quantization or has group-wise weight scales (not supported yet). Nothing is written then, and
            a failed export never leaves a partial file at ``path`` (it is written to a temporary file,
            then renamed).
        ImportError: if the dynamo exporter is needed and ``onnxscript`` is not installed.
    """
    import onnx  # the [onnx] extra

    storage = weight_storage(weight_dtype, target_cpu)  # validates both arguments before any work
    check_choice("weight_only_inputs", weight_only_inputs, WEIGHT_ONLY_INPUTS)
    check_choice("exporter", exporter, EXPORTERS, " HINT: 'auto' tries the legacy exporter, then dynamo.")
    if exporter == "dynamo" and opset_version is not None and opset_version < _DYNAMO_MIN_OPSET:
        raise ValueError(
            f"export_onnx: the dynamo exporter writes opset >= {_DYNAMO_MIN_OPSET}, got opset_version={opset_version}. "
            "HINT: opset_version=None (18 there), or exporter='legacy' for older opsets."
        )
    if example_input is None:
        raise ValueError(
            "export_onnx needs example_input (a tensor, tuple or dict) to trace the model. "
            "HINT: one real batch, e.g. next(iter(dataloader))[0][:1]."
        )
    model = _exportable(model, opset_version)
    call = as_call(example_input)
    try:
        with torch.no_grad():
            outputs = run(model, call)
    except Exception as err:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in call.args]
        raise ValueError(
            f"export_onnx: the model cannot run example_input (positional {shapes}, keywords "
            f"{sorted(call.kwargs)}): {type(err).__name__}: {err}. Nothing was written. HINT: pass one real "
            "batch the model accepts, e.g. next(iter(dataloader))[0][:1]."
        ) from err
    n_outputs = len(outputs) if isinstance(outputs, list | tuple) else 1
    input_names = input_names or [("input" if i == 0 else f"input_{i}") for i in range(len(call.args))] + list(
        call.kwargs
    )
    output_names = output_names or [("output" if i == 0 else f"output_{i}") for i in range(n_outputs)]
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".export-", dir=directory)
    os.close(fd)
    try:
        used = _export_graph(model, call, tmp, exporter, opset_version, (input_names, output_names), dynamic_batch)
        graph_model = onnx.load(tmp)
        _rewrite(graph_model, storage, used, dynamic_inputs=weight_only_inputs == "dynamic")
        onnx.checker.check_model(graph_model)
        onnx.save(graph_model, tmp)
        os.replace(tmp, path)  # atomic: `path` is either the old file or the complete new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# Per-token layers reshape their output with Shape(start=, end=), an opset-15 form.
_PER_TOKEN_MIN_OPSET = 15


def _exportable(model: nn.Module, opset_version: int | None) -> nn.Module:
    """The converted model in eval mode, with what its int8 layers' ONNX forms read attached (to a copy).

    Raises:
        ValueError: group-wise layers that ``MatMulNBits`` cannot express, or per-token layers below opset
            15, naming them.
    """
    if not int8_layers(model) and not int8_embeddings(model):
        model = convert_to_int8(model)
    grouped = {n: m for n, m in int8_layers(model).items() if m.group_size is not None}
    problems = {n: p for n, m in grouped.items() if (p := matmul_nbits_problem(m)) is not None}
    if problems:
        raise ValueError(
            f"export_onnx supports group-wise weight scales only as onnxruntime's MatMulNBits (4-bit weights, "
            f"group_size a power of two >= 16, weight-only or per-token inputs); not supported yet for {problems}. "
            "Nothing was written. HINT: use the PyTorch model from convert_to_int8 (torch.save), or train "
            "with group_size=None (one scale per output channel) for an int8 ONNX export."
        )
    per_token = [n for n, m in int8_layers(model).items() if m.activation_granularity == "token" and n not in grouped]
    if per_token and opset_version is not None and opset_version < _PER_TOKEN_MIN_OPSET:
        raise ValueError(
            f"export_onnx: per-token layers {per_token} need opset_version >= {_PER_TOKEN_MIN_OPSET} (Shape with "
            f"start/end), got {opset_version}. Nothing was written. HINT: opset_version=17 (the legacy default)."
        )
    if grouped or per_token:
        model = copy.deepcopy(model)  # the packed weights and column sums are for the export only
        for name in grouped:
            prepare_matmul_nbits_(model.get_submodule(name))
        for name in per_token:
            prepare_per_token_export_(model.get_submodule(name))
    return model.eval()


def _export_graph(
    model: nn.Module,
    call: CapturedCall,
    path: str,
    exporter: str,
    opset_version: int | None,
    names: tuple[list[str], list[str]],
    dynamic_batch: bool,
) -> str:
    """Trace ``model`` to ``path`` with the chosen exporter; returns the one used (``legacy`` / ``dynamo``)."""
    dynamic_axes = {name: {0: "batch"} for name in (*names[0], *names[1])} if dynamic_batch else None
    if exporter in ("auto", "legacy"):
        try:
            _torchscript_export(model, call, path, opset_version or 17, *names, dynamic_axes)
            return "legacy"
        except Exception as err:
            # Group-wise and per-token layers have no dynamo form (no static per-tensor pattern).
            legacy_only = any(
                m.group_size is not None or m.activation_granularity == "token" for m in int8_layers(model).values()
            )
            if exporter == "legacy" or legacy_only:
                raise
            legacy_error = err
    opset = opset_version or _DYNAMO_MIN_OPSET
    if exporter == "auto":
        opset = max(opset, _DYNAMO_MIN_OPSET)
        warnings.warn(
            f"export_onnx: the legacy (TorchScript) exporter failed on this model ({type(legacy_error).__name__}: "
            f"{str(legacy_error)[:300]}); exported with the dynamo exporter, opset {opset}, instead "
            "(metadata lightning_compress.exporter). Pass exporter='dynamo' to choose it directly.",
            UserWarning,
            stacklevel=3,
        )
    _dynamo_export(model, call, path, opset, *names, dynamic_axes)
    return "dynamo"


def _dynamo_export(
    model: nn.Module,
    call: CapturedCall,
    path: str,
    opset_version: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's operator library)
    except ImportError as err:
        raise ImportError(
            "export_onnx(exporter='dynamo') needs onnxscript. HINT: pip install 'lightning-compress[onnx]', "
            "or exporter='legacy'."
        ) from err
    from lightning_compress.functional.int8_compile import to_reference_

    reference = copy.deepcopy(model)
    to_reference_(reference)  # int8 layers as quantized_decomposed ops: QuantizeLinear / DequantizeLinear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(
            reference,
            call.args,
            path,
            kwargs=call.kwargs or None,
            dynamo=True,
            external_data=False,
            opset_version=opset_version,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            verbose=False,
        )


def _rewrite(graph_model: Any, storage: WeightStorage, exporter: str, dynamic_inputs: bool = True) -> None:
    """Graph passes that make onnxruntime run int8 kernels, and the metadata saying how."""
    from lightning_compress.export import onnx_graph

    index = onnx_graph.GraphIndex(graph_model)
    if storage.keep_int8_within < 127:
        onnx_graph.weights_to_uint8(index, keep_int8_within=storage.keep_int8_within)
    onnx_graph.global_average_pools(index)
    onnx_graph.merge_duplicate_quantize(index)
    onnx_graph.hoist_quantize(index)
    onnx_graph.merge_duplicate_quantize(index)
    onnx_graph.drop_redundant_quantize(index)
    onnx_graph.int8_residuals(index)
    onnx_graph.integer_matmuls(index, dynamic_inputs=dynamic_inputs)
    index.remove_dead()
    index.commit()
    metadata = {
        "lightning_compress.weight_storage": storage.summary,
        "lightning_compress.target_cpu": storage.target,
        "lightning_compress.storage_reason": storage.reason,
        "lightning_compress.exporter": exporter,
    }
    for key, value in metadata.items():
        entry = next((p for p in graph_model.metadata_props if p.key == key), None) or graph_model.metadata_props.add()
        entry.key, entry.value = key, value


def _torchscript_export(
    model: nn.Module,
    call: CapturedCall,
    path: str,
    opset_version: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> None:
    args: tuple[Any, ...] = call.args
    if call.kwargs:
        # The TorchScript exporter passes inputs positionally: adapt keyword(-only) inputs.
        model, args = _KeywordAdapter(model, tuple(call.kwargs), len(call.args)), (*call.args, *call.kwargs.values())
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is deprecated in favour of the dynamo exporter,
        # which needs the extra `onnxscript` package; it is the one that works with the plain [onnx] extra.
        warnings.simplefilter("ignore")
        try:
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
        except Exception as err:
            if "scaled_dot_product_attention" in str(err):
                raise RuntimeError(
                    "export_onnx: torch's TorchScript ONNX exporter cannot convert this model's attention "
                    f"({err}). Grouped-query attention (more query than key/value heads, e.g. Llama) reaches "
                    "scaled_dot_product_attention with enable_gqa=True, which it does not support. HINT: for a "
                    "Hugging Face model, export a copy built with attn_implementation='eager' (load it with "
                    "from_pretrained(..., attn_implementation='eager') or set model.config._attn_implementation "
                    "= 'eager'); the int8 PyTorch model from convert_to_int8 is unaffected."
                ) from err
            raise


class _KeywordAdapter(nn.Module):
    """Takes every input positionally and calls ``model`` with the trailing ones as keywords."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...], positional: int) -> None:
        super().__init__()
        self.model, self.keys, self.positional = model, keys, positional

    def forward(self, *inputs: Any) -> Any:  # noqa: D102
        args, rest = inputs[: self.positional], inputs[self.positional :]
        return self.model(*args, **dict(zip(self.keys, rest, strict=True)))
