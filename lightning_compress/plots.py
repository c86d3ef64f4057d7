"""Pictures of a compression report (matplotlib, the ``[plots]`` extra): pure functions of plain data.

No picture code lives in the callbacks: the report builder hands this module the report's dict and
the metric history, and gets ``matplotlib.figure.Figure`` objects back. Figures are built with the
object-oriented API (``Figure()``, no ``pyplot``), so drawing never changes the user's matplotlib
backend or opens windows.

Example::

    >>> report = {"layers": [{"name": "fc", "sparsity": 0.8, "bits": 8.0}], "sizes": [], "sections": {}}
    >>> sorted(report_figures(report))
    ['layers']
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["history_figure", "layers_figure", "report_figures", "save_figures", "tradeoff_figure"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def layers_figure(layers: Sequence[Mapping[str, Any]]) -> Any:
    """Bars per layer: sparsity (fraction of zero weights) and bit width."""
    names = [str(row["name"]) or "(root)" for row in layers]
    fig = _figure(max(6.0, 0.45 * len(names) + 2), 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(range(len(names)), [row["sparsity"] for row in layers], color="tab:blue")
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    top.set_title("per-layer sparsity (measured zeros) and bit width")
    bottom.bar(range(len(names)), [row["bits"] for row in layers], color="tab:orange")
    bottom.set_ylabel("bits")
    bottom.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    return fig


def history_figure(history: Sequence[Mapping[str, float]]) -> Any:
    """The ``compress/*`` metrics over optimizer steps; sparsity and its target share one panel."""
    keys = sorted({k for row in history for k in row if k != "step"})
    panels: list[list[str]] = []
    for key in keys:
        partner = next((p for p in panels if p[0].replace("target_", "") == key.replace("target_", "")), None)
        if partner is not None:
            partner.append(key)
        else:
            panels.append([key])
    fig = _figure(7.0, 2.2 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, group in zip(axes, panels, strict=True):
        for key in group:
            points = [(row["step"], row[key]) for row in history if key in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key.removeprefix("compress/"))
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("compression metrics over training")
    return fig


def tradeoff_figure(points: Sequence[Mapping[str, Any]], metric: str) -> Any:
    """Measured size on disk (log scale) against a validation metric, one labelled point per artifact."""
    fig = _figure(7.0, 4.5)
    ax = fig.subplots()
    for p in points:
        ax.scatter(p["bytes"], p["value"], s=40)
        ax.annotate(str(p["label"]), (p["bytes"], p["value"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (measured)")
    ax.set_ylabel(metric)
    ax.set_title("size / quality trade-off")
    return fig


def _tradeoff_points(report: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    quality = report.get("sections", {}).get("quality before and after fit-end transforms", {})
    rows, metric = quality.get("rows") or [], quality.get("monitor")
    if not rows or not metric:
        return [], None
    by_model = {row["model"]: row.get(metric) for row in rows}
    sizes = {row["artifact"]: row for row in report.get("sizes", []) if row["kind"] == "measured"}
    points = []
    trained = by_model.get("as trained (before fit-end transforms)")
    after = by_model.get("after fit-end transforms (the LightningModule)")
    int8 = by_model.get("int8 (convert_to_int8)")
    for artifact, row in sizes.items():
        if "[baseline]" in artifact or artifact.endswith("(onnx)"):
            continue  # the original's quality after training is unknown; ONNX outputs were not evaluated
        value = (
            int8
            if ("int8" in artifact or "QuantizationAwareTraining" in artifact)
            else (after if after is not None else trained)
        )
        if isinstance(value, int | float):
            points.append({"bytes": row["bytes"], "value": value, "label": artifact[:48]})
    return points, metric


def report_figures(report: Mapping[str, Any], history: Sequence[Mapping[str, float]] = ()) -> dict[str, Any]:
    """Every picture the report's data supports, by name: ``layers``, ``history``, ``tradeoff``."""
    figures: dict[str, Any] = {}
    if report.get("layers"):
        figures["layers"] = layers_figure(report["layers"])
    if history:
        figures["history"] = history_figure(history)
    points, metric = _tradeoff_points(report)
    if points and metric:
        figures["tradeoff"] = tradeoff_figure(points, metric)
    return figures


def save_figures(
    figures: Mapping[str, Any], directory: str | os.PathLike[str], prefix: str = "compression_"
) -> list[str]:
    """Save each figure as ``<prefix><name>.png`` in ``directory`` (temporary name + rename); return the paths."""
    paths = []
    for name, fig in figures.items():
        path = os.path.join(directory, f"{prefix}{name}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        paths.append(path)
    return paths
