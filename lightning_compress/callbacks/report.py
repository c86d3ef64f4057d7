"""``CompressionReporter``: what the combined report measures beyond counts — files, latency, quality, pictures.

The compression callbacks always write a report at fit end. Adding this callback makes that report
realize and measure what it claims:

- **a compact artifact**: :func:`~lightning_compress.save_compressed` of the deployable model (the int8
  model when a ``QuantizationAwareTraining`` callback is present, else the model as trained) next to the
  report; its size on disk is the headline when it is the smallest file;
- **latency** (``latency=True``): median CPU latency of the original model and of the final one(s) in
  PyTorch, and of every exported ONNX file (and of the original exported to ONNX) in onnxruntime, at a
  batch and thread count you choose;
- **quality before and after** the transforms that happen at fit end (decomposition at fit end, int8
  conversion): the validation loop is run on the model as trained and on the transformed model;
- **pictures** (``plots=True``, needs matplotlib): per-layer sparsity and bit widths, the compression
  metrics over the steps, and the size / quality trade-off, as PNG files next to the report and as
  images/artifacts in TensorBoard, MLflow and W&B loggers.

It compresses nothing itself and can stand anywhere in ``trainer.callbacks``; to time the *original*
model it keeps a CPU copy taken in ``setup``, which must run before ``QuantizationAwareTraining`` swaps
its layers — so list it before that callback (otherwise the original's latency is skipped and the
report says why).

Under ``ModelParallelStrategy`` (FSDP2, a sharded model) latency, quality and the compact artifact need
the whole model on one process, which sharding exists to avoid: they are skipped and the report says
so (exports the other callbacks wrote are still measured). Consolidate the model after ``fit`` to
measure it (``torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
options=StateDictOptions(full_state_dict=True))`` into a plain copy).

Example::

    >>> from lightning_compress import CompressionReporter, GradualPruning
    >>> callbacks = [CompressionReporter(latency=True, latency_batch=64), GradualPruning(0.8)]
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress._lightning_internals import loggers_write_now, strategy_is
from lightning_compress.callbacks.base import CompressionCallback, example_input
from lightning_compress.evaluation import validation_metrics
from lightning_compress.functional import latency as L
from lightning_compress.functional.compressed import save_compressed
from lightning_compress.functional.stats import is_sharded
from lightning_compress.inputs import CapturedCall
from lightning_compress.report import file_bytes, size_row

__all__ = ["CompressionReporter", "run_validation"]

COMPRESSED_BASENAME = "model_compressed.lcz"
_SHARDED = (
    "the model is sharded (ModelParallelStrategy / FSDP2) and these need it whole on one process. HINT: "
    "consolidate it after fit (get_model_state_dict(..., full_state_dict=True)) and measure a plain copy."
)


class CompressionReporter(CompressionCallback):
    """Make the combined compression report measure files, latency and quality, and draw it.

    Args:
        save_compressed: write the deployable model with :func:`~lightning_compress.save_compressed` as
            ``model_compressed.lcz`` next to the report (int8 model when quantization-aware training ran).
        codec: entropy coder of that file: ``"lzma"``, ``"zlib"`` or ``"none"``.
        latency: measure CPU latency at fit end (costs ``latency_repeats`` forwards per model and an ONNX
            export of the original when onnx is installed).
        latency_batch: rows per timed call (the example input repeated).
        latency_threads: threads for PyTorch and onnxruntime while timing; ``None``: PyTorch's current
            ``torch.get_num_threads()``.
        latency_repeats: timed calls per model (the median is reported).
        evaluate: run the validation loop before and after the fit-end transforms.
        monitor: the validation metric the tolerance applies to; ``None``: the first logged metric whose
            name contains ``"acc"``, else the first one.
        tolerance: warn when ``monitor`` gets worse by more than this through a fit-end transform
            (absolute; lower is better when the name contains ``"loss"`` or ``"err"``).
        plots: draw the pictures (skipped, with a message, when matplotlib is missing).
        name: distinguishes several instances (state key).

    Raises:
        ValueError: an argument out of range.
    """

    report_title = "measurements"

    def __init__(
        self,
        save_compressed: bool = True,
        codec: str = "lzma",
        latency: bool = False,
        latency_batch: int = 1,
        latency_threads: int | None = None,
        latency_repeats: int = 30,
        evaluate: bool = True,
        monitor: str | None = None,
        tolerance: float | None = None,
        plots: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if codec not in ("lzma", "zlib", "none"):
            raise ValueError(f"codec must be 'lzma', 'zlib' or 'none', got {codec!r}.")
        for arg, value in (("latency_batch", latency_batch), ("latency_repeats", latency_repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}.")
        if latency_threads is not None and (
            isinstance(latency_threads, bool) or not isinstance(latency_threads, int) or latency_threads < 1
        ):
            raise ValueError(f"latency_threads must be None or an integer >= 1, got {latency_threads!r}.")
        if tolerance is not None and not (isinstance(tolerance, int | float) and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be None or a finite number, got {tolerance!r}.")
        self.save_compressed = save_compressed
        self.codec = codec
        self.latency = latency
        self.latency_batch = latency_batch
        self.latency_threads = latency_threads
        self.latency_repeats = latency_repeats
        self.evaluate = evaluate
        self.monitor = monitor
        self.tolerance = tolerance
        self.plots = plots
        self._original: nn.Module | None = None
        self._original_note = ""
        self._before: dict[str, float] | str | None = None
        self._module_changes = False
        self.history: list[dict[str, float]] = []
        self._results: dict[str, Any] = {}
        self.artifacts: dict[str, str] = {}

    # ---------------------------------------------------------------- during fit
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._original, self._original_note, self.history, self._before = None, "", [], None
        if stage != "fit" or not trainer.is_global_zero:
            return
        if strategy_is(trainer.strategy, "ModelParallelStrategy"):
            self._original_note = f"not kept: {_SHARDED}"
            return
        swapped = [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback) and cb.layer_bits()]
        if swapped:
            self._original_note = (
                "not measured: QuantizationAwareTraining had already swapped the layers when this callback's "
                "setup ran. HINT: list CompressionReporter before QuantizationAwareTraining."
            )
            return
        # A CPU copy of the model as fit received it (module structure and weights before any swap);
        # its weights may be reloaded from a checkpoint later, which changes neither size nor latency.
        self._original = cpu_copy(pl_module)
        self._original_note = "a CPU copy of the model taken in setup, before any compression"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The compression metrics over steps, for the pictures; only at the steps loggers record (cheap).
        if not self.plots or not trainer.is_global_zero or not loggers_write_now(trainer):
            return
        row = {"step": float(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("compress/") and isinstance(value, torch.Tensor) and value.numel() == 1:
                row[key] = float(value)
        if len(row) > 1:
            self.history.append(row)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before any callback's on_fit_end: the model as trained, before fit-end transforms.
        self._module_changes = False
        if not (self.evaluate and trainer.is_global_zero) or is_sharded(pl_module):
            return
        quantized, self._module_changes = _fit_end_transforms(trainer, pl_module)
        if quantized or self._module_changes:
            self._before = run_validation(trainer, pl_module)

    # ---------------------------------------------------------------- at report time
    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        callbacks: list[CompressionCallback],
        directory: str,
    ) -> tuple[list[tuple[str, str]], dict[str, Any] | None]:
        """Write the compact artifact, time and evaluate the models; return ``(artifacts, baseline)``.

        Called by the report builder on rank zero after every callback has finalized.
        """
        self._results = {}
        if is_sharded(pl_module):
            self._results["not_measured"] = f"latency, quality and the compact artifact: {_SHARDED}"
            exports = [
                (f"{type(cb).__name__} export ({kind})", str(path))
                for cb in callbacks
                for kind, path in getattr(cb, "exported", {}).items()
            ]
            return exports, None
        quantized = any(cb.layer_bits() for cb in callbacks)
        deployable, deployable_name = pl_module, "the model as trained"
        if quantized:
            from lightning_compress import convert_to_int8  # public API; its module may move

            deployable, deployable_name = convert_to_int8(pl_module).cpu().eval(), "int8 model (convert_to_int8)"
        artifacts: list[tuple[str, str]] = []
        for cb in callbacks:
            for kind, path in getattr(cb, "exported", {}).items():
                artifacts.append((f"{type(cb).__name__} export ({kind})", str(path)))
        if self.save_compressed:
            path = os.path.join(directory, COMPRESSED_BASENAME)
            try:
                os.makedirs(directory, exist_ok=True)
                rank_zero_info(f"CompressionReporter: writing {path} ...")
                save_compressed(deployable, path, codec=self.codec)  # type: ignore[arg-type]
            except Exception as err:  # a report must not fail a finished training run
                self._results["compressed_artifact"] = f"not written: {type(err).__name__}: {err}"
            else:
                self.artifacts["compressed"] = path
                artifacts.append((f"save_compressed of the {deployable_name}", path))
                self._results["compressed_artifact"] = path
        baseline = None
        if self._original is not None:
            state = self._original.state_dict()
            baseline = size_row(
                "fp32 state_dict of the original model (torch.save)",
                file_bytes(lambda p: torch.save(state, p)),
                "measured",
                note="written to a temporary file; the original is the copy taken in setup",
            )
        sample = example_input(pl_module, callbacks)
        if self.evaluate:
            self._results["quality"] = self._quality(trainer, pl_module, deployable if quantized else None)
        if self.latency:
            self._results["latency"] = self._latency(pl_module, deployable if quantized else None, sample, artifacts)
        self._results["realized_by"] = _techniques(callbacks, self._results.get("latency"))
        return artifacts, baseline

    def _quality(self, trainer: pl.Trainer, pl_module: pl.LightningModule, int8: nn.Module | None) -> dict[str, Any]:
        if not _has_val(trainer):
            return {"note": "not measured: the trainer has no validation dataloader (or limit_val_batches=0)"}
        if self._before is None:
            return {
                "note": "no transform at fit end: the last validation epoch's metrics (training metrics) apply",
            }
        rows: list[dict[str, Any]] = []
        before = self._before
        if isinstance(before, str):
            return {"note": before}
        rows.append({"model": "as trained (before fit-end transforms)", **before})
        if self._module_changes:
            after = run_validation(trainer, pl_module)
            if isinstance(after, dict):
                rows.append({"model": "after fit-end transforms (the LightningModule)", **after})
        if int8 is not None:
            int8_metrics = run_validation(trainer, pl_module, replacement=int8)
            if isinstance(int8_metrics, dict):
                rows.append({"model": "int8 (convert_to_int8)", **int8_metrics})
        out: dict[str, Any] = {
            "how": "validation_step over trainer.val_dataloaders, eval mode, torch.no_grad, logged values "
            "averaged weighted by batch size (rank zero's share under DDP)",
            "rows": rows,
        }
        key = self.monitor or _default_monitor(before)
        if key is not None and key in before:
            worse_is_higher = any(w in key for w in ("loss", "err"))
            drops = [
                (row["model"], (row[key] - before[key]) if worse_is_higher else (before[key] - row[key]))
                for row in rows[1:]
                if key in row
            ]
            out["monitor"] = key
            out["largest_drop"] = max((d for _, d in drops), default=0.0)
            if self.tolerance is not None:
                bad = [f"{model}: {d:+.4g}" for model, d in drops if d > self.tolerance]
                out["tolerance"] = self.tolerance
                if bad:
                    message = f"{key} got worse by more than tolerance={self.tolerance} at fit end: " + "; ".join(bad)
                    out["warning"] = message
                    rank_zero_warn(f"CompressionReporter: {message}")
        return out

    def _latency(
        self, pl_module: pl.LightningModule, int8: nn.Module | None, sample: Any, artifacts: list[tuple[str, str]]
    ) -> dict[str, Any]:
        sample, why_not = _latency_input(sample)
        if why_not is not None:
            return {"note": why_not}
        threads = self.latency_threads or torch.get_num_threads()
        batch = self.latency_batch
        rank_zero_info(f"CompressionReporter: measuring latency (batch {batch}, {threads} threads) ...")
        started = time.perf_counter()
        runners: dict[str, tuple[str, Any]] = {}
        failed: list[dict[str, Any]] = []

        def add(model: str, runtime: str, build: Any) -> None:
            try:
                runners[model] = (runtime, build())
            except Exception as err:  # one model failing must not lose the others' numbers
                failed.append({"model": model, "runtime": runtime, "median_ms": f"failed: {type(err).__name__}: {err}"})

        if self._original is not None:
            add("original (fp32)", "pytorch", lambda: L.torch_runner(self._original, sample, batch))
        else:
            failed.append({"model": "original (fp32)", "runtime": "pytorch", "median_ms": self._original_note})
        final = cpu_copy(pl_module)  # the trained module stays where it is (device, mode)
        add("final (the LightningModule as trained)", "pytorch", lambda: L.torch_runner(final, sample, batch))
        if int8 is not None:
            add("int8 (convert_to_int8; dequantizes per call)", "pytorch", lambda: L.torch_runner(int8, sample, batch))
        onnx_files = [(what, path) for what, path in artifacts if path.endswith(".onnx") and os.path.isfile(path)]
        with tempfile.TemporaryDirectory() as tmp:
            if onnx_files or self._original is not None:
                try:
                    import onnxruntime  # noqa: F401
                except ImportError:
                    failed.append({"model": "ONNX files", "runtime": "onnxruntime", "median_ms": "not installed"})
                    onnx_files = []
                else:
                    if self._original is not None:
                        path = os.path.join(tmp, "original_fp32.onnx")

                        def exported() -> Any:
                            _export_fp32(self._original, sample, path)
                            return L.onnx_runner(path, sample, batch, threads)

                        add("original (fp32) exported to ONNX (not kept)", "onnxruntime", exported)
            for what, path in onnx_files:
                add(f"{what}: {path}", "onnxruntime", lambda p=path: L.onnx_runner(p, sample, batch, threads))
            timed = L.compare_ms(
                {k: fn for k, (_, fn) in runners.items()}, threads=threads, repeats=self.latency_repeats
            )
        rows = _latency_rows({k: runtime for k, (runtime, _) in runners.items()}, timed)
        return {
            "batch": batch,
            "threads": threads,
            "repeats": self.latency_repeats,
            "how": "median of interleaved timed calls (5 rounds over all models, rotating who goes first), "
            "after 3 warm-up calls each",
            "original": self._original_note,
            "seconds": round(time.perf_counter() - started, 2),
            "rows": rows + failed,
        }

    @override
    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "compressed_artifact" in self._results:
            out["compressed_artifact"] = self._results["compressed_artifact"]
        out["original_model"] = self._original_note or "not kept"
        if "not_measured" in self._results:
            out["not_measured"] = self._results["not_measured"]
        return out

    def extra_sections(self) -> dict[str, dict[str, Any]]:
        """The report sections this callback measured: latency, quality, what each technique realizes."""
        out: dict[str, dict[str, Any]] = {}
        if "quality" in self._results:
            out["quality before and after fit-end transforms"] = self._results["quality"]
        if "latency" in self._results:
            out["latency (measured)"] = self._results["latency"]
        if self._results.get("realized_by"):
            out["what each technique realizes"] = {"rows": self._results["realized_by"]}
        return out

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._original = None  # the copy is only needed until the report is written
        super().teardown(trainer, pl_module, stage)


# ------------------------------------------------------------------------------------------ helpers
def _latency_input(sample: Any) -> tuple[Any, str | None]:
    """The example input on CPU, or why latency cannot be measured with it."""
    if sample is None:
        return None, "not measured: no example input known (set example_input_array on the LightningModule)"
    if isinstance(sample, CapturedCall):
        sample = sample.kwargs if not sample.args else sample.args if not sample.kwargs else None
        if sample is None:
            return None, "not measured: the model takes positional and keyword inputs together"
    return _to_cpu(sample), None


def _latency_rows(runtimes: Mapping[str, str], timed: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per timed model with its speed-up over the original model in PyTorch (``-`` without it)."""
    rows = [{"model": k, "runtime": runtime, "median_ms": round(timed[k], 4)} for k, runtime in runtimes.items()]
    base = next((r["median_ms"] for r in rows if r["model"] == "original (fp32)"), None)
    for r in rows:
        r["speedup_vs_original_pytorch"] = round(base / r["median_ms"], 3) if base else "-"
    return rows


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every tensor on CPU and no hooks (they belong to the running fit)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        data = t.detach().to("cpu", copy=True)
        memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    for module in model.modules():
        for key, value in vars(module).items():
            if "hook" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


