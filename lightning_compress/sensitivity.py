"""Per-layer sensitivity: how the validation metric moves when one layer alone is pruned or quantized.

The classic recipe (Han et al. 2015, Distiller's sensitivity analysis): for each selected layer, prune
it alone to a range of sparsities (magnitude, the same masks :class:`GradualPruning` computes) and/or
fake-quantize its weight alone to a range of bit widths (per output channel, as
:class:`QuantizationAwareTraining` does), evaluate the user's own ``validation_step`` on the validation
data, and restore the layer. The result turns into per-layer ``overrides`` for the two callbacks that
keep each layer's measured drop within an accuracy budget.

Layers are measured one at a time, so drops do not simply add up when every layer is compressed at once;
the budget is per layer. Cost: one validation pass per layer and level, on the original model (no
training) — ``max_batches`` subsamples the validation data to keep it to minutes on a CPU.

Example::

    >>> import torch, pytorch_lightning as pl
    >>> from torch import nn
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.fc(x)
    ...     def validation_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         self.log("val_loss", nn.functional.cross_entropy(self(x), y))
    >>> _ = torch.manual_seed(0)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    >>> result = sensitivity(Net(), [data], sparsities=(0.5,), bits=(4,))
    >>> [(row.layer, row.kind, row.level) for row in result.rows]
    [('fc', 'sparsity', 0.5), ('fc', 'bits', 4)]
    >>> result.metric, result.mode
    ('val_loss', 'min')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from lightning_compress._validation import check_choice, check_int, check_range
from lightning_compress.evaluation import validation_metrics
from lightning_compress.functional import pruning as P
from lightning_compress.functional.fake_quant import fake_quantize_weight, weight_scale
from lightning_compress.functional.qat import QUANTIZABLE_TYPES
from lightning_compress.targets import DEFAULT_PRUNABLE_TYPES, ParameterTarget, select_parameters


@dataclass(frozen=True)
class SensitivityRow:
    """One measurement: ``layer`` compressed alone to ``level`` (a sparsity or a bit width)."""

    layer: str
    kind: Literal["sparsity", "bits"]
    level: float
    value: float


@dataclass(frozen=True)
class SensitivityResult:
    """The sweep's measurements and what they mean for the callbacks' per-layer ``overrides``."""

    metric: str
    mode: Literal["max", "min"]
    baseline: float
    rows: tuple[SensitivityRow, ...]

    def drop(self, row: SensitivityRow) -> float:
        """How much worse than the baseline ``row`` is (positive = worse), in the metric's units."""
        return self.baseline - row.value if self.mode == "max" else row.value - self.baseline

    def pruning_overrides(self, budget: float) -> dict[str, float]:
        """``{layer: the highest sparsity measured whose drop is within budget}`` (0.0 when none is)."""
        return {
            layer: max((r.level for r in rows if self.drop(r) <= budget), default=0.0)
            for layer, rows in self._by_layer("sparsity").items()
        }

    def bits_overrides(self, budget: float) -> dict[str, int]:
        """``{layer: the lowest bit width measured whose drop is within budget}`` (8 when none is)."""
        return {
            layer: int(min((r.level for r in rows if self.drop(r) <= budget), default=8))
            for layer, rows in self._by_layer("bits").items()
        }

    def _by_layer(self, kind: str) -> dict[str, list[SensitivityRow]]:
        out: dict[str, list[SensitivityRow]] = {}
        for row in self.rows:
            if row.kind == kind:
                out.setdefault(row.layer, []).append(row)
        return out

    def to_markdown(self) -> str:
        """A table: one row per layer, one column per level, each cell the metric (drop)."""
        lines = [f"Sensitivity of `{self.metric}` ({self.mode} is better; baseline {self.baseline:.4g})", ""]
        for kind in ("sparsity", "bits"):
            by_layer = self._by_layer(kind)
            if not by_layer:
                continue
            levels = sorted({r.level for rows in by_layer.values() for r in rows})
            lines += ["| layer | " + " | ".join(f"{kind} {lv:g}" for lv in levels) + " |"]
            lines += ["| --- |" + " --- |" * len(levels)]
            for layer, rows in by_layer.items():
                cell = {r.level: f"{r.value:.4g} ({self.drop(r):+.3g})" for r in rows}
                lines += [f"| {layer} | " + " | ".join(cell.get(lv, "") for lv in levels) + " |"]
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> str:
        """A PNG of the metric against the level, one line per layer (needs the ``plots`` extra)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = [k for k in ("sparsity", "bits") if self._by_layer(k)]
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for layer, rows in self._by_layer(kind).items():
                rows = sorted(rows, key=lambda r: r.level)
                ax.plot([r.level for r in rows], [r.value for r in rows], marker="o", label=layer)
            ax.axhline(self.baseline, color="gray", linestyle="--", label="baseline")
            ax.set_xlabel(kind)
            ax.set_ylabel(self.metric)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)


def sensitivity(
    pl_module: pl.LightningModule,
    dataloaders: Sequence[Iterable[Any]],
    *,
    metric: str | None = None,
    mode: Literal["max", "min"] | None = None,
    sparsities: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    bits: Sequence[int] = (),
    structure: str = "unstructured",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> SensitivityResult:
    """Measure each selected layer pruned (``sparsities``) and quantized (``bits``) alone.

    Args:
        pl_module: the model; its ``validation_step`` must log ``metric``. It is left exactly as it was.
        dataloaders: the validation data, one iterable of batches per dataloader (e.g.
            ``[datamodule.val_dataloader()]``), on the model's device.
        metric: the logged metric to compare; default: the first logged name containing ``acc`` (higher
            is better), else the first containing ``loss`` (lower is better).
        mode: ``"max"`` or ``"min"``: which direction is better (default from the metric's name).
        sparsities: levels in ``[0, 1)`` for magnitude pruning, in ``structure``.
        bits: weight bit widths in 2..8 (per-output-channel symmetric fake-quantization).
        structure: as :class:`~lightning_compress.GradualPruning`'s (``"unstructured"``, ``"channels"``, ...).
        include: name patterns of the layers to measure (all prunable / quantizable layers when empty).
        exclude: name patterns of layers to leave out.
        max_batches: validation batches per dataloader per measurement (default: all).

    Returns:
        A :class:`SensitivityResult`.

    Raises:
        ValueError: before any measurement, naming the bad argument or the logged metrics that exist.
    """
    levels = [check_range(f"sparsities[{i}]", s, 0.0, 1.0, high_open=True) for i, s in enumerate(sparsities)]
    widths = [check_choice(f"bits[{i}]", b, range(2, 9)) for i, b in enumerate(bits)]
    if not levels and not widths:
        raise ValueError("give at least one level: sparsities=(...) and/or bits=(...); got neither.")
    if max_batches is not None:
        check_int("max_batches", max_batches, minimum=1)
    parsed = P.parse_structure(structure)
    if parsed.kind == "heads":
        raise ValueError(
            "structure='heads' removes q/k/v rows and output columns of an attention together, which a per-layer "
            "sweep cannot do. Accepted: 'unstructured', 'channels', N:M, blocks. HINT: sweep target_sparsity of "
            "GradualPruning(structure='heads') instead."
        )
    limits = None if max_batches is None else [max_batches] * len(dataloaders)

    def evaluate() -> dict[str, float]:
        return validation_metrics(pl_module, dataloaders, limits=limits)

    logged = evaluate()
    metric, mode = _resolve_metric(logged, metric, mode)
    targets: list[ParameterTarget] = []
    if levels:
        targets += select_parameters(pl_module, include=include, exclude=exclude, types=DEFAULT_PRUNABLE_TYPES)
        for t in targets:
            P.check_fits(parsed, t.name, t.out_first(t.parameter).shape)
    quantized = (
        select_parameters(pl_module, include=include, exclude=exclude, types=QUANTIZABLE_TYPES) if widths else []
    )
    rows: list[SensitivityRow] = []
    with torch.no_grad():
        for t in targets:
            for level in levels:
                mask = P.layer_masks({t.name: t.out_first(t.parameter.abs())}, {}, {t.name: level}, parsed)[t.name]
                rows.append(_measure(t, "sparsity", level, t.out_first(mask).to(t.parameter.dtype), evaluate, metric))
        for t in quantized:
            for width in widths:
                axis = t.output_axis
                fake = fake_quantize_weight(t.parameter, weight_scale(t.parameter, width, axis=axis), width, axis=axis)
                rows.append(_measure(t, "bits", width, fake, evaluate, metric, replace=True))
    return SensitivityResult(metric=metric, mode=mode, baseline=logged[metric], rows=tuple(rows))


def _measure(
    target: ParameterTarget,
    kind: Literal["sparsity", "bits"],
    level: float,
    tensor: torch.Tensor,
    evaluate: Any,
    metric: str,
    replace: bool = False,
) -> SensitivityRow:
    """Evaluate with the parameter multiplied by (or, with ``replace``, set to) ``tensor``, then restore it."""
    parameter = target.parameter
    saved = parameter.detach().clone()
    try:
        if replace:
            parameter.copy_(tensor)
        else:
            parameter.mul_(tensor)
        value = evaluate()[metric]
    finally:
        parameter.copy_(saved)
    layer = target.module_name if target.param_name == "weight" else target.name
    return SensitivityRow(layer=layer, kind=kind, level=level, value=float(value))


def _resolve_metric(
    logged: dict[str, float], metric: str | None, mode: Literal["max", "min"] | None
) -> tuple[str, Literal["max", "min"]]:
    if not logged:
        raise ValueError("validation_step logged nothing: sensitivity needs a metric (self.log in validation_step).")
    if metric is None:
        metric = next((k for k in logged if "acc" in k.lower()), None) or next(
            (k for k in logged if "loss" in k.lower()), None
        )
        if metric is None:
            raise ValueError(f"give metric=...: validation_step logged {sorted(logged)}, none named *acc* or *loss*.")
    if metric not in logged:
        raise ValueError(f"metric {metric!r} is not logged by validation_step; it logs {sorted(logged)}.")
    if mode is None:
        mode = "min" if "loss" in metric.lower() or "err" in metric.lower() else "max"
    return metric, check_choice("mode", mode, ("max", "min"))
