"""Knowledge-distillation losses as pure torch functions.

These are the *how* of :class:`~lightning_compress.KnowledgeDistillation`, and the explicit path for
users who prefer to compute the distillation loss inside their own ``training_step``:

- :func:`soft_target_kl`: Hinton et al. (2015) soft targets, ``T^2 * KL(softmax(t/T) || softmax(s/T))``.
  The ``T^2`` factor keeps the gradient magnitude independent of the temperature, so the mixing weight
  ``alpha`` means the same thing at every ``T``.
- :func:`logit_mse`: plain regression of the teacher's logits (Ba & Caruana 2014).
- :func:`feature_mse` with :func:`make_adapter`: FitNets (Romero et al. 2015) hints between intermediate
  layers, through a learned 1x1 convolution / linear map when the widths differ.
- :func:`distillation_loss`: ``(1 - alpha) * task + alpha * logit term``.
- :func:`top1_agreement`: share of rows where student and teacher pick the same class.

Every loss is computed in float32 (logits under bf16/fp16 autocast are upcast first): a softmax at a
high temperature in half precision loses most of the information the soft targets carry.

Example (your own ``training_step``; the teacher is kept off the module so it is neither trained nor
saved)::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.functional import distillation as D
    >>> student, teacher = nn.Linear(8, 4), nn.Linear(8, 4).requires_grad_(False).eval()
    >>> x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    >>> logits = student(x)
    >>> with torch.no_grad():
    ...     teacher_logits = teacher(x)
    >>> task = nn.functional.cross_entropy(logits, y)
    >>> loss = D.distillation_loss(task, logits, teacher_logits, alpha=0.5, temperature=4.0)
    >>> loss.backward()
    >>> bool(student.weight.grad.abs().sum() > 0)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LogitLoss = Literal["kl", "mse"]


def _flat_logits(logits: Tensor, dim: int) -> Tensor:
    # Classes on the last axis, every other axis (batch, sequence, pixels) becomes a row.
    if dim not in (-1, logits.dim() - 1):
        logits = logits.movedim(dim, -1)
    logits = logits.float()  # a no-op for float32
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


def check_compatible(student: Tensor, teacher: Tensor, what: str = "output") -> None:
    """Raise a ``ValueError`` unless ``student`` and ``teacher`` have the same shape.

    Example::

        >>> check_compatible(torch.zeros(2, 10), torch.zeros(2, 12))
        Traceback (most recent call last):
        ...
        ValueError: teacher output shape (2, 12) is incompatible with the student output shape (2, 10): logit losses compare them element by element. HINT: the teacher must predict the same classes as the student.
    """  # noqa: E501
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher {what} shape {tuple(teacher.shape)} is incompatible with the student {what} shape "
            f"{tuple(student.shape)}: logit losses compare them element by element. HINT: the teacher must "
            "predict the same classes as the student."
        )


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    dim: int = -1,
    scale: bool = True,
) -> Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(p_teacher^T || p_student^T)``, averaged over rows.

    Args:
        student_logits: unnormalised scores, classes along ``dim``.
        teacher_logits: same shape; treated as a constant (detached).
        temperature: ``T > 0``; both distributions are ``softmax(logits / T)``.
        dim: the class axis. Every other axis is a row (a sequence model's tokens each count once).
        scale: multiply by ``T^2`` (Hinton et al. 2015) so gradients keep their size as ``T`` changes.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> round(float(soft_target_kl(s, s, temperature=3.0)), 6)
        0.0
        >>> round(float(soft_target_kl(s, torch.tensor([[0.0, 2.0, -1.0]]), temperature=2.0)), 4)
        1.5892
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    check_compatible(student_logits, teacher_logits)
    s = _flat_logits(student_logits, dim) / temperature
    t = _flat_logits(teacher_logits.detach(), dim) / temperature
    loss = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return loss * temperature**2 if scale else loss


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error between student and (detached) teacher logits.

    Example::

        >>> float(logit_mse(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])))
        2.5
    """
    check_compatible(student_logits, teacher_logits)
    return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


def logit_loss(
    student_logits: Tensor, teacher_logits: Tensor, kind: LogitLoss = "kl", temperature: float = 1.0
) -> Tensor:
    """The logit-matching term: :func:`soft_target_kl` (``"kl"``) or :func:`logit_mse` (``"mse"``)."""
    if kind == "kl":
        return soft_target_kl(student_logits, teacher_logits, temperature)
    if kind == "mse":
        return logit_mse(student_logits, teacher_logits)
    raise ValueError(f"loss must be one of ['kl', 'mse'], got {kind!r}.")


