"""Which layers to decompose and at which ranks: plans computed from the model, returned, never stored.

:class:`~lightning_compress.TensorDecomposition` decides *when*; this module decides, for the layers
it selected, the plan of each (method and ranks, from a fixed rank, a parameter ratio, an energy
threshold, VBMF or a model-wide budget) and whether the layer is kept dense (it cannot be factored,
its multiply-accumulates fall by less than ``min_reduction``, or its chain measured slower). Every
decision comes back as a report row with its reason. Pure torch; no Lightning import.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> settings = PlanSettings(rank=0.25, measure_latency=False)
    >>> result = decide(list(model.named_children())[::2], {}, settings, model_params=4290)
    >>> {name: plan.ranks for name, plan in result.plans.items()}
    {'0': (8,)}
    >>> [row["status"] for row in result.rows]
    ['decomposed', 'skipped: MAC reduction 1.94x < min_reduction 2x']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_compress.functional import decomposition as dec
from lightning_compress.inputs import as_call

Shapes = dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]]
Rank = int | float | Literal["vbmf"]


@dataclass(frozen=True)
class PlanSettings:
    """The decomposition arguments that planning reads (validated by the callback)."""

    method: str = "auto"
    rank: Rank | None = 0.25
    energy: float | None = None
    budget: float | None = None
    budget_metric: Literal["params", "flops"] = "params"
    min_reduction: float = 2.0
    measure_latency: bool = True
    skip_slower: bool = True
    latency_batch: int = 32
    n_iter_max: int = 25
    tol: float = 1e-4
    seed: int = 0


@dataclass
class Decisions:
    """What :func:`decide` returns.

    Attributes:
        plans: layer name -> plan, for the layers to replace.
        rows: one report row per candidate layer, in candidate order, with its status.
        chains: layer name -> the chain already computed for it (reused instead of factoring twice).
    """

    plans: dict[str, dec.LayerPlan] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    chains: dict[str, nn.Sequential] = field(default_factory=dict)


# ---------------------------------------------------------------------------- ranks
def ranks_for(layer: nn.Module, method: str, settings: PlanSettings) -> tuple[int, ...]:
    """The ranks of ``layer`` under ``method`` for a per-layer rule (``energy``, ``"vbmf"``, an int, a ratio)."""
    if settings.energy is not None:
        return dec.ranks_for_energy(layer, method, settings.energy)
    if settings.rank == "vbmf":
        return dec.ranks_for_vbmf(layer, method)
    if isinstance(settings.rank, int):
        return (settings.rank, settings.rank) if method == "tucker2" else (settings.rank,)
    return dec.ranks_for_ratio(layer, method, float(settings.rank))  # type: ignore[arg-type]


def budget_plans(
    layers: list[tuple[nn.Module, str, dec.Geometry]],
    settings: PlanSettings,
    *,
    model_params: int,
    model_flops: float | None,
) -> list[dec.LayerPlan | None]:
    """Plans that fit the whole model into ``settings.budget`` of its params or FLOPs (``None``: stays dense)."""
    assert settings.budget is not None
    if settings.budget_metric == "params":
        total = model_params
        chosen = sum(dec.params_of(layer, None) for layer, _, _ in layers)
    else:
        if model_flops is None:
            raise ValueError(
                "budget_metric='flops' needs an example input to count FLOPs, and none was seen. HINT: set "
                "`example_input_array` on the LightningModule, or use budget_metric='params'."
            )
        total = int(model_flops) // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs
        chosen = sum(dec.macs_of(layer, None, geometry) for layer, _, geometry in layers)
    return dec.allocate_budget(
        layers,
        budget=int(settings.budget * total),
        fixed=total - chosen,
        metric=settings.budget_metric,
        min_reduction=settings.min_reduction,
    )


# ---------------------------------------------------------------------------- latency
def measure_pair(layer: nn.Module, chain: nn.Module, sample: torch.Tensor) -> tuple[float, float]:
    """Seconds per forward of ``layer`` and of ``chain`` on ``sample`` (best of 3 interleaved rounds).

    One thread, interleaved rounds, best of each: threaded timings of small ops swing several-fold when
    other processes share the cores, which would flip the decision.
    """
    before, after = math.inf, math.inf
    with dec.single_thread():
        for _ in range(3):
            before = min(before, dec.measure_latency(layer, sample, min_run_time=0.02))
            after = min(after, dec.measure_latency(chain, sample, min_run_time=0.02))
    return before, after


# ---------------------------------------------------------------------------- the decision
def decide(
    candidates: list[tuple[str, nn.Module]],
    shapes: Shapes,
    settings: PlanSettings,
    *,
    model_params: int,
    model_flops: float | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
) -> Decisions:
    """Plan every candidate layer: skip what cannot or should not be decomposed, factor the rest.

    Args:
        candidates: ``(name, layer)`` pairs selected by the caller.
        shapes: input/output shapes of the layers in one forward (:func:`layer_shapes`); without them
            FLOPs count one sample and latency is measured on a Linear only.
        settings: ranks, thresholds and latency options.
        model_params: parameters of the whole model (the ``budget`` over params is a share of this).
        model_flops: FLOPs of one forward of the whole model (``budget_metric="flops"``).
        progress: wraps the loop over layers (e.g. a progress bar).
    """
    result = Decisions()
    work: list[tuple[str, nn.Module, str, dec.Geometry]] = []
    for name, layer in candidates:
        geometry = geometry_of(layer, shapes.get(layer))
        reason = dec.skip_reason(layer)
        if reason is not None:
            result.rows.append(report_row(name, layer, None, geometry, status=f"skipped: {reason}"))
        else:
            work.append((name, layer, dec.resolve_method(layer, settings.method), geometry))
    if settings.budget is not None:
        layers = [(layer, method, geometry) for _, layer, method, geometry in work]
        plans = budget_plans(layers, settings, model_params=model_params, model_flops=model_flops)
    else:
        plans = [dec.LayerPlan(method, ranks_for(layer, method, settings)) for _, layer, method, _ in work]
    for (name, layer, _, geometry), plan in progress(list(zip(work, plans, strict=True))):
        _decide_layer(result, name, layer, plan, geometry, shapes.get(layer), settings)
    order = {name: i for i, (name, _) in enumerate(candidates)}
    result.rows.sort(key=lambda row: order[row["layer"]])
    return result


def _decide_layer(
    result: Decisions,
    name: str,
    layer: nn.Module,
    plan: dec.LayerPlan | None,
    geometry: dec.Geometry,
    shape: tuple[tuple[int, ...], tuple[int, ...]] | None,
    settings: PlanSettings,
) -> None:
    """Add ``layer``'s row (and, when it is replaced, its plan and chain) to ``result``."""
    floor = f"min_reduction {settings.min_reduction:g}x"
    if plan is None:
        status = f"skipped: MAC reduction < {floor} at the rank the budget allows"
        result.rows.append(report_row(name, layer, None, geometry, status=status))
        return
    reduction = dec.macs_of(layer, None, geometry) / max(dec.macs_of(layer, plan, geometry), 1)
    if reduction < settings.min_reduction:
        status = f"skipped: MAC reduction {reduction:.2f}x < {floor}"
        result.rows.append(report_row(name, layer, plan, geometry, status=status))
        return
    chain, error = dec.decompose(layer, plan, n_iter_max=settings.n_iter_max, tol=settings.tol, seed=settings.seed)
    row = report_row(name, layer, plan, geometry, status="decomposed", error=error)
    sample = latency_input(layer, shape, settings.latency_batch)
    if settings.measure_latency and sample is not None:
        before, after = measure_pair(layer, chain, sample.to(layer.weight.device))
        if settings.skip_slower and after >= before:
            status = f"skipped: measured slower ({after * 1e3:.3f} ms vs {before * 1e3:.3f} ms)"
            row = report_row(name, layer, plan, geometry, status=status, error=error)
        row.update(latency_ms_before=round(before * 1e3, 4), latency_ms_after=round(after * 1e3, 4))
    result.rows.append(row)
    if row["status"] == "decomposed":
        result.plans[name] = plan
        result.chains[name] = chain


