"""GradualPruning: masks weights toward a target sparsity on a schedule, inside ``Trainer.fit``.

*When* and *how much* live here; *how* a mask is computed lives in
:mod:`lightning_compress.functional.pruning`.

How masks are kept without a per-forward cost (no reparametrisation, no forward hooks, so
``nn.MultiheadAttention``'s raw ``in_proj_weight`` and any multi-input model just work):

1. At an update step the new masks zero the weights **and** the matching entries of the optimizer
   state (momentum, Adam moments), so nothing remembered can revive a pruned weight.
2. ``on_before_optimizer_step`` zeroes the gradients of pruned weights after accumulation and
   before gradient clipping, so the clipping norm and the optimizer only see live weights.
3. A post-step hook on each optimizer re-applies the masks right after ``optimizer.step()``, which
   catches whatever an optimizer does regardless of gradients (decoupled weight decay, ...).

The model's parameters stay plain tensors with zeros in them: a checkpoint taken at any point loads
into a plain copy of the model with ``load_state_dict``. The masks themselves (and the schedule
position) live in the callback's checkpoint state, so ``fit(ckpt_path=...)`` resumes with identical
masks.

Sharded models (FSDP2: ``ModelParallelStrategy`` with ``fully_shard``, parameters are DTensors split by
rows): every rank keeps the masks of its own rows only and works on its local shards (weights, gradients,
optimizer state). Selections are exact collectives over the shards
(:mod:`lightning_compress.functional.distributed`: a global threshold needs only the global k-th value,
not the weights), so the masks equal those of one process on the full weights; nothing is broadcast,
because every weight lives on exactly one rank. The ``"random"`` criterion draws the full-shape random
tensor from the step-seeded generator on every rank and keeps its own rows. Structures whose groups would
span two ranks' rows are refused before step 1. Lightning saves callback state from rank zero only, so
under FSDP2 the checkpoint holds no masks: on resume each rank recomputes its masks from the exact zeros of
its restored shards (a pruned weight is exactly 0.0; a weight that trained to exactly 0.0 unpruned would
count as pruned from then on), at ``on_train_start``: that strategy restores callback state after
``on_fit_start``. Taylor scores accumulated since the last update are not checkpointed there
(accumulation restarts after a resume), and resuming inside the lottery-ticket rewind window is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import prune
from typing_extensions import override

from lightning_compress._lightning_internals import is_spawn, refuse_unsupported_sharding, strategy_is
from lightning_compress._validation import check_choice, check_int, check_range, check_step
from lightning_compress.callbacks._coupled import CoupledChannels
from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.capture import InputLog
from lightning_compress.functional import distributed as D
from lightning_compress.functional import pruning as F
from lightning_compress.functional import sparsegpt as SG
from lightning_compress.functional.activation_stats import InputNorms
from lightning_compress.functional.shrink import INSTALL_HINT, torch_pruning_available
from lightning_compress.functional.stats import count_nonzeros
from lightning_compress.schedules import OneShot, Schedule, ScheduleName, StepWindow, resolve_schedule
from lightning_compress.targets import (
    DEFAULT_PRUNABLE_TYPES,
    ParameterTarget,
    matches,
    refuse_partial_ties,
    select_parameters,
    validate_patterns,
)


class GradualPruning(CompressionCallback):
    """Prune weights gradually toward ``target_sparsity`` while the model trains.

    The schedule gives the *total* sparsity at each optimizer step (cubic by default, Zhu & Gupta
    2017), from 0 at ``start_step`` to ``target_sparsity`` at ``end_step``; masks are recomputed every
    ``update_every_n_steps`` steps and only ever grow.

    Args:
        target_sparsity: final fraction of zero weights, in ``[0, 1)``. Default 0.9, or ``1 - N/M`` for
            an N:M structure (a smaller value converts only that share of the N:M runs).
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"one_shot"``, ``"constant"`` or a
            :class:`~lightning_compress.schedules.Schedule`.
        start_step: optimizer step at which pruning starts (``trainer.global_step``).
        end_step: step at which ``target_sparsity`` is reached. Default: 75% of
            ``trainer.estimated_stepping_batches``, leaving the rest to recover.
        start_epoch: alternative to ``start_step``, in epochs (fractions allowed).
        end_epoch: alternative to ``end_step``, in epochs.
        update_every_n_steps: optimizer steps between mask updates.
        criterion: ``"magnitude"`` (|w|), ``"random"``, ``"taylor"`` (first-order Taylor |w * grad|
            accumulated between updates; magnitude until gradients have been seen) or ``"wanda"``
            (|w| times the L2 norm of its input feature over the training inputs seen since the last
            update, Sun et al. 2023; forward pre-hooks on the pruned layers, summed across DDP ranks;
            magnitude until inputs have been seen) or ``"sparsegpt"`` (one-shot SparseGPT-style reconstruction,
            Frantar & Alistarh 2023: masks chosen and surviving weights updated so that each layer's outputs
            on recorded training inputs change least; :mod:`lightning_compress.functional.sparsegpt`). With
            ``"sparsegpt"``: ``schedule="one_shot"``, ``scope="layer"``, structure ``"unstructured"`` or N:M,
            Linear / Hugging Face ``Conv1D`` layers only. From ``start_step`` the inputs of the next
            ``calibration_batches`` training forwards of the LightningModule are recorded; then every pruned
            layer is reconstructed at once (one forward pass over them per numbered block of the model) and
            the masks stay fixed for the rest of training.
        structure: ``"unstructured"``, ``"channels"`` (whole output channels by Ln norm), ``"heads"``
            (whole attention heads: q/k/v rows and output-projection columns as one group, see
            :mod:`lightning_compress.functional.heads`; always coupled), an N:M pattern such as ``"2:4"``
            (along the input dimension), or ``"block:RxC"`` such as ``"block:1x4"``.
        scope: ``"global"`` ranks all selected weights together (layers end with different
            sparsities); ``"layer"`` gives every layer the same sparsity.
        norm: the ``n`` of the Ln norm that scores a group of weights (channels, blocks, N:M runs).
        overrides: ``{pattern: sparsity}``; matching layers get their own final sparsity (layer scope). With
            ``criterion="sparsegpt"`` and N:M: ``1 - N/M`` or 0 (the layer is left exactly as it is).
        include: name patterns (glob or ``re:...``) of modules or parameters to prune; all by default.
        exclude: name patterns to leave dense (e.g. the classifier).
        types: module class names to consider.
        rewind_to_step: lottery-ticket rewinding: copy the weights at this step and, once the final
            mask is reached, reset the surviving weights to that copy.
        make_permanent: ``True`` (default) leaves plain parameters with zeros at fit end. ``False``
            also installs :mod:`torch.nn.utils.prune`'s reparametrisation (``weight_orig`` +
            ``weight_mask``) so the masks travel inside the model's ``state_dict``. Not with ``shrink``.
        coupled: with ``structure="channels"``, choose channels per group of coupled parameters (a conv, its
            BatchNorm, every conv writing into the same residual sum, the consumers' input columns; a
            transformer's FFN units) and mask all of them, so the zeros are exactly what removal takes
            away. Default: ``shrink``. Needs ``example_input_array`` on the LightningModule and
            ``torch-pruning`` (``pip install lightning-compress[shrink]``). ``target_sparsity`` is then the
            share of the groups' channels removed. See :mod:`lightning_compress.functional.shrink`.
        shrink: physically remove the pruned channels (or heads) at fit end (or at ``shrink_at_step``): the
            model becomes a plain smaller model with the masked model's outputs (head counts rewritten).
            Implies ``coupled``.
        shrink_at_step: remove them at this optimizer step instead (at or after the end of the schedule), so
            the rest of training runs on the smaller model; optimizer state is sliced along.
        channel_multiple: with coupled groups, keep a multiple of this many channels in each group (rounded
            up; 8 suits CPU convolution kernels, which work on blocks of channels). Slightly less is pruned.
        seed: seed of the ``"random"`` criterion (identical on every process).
        calibration_batches: ``criterion="sparsegpt"``: training batches whose forward inputs calibrate it.
        name: distinguishes several ``GradualPruning`` callbacks (state key and ``compress/<name>/...``).

    Logged metrics (``pl_module.log``, every training step): ``compress/sparsity`` (measured zeros of the
    selected weights), ``compress/target_sparsity``, ``compress/nonzero_params``.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_compress import GradualPruning
        >>> pruning = GradualPruning(target_sparsity=0.8, structure="unstructured", exclude=["classifier"])
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], logger=False, enable_checkpointing=False)
        >>> GradualPruning(target_sparsity=90)
        Traceback (most recent call last):
        ...
        ValueError: target_sparsity must be a number in [0, 1), got 90. HINT: a fraction, not a percentage (0.9, not 90).
    """  # noqa: E501

    report_title = "pruning"

    def __init__(
        self,
        target_sparsity: float | None = None,
        *,
        schedule: ScheduleName | Schedule = "cubic",
        start_step: int = 0,
        end_step: int | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        update_every_n_steps: int = 10,
        criterion: F.Criterion = "magnitude",
        structure: str = "unstructured",
        scope: str = "global",
        norm: float = 2.0,
        overrides: dict[str, float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[str] = DEFAULT_PRUNABLE_TYPES,
        rewind_to_step: int | None = None,
        make_permanent: bool = True,
        coupled: bool | None = None,
        shrink: bool = False,
        shrink_at_step: int | None = None,
        channel_multiple: int = 1,
        seed: int = 0,
        calibration_batches: int = 16,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.structure = F.parse_structure(structure)
        self.coupled, self.shrink, self.shrink_at_step = _check_shrink(
            self.structure, coupled, shrink, shrink_at_step, make_permanent
        )
        self.channel_multiple = check_int("channel_multiple", channel_multiple, minimum=1)
        if self.channel_multiple > 1 and not self.coupled:
            raise ValueError(
                f"channel_multiple={channel_multiple} rounds the widths of coupled channel groups; it needs "
                "structure='channels' with coupled=True or shrink=True."
            )
        limit = self.structure.max_sparsity
        if target_sparsity is None:
            target_sparsity = limit if self.structure.kind == "n:m" else 0.9
        upper = limit + 1e-12 if self.structure.kind == "n:m" else 1.0
        self.target_sparsity = check_range("target_sparsity", target_sparsity, 0.0, upper, high_open=True)
        self.schedule = resolve_schedule(schedule)
        self.window = StepWindow(start_step, end_step, start_epoch, end_epoch)
        check_step("rewind_to_step", rewind_to_step, optional=True)
        check_int("update_every_n_steps", update_every_n_steps, minimum=1)
        check_choice("criterion", criterion, F.CRITERIA)
        check_choice("scope", scope, ("global", "layer"))
        check_range("norm", norm, 0.0, math.inf, low_open=True, hint=" HINT: the n of the Ln norm.")
        self.overrides = {
            str(p): check_range(f"overrides[{p!r}]", s, 0.0, upper, high_open=True)
            for p, s in (overrides or {}).items()
        }
        validate_patterns("overrides", list(self.overrides))
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.types = validate_patterns("types", types)
        if rewind_to_step is not None and end_step is not None and rewind_to_step >= end_step:
            raise ValueError(f"rewind_to_step must be < end_step, got {rewind_to_step} >= {end_step}.")
        self.update_every_n_steps = update_every_n_steps
        self.criterion = criterion
        self.scope = scope
        self.norm = float(norm)
        self.rewind_to_step = rewind_to_step
        self.make_permanent = make_permanent
        self.seed = seed
        self.calibration_batches = check_int("calibration_batches", calibration_batches, minimum=1)
        if criterion == "sparsegpt":
            _check_sparsegpt(self.structure, self.schedule, scope, rewind_to_step, self.target_sparsity, self.overrides)
        self._init_runtime_state()

    def _init_runtime_state(self) -> None:
        # Runtime state. Masks are keyed by full parameter name; True = keep.
        self._targets: list[ParameterTarget] = []
        self._masks: dict[str, torch.Tensor] = {}
        self._taylor: dict[str, torch.Tensor] = {}
        self._rewind: dict[str, torch.Tensor] = {}
        self._last_update_step = -1
        self._window: tuple[int, int] = (0, 1)
        self._pending_state: dict[str, Any] | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._params_of: dict[int, list[ParameterTarget]] = {}
        self._hot: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._metrics: dict[str, float] = {}
        self._model_id: int | None = None
        self._input_norms: InputNorms | None = None  # criterion="wanda": inputs seen since the last update
        self._calibration = InputLog()  # criterion="sparsegpt": forward inputs to reconstruct from
        self._forward_checked = False  # criterion="sparsegpt": whether a training batch has called forward
        self._coupled = CoupledChannels(self.structure.kind) if self.coupled else None
        self._coupled_targets: list[ParameterTarget] = []
        self._root_module: torch.nn.Module | None = None
        # FSDP2: the process group the pruned weights are row-sharded over (None: whole tensors here), and
        # per parameter this rank's first row and the full shape (for the random criterion).
        self._group: Any = None
        self._shards: dict[str, tuple[torch.Size, int]] = {}

    # ---------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_unsupported_sharding(trainer.strategy, type(self).__name__)
        if not self.make_permanent and strategy_is(trainer.strategy, "ModelParallelStrategy"):
            raise ValueError(
                "make_permanent=False cannot be used with ModelParallelStrategy: torch.nn.utils.prune's "
                "reparametrisation (weight_orig * weight_mask) does not work on sharded DTensor parameters. "
                "HINT: keep make_permanent=True; the weights keep their zeros in the (consolidated) state dict."
            )
        if not self.make_permanent and is_spawn(trainer.strategy):
            raise ValueError(
                "make_permanent=False cannot be used with a spawn strategy (ddp_spawn): the parent process "
                "reloads weights with strict=False and would silently drop the masked reparametrisation. "
                "HINT: keep make_permanent=True (weights come back with their zeros) or use strategy='ddp'."
            )
        self._undo_torch_reparametrisation(pl_module)
        # Heads touch only the attentions' layers: ties are checked on those once the head groups are known.
        heads = self.structure.kind == "heads"
        self._targets = select_parameters(
            pl_module, include=self.include, exclude=self.exclude, types=self.types, check_ties=not heads
        )
        for t in self._targets:
            F.check_fits(self.structure, t.name, t.out_first(t.parameter).shape)
        if self.criterion in ("wanda", "sparsegpt"):
            _check_inputs_observable(pl_module, self._targets, self.criterion)
        if self.criterion == "sparsegpt":
            SG.check_sparsegpt_targets(self._targets)
        if self._coupled is not None:
            if self._model_id != id(pl_module):
                self._coupled = CoupledChannels(self.structure.kind)
            if not self._coupled.shrunk:
                # Groups are found on the full-size model; a shrunk one only finishes training (no more updates).
                self._coupled_targets = self._coupled.setup(pl_module, self._targets)
            self._targets = self._coupled_targets
            if heads:
                refuse_partial_ties(pl_module, self._targets)
            self._root_module = pl_module
            self._coupled.register_resize_hook(pl_module)
        names = [t.name for t in self._targets]
        for pattern in self.overrides:
            if not any(matches(t.name, [pattern]) or matches(t.module_name, [pattern]) for t in self._targets):
                raise ValueError(f"overrides pattern {pattern!r} matches no pruned parameter. Pruned: {names}.")
        if self._model_id != id(pl_module) or set(self._masks) != set(names):
            # A different model (or a different selection): start from scratch. The same model in a
            # repeated fit keeps its masks, which only grow.
            self._masks, self._taylor, self._rewind, self._last_update_step = {}, {}, {}, -1
        self._model_id = id(pl_module)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called after `setup` and after the model weights were restored; validated in on_fit_start.
        self._pending_state = state_dict

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._group is not None:
            # Lightning writes callback state from rank zero only; rank zero's masks cover its own rows.
            # Each rank recomputes its masks from the zeros of its restored shards instead.
            return {"last_update_step": self._last_update_step, "masks_from_zeros": True}
        state = {
            "last_update_step": self._last_update_step,
            "masks": {k: v.cpu() for k, v in self._masks.items()},
            "taylor": {k: v.cpu() for k, v in self._taylor.items()},
            "rewind": {k: v.cpu() for k, v in self._rewind.items()},
        }
        if self._coupled is not None:
            state["shrink"] = self._coupled.state()
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = self.window.resolve(trainer)
        if self.rewind_to_step is not None and self.rewind_to_step >= self._window[1]:
            raise ValueError(f"rewind_to_step must be < end_step, got {self.rewind_to_step} >= {self._window[1]}.")
        if self.shrink_at_step is not None and self.shrink_at_step < self._window[1]:
            raise ValueError(
                f"shrink_at_step must be >= the end of the pruning schedule (end_step {self._window[1]}), got "
                f"{self.shrink_at_step}: channels are removed once the final masks are reached. HINT: set "
                f"end_step <= {self.shrink_at_step}, or a later shrink_at_step."
            )
        # After configure_model: the parameters are DTensors now if the model was sharded.
        self._group, self._shards = self._check_sharding()
        if self.criterion == "sparsegpt":
            SG.check_sparsegpt_targets(self._targets)  # now sharded weights are DTensors: refused
        if (
            self._group is not None
            and self._masks
            and any(
                D.local(t.parameter).shape != self._masks[t.name].shape for t in self._targets if t.name in self._masks
            )
        ):
            # Masks of another sharding (a repeated fit that resharded): the zeros of the weights are the truth.
            self._masks = self._masks_from_zeros()
        if self._pending_state is not None:
            self._restore(self._pending_state, trainer.global_step)
            self._pending_state = None
        self._params_of = {
            id(opt): [t for t in self._targets if any(t.parameter is p for g in opt.param_groups for p in g["params"])]
            for opt in trainer.optimizers
        }
        self._apply_masks(trainer)
        self._remove_hooks()
        self._hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
        if self.criterion == "wanda":
            self._input_norms = InputNorms({t.name: t.module for t in self._targets})
            self._input_norms.armed = False
        if self.criterion == "sparsegpt" and self._last_update_step < 0:
            self._calibration.attach(pl_module)
            self._forward_checked = False
        self._refresh_metrics(trainer.global_step)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_state is not None:
            # ModelParallelStrategy restores callback state after on_fit_start (Lightning restores checkpoints
            # after that strategy's setup): without this, a resumed run would train its first steps unmasked.
            self._restore(self._pending_state, trainer.global_step)
            self._pending_state = None
            self._apply_masks(trainer)
            self._refresh_metrics(trainer.global_step)
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (
            self._coupled is not None
            and self.shrink_at_step is not None
            and not self._coupled.shrunk
            and step >= self.shrink_at_step
            and batch_idx % trainer.accumulate_grad_batches == 0  # no half-accumulated gradient of cut weights
        ):
            self._shrink(trainer, pl_module)
        if step == self.rewind_to_step and not self._rewind and self._last_update_step < self._window[1]:
            self._rewind = {t.name: D.local(t.parameter).clone() for t in self._targets}
        changed = batch_idx == 0  # once per epoch at least, so every run starts with the keys present
        if self._is_update_step(step):
            self._update(trainer, step)
            changed = True
        if self.criterion == "sparsegpt" and self._last_update_step < 0:
            if step >= self._window[0]:
                self._calibration.arm()  # this batch's forward inputs: the reconstruction waits for them
            elif not self._forward_checked:
                self._calibration.arm(keep=False)  # a training_step that bypasses forward: told at its first batch
            self._forward_checked = True
        if self._input_norms is not None:
            # Training batches only (validation inputs are not what the next update is about), whatever the
            # modules' training flags: a model handed to fit in eval mode stays in eval mode.
            self._input_norms.armed = True
        self.log_metrics(pl_module, self._metrics, changed=changed)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._input_norms is not None:
            self._input_norms.armed = False
        if self._calibration.armed:
            self._remove_hooks()
            raise ValueError(
                "GradualPruning(criterion='sparsegpt') records the inputs of the LightningModule's forward to "
                f"replay them, but training batch {batch_idx} ran without calling it. HINT: call self(...) in "
                "training_step (not a submodule directly), or use criterion='wanda'."
            )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.criterion == "taylor" and self._last_update_step < self._window[1]:
            for t in self._params_of.get(id(optimizer), ()):
                param = t.parameter
                if param.grad is not None:
                    score = (D.local(param) * D.local(param.grad)).abs_()
                    acc = self._taylor.get(t.name)
                    self._taylor[t.name] = score if acc is None else acc.add_(score)
        for param, mask in self._hot.get(id(optimizer), ()):
            if param.grad is not None:
                D.local(param.grad).mul_(mask)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.criterion == "sparsegpt" and self._last_update_step < 0 and self._calibration.calls:
            rank_zero_warn(
                f"GradualPruning(criterion='sparsegpt'): training ended after {len(self._calibration.calls)} of "
                f"calibration_batches={self.calibration_batches} recorded batches; reconstructing from those."
            )
            self._update(trainer, trainer.global_step)
        self._remove_hooks()
        if self.shrink and self._coupled is not None and not self._coupled.shrunk:
            self._shrink(trainer, pl_module)
        if not self.make_permanent:
            for t in self._targets:
                if t.name in self._masks:
                    prune.custom_from_mask(t.module, t.param_name, self._masks[t.name])
        super().on_fit_end(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if self._coupled is not None:
            self._coupled.remove_hook()
        super().teardown(trainer, pl_module, stage)

    # ---------------------------------------------------------------- schedule
    def target_at(self, step: int) -> dict[str, float]:
        """Scheduled sparsity of every pruned parameter at ``step`` (overrides applied)."""
        start, end = self._window
        out = {}
        for t in self._targets:
            final = next(
                (s for p, s in self.overrides.items() if matches(t.name, [p]) or matches(t.module_name, [p])),
                self.target_sparsity,
            )
            out[t.name] = self.schedule(step, start=start, end=end, initial=0.0, final=final)
        return out

    def _is_update_step(self, step: int) -> bool:
        start, end = self._window
        if self._coupled is not None and self._coupled.shrunk:
            return False  # the groups were cut away: the final masks were reached before
        if step < start or step == self._last_update_step:
            return False
        if self.criterion == "sparsegpt":  # once, when the calibration inputs are there
            return self._last_update_step < 0 and len(self._calibration.calls) >= self.calibration_batches
        on_period = (step - start) % self.update_every_n_steps == 0 and step <= end
        return on_period or (step >= end and self._last_update_step < end)

    # ---------------------------------------------------------------- masks
    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int) -> None:
        # The per-step float masks (one float per weight) are rebuilt at the end: drop them while the scores
        # (one float per weight too) are alive, so an update needs no more than that on top of training.
        self._hot = {}
        if self.criterion == "sparsegpt":
            masks = self._reconstruct(trainer, step)
        else:
            scores = self._scores(step)
            masks = self._new_masks(trainer, scores, step)
            del scores  # one float per weight: free before the new float masks are kept
        # Sharded, each weight lives on one rank and the selection is an exact collective: nothing to agree on.
        self._masks = masks if self._group is not None else _broadcast_masks(trainer, masks)
        self._taylor = {}  # sums since this update (SparseGPT never scored them)
        self._last_update_step = step
        self._apply_masks(trainer, zero_optimizer_state=True)
        if step >= self._window[1] and self._rewind:
            self._rewind_weights(trainer)
        self._refresh_metrics(step)
        self._warn_if_short(step)

    def _reconstruct(self, trainer: pl.Trainer, step: int) -> dict[str, torch.Tensor]:
        """SparseGPT: weights updated in place from the recorded inputs; returns their masks (then frees them)."""
        calls, self._calibration.calls = self._calibration.calls, []
        self._calibration.remove()
        structure = SG.check_sparsegpt_arguments(self.structure, 128, 0.01)
        masks = SG.prune_targets_(
            trainer.lightning_module, self._targets, calls, self.target_at(step), structure, block_size=128, damp=0.01
        )
        # Every rank reconstructed from the same all-reduced Hessians; rank zero's weights rule out rounding drift.
        _broadcast_weights([t.parameter for t in self._targets])
        return masks

    def _scores(self, step: int) -> dict[str, torch.Tensor]:
        """Every pruned tensor's element scores, output channels first (HF Conv1D is stored [in, out]).

        Sharded, they are this rank's rows; the random criterion draws the full tensor and slices it.
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # The Taylor sums are consumed by this update: handed over, not kept, since the scores may be the
        # accumulators themselves and mask selection writes into the scores.
        taylor, self._taylor = self._taylor, {}
        norms: dict[str, torch.Tensor] = {}
        if self._input_norms is not None:
            self._input_norms.all_reduce_()  # every rank scores on the inputs all ranks saw
            norms = self._input_norms.norms()
            self._input_norms.reset()
        return {
            t.name: t.out_first(
                F.element_scores(
                    D.local(t.parameter),
                    self.criterion,
                    taylor=taylor.get(t.name),
                    generator=generator,
                    input_norms=norms.get(t.name),
                    groups=getattr(t.module, "groups", 1),
                    input_axis=1 - t.output_axis,
                    shard=self._shards.get(t.name),
                )
            )
            for t in self._targets
        }

    def _new_masks(self, trainer: pl.Trainer, scores: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The masks for ``step`` in each parameter's own layout (collectives over the shard group if sharded)."""
        group = self._group
        if self._coupled is not None:
            # Channels are chosen per coupled group; overrides match a group's root layer.
            plain = {t.name: t.out_first(scores[t.name]) for t in self._targets}
            level = {g.name: self._group_target(g.name, step) for g in self._coupled.groups}
            scope = "layer" if self.scope == "layer" or self.overrides else "global"
            masks = self._coupled.masks(
                trainer.lightning_module,
                plain,
                self._masks,
                level if scope == "layer" else self._group_target("", step),
                scope,
                self.norm,
                multiple=self.channel_multiple,
            )
            return {t.name: masks[t.name].contiguous() for t in self._targets}
        current = {t.name: t.out_first(self._masks[t.name]) for t in self._targets if t.name in self._masks}
        targets = self.target_at(step)
        if self.scope == "global":
            overridden = {
                t.name
                for t in self._targets
                if any(matches(t.name, [p]) or matches(t.module_name, [p]) for p in self.overrides)
            }
            shared = {k: v for k, v in scores.items() if k not in overridden}
            level = next((targets[k] for k in shared), 0.0)
            masks = (
                F.global_masks(shared, current, level, self.structure, self.norm, group=group, overwrite_scores=True)
                if shared
                else {}
            )
            alone = {k: scores[k] for k in overridden}
            masks.update(
                F.layer_masks(alone, current, targets, self.structure, self.norm, group=group, overwrite_scores=True)
            )
        else:
            masks = F.layer_masks(
                scores, current, targets, self.structure, self.norm, group=group, overwrite_scores=True
            )
        return {t.name: t.out_first(masks[t.name]).contiguous() for t in self._targets}

    def _warn_if_short(self, step: int) -> None:
        """After the schedule's end: say so when the one-group floor kept the target from being reached."""
        reached = self._metrics["channel_sparsity" if self._coupled is not None else "sparsity"]
        shortfall = self._metrics["target_sparsity"] - reached
        if step >= self._window[1] and shortfall > 0.01 and (self._coupled is not None or self._floor_reached()):
            rank_zero_warn(
                f"GradualPruning: reached sparsity {reached:.3f} of the target "
                f"{self._metrics['target_sparsity']:.3f}: every pruned tensor keeps at least one "
                f"{'weight' if self.structure.kind == 'unstructured' else 'group'} (a layer is never emptied), "
                "and too few are left to go further. HINT: prune more layers or lower target_sparsity."
            )

    def _floor_reached(self) -> bool:
        """Whether some pruned tensor is down to its last group, the floor that keeps layers from being emptied."""
        if self.structure.kind == "n:m":
            return False
        live = D.sum_ints(
            [
                int(F.to_groups(t.out_first(self._masks[t.name]), self.structure).any(dim=1).sum())
                for t in self._targets
                if t.name in self._masks
            ],
            self._group,
            self._targets[0].parameter.device if self._targets else None,
        )
        return any(n == 1 for n in live)

    def _apply_masks(self, trainer: pl.Trainer, zero_optimizer_state: bool = False) -> None:
        """Zero the pruned weights (at an update, also their optimizer state); refresh the per-step lists."""
        # Per optimizer: (parameter, mask in the parameter's dtype) pairs, so the two per-step hooks do one
        # multiply per tensor: a bool mask would be converted at every call, and masked_fill_ is slower
        # still (a one-off check; benchmarks/pruning_vs_modelpruning.py measures the callback's whole cost).
        self._hot = {}  # drop the previous float masks first: at most one set of them is alive
        dense = {t.name: self._masks[t.name].to(t.parameter.dtype) for t in self._targets if t.name in self._masks}
        self._hot = {
            key: [(t.parameter, dense[t.name]) for t in targets if t.name in dense]
            for key, targets in self._params_of.items()
        }
        for t in self._targets:
            mask = dense.get(t.name)
            if mask is None:
                continue
            D.local(t.parameter).mul_(mask)
            if zero_optimizer_state:
                for opt in trainer.optimizers:
                    for value in opt.state.get(t.parameter, {}).values():
                        # Sharded optimizer state (DTensor) is sharded like its parameter: mask the local rows.
                        if isinstance(value, torch.Tensor) and D.local(value).shape == mask.shape:
                            D.local(value).mul_(mask.to(value.dtype))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # `detach()` (inside D.local) shares storage and bypasses autograd: cheaper than entering no_grad.
        for param, mask in self._hot.get(id(optimizer), ()):
            D.local(param).mul_(mask)

    @torch.no_grad()
    def _rewind_weights(self, trainer: pl.Trainer) -> None:
        for t in self._targets:
            weight = D.local(t.parameter)
            weight.copy_(self._rewind[t.name].to(weight.device))
            for opt in trainer.optimizers:
                for value in opt.state.get(t.parameter, {}).values():
                    if isinstance(value, torch.Tensor) and D.local(value).shape == weight.shape:
                        D.local(value).zero_()
        self._rewind = {}
        self._apply_masks(trainer)

    def _refresh_metrics(self, step: int) -> None:
        params = [t.parameter for t in self._targets]
        total = sum(p.numel() for p in params)  # a DTensor's numel is the full tensor's
        nonzero = sum(count_nonzeros(params))  # sharded: one all-reduce (every rank is here)
        targets = self.target_at(step)
        self._metrics = {
            "sparsity": 1.0 - nonzero / total if total else 0.0,
            "target_sparsity": sum(targets[t.name] * t.parameter.numel() for t in self._targets) / max(total, 1),
            "nonzero_params": float(nonzero),
        }
        if self._coupled is not None:
            module = self._root_module
            groups = self._coupled.groups
            self._metrics["target_sparsity"] = sum(self._group_target(g.name, step) * g.size for g in groups) / max(
                sum(g.size for g in groups), 1
            )
            self._metrics["channel_sparsity"] = (
                self._coupled.channel_sparsity(module, self._masks) if module is not None else 0.0
            )

    def _group_target(self, group: str, step: int) -> float:
        """Scheduled share of channels removed from ``group`` (its root layer may match an override)."""
        start, end = self._window
        final = next((s for p, s in self.overrides.items() if group and matches(group, [p])), self.target_sparsity)
        return self.schedule(step, start=start, end=end, initial=0.0, final=final)

    def _shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Cut the masked channels away; slice masks, Taylor sums and optimizer state the same way."""
        assert self._coupled is not None

        def follow(name: str, old: torch.Tensor, new: torch.Tensor, cuts: list[tuple[int, torch.Tensor]]) -> None:
            def cut(value: torch.Tensor) -> torch.Tensor:
                for dim, kept in cuts:
                    value = value.index_select(dim, kept.to(value.device))
                return value.contiguous()

            for store in (self._masks, self._taylor, self._rewind):
                if name in store:
                    store[name] = cut(store[name])
            # The optimizer keeps its object (LR schedulers hold it): the parameter is swapped in its groups
            # and its state (momentum, Adam moments) sliced like the parameter, so nothing restarts.
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]
                state = opt.state.pop(old, None)
                if state is not None:
                    opt.state[new] = {
                        k: cut(v) if isinstance(v, torch.Tensor) and v.shape == old.shape else v
                        for k, v in state.items()
                    }

        self._coupled.shrink(trainer, pl_module, self._masks, follow)
        self._apply_masks(trainer)
        self._refresh_metrics(trainer.global_step)

    # ---------------------------------------------------------------- checkpoints
    def _restore(self, state: Mapping[str, Any], step: int) -> None:
        self._last_update_step = int(state.get("last_update_step", -1))
        if self._group is not None or state.get("masks_from_zeros"):
            # Sharded: rank zero's state holds no masks (see the module docstring); the zeros are exact.
            self._masks = self._masks_from_zeros() if self._last_update_step >= 0 else {}
            self._taylor, self._rewind = {}, {}
            start_rewind = self.rewind_to_step
            if start_rewind is not None and start_rewind < step and self._last_update_step < self._window[1]:
                raise ValueError(
                    f"Cannot resume lottery-ticket rewinding at step {step} of a sharded model: the weights "
                    f"copied at rewind_to_step={start_rewind} live on each rank and are not in the checkpoint "
                    "(Lightning saves callback state from rank zero only). HINT: resume from a checkpoint taken "
                    f"before step {start_rewind} or after end_step={self._window[1]}, or drop rewind_to_step."
                )
            return
        masks = state.get("masks", {})
        expected = {t.name: t.parameter for t in self._targets}
        problems = [f"{k} (not in the model)" for k in masks if k not in expected]
        problems += [
            f"{k} (mask {tuple(m.shape)} vs weight {tuple(expected[k].shape)})"
            for k, m in masks.items()
            if k in expected and m.shape != expected[k].shape
        ]
        if problems:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} masks do not fit the model: {', '.join(problems)}. "
                f"Pruned parameters of this model: {sorted(expected)}. HINT: resume with the same model and the "
                "same include/exclude/types."
            )
        self._masks = {k: m.to(expected[k].device, torch.bool) for k, m in masks.items()}
        self._taylor = {k: v.to(expected[k].device) for k, v in state.get("taylor", {}).items() if k in expected}
        self._rewind = {k: v.to(expected[k].device) for k, v in state.get("rewind", {}).items() if k in expected}
        self._last_update_step = int(state.get("last_update_step", -1))
        if self._coupled is not None and "shrink" in state:
            self._coupled.restore(state["shrink"])

    def _masks_from_zeros(self) -> dict[str, torch.Tensor]:
        """The masks of the local rows, read off the weights: a pruned weight is exactly 0.0."""
        return {t.name: D.local(t.parameter) != 0 for t in self._targets}

    def _check_sharding(self) -> tuple[Any, dict[str, tuple[torch.Size, int]]]:
        """The process group the pruned weights are row-sharded over, and each one's (full shape, first row).

        ``(None, {})`` when no pruned weight is a DTensor. Refuses, on every rank alike (the row counts of
        all ranks are gathered first), layouts and structures whose groups would span two ranks' rows.
        """
        params = {t.name: t.parameter for t in self._targets}
        sharded = [n for n, p in params.items() if D.is_dtensor(p)]
        if not sharded:
            return None, {}
        if self._coupled is not None:
            raise ValueError(
                "GradualPruning(coupled=True / shrink=True) traces the whole model to find coupled channels and "
                "removes them from every layer, which FSDP2's sharded parameters cannot follow. HINT: structure="
                "'channels' with coupled=False under ModelParallelStrategy, or shrink a consolidated copy after fit."
            )
        plain = [n for n in params if n not in sharded]
        if plain:
            raise ValueError(
                f"GradualPruning: some pruned parameters are sharded DTensors and some are plain tensors "
                f"({plain}); a global ranking over both would count the plain ones once per rank. "
                "HINT: call fully_shard on every module holding pruned weights (or on the root module), "
                "or exclude these."
            )
        groups = []
        for name, p in params.items():
            try:
                groups.append(D.row_sharded_group(p))
            except ValueError as err:
                raise ValueError(
                    f"GradualPruning supports parameters sharded by FSDP2's fully_shard; {name!r}: {err} "
                    "HINT: ModelParallelStrategy(tensor_parallel_size=1), with fully_shard in configure_model."
                ) from None
        group = groups[0]
        if any(g is not group for g in groups):
            raise ValueError("GradualPruning: the pruned parameters are sharded over different device meshes.")
        device = D.local(next(iter(params.values()))).device
        rows = D.gather_ints([D.local(params[t.name]).shape[0] for t in self._targets], group, device)
        rank = D.rank(group)
        shards = {}
        for i, t in enumerate(self._targets):
            full = params[t.name].shape
            counts = [r[i] for r in rows]
            shards[t.name] = (full, sum(counts[:rank]))
            self._check_shard_groups(t, full, counts)
        return group, shards

    def _check_shard_groups(self, target: ParameterTarget, full: torch.Size, counts: list[int]) -> None:
        kind = self.structure.kind
        split = sum(1 for c in counts if c) > 1
        if kind == "unstructured" or not split:
            return
        # Dim 0 of the stored weight is split; a group must lie within one rank's rows.
        if kind == "channels" and (target.output_axis != 0 or len(full) < 2):
            problem = "an output channel spans every rank's rows (the output dimension is not dim 0)"
        else:
            problem = ""
            for c in (c for c in counts if c):
                try:
                    F.check_fits(
                        self.structure, target.name, target.out_first(torch.empty(c, *full[1:], device="meta")).shape
                    )
                except ValueError:
                    problem = f"a {self.structure} group would span two ranks' rows"
                    break
        if problem:
            raise ValueError(
                f"GradualPruning cannot prune {target.name!r} with structure '{self.structure}' under FSDP2: "
                f"fully_shard splits its weight {tuple(full)} along dim 0 into {counts} rows per rank, and "
                f"{problem}. Accepted under FSDP2: 'unstructured'; 'channels' for weights stored "
                "[out, in, ...]; N:M and blocks whose groups fit inside every rank's rows. "
                f"HINT: exclude=[{target.module_name!r}], or structure='unstructured'."
            )

    def _undo_torch_reparametrisation(self, pl_module: pl.LightningModule) -> None:
        # A model finished with make_permanent=False carries torch.nn.utils.prune's weight_orig/weight_mask;
        # fold it back into plain weights and keep its mask, so training can continue from it.
        for module_name, module in pl_module.named_modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    param_name = hook._tensor_name
                    mask = getattr(module, param_name + "_mask").detach().bool().clone()
                    prune.remove(module, param_name)
                    full = f"{module_name}.{param_name}" if module_name else param_name
                    self._masks[full] = mask
                    self._model_id = id(pl_module)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._input_norms is not None:
            self._input_norms.remove()
            self._input_norms = None
        self._calibration.remove()

    @override
    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        start, end = self._window
        extra = {} if self._coupled is None else {"channel_sparsity": self._metrics.get("channel_sparsity")}
        if self._coupled is not None:
            extra["shrink"] = self._coupled.report()
        return {
            **extra,
            "target_sparsity": self.target_sparsity,
            "measured_sparsity": self._metrics.get("sparsity", 0.0),
            "structure": str(self.structure),
            "criterion": self.criterion,
            "scope": self.scope,
            "schedule": repr(self.schedule),
            "window_steps": f"{start}..{end}, every {self.update_every_n_steps}",
            "layers": [
                {
                    "parameter": t.name,
                    "shape": "x".join(map(str, t.parameter.shape)),
                    "sparsity": round(1.0 - nonzero / t.parameter.numel(), 4),
                }
                for t, nonzero in zip(self._targets, count_nonzeros([t.parameter for t in self._targets]), strict=True)
            ],
        }


def _broadcast_masks(trainer: pl.Trainer, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank zero's masks on every process.

    The computation is deterministic on identical weights and all-reduced gradients, but a tie broken
    differently by floating-point noise would desynchronise the ranks forever; one broadcast per
    update (not per step) rules that out.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return masks
    out = {}
    for name in sorted(masks):
        payload = masks[name].to(torch.uint8)
        dist.broadcast(payload, src=0)
        out[name] = payload.bool()
    return out


def _check_shrink(
    structure: F.Structure, coupled: bool | None, shrink: bool, shrink_at_step: int | None, make_permanent: bool
) -> tuple[bool, bool, int | None]:
    """Validate the coupled / shrink arguments; returns ``(coupled, shrink, shrink_at_step)``."""
    if not isinstance(shrink, bool):
        raise ValueError(f"shrink must be True or False, got {shrink!r}.")
    if coupled is not None and not isinstance(coupled, bool):
        raise ValueError(f"coupled must be True, False or None (= shrink), got {coupled!r}.")
    check_step("shrink_at_step", shrink_at_step, optional=True)
    if shrink_at_step is not None and not shrink:
        raise ValueError(f"shrink_at_step={shrink_at_step} needs shrink=True.")
    if structure.kind == "heads":
        if coupled is False:
            raise ValueError(
                "structure='heads' always masks a head's q/k/v rows and output columns together; coupled=False "
                "is not accepted. HINT: leave coupled unset."
            )
        coupled = True
    if coupled is None:
        coupled = shrink
    if (coupled or shrink) and structure.kind not in ("channels", "heads"):
        raise ValueError(
            f"{'shrink=True' if shrink else 'coupled=True'} needs structure='channels' or 'heads' (whole channels "
            f"or heads can be removed), got structure='{structure}': {structure.kind} zeros leave every channel "
            "in place. HINT: structure='channels' / 'heads', or shrink=False to keep the zeros."
        )
    if shrink and not coupled:
        raise ValueError(
            "shrink=True needs coupled=True: per-layer channel masks do not agree across a residual sum or "
            "with BatchNorm, so removing them would change the outputs. HINT: leave coupled unset."
        )
    if shrink and not make_permanent:
        raise ValueError(
            "make_permanent=False cannot be combined with shrink=True: the shrunk model has no pruned weights "
            "left to reparametrise (its state_dict is already a plain, smaller model). HINT: drop "
            "make_permanent=False."
        )
    if coupled and structure.kind == "channels" and not torch_pruning_available():
        raise ImportError(
            f"GradualPruning(structure='channels', {'shrink' if shrink else 'coupled'}=True) finds coupled "
            f"channels with torch-pruning, which is not installed. {INSTALL_HINT}"
        )
    return coupled, shrink, shrink_at_step


def _check_inputs_observable(model: torch.nn.Module, targets: Sequence[ParameterTarget], criterion: str) -> None:
    """Wanda and SparseGPT need each pruned layer's inputs: refuse weights whose layer's forward never runs."""
    read_directly = {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    blind = [
        t.name
        for t in targets
        if t.module_name in read_directly or (isinstance(t.module, nn.MultiheadAttention) and t.param_name != "weight")
    ]
    if blind:
        raise ValueError(
            f"criterion={criterion!r} needs the inputs of every pruned layer, but nn.MultiheadAttention reads {blind} "
            "directly (their layers' forward never runs, so no input can be observed). HINT: exclude them, "
            "e.g. exclude=['*.out_proj', '*.in_proj_weight'], or use criterion='magnitude'."
        )


def _check_sparsegpt(
    structure: F.Structure,
    schedule: Schedule,
    scope: str,
    rewind_to_step: int | None,
    target: float,
    overrides: Mapping[str, float],
) -> None:
    """The arguments ``criterion="sparsegpt"`` accepts (a one-shot, per-layer reconstruction)."""
    SG.check_sparsegpt_arguments(structure, 128, 0.01)
    usage = "HINT: GradualPruning(criterion='sparsegpt', schedule='one_shot', scope='layer', ...)."
    if not isinstance(schedule, OneShot):
        raise ValueError(
            f"criterion='sparsegpt' reconstructs the layers once, at their final sparsity; schedule must be "
            f"'one_shot', got {schedule!r}. {usage}"
        )
    if scope != "layer":
        raise ValueError(
            f"criterion='sparsegpt' gives every layer its own sparsity (set per layer with overrides); scope must "
            f"be 'layer', got {scope!r}. {usage}"
        )
    if rewind_to_step is not None:
        raise ValueError(
            f"criterion='sparsegpt' cannot be combined with rewind_to_step={rewind_to_step}: rewinding would "
            "throw away the reconstructed weights."
        )
    if structure.kind == "n:m" and abs(target - structure.max_sparsity) > 1e-9:
        raise ValueError(
            f"criterion='sparsegpt' with structure '{structure}' prunes every run of {structure.m}; "
            f"target_sparsity must be {structure.max_sparsity} (or unset), got {target}."
        )
    if structure.kind == "n:m":
        for pattern, share in overrides.items():
            SG.check_nm_share(f"criterion='sparsegpt': overrides[{pattern!r}]", share, structure)


def _broadcast_weights(params: Sequence[torch.Tensor]) -> None:
    """Rank zero's values of ``params`` on every process (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for param in params:
        dist.broadcast(param.data, src=0)
