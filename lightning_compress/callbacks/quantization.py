"""QuantizationAwareTraining: train with fake-quantized weights and activations, ship int8.

*When* (start, observer and BatchNorm freezing) and *where* (which layers, at which bits) live here;
*how* lives in :mod:`lightning_compress.functional.qat` (module swaps, observers),
:mod:`~lightning_compress.functional.int8` (conversion) and :mod:`lightning_compress.export.onnx`.

The layers are swapped in ``setup`` (before Lightning restores a checkpoint), so
``fit(ckpt_path=...)`` loads the observed ranges and scales into the already-swapped model with strict
loading. The swap changes the class of the user's own layer objects in place: the user's ``forward``,
multi-input/keyword signatures, parameter names and any other callback's references (e.g.
:class:`~lightning_compress.GradualPruning`'s masks) keep working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress._files import save_atomically
from lightning_compress._lightning_internals import refuse_unsupported_sharding
from lightning_compress._validation import check_choice, check_range, check_step
from lightning_compress.callbacks._consolidate import is_sharded, run_on_plain_copy
from lightning_compress.callbacks.base import CompressionCallback, example_input
from lightning_compress.export.cpu import TARGET_CPUS, WEIGHT_DTYPES, weight_storage
from lightning_compress.export.onnx import export_onnx
from lightning_compress.functional.fake_quant import SUPPORTED_ACTIVATION_BITS, SUPPORTED_WEIGHT_BITS
from lightning_compress.functional.int8 import (
    convert_to_int8,
    int8_layers,
    matmul_nbits_problem,
    quantized_size_bytes,
)
from lightning_compress.functional.qat import (
    ACTIVATION_GRANULARITIES,
    OPTIONAL_TYPES,
    QUANTIZABLE_TYPES,
    check_group_size_,
    finalize_,
    is_qat,
    pool_names,
    prepare_,
    qat_class,
    qat_pools,
)
from lightning_compress.inputs import to_device
from lightning_compress.targets import matches, select_modules, tied_parameters, validate_patterns


def _check_bits(argument: str, value: Any, accepted: Sequence[int]) -> int:
    return check_choice(argument, value, accepted, hint=" HINT: bits per value, not bytes." if value == 1 else "")


class QuantizationAwareTraining(CompressionCallback):
    """Quantization-aware training: the model learns to live at low precision, then ships as int8.

    From ``start_step`` every selected Linear / Conv1d / Conv2d / Hugging Face ``Conv1D`` layer
    fake-quantizes its weight (symmetric, per output channel, zero point 0) and its input (affine per
    tensor, range from an EMA of the observed min/max), with straight-through gradients. Other layer types
    (Conv3d, embeddings, attention's raw ``in_proj_weight``, normalisation) are left in fp32 and listed
    under ``fp32_layers`` in the report. ``nn.MultiheadAttention``'s ``out_proj`` is left in fp32 with a
    warning (the attention reads its weight directly, bypassing any swapped layer). A layer whose weight
    is tied to another parameter (GPT-2's ``lm_head``) is refused in ``setup``: exclude it.

    After ``fit``, :func:`~lightning_compress.convert_to_int8` gives a model with int8 weights and
    :func:`~lightning_compress.export_onnx` an int8 ONNX file (or set ``export_dir``).

    Args:
        weight_bits: bits of the weights, 2 to 8 (8 default; 4 is common for weight compression).
        activation_bits: bits of each quantized layer's input (8), or ``None`` for weight-only.
        activation_granularity: ``"tensor"`` (default): one input range per layer, observed in training
            (static, what int8 conv runtimes need). ``"token"``: each row of a layer's input is quantized with
            its own range at run time (dynamic per-token int8, as torchao's int8-dynamic-activation schemes;
            Linear / ``Conv1D`` only, convs are refused in ``setup``). Exports as ``MatMulInteger`` (8-bit
            weights) or ``MatMulNBits`` with int8 compute (4-bit group-wise weights).
        start_step: optimizer step at which fake-quantization starts (``trainer.global_step``).
        freeze_observers_step: step from which scales and ranges stop changing (``None``: never).
        freeze_bn_step: step from which folded BatchNorms use running statistics (``None``: never).
        fold_bn: fold every BatchNorm that follows a quantized conv in the data flow (traced with
            ``torch.fx``, so torchvision-style ``conv1``/``bn1`` attributes count) into the conv's quantized
            weight during training (the standard QAT recipe); conversion removes it. BatchNorms left
            unfolded are named in a warning and listed under ``fp32_layers`` in the report.
        ema_decay: EMA weight of the old activation range, in ``[0, 1)``.
        overrides: ``{pattern: weight_bits}`` for layers that need other bits (e.g. ``{"classifier": 8}``).
        include: module name patterns (glob or ``re:``) to quantize; all supported layers by default.
        exclude: module name patterns to keep in fp32.
        types: layer class names to quantize, among ``Linear``, ``Conv1d``, ``Conv2d``, ``Conv1D`` (the
            default) and ``Embedding`` (only when named here: weight-only, one scale per row; a tied
            embedding such as GPT-2's is refused).
        group_size: one weight scale per output channel *and* per group of ``group_size`` consecutive input
            features (torchao's int4 weight-only layout, e.g. 32/64/128 with ``weight_bits=4``) for Linear
            and ``Conv1D`` layers; must divide the input size of every selected layer (checked in ``setup``,
            convs are refused). ``None`` (default): one scale per output channel. Group-wise layers convert
            with :func:`~lightning_compress.convert_to_int8` and export to ONNX as onnxruntime's ``MatMulNBits``
            (4-bit weights, ``group_size`` a power of two >= 16, weight-only or
            ``activation_granularity="token"``); the ONNX export refuses other group-wise configurations.
        export_dir: if set, at fit end rank zero writes ``model_int8.pt`` (the converted model) and, when
            an example input is known (``example_input_array`` or the first training batch),
            ``model_int8.onnx`` there. Under ``ModelParallelStrategy`` (FSDP2) the full weights are gathered
            to rank zero's CPU memory at fit end and a plain, unsharded copy of the model is exported; the
            sharded model itself is left as it is.
        target_cpu: the CPU the ONNX model will run on (``"auto"``: the one running the export; ``"vnni"``,
            ``"avx2"``, ``"arm64"``); decides the int8 weight storage, see
            :func:`~lightning_compress.export.cpu.weight_storage`. The report says what was chosen and why.
        export_weight_dtype: force the ONNX weight storage (``"int8"`` / ``"uint8"``) instead of
            deciding it from ``target_cpu`` (``"auto"``).
        name: distinguishes several instances (state key and ``compress/<name>/...`` metrics).

    Logged metrics (``pl_module.log``, every training step): ``compress/weight_bits`` (mean over the
    quantized weights), ``compress/size_bytes`` (parameters at their quantized bit widths, scales
    included), ``compress/ratio`` (fp32 bytes / ``size_bytes``).

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_compress import QuantizationAwareTraining
        >>> qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, freeze_bn_step=200)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[qat], logger=False, enable_checkpointing=False)
        >>> QuantizationAwareTraining(weight_bits=16)
        Traceback (most recent call last):
        ...
        ValueError: weight_bits must be one of [2, 3, 4, 5, 6, 7, 8], got 16.
    """

    report_title = "quantization"

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        *,
        activation_granularity: str = "tensor",
        start_step: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        fold_bn: bool = True,
        ema_decay: float = 0.99,
        overrides: dict[str, int] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        group_size: int | None = None,
        export_dir: str | None = None,
        target_cpu: str = "auto",
        export_weight_dtype: str = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.weight_bits = _check_bits("weight_bits", weight_bits, SUPPORTED_WEIGHT_BITS)
        if activation_bits is not None:
            _check_bits("activation_bits", activation_bits, SUPPORTED_ACTIVATION_BITS)
        self.activation_bits = activation_bits
        self.activation_granularity = check_choice(
            "activation_granularity", activation_granularity, ACTIVATION_GRANULARITIES
        )
        self.start_step = check_step("start_step", start_step, optional=True) or 0
        self.freeze_observers_step = check_step("freeze_observers_step", freeze_observers_step, optional=True)
        self.freeze_bn_step = check_step("freeze_bn_step", freeze_bn_step, optional=True)
        for argument, value in (
            ("freeze_observers_step", self.freeze_observers_step),
            ("freeze_bn_step", self.freeze_bn_step),
        ):
            if value is not None and value <= self.start_step:
                raise ValueError(
                    f"{argument} must be > start_step, got {argument}={value} and "
                    f"start_step={self.start_step}. HINT: observers need at least one quantized step to see "
                    "ranges; use None to never freeze."
                )
        self.ema_decay = check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        self.fold_bn = bool(fold_bn)
        self.overrides = {
            str(p): _check_bits(f"overrides[{p!r}]", b, SUPPORTED_WEIGHT_BITS) for p, b in (overrides or {}).items()
        }
        validate_patterns("overrides", list(self.overrides))
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.types = validate_patterns("types", types) or list(QUANTIZABLE_TYPES)
        unsupported = [t for t in self.types if t not in QUANTIZABLE_TYPES + OPTIONAL_TYPES]
        if unsupported:
            raise ValueError(
                f"types must be among {list(QUANTIZABLE_TYPES + OPTIONAL_TYPES)}, got {unsupported}. "
                "HINT: other layers (Conv3d, attention's in_proj_weight) stay in fp32."
            )
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"group_size must be a positive integer or None, got {group_size!r}. "
                "HINT: input features per scale, e.g. 32, 64 or 128."
            )
        self.group_size = group_size
        self.export_dir = export_dir
        self.target_cpu = check_choice("target_cpu", target_cpu, TARGET_CPUS)
        self.export_weight_dtype = check_choice("export_weight_dtype", export_weight_dtype, WEIGHT_DTYPES)

        self._layers: dict[str, Any] = {}
        # Swapped by this fit's setup and no step run yet: a failure before step 1 gives the model back as it was.
        self._undo_on_failure = False
        self._pools: dict[str, Any] = {}
        self._fp32_layers: dict[str, str] = {}
        self._phase: tuple[bool, bool, bool] | None = None
        self._metrics: dict[str, float] = {}
        self.exported: dict[str, str] = {}

    # ---------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_unsupported_sharding(trainer.strategy, type(self).__name__)
        selected = select_modules(pl_module, include=self.include, exclude=self.exclude, types=self.types)
        names = self._quantizable(pl_module, selected)
        for pattern in self.overrides:
            if not any(matches(n, [pattern]) for n in names):
                raise ValueError(f"overrides pattern {pattern!r} matches no quantized layer. Quantized: {names}.")
        bits = {n: next((b for p, b in self.overrides.items() if matches(n, [p])), self.weight_bits) for n in names}
        check_group_size_(dict(pl_module.named_modules()), names, self.group_size)
        self._undo_on_failure = not any(is_qat(m) for m in pl_module.modules())
        prepare_(
            pl_module,
            weight_bits=bits,
            activation_bits=self.activation_bits,
            modules=names,
            fold_bn=self.fold_bn,
            ema_decay=self.ema_decay,
            # Average pools are observed so an int8 runtime can pool in int8; `exclude` keeps one float.
            pools=self._pools_to_observe(pl_module),
            group_size=self.group_size,
            activation_granularity=self.activation_granularity,
        )
        modules = dict(pl_module.named_modules())
        self._layers = {n: modules[n] for n in names}
        self._pools = dict(qat_pools(pl_module))
        if self.fold_bn:
            for n, m in modules.items():
                if type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d):
                    self._fp32_layers[n] = "BatchNorm not folded during training (see the setup warning)"
        self._phase = None
        self._set_phase(trainer.global_step)
        self._refresh_metrics(pl_module)

    def _pools_to_observe(self, pl_module: pl.LightningModule) -> list[str]:
        # Pools run in int8 only between statically quantized convs; per-token layers are Linear only.
        if self.activation_granularity == "token":
            return []
        return [n for n in pool_names(pl_module) if not (self.exclude and matches(n, self.exclude))]

    @override
    def state_dict(self) -> dict[str, Any]:
        # Observed ranges and scales are buffers of the swapped layers: they travel in the model's own
        # state_dict. The phase follows from trainer.global_step. This records the configuration, so a
        # resume with different bits fails loudly instead of mixing scales.
        return {"layer_bits": {n: m.weight_bits for n, m in self._layers.items()}, "group_size": self.group_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("group_size", self.group_size) != self.group_size:
            raise ValueError(
                f"The checkpoint was trained with group_size={state_dict['group_size']}, this callback uses "
                f"group_size={self.group_size}. HINT: resume with the same group_size."
            )
        saved = state_dict.get("layer_bits", {})
        current = {n: m.weight_bits for n, m in self._layers.items()}
        if saved and saved != current:
            raise ValueError(
                f"The checkpoint was trained with quantized layers {saved}, "
                f"this callback quantizes {current}. "
                "HINT: resume with the same weight_bits, overrides and include/exclude/types."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = None
        self._set_phase(trainer.global_step)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_phase(trainer.global_step)
        self._mark_training_batch(True)
        self.log_metrics(pl_module, self._metrics)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mark_training_batch(False)
        self._undo_on_failure = False
        _sync_observers(self._layers, self._pools)

    def _mark_training_batch(self, flag: bool) -> None:
        # Observers run on training batches whatever the modules' mode (a model passed to fit in eval mode
        # stays in eval mode under Lightning), and never on validation batches.
        for module in (*self._layers.values(), *self._pools.values()):
            module.training_batch = flag

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._mark_training_batch(False)
        if self._undo_on_failure:
            # Refused before any step (e.g. by another callback's setup): the user's own layers, not QAT ones.
            finalize_(pl_module)
            self._layers, self._pools, self._undo_on_failure = {}, {}, False
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and is_sharded(pl_module):
            # FSDP2: rank zero exports a plain copy holding the gathered weights; every rank learns the paths.
            self.exported = run_on_plain_copy(trainer, pl_module, lambda plain: self._export(trainer, plain))
        elif self.export_dir is not None and trainer.is_global_zero:
            self._export(trainer, pl_module)
        super().on_fit_end(trainer, pl_module)

    def _quantizable(self, pl_module: pl.LightningModule, selected: list[tuple[str, Any]]) -> list[str]:
        """Names of the selected layers to swap; refuses (before step 1) what cannot be quantized correctly."""
        read_directly = _read_directly_by_parent(pl_module)
        skipped = [n for n, _ in selected if n in read_directly]
        if skipped:
            # Never silently: the user asked for these (by default or by pattern) and gets fp32.
            rank_zero_warn(
                f"QuantizationAwareTraining keeps {skipped} in fp32: nn.MultiheadAttention reads out_proj.weight "
                "directly and never calls out_proj's forward, so it cannot be fake-quantized or converted "
                "(nor can its in_proj_weight). The compression report lists them under fp32_layers."
            )
        selected = [(n, m) for n, m in selected if n not in read_directly]
        if not selected:
            raise ValueError(
                f"Nothing left to quantize: the selected layers {skipped} are nn.MultiheadAttention out_proj "
                "layers, which stay fp32. HINT: select other layers with include/types."
            )
        # Exact supported classes only: a user subclass may have its own forward, which the swap would skip.
        unsupported = [f"{n} ({type(m).__name__})" for n, m in selected if qat_class(m) is None and not is_qat(m)]
        if unsupported:
            raise ValueError(
                f"Cannot quantize {unsupported}: only plain nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding and "
                "Hugging Face Conv1D are swapped. HINT: exclude these modules."
            )
        names = [n for n, _ in selected]
        # Ties to an unselected module were refused by select_modules; this catches ties inside the selection.
        ties_of = tied_parameters(pl_module)
        tied = {n: ties_of[f"{n}.weight"] for n in names if f"{n}.weight" in ties_of}
        if tied:
            ties = "; ".join(f"{n}.weight is also {', '.join(others)}" for n, others in tied.items())
            raise ValueError(
                f"Cannot quantize layers whose weight is tied to another parameter: {ties}. Quantizing one "
                "copy would give the int8 model two different weights where the float model has one. "
                f"HINT: exclude={sorted(tied)!r}."
            )
        self._fp32_layers = {n: "read directly by nn.MultiheadAttention" for n in skipped}
        for n, m in pl_module.named_modules():
            if isinstance(m, torch.nn.Embedding) and n not in names:
                self._fp32_layers[n] = "Embedding: not quantized (add 'Embedding' to types)"
        return names

    # ---------------------------------------------------------------- phases
    def phase_at(self, step: int) -> tuple[bool, bool, bool]:
        """``(fake_quant_enabled, observer_enabled, bn_frozen)`` at optimizer step ``step``."""
        enabled = step >= self.start_step
        observing = enabled and (self.freeze_observers_step is None or step < self.freeze_observers_step)
        bn_frozen = self.freeze_bn_step is not None and step >= self.freeze_bn_step
        return enabled, observing, bn_frozen

    def _set_phase(self, step: int) -> None:
        phase = self.phase_at(step)
        if phase == self._phase:
            return
        for module in (*self._layers.values(), *self._pools.values()):
            module.fake_quant_enabled, module.observer_enabled, module.bn_frozen = phase
        self._phase = phase

    def _refresh_metrics(self, pl_module: pl.LightningModule) -> None:
        # Parameter counts and bits do not change during a fit: computed once in setup.
        dense, effective, mean_bits = quantized_size_bytes(pl_module)
        self._metrics = {"weight_bits": mean_bits, "size_bytes": float(effective), "ratio": dense / effective}

    # ---------------------------------------------------------------- results
    @override
    def layer_bits(self) -> dict[str, float]:
        return {n: float(m.weight_bits) for n, m in self._layers.items()}

    @override
    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        rows = []
        for n, m in self._layers.items():
            lo, hi = (float(v) for v in m.activation_range)
            rows.append(
                {
                    "layer": n,
                    "type": type(m).__name__.removeprefix("QAT"),
                    "weight_bits": m.weight_bits,
                    "activation_bits": m.activation_bits if m.activation_bits is not None else "-",
                    "input_range": f"[{lo:.3g}, {hi:.3g}]" if m.activation_observed else "-",
                    "folded_bn": "yes" if m.folded_bn is not None else "-",
                }
            )
        storage = weight_storage(self.export_weight_dtype, self.target_cpu)
        return {
            "weight_bits": self._metrics.get("weight_bits", float(self.weight_bits)),
            "activation_bits": self.activation_bits if self.activation_bits is not None else "none (weight-only)",
            "activation_granularity": self.activation_granularity if self.activation_bits is not None else "-",
            "size_bytes": self._metrics.get("size_bytes"),
            "ratio": self._metrics.get("ratio"),
            "start_step": self.start_step,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
            "group_size": self.group_size if self.group_size is not None else "- (per output channel)",
            "onnx_weight_storage": storage.summary,
            "onnx_target_cpu": storage.target,
            "onnx_storage_reason": storage.reason,
            **{f"exported_{k}": v for k, v in self.exported.items()},
            "layers": rows,
            "fp32_layers": [{"layer": n, "reason": r} for n, r in self._fp32_layers.items()],
        }

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        """Write the int8 model (and ONNX when an example input is known); returns ``self.exported``."""
        assert self.export_dir is not None
        os.makedirs(self.export_dir, exist_ok=True)
        int8 = convert_to_int8(pl_module)
        path = os.path.join(self.export_dir, "model_int8.pt")
        save_atomically(int8, path)
        self.exported["torch"] = path
        problems = {n: p for n, m in int8_layers(int8).items() if (p := matmul_nbits_problem(m)) and m.group_size}
        if problems:
            rank_zero_warn(
                "QuantizationAwareTraining: group-wise layers export to ONNX only as onnxruntime's MatMulNBits "
                f"(4-bit, group_size a power of two >= 16, weight-only or per-token inputs); not for {problems}. Only "
                f"{path} (the PyTorch int8 model) was written."
            )
            return self.exported
        sample = example_input(pl_module, [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)])
        if sample is None:
            rank_zero_info(
                "QuantizationAwareTraining: no example input known, ONNX export skipped "
                "(set example_input_array on the LightningModule)."
            )
            return self.exported
        try:
            import onnx  # noqa: F401
        except ImportError:
            rank_zero_info(
                "QuantizationAwareTraining: onnx is not installed, ONNX export skipped "
                "(pip install 'lightning-compress[onnx]')."
            )
            return self.exported
        # The whole call, positional and keyword inputs alike (forward(x, *, gate) keeps its gate).
        self.exported["onnx"] = export_onnx(
            int8.cpu(),
            os.path.join(self.export_dir, "model_int8.onnx"),
            to_device(sample, "cpu"),
            weight_dtype=self.export_weight_dtype,
            target_cpu=self.target_cpu,
        )
        return self.exported


def _read_directly_by_parent(model: torch.nn.Module) -> set[str]:
    """Layers whose parent uses their weight without calling them: ``nn.MultiheadAttention.out_proj``."""
    return {
        f"{n}.out_proj" if n else "out_proj"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.MultiheadAttention)
    }


def _sync_observers(layers: dict[str, Any], pools: dict[str, Any] | None = None) -> None:
    """Average the observed ranges over DDP processes, so every rank quantizes alike.

    Input ranges of layers and pools, and output ranges of convs that quantize their output. Weight
    scales follow from the weights, which DDP already keeps identical. One all-reduce per step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    observing = [
        m
        for m in (*layers.values(), *(pools or {}).values())
        if m.activation_bits is not None and getattr(m, "activation_granularity", "tensor") == "tensor"
    ]
    ranges = [m.activation_range for m in observing if m.observer_enabled]
    ranges += [m.output_range for m in observing if m.observer_enabled and getattr(m, "quantize_output", False)]
    if not ranges:
        return
    flat = torch.cat(ranges)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for i, r in enumerate(ranges):
        r.copy_(flat[2 * i : 2 * i + 2])
