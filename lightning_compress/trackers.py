"""Send the compression configuration, report files and pictures to every Lightning logger that takes them.

Duck-typed on what each tracker offers, so no tracker package is imported here:

- TensorBoard: configuration as hyperparameters (``hparams``, against the final ratio), pictures as
  ``add_figure`` images under ``compress/<name>``, the Markdown report as text (``add_text``);
  TensorBoard has no artifact store.
- MLflow: configuration as run parameters; JSON, Markdown and PNG files as run artifacts under
  ``compression/`` (``log_artifact``).
- W&B: configuration in the run config, pictures with ``log_image``, files with ``experiment.save``
  (not exercised by the tests: wandb is not a test dependency).
- Others (CSV, ...): ``log_hyperparams`` only; the files are next to the logs.

A tracker that fails is reported with a warning and never fails the finished run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["callback_config", "log_config", "log_report_files"]

_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.__name__ if isinstance(value, type) else repr(value)


def callback_config(callback: Any) -> dict[str, Any]:
    """The constructor arguments of ``callback`` as stored on it (plain data; other objects as their ``repr``).

    Example::

        >>> from lightning_compress import GradualPruning
        >>> config = callback_config(GradualPruning(0.8, exclude=["classifier"]))
        >>> config["target_sparsity"], config["exclude"]
        (0.8, ['classifier'])
    """
    out: dict[str, Any] = {}
    for name, param in inspect.signature(type(callback).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(callback, name):
            value = getattr(callback, name)
            if callable(value) and not isinstance(value, type):
                continue
            out[name] = _plain(value)
    return out


def log_config(loggers: Iterable[Any], callbacks: Sequence[Any], metrics: Mapping[str, float] | None = None) -> None:
    """Record every compression callback's configuration as hyperparameters ``compress/<Class>[/<name>]/<arg>``.

    TensorBoard shows hyperparameters against metrics: ``metrics`` (the report's final numbers) are
    given to it instead of its placeholder ``hp_metric = -1``.
    """
    params: dict[str, Any] = {}
    for cb in callbacks:
        prefix = f"compress/{type(cb).__name__}" + (f"/{cb.name}" if getattr(cb, "name", None) else "")
        for key, value in callback_config(cb).items():
            params[f"{prefix}/{key}"] = value if isinstance(value, _PLAIN) else str(value)
    if not params:
        return
    for logger in loggers:
        try:
            if type(logger).__name__.startswith("TensorBoard") and metrics:
                logger.log_hyperparams(params, metrics=dict(metrics))
            else:
                logger.log_hyperparams(params)
        except Exception as err:  # a tracker must not fail a finished run
            rank_zero_warn(
                f"{type(logger).__name__}: compression configuration not logged ({type(err).__name__}: {err})."
            )


def log_report_files(loggers: Iterable[Any], files: Sequence[str], figures: Mapping[str, Any], step: int = 0) -> None:
    """Attach the report files and pictures to each logger that supports them (see the module table)."""
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind.startswith("TensorBoard") or hasattr(getattr(logger, "experiment", None), "add_figure"):
                writer = logger.experiment
                for name, fig in figures.items():
                    writer.add_figure(f"compress/{name}", fig, global_step=step, close=False)
                for path in files:
                    if path.endswith(".md"):
                        with open(path, encoding="utf-8") as fh:
                            writer.add_text("compress/report", fh.read(), global_step=step)
            elif kind.startswith("MLFlow"):
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, path, artifact_path="compression")
            elif kind.startswith("Wandb"):
                for name, path in ((os.path.basename(p), p) for p in files if p.endswith(".png")):
                    logger.log_image(key=f"compress/{name.removesuffix('.png')}", images=[path], step=step)
                for path in files:
                    logger.experiment.save(path, base_path=os.path.dirname(path), policy="now")
        except Exception as err:  # a tracker must not fail a finished run
            rank_zero_warn(f"{kind}: compression report not attached ({type(err).__name__}: {err}).")
