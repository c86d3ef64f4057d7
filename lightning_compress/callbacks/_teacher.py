"""Where a distillation teacher comes from: a module, a checkpoint path, or a snapshot of the student.

:class:`~lightning_compress.KnowledgeDistillation` accepts ``teacher`` as an ``nn.Module``, as the path
of a LightningModule checkpoint (loaded with ``teacher_class``, default the student's class), or as
``"self"`` (a frozen copy of the student taken at fit start). This module validates those forms and
turns each into a module; the callback decides *when*.
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

import torch
from torch import nn

from lightning_compress.functional.qat import finalize_

TeacherSpec = nn.Module | str

# Hook dicts of a module that may hold bound methods of callbacks (and through them the trainer).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def check_teacher_spec(teacher: Any, teacher_class: str | None) -> None:
    """Refuse a ``teacher`` / ``teacher_class`` pair that can never give a teacher (at construction).

    Raises:
        TypeError: ``teacher`` is neither a module nor a string.
        ValueError: a path that does not exist, or ``teacher_class`` without a checkpoint path.
    """
    if isinstance(teacher, str):
        if teacher != "self" and not os.path.isfile(teacher):
            raise ValueError(
                "teacher must be an nn.Module, 'self' or the path of a LightningModule checkpoint; "
                f"the file {teacher!r} does not exist."
            )
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, 'self' or a checkpoint path, got {type(teacher).__name__}.")
    if teacher_class is not None and not (isinstance(teacher, str) and teacher != "self"):
        raise ValueError("teacher_class only applies when teacher is a checkpoint path.")


def import_class(dotted: str) -> type:
    """The class called ``dotted`` (``"package.module.Class"``)."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"teacher_class {dotted!r} cannot be imported: {err}.") from err


def load_checkpoint_teacher(path: str, student_class: type, teacher_class: str | None = None) -> nn.Module:
    """``load_from_checkpoint`` of ``teacher_class`` (default: ``student_class``) on ``path``, on CPU."""
    cls = student_class if teacher_class is None else import_class(teacher_class)
    # Duck-typed: pytorch_lightning and lightning.pytorch define different LightningModule classes.
    if not (isinstance(cls, type) and callable(getattr(cls, "load_from_checkpoint", None))):
        raise ValueError(f"teacher_class must name a LightningModule subclass, got {cls!r}.")
    try:
        return cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure means "not a loadable teacher"; say which and why
        raise ValueError(
            f"teacher checkpoint {path!r} holds no module loadable with "
            f"{cls.__name__}.load_from_checkpoint: {type(err).__name__}: {err}. "
            "HINT: pass teacher_class='package.module.Class' when the teacher's class differs from the "
            "student's."
        ) from err


def check_not_shared(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that is the student or holds any of its parameters (it would be trained and saved)."""
    student_params = {id(p) for p in student.parameters()}
    if teacher is student or any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "the teacher shares parameters with the student (it is the student or one of its "
            "submodules), so it would be trained and saved with it. HINT: keep the teacher off the "
            "LightningModule; teacher='self' distills from a frozen copy of the student."
        )


def named_layers(model: nn.Module, names: list[str], who: str) -> dict[str, nn.Module]:
    """``{name: module}`` for ``names`` in ``model``; refuse names that do not exist, listing those that do."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        available = [n for n in modules if n]
        raise ValueError(
            f"features name {who} layer(s) {missing} that do not exist. {who.capitalize()} layers: {available}."
        )
    return {n: modules[n] for n in names}


def snapshot(student: nn.Module) -> nn.Module:
    """A float deep copy of the student without the hooks and ``training_step`` wrapper callbacks put on it.

    LightningModule's ``__getstate__`` leaves the trainer out. Hooks that callbacks put on the student
    are bound methods: deep-copying them would copy the callbacks (and their trainer). The memo hands the
    copy fresh hook dicts instead, keeping only torch's pruning reparametrisation, which is part of what
    the model computes.
    """
    memo: dict[int, Any] = {}
    for module in student.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if isinstance(hooks, dict):
                memo[id(hooks)] = type(hooks)(
                    (k, v) for k, v in hooks.items() if isinstance(v, torch.nn.utils.prune.BasePruningMethod)
                )
    wrapped = student.__dict__.pop("training_step", None)  # never copy a distillation wrapper
    try:
        teacher = copy.deepcopy(student, memo)
    finally:
        if wrapped is not None:
            student.training_step = wrapped  # type: ignore[method-assign]
    # With QuantizationAwareTraining on the same trainer the student's layers are already quantization-aware
    # (swapped in `setup`): the teacher is the float model (quantization-aware distillation), not a second
    # fake-quantized copy whose observers would keep moving.
    finalize_(teacher)
    return teacher