# ---------------------------------------------------------------------------- shapes and rows
def layer_shapes(model: nn.Module, layers: list[nn.Module], example: Any) -> Shapes:
    """Input and output shapes of ``layers`` in one eval-mode forward of ``model`` on ``example``."""
    if example is None or not layers:
        return {}
    shapes: Shapes = {}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(module, (tuple(args[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    model.eval()  # no BatchNorm statistics update
    try:
        args, kwargs = as_call(example)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def geometry_of(layer: nn.Module, shape: tuple[tuple[int, ...], tuple[int, ...]] | None) -> dec.Geometry:
    """The :class:`~lightning_compress.functional.decomposition.Geometry` of ``layer`` from its recorded shapes."""
    if shape is None:
        return dec.Geometry()
    x, y = shape
    if isinstance(layer, nn.Linear):
        return dec.Geometry(n=max(1, math.prod(x) // max(layer.in_features, 1)))
    if len(x) == 3:  # unbatched conv input
        x, y = (1, *x), (1, *y)
    return dec.Geometry(n=x[0], h_in=x[-2], w_in=x[-1], h_out=y[-2], w_out=y[-1])


def latency_input(
    layer: nn.Module, shape: tuple[tuple[int, ...], tuple[int, ...]] | None, batch: int
) -> torch.Tensor | None:
    """A seeded random batch of ``batch`` inputs shaped like ``layer``'s (``None`` for a conv never seen)."""
    g = torch.Generator().manual_seed(0)
    if shape is None:
        return torch.randn(batch, layer.in_features, generator=g) if isinstance(layer, nn.Linear) else None
    x = shape[0]
    if isinstance(layer, nn.Conv2d) and len(x) == 3:
        x = (1, *x)
    return torch.randn(batch, *x[1:], generator=g)


def describe(layer: nn.Module) -> str:
    """``"Linear 512->64"`` / ``"Conv2d 16->32 k=(3, 3)"``."""
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}"
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d {layer.in_channels}->{layer.out_channels} k={tuple(layer.kernel_size)}"
    return type(layer).__name__


def report_row(
    name: str,
    layer: nn.Module,
    plan: dec.LayerPlan | None,
    geometry: dec.Geometry,
    *,
    status: str,
    error: float | None = None,
) -> dict[str, Any]:
    """One row of the decomposition report (plain JSON-able values)."""
    applied = plan if status == "decomposed" else None
    return {
        "layer": name,
        "shape": describe(layer),
        "method": None if plan is None else plan.method,
        "ranks": None if plan is None else "x".join(map(str, plan.ranks)),
        "params_before": dec.params_of(layer, None),
        "params_after": dec.params_of(layer, applied),
        "flops_before": 2 * dec.macs_of(layer, None, geometry),
        "flops_after": 2 * dec.macs_of(layer, applied, geometry),
        "error": None if error is None else round(error, 5),
        "latency_ms_before": None,
        "latency_ms_after": None,
        "status": status,
    }


# ---------------------------------------------------------------------------- checks before step 1
def check_candidates(candidates: list[tuple[str, nn.Module]], settings: PlanSettings) -> None:
    """Refuse, naming the layer, a method or fixed rank that a selected layer cannot take.

    Runs in ``setup`` (before any training step), on the layers the callback selected.
    """
    for name, layer in candidates:
        if dec.skip_reason(layer) is not None:
            continue  # kept dense with its reason in the report
        try:
            method = dec.resolve_method(layer, settings.method)
        except ValueError as err:
            raise ValueError(
                f"layer {name!r} ({describe(layer)}): {err} HINT: narrow `types`/`include`, or `exclude` it."
            ) from None
        if isinstance(settings.rank, int) and not isinstance(settings.rank, bool):
            limit = min(dec.max_ranks(layer, method))
            if settings.rank > limit:
                raise ValueError(
                    f"rank={settings.rank} is larger than layer {name!r} ({describe(layer)}) allows "
                    f"for {method}: at most {limit}. HINT: a float ratio such as rank=0.25 adapts "
                    "to each layer, or exclude the layer."
                )
