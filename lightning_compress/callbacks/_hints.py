"""FitNets hint adapters of distillation: built once, trained in the user's optimizer, kept in checkpoints.

The adapters map a student feature to the teacher's width (see
:func:`lightning_compress.functional.distillation.adapter_spec`). They are not part of the student,
so three things DDP and Lightning do for the model's own parameters are done here by hand:

- they join the trainer's first optimizer as an extra param group (:meth:`HintAdapters.attach`),
  found again by identity after ``Optimizer.load_state_dict`` replaced the group dicts;
- their gradients are averaged across processes (:meth:`HintAdapters.average_gradients`);
- their shapes and weights travel in the callback's checkpoint state.

Under FSDP2 (a sharded student) the adapters get an optimizer of their own instead (same class, the first
group's settings), stepped right after the user's: a distributed checkpoint maps every parameter of the
user's optimizer to a name in the model (``get_optimizer_state_dict``), and the adapters have none there.
Their optimizer state then travels in the callback's checkpoint state too (identical on every rank, like
the adapters). The user's gradient clipping and LR scheduler do not reach them in that case.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress.functional import distillation as distill

AdapterShape = tuple[str, int, int]  # (kind, student width, teacher width)


def _key(student_layer: str) -> str:
    # ModuleDict keys cannot contain ".".
    return student_layer.replace(".", "__")


class HintAdapters:
    """The adapters of one distillation callback, keyed by student layer name.

    Args:
        seed: seed of the initialisation (identical adapters on every process).
        lr: learning rate of their param group (``None``: the first group's).
    """

    def __init__(self, seed: int = 0, lr: float | None = None) -> None:
        self.seed = seed
        self.lr = lr
        self.modules = nn.ModuleDict()
        self.shapes: dict[str, AdapterShape] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        # A sharded student (FSDP2): the adapters' own optimizer, stepped after `optimizer` (see module doc).
        self.separate = False
        self.own: torch.optim.Optimizer | None = None
        self._step_hook: torch.utils.hooks.RemovableHandle | None = None

    def get(self, student_layer: str) -> nn.Module | None:
        """The adapter of ``student_layer``, or ``None`` when its feature already has the teacher's width."""
        key = _key(student_layer)
        return self.modules[key] if key in self.modules else None  # noqa: SIM401 - ModuleDict has no get

    def build(self, shapes: dict[str, AdapterShape], device: torch.device, keep_weights: bool = False) -> None:
        """(Re)create the adapters for ``shapes`` on ``device`` and put them in the optimizer.

        With ``keep_weights`` the existing modules are only moved (a repeated ``fit`` continues training them).
        """
        self.detach()
        if not keep_weights:
            # A private generator: identical adapters on every process, and the global RNG stream (data order,
            # dropout) is the same with and without hints.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.modules = nn.ModuleDict(
                    {_key(s): distill.build_adapter(kind, i, o) for s, (kind, i, o) in sorted(shapes.items())}
                )
            self.shapes = {s: (str(k), int(i), int(o)) for s, (k, i, o) in shapes.items()}
        self.modules.to(device)
        self._add_group()

    def _add_group(self) -> None:
        if self.optimizer is None or not len(self.modules):
            return
        # The first group's settings (momentum, betas, weight decay, current lr) for the adapters' own group.
        settings = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        if self.lr is not None:
            settings["lr"] = settings["initial_lr"] = self.lr
        group = {**settings, "params": list(self.modules.parameters())}
        if not self.separate:
            self.optimizer.add_param_group(group)
            return
        self.own = type(self.optimizer)([group])  # a param group dict takes every setting the class knows
        self._step_hook = self.optimizer.register_step_post_hook(self._step_own)

    def _step_own(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Right after the user's step: the adapters' gradients were averaged in on_before_optimizer_step.
        if self.own is not None:
            self.own.step()
            self.own.zero_grad()

    def detach(self) -> None:
        """Remove the adapters' param group (and its state) from the optimizer."""
        # Found by its parameters: Optimizer.load_state_dict (resume) replaces the group dicts.
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self.own = None
        if self.optimizer is None:
            return
        ours = {id(p) for p in self.modules.parameters()}
        groups = self.optimizer.param_groups
        for i in reversed(range(len(groups))):
            if groups[i]["params"] and all(id(p) in ours for p in groups[i]["params"]):
                for p in groups[i]["params"]:
                    self.optimizer.state.pop(p, None)
                del groups[i]

    def average_gradients(self, world_size: int) -> None:
        """Average the adapters' gradients across processes (DDP averages only the student's)."""
        if not (len(self.modules) and dist.is_available() and dist.is_initialized() and world_size > 1):
            return
        for p in self.modules.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world_size)

    def check_or_build(self, shapes: dict[str, AdapterShape], device: torch.device) -> None:
        """On the first step: build the adapters ``shapes`` needs, or check restored ones have those shapes."""
        if not shapes:
            return
        if set(shapes) != set(self.shapes):
            self.build(shapes, device)
            return
        for s, shape in shapes.items():
            if tuple(self.shapes[s]) != shape:
                raise ValueError(
                    f"the checkpoint's adapter for {s!r} is {self.shapes[s]}, the model "
                    f"needs {shape}. HINT: resume with the same student, teacher and features."
                )

    def state(self) -> dict[str, Any]:
        """Shapes and weights, for the callback's checkpoint state."""
        state = {
            "adapter_shapes": dict(self.shapes),
            "adapters": {k: v.detach().cpu() for k, v in self.modules.state_dict().items()},
        }
        if self.own is not None:
            state["adapter_optimizer"] = self.own.state_dict()
        return state

    def restore(self, state: dict[str, Any] | None, device: torch.device) -> None:
        """At fit start: rebuild checkpointed adapters, or re-attach the ones of a previous fit.

        Runs before Lightning restores the optimizer state, so that state finds the adapters' param group
        where the checkpointed run had it.
        """
        self.detach()
        if state is not None and state.get("adapter_shapes"):
            self.build(dict(state["adapter_shapes"]), device)
            self.modules.load_state_dict(state["adapters"])
            if self.own is not None and "adapter_optimizer" in state:
                self.own.load_state_dict(state["adapter_optimizer"])
        elif self.shapes:
            self.build(dict(self.shapes), device, keep_weights=True)
