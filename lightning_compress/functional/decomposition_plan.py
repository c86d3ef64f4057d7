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
import time
from collections.abc import Callable
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
    num_threads: int | None = None


@dataclass
class Decisions:
    """What :func:`decide` returns.

    Attributes:
        plans: layer name -> plan, for the layers to replace.
        rows: one report row per candidate layer, in candidate order, with its status.
        chains: layer name -> the chain already computed for it (reused instead of factoring twice).
        seconds: layer name -> wall time of its factorization (and latency measurement), for every
            layer that was factored.
        estimated_seconds: the estimate of the whole loop made before it started (``None`` when no
            ``log`` was given).
    """

    plans: dict[str, dec.LayerPlan] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    chains: dict[str, nn.Sequential] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    estimated_seconds: float | None = None


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


# ---------------------------------------------------------------------------- time estimate
@dataclass(frozen=True)
class Throughput:
    """Measured FLOP/s: matrix products on the factorization threads and on one thread, LAPACK on one."""

    gemm: float
    gemm_one: float
    lapack: float

    @classmethod
    def measure(cls, num_threads: int | None) -> Throughput:
        """Time short matrix products and an SVD now (:func:`.decomposition.measure_throughput`)."""
        gemm, lapack = dec.measure_throughput(num_threads)
        gemm_one = gemm if (num_threads or torch.get_num_threads()) == 1 else dec.measure_throughput(1)[0]
        return cls(gemm=gemm, gemm_one=gemm_one, lapack=lapack)


def estimate_seconds(
    layer: nn.Module,
    plan: dec.LayerPlan,
    settings: PlanSettings,
    rates: Throughput,
    *,
    call_seconds: tuple[float, float] | None = None,
) -> float:
    """Estimated wall time of factoring ``layer`` by ``plan`` and, given ``call_seconds``, timing it.

    The factorization: the FLOP counts of
    :func:`~lightning_compress.functional.decomposition.factorization_flops` divided by measured rates
    (CP's matrix products on the factorization threads; SVD / Tucker-2 and all LAPACK calls on one).
    The latency measurement (:func:`measure_pair`): 3 rounds of two timings, each a warm-up call, a first
    call and calls for at least 0.02 s, from ``call_seconds`` = seconds of one call of the layer and of
    its chain at ``latency_batch``. Those are timed rather than counted: a conv's speed, and even more
    a depthwise one's, is far from the matrix-product rate (a CP chain of a 7x7 stem conv measured ~20x
    slower per FLOP).
    """
    gemm, lapack = dec.factorization_flops(layer, plan, settings.n_iter_max)
    seconds = gemm / (rates.gemm if plan.method == "cp" else rates.gemm_one) + lapack / rates.lapack
    for call in call_seconds or ():
        seconds += 3 * (max(0.02, call) + 2 * call)
    return seconds


def time_calls(layer: nn.Module, plan: dec.LayerPlan, sample: torch.Tensor, batch: int) -> tuple[float, float]:
    """Seconds of one forward of ``layer`` and of an (untrained) chain of ``plan`` at ``batch``, on one thread.

    Timed on ``sample`` (a smaller batch, after one warm-up call) and scaled linearly to ``batch``: about
    a tenth of what :func:`measure_pair` will spend, for an estimate that is right where it matters
    (large activations, where the measurement takes seconds).
    """
    chain = dec.build_chain(layer, plan)
    scale = batch / sample.shape[0]
    out = []
    with dec.single_thread(), torch.no_grad():
        for module in (layer, chain):
            module(sample)
            start = time.perf_counter()
            module(sample)
            out.append((time.perf_counter() - start) * scale)
    return out[0], out[1]