def distillation_loss(
    task_loss: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 4.0,
    loss: LogitLoss = "kl",
) -> Tensor:
    """``(1 - alpha) * task_loss + alpha * logit_loss(student, teacher)``.

    Example::

        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
        >>> float(distillation_loss(torch.tensor(2.0), s, t, alpha=0.25))
        1.5
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    term = logit_loss(student_logits, teacher_logits, loss, temperature)
    return (1.0 - alpha) * task_loss + alpha * term


def feature_mse(student_feature: Tensor, teacher_feature: Tensor, adapter: nn.Module | None = None) -> Tensor:
    """FitNets hint loss: MSE between ``adapter(student_feature)`` and the (detached) teacher feature.

    Example::

        >>> s, t = torch.randn(4, 8), torch.randn(4, 16)
        >>> feature_mse(s, t, make_adapter(s.shape, t.shape)).shape
        torch.Size([])
    """
    mapped = student_feature if adapter is None else adapter(student_feature.to(_param_dtype(adapter)))
    if mapped.shape != teacher_feature.shape:
        raise ValueError(
            f"feature shapes differ after the adapter: student {tuple(mapped.shape)} vs teacher "
            f"{tuple(teacher_feature.shape)}."
        )
    return F.mse_loss(mapped.float(), teacher_feature.detach().float())


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module | None:
    """A learned map from a student feature to the teacher's width, or ``None`` if the shapes already match.

    See :func:`adapter_spec` for which axis is the width and which adapter maps it.

    Example::

        >>> make_adapter((2, 8, 4, 4), (2, 16, 4, 4))
        Conv2d(8, 16, kernel_size=(1, 1), stride=(1, 1), bias=False)
        >>> make_adapter((2, 8), (2, 8)) is None
        True
    """
    spec = adapter_spec(student_shape, teacher_shape)
    return None if spec is None else build_adapter(*spec)


def adapter_spec(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[str, int, int] | None:
    """``(kind, student width, teacher width)`` of the adapter between two feature shapes (``None``: equal).

    ``[N, D]`` features get a ``"linear"`` map; ``[N, C, ...spatial]`` features (Conv and BatchNorm
    outputs) a 1x1 convolution on axis 1, FitNets' regressor (``"conv1d"``/``"conv2d"``/``"conv3d"``).
    Rank-3 features are told apart by the axis that differs: ``[N, L, D]`` (a sequence, width last)
    gets a per-token ``"linear"``, ``[N, C, L]`` a ``"conv1d"``.

    Raises:
        ValueError: when the shapes differ in anything but the width (a spatial size, a length, the rank).

    Example::

        >>> adapter_spec((4, 10, 64), (4, 10, 128))
        ('linear', 64, 128)
        >>> adapter_spec((4, 32, 50), (4, 64, 50))
        ('conv1d', 32, 64)
    """
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if s == t:
        return None
    differing = [i for i in range(len(s)) if s[i] != t[i]] if len(s) == len(t) else []
    rank = len(s)
    if rank == 2 and differing == [1]:
        return "linear", s[1], t[1]
    if rank == 3 and differing == [2]:
        return "linear", s[2], t[2]
    if rank in (3, 4, 5) and differing == [1]:
        return f"conv{rank - 2}d", s[1], t[1]
    if rank not in (2, 3, 4, 5):
        raise ValueError(f"cannot build an adapter for a feature of rank {rank} (shape {s}).")
    raise ValueError(
        f"student feature {s} and teacher feature {t} differ in more than their width; an adapter can only "
        "map channels. HINT: pair layers with the same batch, spatial and sequence sizes."
    )


def build_adapter(kind: str, in_width: int, out_width: int) -> nn.Module:
    """The adapter of ``kind`` (see :func:`adapter_spec`) from ``in_width`` to ``out_width`` channels."""
    if kind == "linear":
        return nn.Linear(in_width, out_width, bias=False)
    layers = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
    if kind not in layers:
        raise ValueError(f"unknown adapter kind {kind!r}; one of {['linear', *layers]}.")
    return layers[kind](in_width, out_width, kernel_size=1, bias=False)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, dim: int = -1) -> Tensor:
    """Share of rows where student and teacher give the same arg-max class.

    Example::

        >>> student, teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [3.0, 0.0]])
        >>> float(top1_agreement(student, teacher))
        0.5
    """
    check_compatible(student_logits, teacher_logits)
    return (student_logits.argmax(dim) == teacher_logits.argmax(dim)).float().mean()


def select_output(output: Any, key: str | int | None = None) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output[key]``, ``output.key``, or a default.

    Without ``key``: a tensor is used as is; a mapping or object with ``logits`` gives those (Hugging
    Face outputs); a tuple or list gives its first element.

    Example::

        >>> select_output({"logits": torch.ones(1), "aux": 0}).tolist()
        [1.0]
        >>> select_output((torch.zeros(1), torch.ones(1)), key=1).tolist()
        [1.0]
    """
    if key is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping) and "logits" in output:
            return output["logits"]
        if hasattr(output, "logits"):
            return output.logits
        if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
            return output[0]
    elif isinstance(key, int) and isinstance(output, tuple | list):
        if key in range(-len(output), len(output)):
            return output[key]
    elif isinstance(key, str) and isinstance(output, Mapping):
        if key in output:
            return output[key]
    elif isinstance(key, str) and hasattr(output, key):
        return getattr(output, key)
    raise ValueError(
        f"cannot find the logits in a model output of type {type(output).__name__} with output_key={key!r}. "
        "HINT: set output_key to the dict key / attribute name / tuple index of the logits."
    )
