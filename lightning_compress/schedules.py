"""Value-of-step schedules shared by every callback.

A schedule is a *shape*: it maps the progress through a ``[start_step, end_step]`` window to the
fraction of the way travelled from an ``initial`` to a ``final`` value. Callbacks own the window and
the two values (e.g. ``GradualPruning`` goes from 0 to ``target_sparsity``), so one schedule object
can drive sparsity, a distillation weight or a temperature alike.

Schedules count ``trainer.global_step`` (optimizer steps): Lightning already accounts for gradient
accumulation there and saves/restores it with checkpoints, so a resumed run continues exactly where
it stopped. Epoch arguments are sugar, converted with :func:`steps_per_epoch`.

Every schedule is a small frozen dataclass, so it can be written in YAML as a name (``"cubic"``) or
as ``class_path: lightning_compress.schedules.Exponential`` with ``init_args``.

Example::

    >>> from lightning_compress.schedules import Cubic, resolve_schedule
    >>> cubic = Cubic()
    >>> [round(cubic(step, start=0, end=100, initial=0.0, final=0.9), 3) for step in (0, 50, 100, 200)]
    [0.0, 0.787, 0.9, 0.9]
    >>> resolve_schedule("linear")(50, start=0, end=100, initial=0.0, final=1.0)
    0.5
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lightning_compress._validation import check_step, is_number

if TYPE_CHECKING:
    import pytorch_lightning as pl

ScheduleName = Literal["cubic", "linear", "exponential", "constant", "one_shot"]


class Schedule(ABC):
    """Base class: a monotone shape on ``[0, 1]`` evaluated at a training step."""

    @abstractmethod
    def fraction(self, progress: float) -> float:
        """Fraction of the way from ``initial`` to ``final`` at ``progress`` in ``[0, 1]``."""

    def __call__(self, step: int, *, start: int, end: int, initial: float, final: float) -> float:
        """Value at ``step``: ``initial`` before ``start``, ``final`` from ``end`` on."""
        if step < start:
            return initial
        progress = 1.0 if step >= end or end <= start else (step - start) / (end - start)
        return initial + (final - initial) * self.fraction(progress)


@dataclass(frozen=True)
class Polynomial(Schedule):
    """``1 - (1 - p)^power``: fast change early, gentle at the end (power 3 is Zhu & Gupta's AGP)."""

    power: float = 3.0

    def __post_init__(self) -> None:
        if not self.power > 0:
            raise ValueError(f"Polynomial power must be > 0, got {self.power!r}.")

    def fraction(self, progress: float) -> float:  # noqa: D102
        return 1.0 - (1.0 - progress) ** self.power


@dataclass(frozen=True)
class Cubic(Polynomial):
    """Zhu & Gupta (2017) cubic schedule: ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3``."""

    power: float = 3.0


@dataclass(frozen=True)
class Linear(Schedule):
    """Constant rate from ``initial`` to ``final``."""

    def fraction(self, progress: float) -> float:  # noqa: D102
        return progress


@dataclass(frozen=True)
class Exponential(Schedule):
    """``(1 - e^(-rate p)) / (1 - e^(-rate))``: front-loaded, larger ``rate`` front-loads more."""

    rate: float = 5.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"Exponential rate must be > 0, got {self.rate!r}.")

    def fraction(self, progress: float) -> float:  # noqa: D102
        return (1.0 - math.exp(-self.rate * progress)) / (1.0 - math.exp(-self.rate))


@dataclass(frozen=True)
class OneShot(Schedule):
    """Jump to ``final`` at ``start`` (``initial`` before it)."""

    def fraction(self, progress: float) -> float:  # noqa: D102
        return 1.0


@dataclass(frozen=True)
class Constant(Schedule):
    """``final`` at every step, before ``start`` included."""

    def fraction(self, progress: float) -> float:  # noqa: D102
        return 1.0

    def __call__(self, step: int, *, start: int, end: int, initial: float, final: float) -> float:  # noqa: D102
        return final


_BY_NAME: dict[str, type[Schedule]] = {
    "cubic": Cubic,
    "linear": Linear,
    "exponential": Exponential,
    "constant": Constant,
    "one_shot": OneShot,
}


