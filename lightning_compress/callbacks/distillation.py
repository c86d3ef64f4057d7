"""KnowledgeDistillation: add a teacher-matching term to the loss the user's ``training_step`` returns.

*When* and *how much* (alpha, temperature, schedules) live here; the loss functions live in
:mod:`lightning_compress.functional.distillation`.

How the distillation term reaches the loss without any edit to the user's module
----------------------------------------------------------------------------------

A callback cannot replace the loss ``training_step`` returns, so something has to sit between the
two. The options, and why this one:

- Monkeypatching ``forward`` (PL 1.x quantization) breaks multi-input and keyword-argument models,
  and ``forward`` is also what ``validation_step`` and inference call.
- Adding a second ``backward`` of the KD term in ``on_before_backward``/``on_after_backward`` bypasses
  the precision plugin's grad scaler, fires DDP's gradient reduction twice, and must redo Lightning's
  accumulation scaling by hand.
- Wrapping the *instance's* ``training_step`` (chosen). Lightning calls ``training_step`` through
  ``getattr`` on the module (directly, or through DDP's forward redirection) inside the precision
  plugin's ``train_step_context``, so the wrapper runs exactly where the user's code runs: under
  autocast, inside DDP's forward, before Lightning divides the loss for gradient accumulation and
  before the one backward. The wrapper only adds to the returned loss (a tensor, or the ``"loss"``
  of a dict) and never touches ``forward``.

The teacher sees exactly what the student saw: a forward hook (``with_kwargs=True``) on the
LightningModule records the positional and keyword arguments and the output of the *first* call of
``self(...)`` inside ``training_step``; the wrapper then runs the teacher once on those arguments, under
``no_grad`` and the precision plugin's ``forward_context()``. Named layers' outputs for hint losses
are recorded the same way, by forward hooks active only during that first call (both recorders are
:class:`~lightning_compress.capture.CallRecorder`).

The teacher lives on the callback, never as an attribute of the LightningModule: it is not in the
module tree, so it is not in the optimizer, not in the student's checkpoint ``state_dict`` and not
wrapped by DDP (where it comes from: :mod:`lightning_compress.callbacks._teacher`). Hint adapters
(learned maps from student to teacher width, :mod:`lightning_compress.callbacks._hints`) also live on
the callback: they join the trainer's first optimizer as an extra param group, their gradients are
averaged across DDP ranks by hand (DDP does not know them), and their weights travel in the callback's
checkpoint state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lightning_compress._lightning_internals import refuse_unsupported_sharding, strategy_is
from lightning_compress._validation import check_choice, check_range
from lightning_compress.callbacks import _teacher
from lightning_compress.callbacks._consolidate import is_sharded
from lightning_compress.callbacks._hints import HintAdapters
from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.capture import CallRecorder
from lightning_compress.functional import distillation as distill
from lightning_compress.schedules import Schedule, ScheduleName, StepWindow, resolve_schedule

_MISSING = object()


def _check_temperature(argument: str, value: Any) -> float:
    return check_range(
        argument,
        value,
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        hint=" HINT: 1 is a plain softmax; Hinton et al. used 2-20.",
    )


class KnowledgeDistillation(CompressionCallback):
    """Train the model (the student) to also match a teacher, with no change to its LightningModule.

    The loss that ``training_step`` returns becomes::

        (1 - alpha) * task_loss + alpha * logit_loss + feature_weight * mean(feature losses)

    where ``logit_loss`` is ``T^2 * KL`` between temperature-softened distributions (``loss="kl"``,
    Hinton et al. 2015) or the MSE of the logits (``loss="mse"``), and the feature losses are FitNets
    hints between named layers through learned adapters when widths differ. The teacher runs once per
    training step, on exactly the arguments of the first ``self(...)`` call in ``training_step``.

    Under ``ModelParallelStrategy`` (FSDP2) the student is sharded as the user's ``configure_model`` says
    and the teacher is **replicated**: each process holds the whole frozen teacher and runs it on its own
    batch (it is not part of the LightningModule, so ``fully_shard`` never sees it). Hint adapters are
    replicated too, their gradients averaged over the processes.

    Args:
        teacher: an ``nn.Module`` (in YAML: a ``class_path``); a path to a LightningModule checkpoint
            (loaded with ``teacher_class``, default the student's own class, which restores its saved
            hyperparameters, e.g. a wider ``DigitsCNN``); or ``"self"``: a frozen copy of the student
            taken at fit start, so a pruning or quantization run can distill from its own uncompressed
            model (the copy is saved in this callback's checkpoint state, so a resumed run keeps it).
        alpha: weight of the logit term, in ``[0, 1]``; the task loss gets ``1 - alpha``. ``0`` turns the
            logit term off (hints only).
        temperature: softmax temperature ``T > 0`` of ``loss="kl"``.
        loss: ``"kl"`` (soft targets) or ``"mse"`` (logit regression).
        alpha_schedule: how ``alpha`` moves from ``initial_alpha`` to ``alpha`` over the window
            (``"constant"`` by default; any :class:`~lightning_compress.schedules.Schedule`).
        initial_alpha: ``alpha`` at ``start_step`` (default: ``alpha``).
        temperature_schedule: how ``temperature`` moves from ``initial_temperature`` to ``temperature``.
        initial_temperature: temperature at ``start_step`` (default: ``temperature``).
        start_step: first optimizer step of the schedule window (``trainer.global_step``).
        end_step: last step of the window (default: 75% of ``trainer.estimated_stepping_batches``).
        start_epoch: alternative to ``start_step``, in epochs.
        end_epoch: alternative to ``end_step``, in epochs.
        features: ``{student_layer: teacher_layer}`` module names for hint losses (``{}``: none).
        feature_weight: weight of the mean hint loss.
        teacher_class: dotted class path to load a checkpoint ``teacher`` with
            (e.g. ``"my_pkg.models.BigNet"``); default: the student's class.
        output_key: where the logits are in the model output when it is not a tensor: a dict key or
            attribute (``"logits"`` is found without it) or a tuple index (default: the first element).
        adapter_lr: learning rate of the hint adapters' param group (default: the first group's).
        log_agreement: run the teacher on validation batches too and log the top-1 agreement.
        seed: seed of the adapters' initialisation (identical on every process).
        name: distinguishes several ``KnowledgeDistillation`` callbacks (state key and metric names).

    Logged metrics: at the training steps Lightning writes to its loggers (``log_every_n_steps``),
    ``compress/distill_loss`` (the logit term before weighting),
    ``compress/task_loss``, ``compress/task_loss_share`` (``(1 - alpha) * task / total``),
    ``compress/alpha``, ``compress/temperature`` and, with hints, ``compress/feature_loss``; every
    validation epoch ``compress/teacher_agreement`` (share of validation samples where student and
    teacher agree on the top-1 class, a torchmetrics ``MeanMetric`` synchronised across processes).

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_compress import KnowledgeDistillation
        >>> from lightning_compress.demo import DigitsCNN
        >>> kd = KnowledgeDistillation(teacher=DigitsCNN(width=64), temperature=4.0, alpha=0.7)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[kd], logger=False, enable_checkpointing=False)
        >>> KnowledgeDistillation(teacher="self", alpha=70)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a number in [0, 1], got 70. HINT: a fraction, not a percentage (0.7, not 70).
    """

    report_title = "distillation"

    def __init__(
        self,
        teacher: nn.Module | str,
        *,
        alpha: float = 0.5,
        temperature: float = 4.0,
        loss: distill.LogitLoss = "kl",
        alpha_schedule: ScheduleName | Schedule = "constant",
        initial_alpha: float | None = None,
        temperature_schedule: ScheduleName | Schedule = "constant",
        initial_temperature: float | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        features: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        teacher_class: str | None = None,
        output_key: str | int | None = None,
        adapter_lr: float | None = None,
        log_agreement: bool = True,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        _teacher.check_teacher_spec(teacher, teacher_class)
        self.teacher_spec = teacher
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.initial_alpha = (
            self.alpha if initial_alpha is None else check_range("initial_alpha", initial_alpha, 0.0, 1.0)
        )
        self.temperature = _check_temperature("temperature", temperature)
        self.initial_temperature = (
            self.temperature
            if initial_temperature is None
            else _check_temperature("initial_temperature", initial_temperature)
        )
        self.loss = check_choice("loss", loss, ("kl", "mse"))
        self.alpha_schedule = resolve_schedule(alpha_schedule, "alpha_schedule")
        self.temperature_schedule = resolve_schedule(temperature_schedule, "temperature_schedule")
        self.window = StepWindow(start_step, end_step, start_epoch, end_epoch)
        features = dict(features or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in features.items()):
            raise ValueError(
                f"features must map student layer names to teacher layer names (strings), got {features!r}."
            )
        self.features = features
        self.feature_weight = check_range("feature_weight", feature_weight, 0.0, math.inf)
        if self.alpha == 0 and self.initial_alpha == 0 and not (self.features and self.feature_weight > 0):
            raise ValueError(
                "alpha=0 and no feature hints: nothing would be distilled. HINT: alpha in (0, 1], or "
                "give features={student_layer: teacher_layer}."
            )
        self.teacher_class = teacher_class
        if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, str | int)):
            raise ValueError(f"output_key must be a string, an integer or None, got {output_key!r}.")
        self.output_key = output_key
        if adapter_lr is not None:
            check_range("adapter_lr", adapter_lr, 0.0, math.inf, low_open=True)
        self.adapter_lr = adapter_lr
        self.log_agreement = log_agreement
        self.seed = seed
        self.hints = HintAdapters(seed=seed, lr=adapter_lr)

        # Runtime state.
        self._teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._student_layers: dict[str, nn.Module] = {}
        self._student_call = CallRecorder()
        self._teacher_call = CallRecorder()
        self._wrapped: pl.LightningModule | None = None
        self._previous_step: Any = _MISSING
        self._window: tuple[int, int] = (0, 1)
        self._pending_state: dict[str, Any] | None = None
        self._checked = False
        self._trainer: pl.Trainer | None = None
        self._metrics: dict[str, Any] = {}
        self._agreement = MeanMetric()
        self.teacher_forward_calls = 0  # counted for tests and the benchmark
        self.last_agreement: float | None = None  # top-1 agreement of the last validation epoch

    # ---------------------------------------------------------------- values on the schedule
    def alpha_at(self, step: int) -> float:
        """Scheduled ``alpha`` at optimizer step ``step``."""
        start, end = self._window
        return self.alpha_schedule(step, start=start, end=end, initial=self.initial_alpha, final=self.alpha)

    def temperature_at(self, step: int) -> float:
        """Scheduled temperature at optimizer step ``step``."""
        start, end = self._window
        return self.temperature_schedule(
            step, start=start, end=end, initial=self.initial_temperature, final=self.temperature
        )

    @property
    def teacher(self) -> nn.Module | None:
        """The (frozen) teacher module, once resolved."""
        return self._teacher

    @property
    def adapters(self) -> nn.ModuleDict:
        """The hint adapters, keyed by student layer name with ``"."`` replaced by ``"__"``."""
        return self.hints.modules

    # ---------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_unsupported_sharding(trainer.strategy, type(self).__name__)
        if self.teacher_spec == "self" and strategy_is(trainer.strategy, "ModelParallelStrategy"):
            raise ValueError(
                "teacher='self' is not supported under ModelParallelStrategy: the copy would be taken of the "
                "sharded student (DTensor parameters without FSDP's gathering), and the teacher must be whole "
                "on each process. HINT: pass a plain module (an instance of the model with the weights to "
                "distill from) or a checkpoint path as teacher."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation adds its term to the loss training_step returns, which manual "
                "optimization ignores. HINT: call lightning_compress.functional.distillation.distillation_loss "
                "before manual_backward."
            )
        if isinstance(self.teacher_spec, str) and self.teacher_spec != "self" and self._teacher is None:
            self._teacher = _teacher.load_checkpoint_teacher(self.teacher_spec, type(pl_module), self.teacher_class)
        if self._teacher is not None:
            _teacher.check_not_shared(self._teacher, pl_module)
        self._student_layers = _teacher.named_layers(pl_module, list(self.features), "student")
        # "self": the teacher is a copy of the student, so its layer names are the student's.
        _teacher.named_layers(self._teacher or pl_module, list(self.features.values()), "teacher")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called after `setup` and after the model weights were restored; applied in on_fit_start.
        self._pending_state = state_dict

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.hints.state()
        if self.teacher_spec == "self" and self._teacher is not None:
            # The snapshot is the teacher: without it a resumed run would distill from resumed weights.
            state["teacher"] = {k: v.detach().cpu() for k, v in self._teacher.state_dict().items()}
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._window = self.window.resolve(trainer)
        state, self._pending_state = self._pending_state, None
        if self.teacher_spec == "self":
            # After DDP's initial broadcast, so every process copies the same weights.
            self._teacher = _teacher.snapshot(pl_module)
            if state is not None and "teacher" in state:
                self._teacher.load_state_dict(state["teacher"])
        assert self._teacher is not None
        teacher = trainer.precision_plugin.convert_module(self._teacher)  # bf16-true etc.: the student's dtype
        self._teacher = teacher.to(pl_module.device).eval().requires_grad_(False)
        if trainer.optimizers:
            self.hints.optimizer = trainer.optimizers[0]
        self.hints.separate = is_sharded(pl_module)  # FSDP2: the adapters get their own optimizer
        self.hints.restore(state, pl_module.device)
        self._agreement = self._agreement.to(pl_module.device)
        self._install(pl_module)
        self._checked = False
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_state is not None:
            # ModelParallelStrategy restores callback state after on_fit_start (Lightning restores checkpoints
            # after that strategy's setup): the adapters and their optimizer state come back here instead.
            # (teacher='self', the other restored piece, is refused under that strategy.)
            self.hints.restore(self._pending_state, pl_module.device)
            self._pending_state = None
        super().on_train_start(trainer, pl_module)

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        assert self._teacher is not None
        self._student_call.attach(pl_module)
        teacher_layers = _teacher.named_layers(self._teacher, list(self.features.values()), "teacher")
        for student_name, teacher_name in self.features.items():
            # Both recorders key the pair by the student layer's name.
            self._student_call.attach_layer(self._student_layers[student_name], student_name)
            self._teacher_call.attach_layer(teacher_layers[teacher_name], student_name)
        # An attribute on the instance shadows the class's method for this object only; Lightning looks
        # `training_step` up with getattr at every step (also through DDP's redirection). One may already be
        # there (Lightning's torch.compile support puts the compiled training_step there): wrap it, and put
        # it back in `teardown`.
        self._previous_step = pl_module.__dict__.get("training_step", _MISSING)
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distilled_step(pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _uninstall(self) -> None:
        self._student_call.detach()
        self._teacher_call.detach()
        if self._wrapped is not None:
            if self._previous_step is _MISSING:
                self._wrapped.__dict__.pop("training_step", None)
            else:
                self._wrapped.training_step = self._previous_step  # type: ignore[method-assign]
            self._wrapped, self._previous_step = None, _MISSING

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before any callback's on_fit_end: the model other callbacks save or export there (QAT's int8 copy,
        # the report's compact file) must be the user's own, without the training_step wrapper (a closure
        # that cannot be pickled).
        self._uninstall()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        super().on_fit_end(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        self._student_call.clear()
        self._teacher_call.clear()
        self._trainer = None
        # The adapters' param group stays in the optimizer: a `trainer.save_checkpoint` after fit must save
        # the optimizer state that the callback state (adapter shapes) will rebuild on resume. A new fit
        # gets new optimizers from configure_optimizers anyway.
        super().teardown(trainer, pl_module, stage)

    # ---------------------------------------------------------------- the training step
    def _distilled_step(self, pl_module: pl.LightningModule, original: Any, *args: Any, **kwargs: Any) -> Any:
        self._student_call.arm()
        try:
            output = original(*args, **kwargs)
        finally:
            self._student_call.disarm()
        if output is None:
            self._student_call.clear()
            return output  # the user skipped this batch
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            raise TypeError(
                "KnowledgeDistillation needs training_step to return a loss tensor or a dict with 'loss', "
                f"got {type(output).__name__}."
            )
        if not self._student_call.seen:
            raise RuntimeError(
                "training_step never called the LightningModule, so there is no student output to distill. "
                "KnowledgeDistillation matches the output of the first `self(...)` call in training_step "
                "(calls of `self.forward(...)` or of submodules bypass forward hooks). HINT: call `self(x)`, "
                "or compute the loss yourself with lightning_compress.functional.distillation."
            )
        total = self._add_distillation(pl_module, loss)
        return {**output, "loss": total} if isinstance(output, Mapping) else total

    def _run_teacher(self) -> None:
        """Run the teacher on the recorded student call; its output and hint layers land in ``_teacher_call``."""
        assert self._teacher is not None and self._trainer is not None
        args, kwargs = self._student_call.args or (), self._student_call.kwargs
        self._teacher_call.arm()
        try:
            # Inside training_step autocast is already active; the explicit context keeps the teacher under
            # the trainer's precision when it runs from other hooks (validation agreement) too.
            with torch.no_grad(), self._trainer.precision_plugin.forward_context():
                output = self._teacher(*args, **kwargs)
        except Exception as err:
            if self._checked:
                raise
            raise RuntimeError(
                f"the teacher ({type(self._teacher).__name__}) failed on the arguments of the student's "
                f"forward ({_describe(args, kwargs)}): {type(err).__name__}: {err}. HINT: the teacher must "
                "accept the same inputs as the student."
            ) from err
        finally:
            self._teacher_call.disarm()
        self._teacher_call.output = output
        self.teacher_forward_calls += 1

    def _add_distillation(self, pl_module: pl.LightningModule, task_loss: Tensor) -> Tensor:
        assert self._trainer is not None
        self._run_teacher()
        student_logits = distill.select_output(self._student_call.output, self.output_key)
        teacher_logits = distill.select_output(self._teacher_call.output, self.output_key)
        if not self._checked:
            self._check_first_step(pl_module.device, student_logits, teacher_logits)
        step = self._trainer.global_step
        alpha, temperature = self.alpha_at(step), self.temperature_at(step)
        # Detached tensors, not floats: `float()` would wait for the accelerator at every step.
        metrics: dict[str, Any] = {"alpha": alpha, "temperature": temperature}
        total = task_loss * (1.0 - alpha) if alpha > 0 else task_loss
        if alpha > 0:
            term = distill.logit_loss(student_logits, teacher_logits, self.loss, temperature)
            total = total + alpha * term
            metrics["distill_loss"] = term.detach()
        if self.features and self.feature_weight > 0:
            hints = [
                distill.feature_mse(
                    self._feature(self._student_call, s), self._feature(self._teacher_call, s), self.hints.get(s)
                )
                for s in self.features
            ]
            feature_loss = torch.stack(hints).mean()
            total = total + self.feature_weight * feature_loss
            metrics["feature_loss"] = feature_loss.detach()
        metrics["task_loss"] = task_loss.detach()
        metrics["total_loss"] = total.detach()  # turned into task_loss_share when logged
        self._metrics = metrics
        self._student_call.clear()
        self._teacher_call.clear()
        return total

    @staticmethod
    def _feature(recorder: CallRecorder, student_layer: str) -> Tensor:
        # A layer may return a tuple (an RNN, an attention block): its first tensor is the hint.
        return distill.select_output(recorder.layer_outputs[student_layer])

    def _check_first_step(self, device: torch.device, student_logits: Tensor, teacher_logits: Tensor) -> None:
        # Runs on the first step, after both forwards and before any backward or optimizer step.
        if self.alpha > 0 or self.initial_alpha > 0:
            distill.check_compatible(student_logits, teacher_logits)
        missing = [s for s in self.features if s not in self._student_call.layer_outputs]
        missing += [t for s, t in self.features.items() if s not in self._teacher_call.layer_outputs]
        if missing:
            raise ValueError(f"feature layer(s) {missing} were not called in the forward pass, so they give no hint.")
        shapes: dict[str, tuple[str, int, int]] = {}
        for s in self.features:
            s_shape = self._feature(self._student_call, s).shape
            t_shape = self._feature(self._teacher_call, s).shape
            try:
                spec = distill.adapter_spec(s_shape, t_shape)
            except ValueError as err:
                raise ValueError(f"features[{s!r}] -> {self.features[s]!r}: {err}") from err
            if spec is not None:
                shapes[s] = spec
        self.hints.check_or_build(shapes, device)
        self._checked = True

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # DDP averages the student's gradients; the adapters are outside it, so average theirs here.
        if optimizer is self.hints.optimizer:
            self.hints.average_gradients(trainer.world_size)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._metrics:
            # `pl_module.log` has a per-value cost that is noticeable on a small model's step: send the values
            # only at the steps where Lightning writes to its loggers (`log_every_n_steps`); callback_metrics
            # (ModelCheckpoint, EarlyStopping) keep the last written values in between.
            self.log_metrics(pl_module, self._loggable(), changed=False)

    def _loggable(self) -> dict[str, Any]:
        metrics = dict(self._metrics)
        metrics["task_loss_share"] = (1.0 - metrics["alpha"]) * metrics["task_loss"] / metrics.pop("total_loss")
        return metrics

    # ---------------------------------------------------------------- validation: teacher agreement
    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.log_agreement and self._wrapped is not None:
            self._student_call.arm()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._student_call.disarm()
        if not (self.log_agreement and self._student_call.seen):
            return
        # Outside validation_step: _run_teacher enters the precision context itself.
        self._run_teacher()
        student = distill.select_output(self._student_call.output, self.output_key).detach()
        teacher = distill.select_output(self._teacher_call.output, self.output_key)
        if student.shape == teacher.shape:
            rows = student.argmax(-1) == teacher.argmax(-1)
            self._agreement.update(rows.float().flatten())
        self._student_call.clear()
        self._teacher_call.clear()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._agreement.update_count:
            value = self._agreement.compute()  # synchronised across processes by torchmetrics
            pl_module.log(self.metric("teacher_agreement"), value, on_step=False, on_epoch=True, batch_size=1)
            self.last_agreement = float(value)
        self._agreement.reset()

    # ---------------------------------------------------------------- report
    @override
    def report_section(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        teacher = self._teacher
        n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
        n_student = sum(p.numel() for p in pl_module.parameters())
        section: dict[str, Any] = {
            "teacher": self.teacher_spec if isinstance(self.teacher_spec, str) else type(self.teacher_spec).__name__,
            "teacher_params": n_teacher,
            "student_params": n_student,
            "student/teacher params": round(n_student / n_teacher, 4) if n_teacher else None,
            "loss": self.loss,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "teacher_forward_calls": self.teacher_forward_calls,
        }
        if self.last_agreement is not None:
            section["teacher_agreement"] = round(self.last_agreement, 6)
        last = self._loggable() if self._metrics else {}
        for key in ("distill_loss", "task_loss_share", "feature_loss"):
            if key in last:
                section[key] = round(float(last[key]), 6)
        if self.hints.shapes:
            section["hints"] = [
                {"student": s, "teacher": self.features[s], "adapter": f"{k} {i}->{o}"}
                for s, (k, i, o) in sorted(self.hints.shapes.items())
            ]
        return section


def _describe(args: tuple, kwargs: dict) -> str:
    def one(value: Any) -> str:
        return f"Tensor{tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])
