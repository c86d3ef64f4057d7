"""What every compression callback shares: naming, metric logging and the combined report.

Subclasses decide *when* and *how much*; this base owns *where results go*:

- ``log_metrics`` goes through ``pl_module.log`` (from hooks Lightning allows it in), namespaced
  ``compress/...`` so the values land in every configured logger and can be monitored by
  ``ModelCheckpoint`` / ``EarlyStopping``.
- At fit end the last compression callback on the trainer builds one :class:`CompressionReport`
  over the model and every callback's section, shows it on rank zero, writes it into
  ``trainer.log_dir``, and sends its summary to ``trainer.loggers`` directly (``pl_module.log`` is
  refused in ``on_fit_end``).
"""

from __future__ import annotations

import re
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_compress._lightning_internals import loggers_write_now
from lightning_compress.capture import FirstCallSample
from lightning_compress.inputs import to_device
from lightning_compress.report import CompressionReport

PROGRESS_BAR_KEYS = frozenset({"sparsity", "weight_bits", "alpha"})
"""Metric keys shown in Lightning's progress bar (TQDM and Rich): the current compression state."""


class CompressionCallback(Callback):
    """Base class of the lightning_compress callbacks.

    Args:
        name: distinguishes several instances of one callback on a trainer (e.g. two pruning groups):
            it becomes part of the checkpoint state key and of the metric names
            (``compress/<name>/sparsity``). ``None`` logs plain ``compress/sparsity``. Lightning refuses
            two callbacks with one state key when the Trainer is built.
    """

    report_title: str = "compression"

    def __init__(self, name: str | None = None) -> None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ValueError(f"name must be letters, digits, '_', '.' or '-', got {name!r}.")
        self.name = name
        self._first_call = FirstCallSample()  # FLOPs are counted on what the model really sees
        self.last_report: CompressionReport | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def metric(self, key: str) -> str:
        """Full metric name for ``key``: ``compress/<key>`` or ``compress/<name>/<key>``."""
        return f"compress/{key}" if self.name is None else f"compress/{self.name}/{key}"

    def log_metrics(
        self, pl_module: pl.LightningModule, metrics: dict[str, float], *, changed: bool = True, **kwargs: Any
    ) -> None:
        """Log ``metrics`` through Lightning from a hook that allows ``pl_module.log``.

        ``pl_module.log`` has a per-key cost that matters next to a small model's step. With
        ``changed=False`` (the values are the ones logged last time) the call is skipped unless Lightning
        writes to its loggers at this step: ``trainer.callback_metrics`` keeps the last logged value for
        ``ModelCheckpoint`` / ``EarlyStopping``, and loggers see every value they would have recorded anyway.
        """
        if not changed and not loggers_write_now(pl_module.trainer):
            return
        for key, value in metrics.items():
            # The compression state in the progress bar: the value is logged anyway, showing it is free.
            prog_bar = kwargs.get("prog_bar", key in PROGRESS_BAR_KEYS)
            extra = {k: v for k, v in kwargs.items() if k != "prog_bar"}
            pl_module.log(
                self.metric(key), value, on_step=True, on_epoch=False, batch_size=1, prog_bar=prog_bar, **extra
            )

    # ---- what subclasses contribute to the combined report -------------------------------------
    def layer_bits(self) -> dict[str, float]:
        """Bit width per module name, for callbacks that change it (quantization)."""
        return {}

    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The part of the report this callback contributes (plain JSON-able values; lists of dicts become tables)."""
        return {}

    # ---- example input for FLOPs -----------------------------------------------------------------
    @property
    def _example_input(self) -> Any:
        """One sample of the first real forward call of the fit (``None`` until one was seen)."""
        return self._first_call.call

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "example_input_array", None) is None:
            self._first_call.attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove everything this callback attached to the user's module (subclasses extend it)."""
        self._first_call.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` after an exception (also one raised in `setup`): give the
        # user's module back here, whatever failed.
        self.teardown(trainer, pl_module, trainer.state.fn or "fit")

    # ---- fit end: the combined report ------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_call.detach()
        ours = [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]
        if ours[-1] is not self:
            return  # the last one writes, after every callback has finalized in its own on_fit_end
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
        directory = trainer.log_dir or trainer.default_root_dir
        self.last_report = build_report(trainer, pl_module, ours, directory=directory)
        if trainer.is_global_zero:
            _publish(trainer, self.last_report, directory, ours)


def example_input(pl_module: pl.LightningModule, callbacks: list[CompressionCallback]) -> Any:
    """The input to count FLOPs on: ``pl_module.example_input_array`` or the first captured forward call.

    Follows Lightning's convention: a tensor, a tuple of positional arguments, or a dict of keyword
    arguments (a captured call is a :class:`~lightning_compress.inputs.CapturedCall`).
    """
    if getattr(pl_module, "example_input_array", None) is not None:
        return pl_module.example_input_array
    for cb in callbacks:
        if cb._example_input is not None:
            return to_device(cb._example_input, pl_module.device)
    return None


def build_report(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    callbacks: list[CompressionCallback],
    directory: str | None = None,
) -> CompressionReport:
    """One report over ``pl_module`` with every callback's section and bit widths.

    Files the callbacks wrote (``exported`` paths) are measured on disk. With a
    :class:`~lightning_compress.CompressionReporter` among ``callbacks``, it first writes the compact
    artifact into ``directory`` and measures latency and quality (rank zero only).
    """
    from lightning_compress.callbacks.report import CompressionReporter

    bits: dict[str, float] = {}
    for cb in callbacks:
        bits.update(cb.layer_bits())
    training = {
        k: float(v)
        for k, v in sorted(trainer.callback_metrics.items())
        if not k.startswith("compress/") and v.numel() == 1
    }
    artifacts: list[tuple[str, str]] = [
        (f"{type(cb).__name__} export ({kind})", str(path))
        for cb in callbacks
        for kind, path in getattr(cb, "exported", {}).items()
    ]
    baseline = None
    extra: dict[str, dict[str, Any]] = {}
    reporters = [cb for cb in callbacks if isinstance(cb, CompressionReporter)]
    if reporters and trainer.is_global_zero:
        artifacts, baseline = reporters[0].measure(trainer, pl_module, callbacks, directory or trainer.default_root_dir)
        extra = reporters[0].extra_sections()
    sections: dict[str, dict[str, Any]] = {"training metrics": training} if training else {}
    for cb in callbacks:
        title = cb.report_title if cb.name is None else f"{cb.report_title} ({cb.name})"
        sections[title] = _label_sizes(cb.report_section(trainer, pl_module))
    sections.update(extra)
    return CompressionReport.from_model(
        pl_module,
        bits=bits,
        example_input=example_input(pl_module, callbacks),
        sections=sections,
        artifacts=artifacts,
        baseline=baseline,
    )


def _label_sizes(section: dict[str, Any]) -> dict[str, Any]:
    # A callback's `size_bytes` (and the `ratio` next to it) are computed from counts and bit widths:
    # say so in the key, so no size in the report passes for a measurement.
    if "size_bytes" not in section:
        return section
    renamed = {"size_bytes": "size_bytes_estimated", "ratio": "ratio_estimated"}
    return {renamed.get(k, k): v for k, v in section.items()}


def _publish(
    trainer: pl.Trainer, report: CompressionReport, directory: str, callbacks: list[CompressionCallback] = ()
) -> None:
    from lightning_compress.callbacks.report import CompressionReporter
    from lightning_compress.trackers import log_config, log_report_files

    json_path, md_path = report.write(directory)
    files = [json_path, md_path]
    reporters = [cb for cb in callbacks if isinstance(cb, CompressionReporter)]
    figures: dict[str, Any] = {}
    if reporters and reporters[0].plots:
        from lightning_compress import plots

        try:
            figures = plots.report_figures(report.as_dict(), reporters[0].history)
        except ImportError:
            rank_zero_info(
                "CompressionReporter: no pictures, matplotlib is missing: pip install 'lightning-compress[plots]'"
            )
        else:
            files += plots.save_figures(figures, directory)
    rank_zero_info(report.to_markdown() + f"\nCompression report written to {json_path} and {md_path}")
    numeric = {
        f"compress/final/{k}": float(v)
        for k, v in report.summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for logger in trainer.loggers:
        logger.log_metrics(numeric, step=trainer.global_step)
    log_config(trainer.loggers, callbacks, {k: v for k, v in numeric.items() if k.endswith("/ratio")})
    log_report_files(trainer.loggers, files, figures, step=trainer.global_step)
    for logger in trainer.loggers:
        logger.save()
    for fig in figures.values():
        fig.clear()