def resolve_schedule(schedule: str | Schedule, argument: str = "schedule") -> Schedule:
    """Turn a schedule name or object into a :class:`Schedule`, naming ``argument`` in errors.

    Example::

        >>> resolve_schedule("cubic")
        Cubic(power=3.0)
        >>> resolve_schedule("cosine")
        Traceback (most recent call last):
        ...
        ValueError: schedule must be one of ['constant', 'cubic', 'exponential', 'linear', 'one_shot'] or a lightning_compress.schedules.Schedule, got 'cosine'.
    """  # noqa: E501
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule.lower() in _BY_NAME:
        return _BY_NAME[schedule.lower()]()
    raise ValueError(
        f"{argument} must be one of {sorted(_BY_NAME)} or a lightning_compress.schedules.Schedule, got {schedule!r}."
    )


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch, as Lightning estimates them (accumulation included).

    Raises:
        ValueError: when the trainer has no finite epoch length (``max_epochs=-1`` with
            ``max_steps``), so an epoch argument cannot be turned into steps.
    """
    total = trainer.estimated_stepping_batches
    epochs = trainer.max_epochs
    if not math.isfinite(total) or epochs is None or epochs < 1:
        raise ValueError(
            "Epoch arguments need a finite `Trainer(max_epochs=...)`; this trainer has "
            f"max_epochs={epochs!r}. HINT: give the step arguments (start_step/end_step) instead."
        )
    # estimated_stepping_batches is min(max_steps, epochs * steps/epoch); with a max_steps cap this
    # underestimates the epoch length, so prefer the dataloader length when it is known.
    num_batches = trainer.num_training_batches
    if isinstance(num_batches, int) and num_batches > 0:
        return max(1, math.ceil(num_batches / trainer.accumulate_grad_batches))
    return max(1, int(total) // epochs)


@dataclass(frozen=True)
class StepWindow:
    """The optimizer steps ``[start, end)`` over which a callback's value moves, given in steps or epochs.

    Every time-windowed callback (pruning, distillation) validates its window arguments here, in its
    constructor, and resolves them against the trainer in ``on_fit_start`` (epochs need the trainer to
    become steps). The default end is ``default_end_fraction`` of ``trainer.estimated_stepping_batches``,
    leaving the rest of training to recover at the final value.

    Example::

        >>> StepWindow(start_step=10, end_step=100)
        StepWindow(start_step=10, end_step=100, start_epoch=None, end_epoch=None)
        >>> StepWindow(start_step=5, end_step=5)
        Traceback (most recent call last):
        ...
        ValueError: end_step must be > start_step, got start_step=5 and end_step=5.
        >>> StepWindow(start_epoch=-3)
        Traceback (most recent call last):
        ...
        ValueError: start_epoch must be a non-negative number of epochs, got -3.
    """

    start_step: int = 0
    end_step: int | None = None
    start_epoch: float | None = None
    end_epoch: float | None = None

    def __post_init__(self) -> None:
        check_step("start_step", self.start_step)
        check_step("end_step", self.end_step, optional=True)
        for argument, value in (("start_epoch", self.start_epoch), ("end_epoch", self.end_epoch)):
            if value is not None and not is_number(value, 0.0, math.inf):
                raise ValueError(f"{argument} must be a non-negative number of epochs, got {value!r}.")
        if self.start_epoch is not None and self.start_step != 0:
            raise ValueError(
                f"give start_step or start_epoch, not both; got start_step={self.start_step} and "
                f"start_epoch={self.start_epoch}."
            )
        if self.end_epoch is not None and self.end_step is not None:
            raise ValueError(
                f"give end_step or end_epoch, not both; got end_step={self.end_step} and end_epoch={self.end_epoch}."
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(
                f"end_step must be > start_step, got start_step={self.start_step} and end_step={self.end_step}."
            )
        if self.start_epoch is not None and self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ValueError(
                f"end_epoch must be > start_epoch, got start_epoch={self.start_epoch} and end_epoch={self.end_epoch}."
            )

    def resolve(self, trainer: pl.Trainer, default_end_fraction: float = 0.75) -> tuple[int, int]:
        """``(start, end)`` in optimizer steps for ``trainer``, epoch arguments converted."""
        start = self.start_step
        if self.start_epoch is not None:
            start = round(self.start_epoch * steps_per_epoch(trainer))
        if self.end_epoch is not None:
            end = round(self.end_epoch * steps_per_epoch(trainer))
        elif self.end_step is not None:
            end = self.end_step
        else:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "end_step is required when the trainer's length is unknown (max_steps=-1 and max_epochs=-1)."
                )
            end = max(start + 1, int(total * default_end_fraction))
        if end <= start:
            raise ValueError(
                f"the window ends before it starts: start step {start}, end step {end} "
                f"(from {self}). HINT: an end_epoch rounds to a step; give end_step/start_step directly."
            )
        return start, end