def _to_cpu(sample: Any) -> Any:
    if isinstance(sample, torch.Tensor):
        return sample.detach().cpu()
    if isinstance(sample, Mapping):
        return {k: _to_cpu(v) for k, v in sample.items()}
    if isinstance(sample, list | tuple):
        return type(sample)(_to_cpu(v) for v in sample)
    return sample


def _export_fp32(model: nn.Module, sample: Any, path: str) -> None:
    args = (
        tuple(sample.values())
        if isinstance(sample, Mapping)
        else tuple(sample)
        if isinstance(sample, list | tuple)
        else (sample,)
    )
    if isinstance(sample, Mapping):
        raise ValueError("keyword inputs: the fp32 ONNX export of the original is not attempted")
    names = [f"input_{i}" for i in range(len(args))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            args,
            path,
            dynamo=False,
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
        )


def _has_val(trainer: pl.Trainer) -> bool:
    loaders = trainer.val_dataloaders
    if loaders is None:
        return False
    limits = trainer.num_val_batches
    return bool(limits) and any(n != 0 for n in limits)


def _fit_end_transforms(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[bool, bool]:
    """``(int8 conversion follows, the module itself changes at fit end)``.

    Read through the callbacks' public methods only: quantized layers show in ``layer_bits()``; a
    transform still to apply shows as ``applied: False`` in ``report_section`` (decomposition at fit end).
    """
    quantized = changes = False
    for cb in trainer.callbacks:
        if not isinstance(cb, CompressionCallback) or isinstance(cb, CompressionReporter):
            continue
        quantized = quantized or bool(cb.layer_bits())
        with contextlib.suppress(Exception):
            changes = changes or cb.report_section(trainer, pl_module).get("applied") is False
    return quantized, changes


def _default_monitor(metrics: Mapping[str, float]) -> str | None:
    keys = list(metrics)
    return next((k for k in keys if "acc" in k), keys[0] if keys else None)


def run_validation(
    trainer: pl.Trainer, pl_module: pl.LightningModule, replacement: nn.Module | None = None
) -> dict[str, float] | str:
    """``pl_module.validation_step`` over the batches Lightning would validate on, outside its loop.

    The same dataloaders, ``num_val_batches`` limits and ``batch_to_device`` as ``trainer``'s validation
    (see :mod:`lightning_compress.evaluation` for why not Lightning's own loop).

    Returns:
        ``{metric: value}``, or a sentence saying why nothing was measured.
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        return "not measured: no validation dataloader"
    loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    device = pl_module.device
    try:
        return validation_metrics(
            pl_module,
            loaders,
            limits=list(trainer.num_val_batches) or None,
            to_device=lambda batch: trainer.strategy.batch_to_device(batch, device),
            replacement=replacement,
        )
    except Exception as err:  # a report must not fail a finished training run
        return f"not measured: validation_step failed ({type(err).__name__}: {err})"


def _techniques(callbacks: list[CompressionCallback], latency: dict[str, Any] | None) -> list[dict[str, str]]:
    """One line per technique present: which saving it makes and which runtime realizes it."""
    rows = []
    for cb in callbacks:
        kind = type(cb).__name__
        if kind == "GradualPruning":
            structure = str(getattr(cb, "structure", "unstructured"))
            if structure == "heads":
                saving = "whole attention heads are zero: fewer FLOPs once the heads are removed (shrink=True)"
                realized = "speed and size: only after removing the heads (shrink=True); zeros alone run dense"
            elif structure == "channels":
                saving = (
                    "whole output channels are zero: fewer FLOPs once the channels are removed; in the "
                    "model as it is (zeros kept) dense kernels still run them"
                )
                realized = "storage: save_compressed / save_sparse; speed: only after removing the channels"
            else:
                saving = f"{structure} sparsity: zeros in dense tensors"
                realized = (
                    "storage only (save_compressed / save_sparse files shrink); PyTorch and onnxruntime run "
                    "dense kernels over the zeros, so no speed-up unless a sparse kernel is used"
                    + (" (2:4 on sparse tensor cores)" if ":" in structure else "")
                )
        elif kind == "QuantizationAwareTraining":
            saving = "int8 weights (and activations): 4x smaller weights, int8 arithmetic"
            realized = (
                "storage: model_int8.pt / ONNX / save_compressed; speed: onnxruntime's int8 kernels "
                "(ONNX export). PyTorch eager (convert_to_int8) dequantizes per call: smaller, not faster"
            )
        elif kind == "TensorDecomposition":
            saving = "low-rank factor chains: fewer parameters and FLOPs"
            realized = "smaller and faster on every runtime (plain dense layers), where the layers are large enough"
        elif kind == "KnowledgeDistillation":
            saving = "none by itself: it trains the student you built"
            realized = "the student's own size and speed, on every runtime"
        else:
            continue
        rows.append(
            {"technique": kind + (f" ({cb.name})" if cb.name else ""), "saving": saving, "realized by": realized}
        )
    if latency and latency.get("rows"):
        rows.append(
            {
                "technique": "measured",
                "saving": f"see 'latency (measured)': batch {latency['batch']}, {latency['threads']} threads",
                "realized by": "; ".join(
                    f"{r['model']} [{r['runtime']}]: {r['median_ms']} ms"
                    for r in latency["rows"]
                    if isinstance(r.get("median_ms"), float)
                ),
            }
        )
    return rows