# ---------------------------------------------------------------------------- the decision
def decide(
    candidates: list[tuple[str, nn.Module]],
    shapes: Shapes,
    settings: PlanSettings,
    *,
    model_params: int,
    model_flops: float | None = None,
    skip: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Decisions:
    """Plan every candidate layer: skip what cannot or should not be decomposed, factor the rest.

    Args:
        candidates: ``(name, layer)`` pairs selected by the caller.
        shapes: input/output shapes of the layers in one forward (:func:`layer_shapes`); without them
            FLOPs count one sample and latency is measured on a Linear only.
        settings: ranks, thresholds, latency and thread options.
        model_params: parameters of the whole model (the ``budget`` over params is a share of this).
        model_flops: FLOPs of one forward of the whole model (``budget_metric="flops"``).
        skip: layer name -> reason to keep it dense that only the model knows (:func:`tied_weight_reasons`).
        log: receives progress lines: before the first factorization, the number of layers to factor
            and an estimate of the total time (:func:`estimate_seconds`, from FLOP counts and rates
            measured on the spot); after each factored layer, its name, method, ranks, seconds, error,
            status and the time left.
    """
    result = Decisions()
    work: list[tuple[str, nn.Module, str, dec.Geometry]] = []
    for name, layer in candidates:
        geometry = geometry_of(layer, shapes.get(layer))
        reason = (skip or {}).get(name) or dec.skip_reason(layer)
        if reason is not None:
            result.rows.append(report_row(name, layer, None, geometry, status=f"skipped: {reason}"))
        else:
            work.append((name, layer, dec.resolve_method(layer, settings.method), geometry))
    if settings.budget is not None:
        layers = [(layer, method, geometry) for _, layer, method, geometry in work]
        plans = budget_plans(layers, settings, model_params=model_params, model_flops=model_flops)
    else:
        plans = [dec.LayerPlan(method, ranks_for(layer, method, settings)) for _, layer, method, _ in work]
    items = list(zip(work, plans, strict=True))
    estimates = _estimate(items, len(candidates), shapes, settings, log) if log is not None else {}
    if log is not None:
        result.estimated_seconds = sum(estimates.values())
    started, done_estimate = time.perf_counter(), 0.0
    for (name, layer, _, geometry), plan in items:
        begin = time.perf_counter()
        factored = _decide_layer(result, name, layer, plan, geometry, shapes.get(layer), settings)
        if not factored:
            continue
        result.seconds[name] = seconds = time.perf_counter() - begin
        if log is not None:
            done_estimate += estimates[name]
            elapsed = time.perf_counter() - started
            left = (sum(estimates.values()) - done_estimate) * elapsed / max(done_estimate, 1e-9)
            row = result.rows[-1]
            log(
                f"TensorDecomposition: [{len(result.seconds)}/{len(estimates)}] {name}: {row['method']} "
                f"rank {row['ranks']}, {seconds:.1f} s (estimated {estimates[name]:.1f} s), error "
                f"{row['error']:.3f}, {row['status']}; {_seconds(elapsed)} s elapsed, about {_seconds(left)} s left"
            )
    order = {name: i for i, (name, _) in enumerate(candidates)}
    result.rows.sort(key=lambda row: order[row["layer"]])
    return result


def _estimate(
    items: list[tuple[tuple[str, nn.Module, str, dec.Geometry], dec.LayerPlan | None]],
    selected: int,
    shapes: Shapes,
    settings: PlanSettings,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Estimated seconds of every layer that will be factored; logs the total before any work starts."""
    rates = Throughput.measure(settings.num_threads)
    estimates: dict[str, float] = {}  # (taking the estimate costs ~0.1 s plus two forwards per timed layer)
    methods: dict[str, int] = {}
    for (name, layer, _, geometry), plan in items:
        if plan is None or _mac_reduction(layer, plan, geometry) < settings.min_reduction:
            continue  # kept dense without factoring
        sample = latency_input(layer, shapes.get(layer), min(2, settings.latency_batch))
        calls = None
        if settings.measure_latency and sample is not None:
            calls = time_calls(layer, plan, sample.to(layer.weight.device), settings.latency_batch)
        estimates[name] = estimate_seconds(layer, plan, settings, rates, call_seconds=calls)
        methods[plan.method] = methods.get(plan.method, 0) + 1
    threads = settings.num_threads or torch.get_num_threads()
    listing = ", ".join(f"{m}: {n}" for m, n in sorted(methods.items())) or "none"
    log(
        f"TensorDecomposition: factoring {len(estimates)} of {selected} layers ({listing}), CP on {threads} "
        f"thread(s); estimated {_seconds(sum(estimates.values()))} s (FLOP counts at measured "
        f"{rates.gemm / 1e9:.1f} GFLOP/s matrix products, {rates.lapack / 1e9:.1f} GFLOP/s LAPACK"
        f"{'; latency measurement included' if settings.measure_latency else ''})."
    )
    return estimates


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _mac_reduction(layer: nn.Module, plan: dec.LayerPlan, geometry: dec.Geometry) -> float:
    return dec.macs_of(layer, None, geometry) / max(dec.macs_of(layer, plan, geometry), 1)


def _decide_layer(
    result: Decisions,
    name: str,
    layer: nn.Module,
    plan: dec.LayerPlan | None,
    geometry: dec.Geometry,
    shape: tuple[tuple[int, ...], tuple[int, ...]] | None,
    settings: PlanSettings,
) -> bool:
    """Add ``layer``'s row (and, when it is replaced, its plan and chain) to ``result``; ``True`` if factored."""
    floor = f"min_reduction {settings.min_reduction:g}x"
    if plan is None:
        status = f"skipped: MAC reduction < {floor} at the rank the budget allows"
        result.rows.append(report_row(name, layer, None, geometry, status=status))
        return False
    reduction = _mac_reduction(layer, plan, geometry)
    if reduction < settings.min_reduction:
        status = f"skipped: MAC reduction {reduction:.2f}x < {floor}"
        result.rows.append(report_row(name, layer, plan, geometry, status=status))
        return False
    chain, error = dec.decompose(
        layer,
        plan,
        n_iter_max=settings.n_iter_max,
        tol=settings.tol,
        seed=settings.seed,
        num_threads=settings.num_threads,
    )
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
    return True


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
    if dec.is_linear_like(layer):
        in_features = dec.channels(layer)[1]
        return dec.Geometry(n=max(1, math.prod(x) // max(in_features, 1)))
    if len(x) == 3:  # unbatched conv input
        x, y = (1, *x), (1, *y)
    return dec.Geometry(n=x[0], h_in=x[-2], w_in=x[-1], h_out=y[-2], w_out=y[-1])


def latency_input(
    layer: nn.Module, shape: tuple[tuple[int, ...], tuple[int, ...]] | None, batch: int
) -> torch.Tensor | None:
    """A seeded random batch of ``batch`` inputs shaped like ``layer``'s (``None`` for a conv never seen)."""
    g = torch.Generator().manual_seed(0)
    if shape is None:
        return torch.randn(batch, dec.channels(layer)[1], generator=g) if dec.is_linear_like(layer) else None
    x = shape[0]
    if isinstance(layer, nn.Conv2d) and len(x) == 3:
        x = (1, *x)
    return torch.randn(batch, *x[1:], generator=g)


def describe(layer: nn.Module) -> str:
    """``"Linear 512->64"`` / ``"Conv2d 16->32 k=(3, 3)"``."""
    if dec.is_linear_like(layer):
        o, i = dec.channels(layer)
        return f"{type(layer).__name__} {i}->{o}"
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


# ---------------------------------------------------------------------------- what the model says about a layer
# Zeros above this share of a weight mean a pruned layer: a trained dense weight has essentially none, and a
# factorization would fill them in.
PRUNED_ZERO_SHARE = 0.01


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> names of every module holding it directly (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    return owners


def tied_weight_reasons(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Skip reasons for candidates whose weight another module shares (Hugging Face ties ``lm_head`` this way).

    Replacing such a layer by a chain unties the weights: the other module keeps the full matrix, so the
    model gets *bigger*. They are kept dense, with this reason in the report.
    """
    owners = parameter_owners(model)
    reasons = {}
    for name, layer in candidates:
        others = sorted({n for n in owners.get(id(getattr(layer, "weight", None)), []) if n != name})
        if others:
            reasons[name] = (
                f"weight tied to {others[0]!r}{' and more' if len(others) > 1 else ''}: a factor chain would "
                "untie it and add parameters"
            )
    return reasons


def _reads_weight_directly(model: nn.Module, name: str) -> str | None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) and child in ("linear1", "linear2"):
        return f"{type(parent).__name__}'s fast path reads {child}.weight"
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight in its forward"
    return None


def _compression_already_there(layer: nn.Module) -> str | None:
    from lightning_compress.functional.quantization import is_qat

    if is_qat(layer):
        return f"it is quantization-aware ({type(layer).__name__}): its factors would be plain float layers"
    if hasattr(layer, "weight_orig") or any(
        isinstance(h, torch.nn.utils.prune.BasePruningMethod) for h in layer._forward_pre_hooks.values()
    ):
        return "it carries a pruning mask (weight_orig/weight_mask): its factors would be dense"
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel():
        zeros = float((weight.detach() == 0).float().mean())
        if zeros >= PRUNED_ZERO_SHARE:
            return f"{zeros:.0%} of its weights are exactly zero (pruned): its factors would be dense"
    return None


def check_layers(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> None:
    """Refuse candidates that a factor chain would break or silently un-compress (before step 1).

    - a parent module reads the layer's ``.weight`` itself (``nn.TransformerEncoderLayer``'s fast path,
      ``nn.MultiheadAttention.out_proj``): after replacement the model fails;
    - the layer is already quantization-aware or pruned: the float, dense factors would silently undo it.

    Raises:
        ValueError: naming every such layer, why, and the ``exclude`` patterns that avoid it.
    """
    read_directly = {n: r for n, _ in candidates if (r := _reads_weight_directly(model, n)) is not None}
    if read_directly:
        listing = "; ".join(f"{n!r} ({r})" for n, r in read_directly.items())
        patterns = sorted({f"*.{n.rpartition('.')[2]}" for n in read_directly})
        raise ValueError(
            f"TensorDecomposition cannot replace {listing}: the parent module uses the weight tensor directly, "
            f"so the model would fail once the layer is a factor chain. HINT: exclude={patterns!r}."
        )
    compressed = {n: r for n, layer in candidates if (r := _compression_already_there(layer)) is not None}
    if compressed:
        listing = "; ".join(f"{n!r}: {r}" for n, r in compressed.items())
        raise ValueError(
            f"TensorDecomposition would silently undo earlier compression of {listing}. HINT: exclude these "
            f"layers (exclude={list(compressed)!r}), or decompose the dense model first and prune / quantize "
            "the factors in a later fit."
        )
