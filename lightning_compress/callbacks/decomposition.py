"""TensorDecomposition: replace Linear / Conv2d layers by low-rank factor chains, at fit end or mid-fit.

*When* and *which layers* live here; *how* a layer is factored and how ranks are chosen live in
:mod:`lightning_compress.functional.decomposition`.

Checkpoints: a decomposed model's ``state_dict`` describes its own structure (``conv.0.weight``,
``conv.1.weight``, ... are the factors of the chain that replaced ``conv``). The callback registers a
``load_state_dict`` pre-hook on the LightningModule in ``setup``, so when ``fit(ckpt_path=...)``
restores a checkpoint the chains are rebuilt from those shapes *before* the weights are copied in,
strict loading succeeds, and the optimizer is then created over the decomposed parameters. Outside a
``Trainer``, :func:`load_decomposed` does the same for ``LightningModule.load_from_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress._files import save_atomically
from lightning_compress._lightning_internals import is_spawn, strategy_is
from lightning_compress._validation import check_range, is_number
from lightning_compress.callbacks._consolidate import is_sharded, run_on_plain_copy
from lightning_compress.callbacks._optimizers import rebuild_optimizers
from lightning_compress.callbacks.base import CompressionCallback, example_input
from lightning_compress.functional import decomposition as dec
from lightning_compress.functional import decomposition_plan as planning
from lightning_compress.functional.stats import module_flops
from lightning_compress.inputs import as_call
from lightning_compress.schedules import steps_per_epoch
from lightning_compress.targets import select_modules, select_parameters, validate_patterns


class TensorDecomposition(CompressionCallback):
    """Replace ``Linear`` / ``Conv2d`` layers by low-rank chains (SVD, Tucker-2, CP) inside ``Trainer.fit``.

    By default the model is decomposed when ``fit`` ends (post-training compression). With
    ``apply_at=<step>`` (or ``apply_at_epoch``) it is decomposed at that optimizer step and the rest
    of the run fine-tunes the factors: the optimizer and LR scheduler are rebuilt over the new
    parameters (state of untouched parameters and the scheduler position carry over), and under DDP
    the wrapped module is rebuilt too.

    A layer is left alone, with the reason in the report, when it cannot be decomposed (grouped conv,
    one channel), when its weight is tied to another module's (Hugging Face ``lm_head``: a chain would
    untie it and grow the model), when its multiply-accumulates would fall by less than
    ``min_reduction``, or when the decomposed chain measures slower than the original on this CPU
    (``skip_slower``).

    Refused in ``setup``, before any training step, naming the layers: a layer whose parent reads its
    ``.weight`` directly (``nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``'s ``linear1`` /
    ``linear2``, ``nn.MultiheadAttention.out_proj``); a layer that ``GradualPruning`` or
    ``QuantizationAwareTraining`` on the same trainer also selects (in any callback order), or that is
    already pruned or quantization-aware from an earlier fit, since the float, dense factors would
    silently undo that compression.

    Ranks (give at most one of ``rank``, ``energy``, ``budget``; default ``rank=0.25``):

    - ``rank`` an ``int`` >= 1: that rank for every layer (Tucker-2: both channel ranks).
    - ``rank`` a ``float`` in (0, 1]: the fraction of each layer's parameters the chain keeps.
    - ``rank="vbmf"``: empirical variational Bayesian matrix factorization (Nakajima et al. 2013) of
      each unfolding, as Kim et al. 2016 do for Tucker-2.
    - ``energy``: the smallest ranks keeping this fraction of the squared singular values.
    - ``budget``: the whole model keeps at most this fraction of its ``budget_metric`` (params or
      FLOPs); one energy threshold shared by all layers allocates the ranks.

    Args:
        method: ``"auto"`` (SVD for Linear and 1x1 convs, Tucker-2 for larger kernels), ``"svd"``,
            ``"tucker2"`` or ``"cp"``.
        rank: see above.
        energy: fraction of spectral energy kept, in (0, 1].
        budget: fraction of the whole model's params / FLOPs to keep, in (0, 1).
        budget_metric: ``"params"`` or ``"flops"``.
        apply_at: ``"fit_end"``, or an optimizer step (``trainer.global_step``) after which training
            continues on the decomposed model.
        apply_at_epoch: alternative to a step, in epochs (fractions allowed).
        include: module name patterns (glob or ``re:...``) to decompose; all of ``types`` by default.
        exclude: module name patterns to keep dense (e.g. the classifier).
        types: module class names: ``"Linear"``, ``"Conv2d"`` and/or ``"Conv1D"`` (Hugging Face's
            transposed Linear, factored like a Linear into two ``nn.Linear``).
        min_reduction: minimum factor by which a layer's multiply-accumulates must fall (2.0: half).
        measure_latency: time every original and decomposed layer on CPU (one thread) for the report.
        skip_slower: keep the original layer when its chain measured slower.
        latency_batch: batch size of the latency measurement.
        n_iter_max: iteration cap of Tucker (HOOI) and CP (ALS); both start from an SVD.
        tol: relative-change tolerance that stops those iterations early.
        seed: seed of randomized SVD and CP initialisation.
        num_threads: threads of CP's matrix products. ``None``: ``torch.get_num_threads()`` when the
            decomposition runs, capped by the cores other processes leave free (threads waiting on
            each other measured 3x slower on busy shared cores; the cap is logged). SVD, Tucker-2,
            LAPACK solves and the latency measurements run on one thread, which measured steadier on
            shared cores. The torch setting is restored afterwards.
        save_path: if set, rank zero saves the decomposed model there at fit end (``torch.save`` of the whole
            module; load with ``torch.load(path, weights_only=False)``). Needed under ``ModelParallelStrategy``
            (FSDP2): there the sharded model keeps its layers, and a plain copy holding the gathered weights
            (rank zero, CPU) is decomposed and saved instead.
        name: distinguishes several instances (state key and ``compress/<name>/...``).

    Progress: before factoring, a rank-zero log line gives the number of layers and an estimate of the
    total time (FLOP counts of each factorization divided by matrix-product and LAPACK rates measured on
    the spot, plus the latency measurements); then one line per layer with its method, ranks, seconds,
    error, status and the time left.

    Logged metrics (every training step, and once more at fit end): ``compress/params`` (whole model),
    ``compress/flops`` (one forward on the example input, when known), ``compress/ratio`` (parameters
    before / now), ``compress/flops_ratio``.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_compress import TensorDecomposition
        >>> decomposition = TensorDecomposition(rank=0.25, apply_at=100, exclude=["classifier"])
        >>> trainer = pl.Trainer(max_steps=200, callbacks=[decomposition], logger=False)
        >>> TensorDecomposition(rank=25.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: rank must be an int >= 1, a float ratio in (0, 1] or 'vbmf', got 25.0. HINT: ...
    """

    report_title = "decomposition"

    def __init__(
        self,
        method: dec.Method = "auto",
        *,
        rank: int | float | Literal["vbmf"] | None = None,
        energy: float | None = None,
        budget: float | None = None,
        budget_metric: Literal["params", "flops"] = "params",
        apply_at: Literal["fit_end"] | int = "fit_end",
        apply_at_epoch: float | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[str] = dec.DECOMPOSABLE_TYPES,
        min_reduction: float = 2.0,
        measure_latency: bool = True,
        skip_slower: bool = True,
        latency_batch: int = 32,
        n_iter_max: int = 25,
        tol: float = 1e-4,
        seed: int = 0,
        num_threads: int | None = None,
        save_path: str | None = None,
        name: str | None = None,
    ) -> None:
        # One check per documented argument, each naming its argument (long signature, flat body).
        super().__init__(name=name)
        if method not in dec.METHODS:
            raise ValueError(f"method must be one of {list(dec.METHODS)}, got {method!r}.")
        rank = _check_rank_rule(rank, energy, budget, budget_metric)
        _check_apply_at(apply_at, apply_at_epoch)
        self.types = validate_patterns("types", types)
        unknown = [t for t in self.types if t not in dec.DECOMPOSABLE_TYPES]
        if unknown or not self.types:
            raise ValueError(
                f"types must be a non-empty list from {list(dec.DECOMPOSABLE_TYPES)}, got {list(types)!r}."
            )
        if not is_number(min_reduction, 1.0, math.inf):
            raise ValueError(f"min_reduction must be a number >= 1 (a MAC reduction factor), got {min_reduction!r}.")
        if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
            raise ValueError(f"latency_batch must be an int >= 1, got {latency_batch!r}.")
        if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
            raise ValueError(f"n_iter_max must be an int >= 1, got {n_iter_max!r}.")
        if not is_number(tol, 0.0, math.inf, low_open=True):
            raise ValueError(f"tol must be a positive number, got {tol!r}.")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be None (torch.get_num_threads()) or an int >= 1, got {num_threads!r}.")
        self.method = method
        self.rank, self.energy, self.budget, self.budget_metric = rank, energy, budget, budget_metric
        self.apply_at, self.apply_at_epoch = apply_at, apply_at_epoch
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.min_reduction = float(min_reduction)
        self.measure_latency, self.skip_slower, self.latency_batch = measure_latency, skip_slower, latency_batch
        self.n_iter_max, self.tol, self.seed, self.num_threads = n_iter_max, float(tol), seed, num_threads
        if save_path is not None and (not isinstance(save_path, str) or not save_path):
            raise ValueError(f"save_path must be None or a file path (str), got {save_path!r}.")
        self.save_path = save_path

        self._settings = planning.PlanSettings(
            method=method,
            rank=rank,
            energy=energy,
            budget=budget,
            budget_metric=budget_metric,
            min_reduction=self.min_reduction,
            measure_latency=measure_latency,
            skip_slower=skip_slower,
            latency_batch=latency_batch,
            n_iter_max=n_iter_max,
            tol=self.tol,
            seed=seed,
            num_threads=num_threads,
        )

        # Runtime state.
        self._plans: dict[str, dec.LayerPlan] = {}  # decomposed layer name -> plan
        self._rows: list[dict[str, Any]] = []
        self._applied = False
        self._apply_step: int | None = None
        self._baseline: dict[str, float] = {}  # params / flops of the model before decomposition
        self._metrics: dict[str, float] = {}
        self._load_hook: torch.utils.hooks.RemovableHandle | None = None
        self._model_id: int | None = None

    @property
    def plans(self) -> dict[str, dec.LayerPlan]:
        """Decomposed layer name -> its plan (method and ranks)."""
        return dict(self._plans)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The report's per-layer rows: every candidate layer with its status (decomposed or why not)."""
        return list(self._rows)

    # ---------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The rebuild hook serves every stage (validate/test/predict with ckpt_path too).
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._rebuild_before_load)
        if self._model_id != id(pl_module):
            self._plans, self._rows, self._applied, self._baseline = {}, [], False, {}
            self._model_id = id(pl_module)
        if stage != "fit":
            return
        _check_strategy(trainer.strategy, self.apply_at, self.apply_at_epoch, self.save_path)
        candidates = self._select(pl_module)
        _check_other_callbacks(trainer, pl_module, candidates)
        planning.check_layers(pl_module, candidates)
        tied = planning.tied_weight_reasons(pl_module, candidates)
        planning.check_candidates([(n, m) for n, m in candidates if n not in tied], self._settings)

    def _select(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        chosen = select_modules(pl_module, include=self.include, exclude=self.exclude, types=self.types)
        # Layers inside chains this callback built are factors, not candidates.
        return [
            (n, m) for n, m in chosen if dec.is_decomposable(m) and not any(n.startswith(p + ".") for p in self._plans)
        ]

    def _rebuild_before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # Runs before the LightningModule copies a state dict in: rebuild every chain the state dict
        # holds, so strict loading finds matching keys and shapes.
        plans = dec.structure_from_state_dict(module, state_dict, prefix)
        if plans:
            dec.apply_structure_(module, plans)
            self._plans.update(plans)
            self._applied = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self._applied,
            "plans": {k: p.as_dict() for k, p in self._plans.items()},
            "rows": self._rows,
            "before": self._baseline,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs after the model weights were restored (and the chains rebuilt by the pre-hook).
        plans = {k: dec.LayerPlan.from_dict(v) for k, v in state_dict.get("plans", {}).items()}
        missing = [k for k in plans if k not in self._plans]
        if missing:
            raise ValueError(
                f"the checkpoint's TensorDecomposition state lists decomposed layers {missing} that the "
                "restored model does not have in decomposed form. HINT: resume from a checkpoint of the "
                "same model (its state_dict holds the factor weights)."
            )
        self._applied = bool(state_dict.get("applied", bool(plans))) or self._applied
        self._rows = list(state_dict.get("rows", []))
        self._baseline = dict(state_dict.get("before", {}))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_at_epoch is not None:
            self._apply_step = round(self.apply_at_epoch * steps_per_epoch(trainer))
        elif self.apply_at != "fit_end":
            self._apply_step = int(self.apply_at)
        else:
            self._apply_step = None
        if not self._baseline:
            self._baseline = {"params": float(_count_params(pl_module))}
        self._refresh_metrics(pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = self._apply_step
        # Only at the start of an accumulation window, so no gradient of the old layers is half-accumulated.
        if (
            step is not None
            and not self._applied
            and trainer.global_step >= step
            and batch_idx % trainer.accumulate_grad_batches == 0
        ):
            self._apply(trainer, pl_module)
            rebuild_optimizers(trainer)
            self._refresh_metrics(pl_module)
        if "flops" not in self._metrics and self._baseline.get("params") is not None:
            self._refresh_metrics(pl_module)
        self.log_metrics(pl_module, self._metrics)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._applied:
            if self._apply_step is not None:
                rank_zero_warn(
                    f"TensorDecomposition: apply_at step {self._apply_step} was not reached (training ended "
                    f"at step {trainer.global_step}); the model is decomposed now, at fit end, without "
                    "fine-tuning."
                )
            if is_sharded(pl_module):
                self._decompose_plain_copy(trainer, pl_module)
            else:
                self._apply(trainer, pl_module)
        if not is_sharded(pl_module):
            self._refresh_metrics(pl_module)
            if self.save_path is not None and trainer.is_global_zero:
                _save(pl_module, self.save_path)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({self.metric(k): v for k, v in self._metrics.items()}, step=trainer.global_step)
        super().on_fit_end(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        super().teardown(trainer, pl_module, stage)

    # ---------------------------------------------------------------- decomposition
    def _decompose_plain_copy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2 at fit end: rank zero decomposes and saves a plain copy with the gathered weights.

        The sharded model is left as it is (its parameter set cannot change under FSDP2); every rank
        receives the copy's report rows and metrics.
        """
        assert self.save_path is not None  # checked in setup

        def work(plain: nn.Module) -> tuple[Any, ...]:
            self._apply(trainer, plain, alone=True)
            self._refresh_metrics(plain)
            _save(plain, self.save_path)  # type: ignore[arg-type]
            return self._rows, self._metrics, self._baseline

        self._rows, self._metrics, self._baseline = run_on_plain_copy(trainer, pl_module, work)
        self._plans, self._applied = {}, False  # the live model is not decomposed

    def _apply(self, trainer: pl.Trainer, pl_module: nn.Module, alone: bool = False) -> None:
        """Decompose ``pl_module`` in place; ``alone``: this process only (no broadcast of rank zero's plans)."""
        started = time.perf_counter()
        candidates = self._select(pl_module)
        example = example_input(pl_module, [self])
        if "flops" not in self._baseline and example is not None:
            self._baseline["flops"] = float(_model_flops(pl_module, example))
        decisions = planning.Decisions()
        threads, why = dec.factorization_threads(self.num_threads)
        if why is not None:
            rank_zero_info(f"TensorDecomposition: CP on {why}.")
        if trainer.is_global_zero or alone:
            # Rank zero decides (latency measurements differ between processes); every rank builds the
            # same chains from the broadcast plans.
            decisions = self._decide(trainer, pl_module, candidates, example, threads)
        plans, rows = (
            (decisions.plans, decisions.rows)
            if alone
            else trainer.strategy.broadcast((decisions.plans, decisions.rows), src=0)
        )
        for layer_name, layer in candidates:
            if layer_name not in plans:
                continue
            chain = decisions.chains.get(layer_name)
            if chain is None:
                chain, _ = dec.decompose(
                    layer,
                    plans[layer_name],
                    n_iter_max=self.n_iter_max,
                    tol=self.tol,
                    seed=self.seed,
                    num_threads=threads,
                )
            dec.set_submodule_(pl_module, layer_name, chain)
            self._plans[layer_name] = plans[layer_name]
        self._rows = rows
        self._applied = True
        done = sum(1 for r in rows if r["status"] == "decomposed")
        estimated = "" if decisions.estimated_seconds is None else f", estimated {decisions.estimated_seconds:.1f} s"
        rank_zero_info(
            f"TensorDecomposition: decomposed {done} of {len(rows)} layers in "
            f"{time.perf_counter() - started:.1f} s{estimated} "
            f"(params {int(self._baseline['params'])} -> {_count_params(pl_module)})."
        )

    def _decide(
        self,
        trainer: pl.Trainer,
        pl_module: nn.Module,
        candidates: list[tuple[str, nn.Module]],
        example: Any,
        threads: int,
    ) -> planning.Decisions:
        shapes = planning.layer_shapes(pl_module, [m for _, m in candidates], example)
        return planning.decide(
            candidates,
            shapes,
            dataclasses.replace(self._settings, num_threads=threads),
            model_params=_count_params(pl_module),
            model_flops=self._baseline.get("flops"),
            skip=planning.tied_weight_reasons(pl_module, candidates),
            log=rank_zero_info,  # rank zero only decides; lines go to Python logging like Lightning's own
        )

    # ---------------------------------------------------------------- metrics and report
    def _refresh_metrics(self, pl_module: pl.LightningModule) -> None:
        params = _count_params(pl_module)
        before = self._baseline.get("params", float(params))
        self._metrics = {"params": float(params), "ratio": before / max(params, 1)}
        example = example_input(pl_module, [self])
        if example is not None:
            flops = float(_model_flops(pl_module, example))
            self._baseline.setdefault("flops", flops)
            self._metrics.update(flops=flops, flops_ratio=self._baseline["flops"] / max(flops, 1.0))

    @override
    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "method": self.method,
            "rank": self.rank if self.energy is None and self.budget is None else None,
            "energy": self.energy,
            "budget": None if self.budget is None else f"{self.budget:g} of {self.budget_metric}",
            "applied": self._applied,
            "saved_to": self.save_path if self._rows else None,
            "params_before": self._baseline.get("params"),
            "params_after": self._metrics.get("params"),
            "flops_before": self._baseline.get("flops"),
            "flops_after": self._metrics.get("flops"),
            "ratio": self._metrics.get("ratio"),
            "flops_ratio": self._metrics.get("flops_ratio"),
            "layers": self._rows,
        }


# ---------------------------------------------------------------------------- loading helper
def load_decomposed(
    cls: type[pl.LightningModule],
    checkpoint_path: str,
    map_location: Any = None,
    **kwargs: Any,
) -> pl.LightningModule:
    """``cls.load_from_checkpoint`` for a checkpoint of a decomposed model.

    The LightningModule is built from its saved hyperparameters, the chains the checkpoint holds are
    rebuilt from the shapes of their factor weights, and the weights are then loaded strictly.

    Args:
        cls: the LightningModule class.
        checkpoint_path: a checkpoint written by ``Trainer.save_checkpoint`` / ``ModelCheckpoint``.
        map_location: as for ``torch.load``.
        **kwargs: hyperparameter overrides, as for ``load_from_checkpoint``.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_compress import load_decomposed
        >>> # trainer.fit(model); trainer.save_checkpoint("decomposed.ckpt")
        >>> # model = load_decomposed(MyModule, "decomposed.ckpt")
    """
    from lightning_fabric.utilities.cloud_io import _load as pl_load

    checkpoint = pl_load(checkpoint_path, map_location=map_location or "cpu", weights_only=False)
    with warnings.catch_warnings():
        # Missing/unexpected keys are expected here: the decomposed layers are loaded just below.
        warnings.simplefilter("ignore")
        model = cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=False, **kwargs)
    state_dict = checkpoint["state_dict"]
    dec.apply_structure_(model, dec.structure_from_state_dict(model, state_dict))
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------- helpers
def _check_rank_rule(rank: Any, energy: Any, budget: Any, budget_metric: Any) -> Any:
    """Validate the one rank rule given (default ``rank=0.25``) and return the rank to use."""
    given = [k for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of rank, energy, budget; got {', '.join(given)}.")
    if not given:
        rank = 0.25
    if rank is not None:
        _check_rank(rank)
    if energy is not None:
        check_range("energy", energy, 0.0, 1.0, low_open=True)
    if budget is not None:
        check_range("budget", budget, 0.0, 1.0, low_open=True, high_open=True)
    if budget_metric not in ("params", "flops"):
        raise ValueError(f"budget_metric must be 'params' or 'flops', got {budget_metric!r}.")
    return rank


def _check_apply_at(apply_at: Any, apply_at_epoch: Any) -> None:
    if apply_at != "fit_end" and (isinstance(apply_at, bool) or not isinstance(apply_at, int) or apply_at < 0):
        raise ValueError(f"apply_at must be 'fit_end' or a non-negative optimizer step (int), got {apply_at!r}.")
    if apply_at_epoch is not None:
        if apply_at != "fit_end":
            raise ValueError(
                f"give apply_at (a step) or apply_at_epoch, not both; got {apply_at!r} and {apply_at_epoch!r}."
            )
        if not is_number(apply_at_epoch, 0.0, math.inf):
            raise ValueError(f"apply_at_epoch must be a non-negative number of epochs, got {apply_at_epoch!r}.")


def _check_rank(rank: Any) -> None:
    if rank == "vbmf" and isinstance(rank, str):
        return
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1, a float ratio in (0, 1] or 'vbmf', got {rank!r}.")
        return
    if isinstance(rank, float) and not math.isnan(rank):
        if 0.0 < rank <= 1.0:
            return
        hint = f" HINT: write {int(rank)} (an int) for an absolute rank." if rank > 1 and rank.is_integer() else ""
        raise ValueError(f"rank must be an int >= 1, a float ratio in (0, 1] or 'vbmf', got {rank!r}.{hint}")
    raise ValueError(f"rank must be an int >= 1, a float ratio in (0, 1] or 'vbmf', got {rank!r}.")


def _check_strategy(strategy: Any, apply_at: Any, apply_at_epoch: Any, save_path: str | None) -> None:
    """Refuse strategies that cannot follow a change of the parameter set (before any step)."""
    spawn = is_spawn(strategy)
    if strategy_is(strategy, "ModelParallelStrategy"):
        if apply_at != "fit_end" or apply_at_epoch is not None:
            when = f"apply_at={apply_at!r}" if apply_at_epoch is None else f"apply_at_epoch={apply_at_epoch!r}"
            raise ValueError(
                f"TensorDecomposition({when}) cannot decompose mid-fit under ModelParallelStrategy: replacing "
                "layers changes the parameter set, which FSDP2's sharded parameters and optimizer state cannot "
                "follow. Accepted under ModelParallelStrategy: apply_at='fit_end' with save_path=... (a plain copy "
                "with the gathered weights is decomposed and saved). HINT: apply_at='fit_end', or strategy='ddp' to "
                "fine-tune the factors."
            )
        if save_path is None:
            raise ValueError(
                "TensorDecomposition under ModelParallelStrategy needs save_path=...: the sharded model keeps its "
                "layers, and the decomposed model is a plain copy with the gathered weights, written by rank zero "
                "at fit end. HINT: TensorDecomposition(save_path='decomposed.pt')."
            )
        return
    # DeepSpeedStrategy subclasses DDPStrategy: name it, or it would pass as plain DDP.
    sharded = strategy_is(strategy, "DeepSpeedStrategy", "FSDPStrategy")
    if sharded or spawn or not strategy_is(strategy, "SingleDeviceStrategy", "DDPStrategy"):
        raise ValueError(
            f"TensorDecomposition supports single-device training, strategy='ddp' and, at fit end, "
            f"ModelParallelStrategy (FSDP2, with save_path); got {type(strategy).__name__}"
            f"{' (spawn)' if spawn else ''}. Replacing layers changes the parameter set, which FSDP1 and DeepSpeed "
            "cannot follow, and ddp_spawn reloads the undecomposed weights into the parent process with "
            "strict=False. HINT: use strategy='ddp', or ModelParallelStrategy with fully_shard and save_path=..."
        )


def _save(model: nn.Module, path: str) -> None:
    """``torch.save`` the whole decomposed module (its class must be importable where it is loaded)."""
    save_atomically(model, path)


# Callbacks whose compression a factor chain would silently drop, by class name: the pytorch_lightning and
# the unified `lightning` twins are distinct classes with the same names.
_CONFLICTING_CALLBACKS = ("GradualPruning", "QuantizationAwareTraining")


def _layers_compressed_by(callback: Any, pl_module: nn.Module) -> set[int] | None:
    """``id`` of every module ``callback`` (pruning or QAT) selects, or ``None`` when it cannot be told."""
    try:
        if any(cls.__name__ == "GradualPruning" for cls in type(callback).__mro__):
            targets = select_parameters(
                pl_module, include=callback.include, exclude=callback.exclude, types=callback.types
            )
            return {id(t.module) for t in targets}
        chosen = select_modules(pl_module, include=callback.include, exclude=callback.exclude, types=callback.types)
        return {id(m) for _, m in chosen}
    except (AttributeError, TypeError, ValueError):
        return None


def _check_other_callbacks(trainer: Any, pl_module: nn.Module, candidates: list[tuple[str, nn.Module]]) -> None:
    """Refuse (before step 1) layers that pruning or QAT on the same trainer also compress, in any order.

    A factor chain is made of new float, dense layers: decomposing a pruned or quantization-aware layer
    would silently drop its zeros or its fake quantization while the run reports success.
    """
    for callback in trainer.callbacks:
        kind = next((c.__name__ for c in type(callback).__mro__ if c.__name__ in _CONFLICTING_CALLBACKS), None)
        if kind is None:
            continue
        theirs = _layers_compressed_by(callback, pl_module)
        shared = [n for n, m in candidates if theirs is None or id(m) in theirs]
        if shared:
            shown = shared if len(shared) <= 8 else [*shared[:8], f"... ({len(shared)} in all)"]
            raise ValueError(
                f"TensorDecomposition and {kind} on this trainer both select layer(s) {shown}: the factor "
                f"chains are new float, dense layers, so decomposing would silently undo {kind}'s "
                "compression. HINT: give the two disjoint layers (include/exclude), or decompose first "
                f"(a fit with TensorDecomposition alone, or apply_at early) and run {kind} in a second fit "
                "on the decomposed model."
            )


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_flops(model: nn.Module, example: Any) -> int:
    args, kwargs = as_call(example)
    return module_flops(model, *args, **kwargs).get("", 0)
