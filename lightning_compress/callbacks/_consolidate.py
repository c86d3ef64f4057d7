"""A plain, unsharded copy of an FSDP2-sharded model on rank zero, for what needs the whole model at fit end.

FSDP2 (``fully_shard``) leaves every rank with a shard of each parameter, swaps the classes of the sharded
modules for ``FSDP<Name>`` subclasses, adds forward hooks and forbids ``copy.deepcopy``. An int8 export or
a decomposition needs the whole trained weights in ordinary modules. :func:`run_on_plain_copy` gathers the
full state dict (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: only rank zero receives
it, in CPU memory), builds on rank zero a copy of the module tree without FSDP (:func:`plain_copy`), runs
the export on it there, and hands every rank the result, so all ranks leave the call together.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_compress.functional import distributed as D

T = TypeVar("T")

# What fully_shard adds to a module's __dict__ besides hooks: its state, under keys with this prefix.
_STATE_KEY_PREFIX = "__composable_api_state_key"


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2 / tensor parallel)."""
    return any(D.is_dtensor(p) for p in module.parameters())


def _fsdp_hook(hook: Any) -> bool:
    return str(getattr(hook, "__module__", "")).startswith("torch.distributed.fsdp")


def _set_fsdp_aside(m: nn.Module) -> tuple[nn.Module, type, dict[str, Any], dict[str, dict[Any, Any]]]:
    """Take FSDP2's class, state and hooks (forward, state-dict, load) off ``m``; returns what to put back.

    FSDP2 forbids ``deepcopy`` of its modules, and its state holds process groups that cannot be copied.
    """
    cls = type(m)
    attributes = {k: vars(m).pop(k) for k in [k for k in vars(m) if k.startswith(_STATE_KEY_PREFIX)]}
    hooks = {k: dict(v) for k, v in vars(m).items() if k.endswith("_hooks") and isinstance(v, dict)}
    for name, kept in hooks.items():
        getattr(m, name).clear()
        getattr(m, name).update({k: h for k, h in kept.items() if not _fsdp_hook(h)})
    m.__class__ = _original_class(m)
    return m, cls, attributes, hooks


def _original_class(module: nn.Module) -> type:
    """The user's class behind FSDP2's ``FSDP<Name>`` subclass (the class itself for other modules)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if not isinstance(module, FSDPModule):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def plain_copy(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module``'s tree with ordinary classes, no FSDP hooks, and ``state``'s tensors as weights.

    Parameters are not copied (meta placeholders, then ``state``'s full tensors are assigned, strictly);
    buffers are copied as they are (FSDP2 does not shard them; non-persistent ones are not in ``state``).
    Tied parameters stay tied. The sharded ``module`` is given back unchanged (its FSDP classes and hooks
    are set aside only while the copy is made). The trainer and device mesh the LightningModule refers to
    are not copied.

    Args:
        module: the FSDP2-sharded model (any module: non-sharded parts are copied as they are).
        state: the full state dict of ``module`` (``get_model_state_dict(..., full_state_dict=True)``).
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = D.local(b).clone().cpu()
    for attribute in ("_trainer", "_device_mesh", "_fabric"):  # Lightning's references to the running fit
        value = vars(module).get(attribute)
        if value is not None:
            memo[id(value)] = None
    set_aside = []
    try:
        for m in module.modules():
            set_aside.append(_set_fsdp_aside(m))
        plain = copy.deepcopy(module, memo)
    finally:
        for m, cls, attributes, hooks in set_aside:
            m.__class__ = cls
            vars(m).update(attributes)
            for name, kept in hooks.items():
                getattr(m, name).clear()
                getattr(m, name).update(kept)
    for m in plain.modules():
        for flag in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            vars(m).pop(flag, None)
    plain.load_state_dict(dict(state), strict=True, assign=True)
    return plain


def run_on_plain_copy(trainer: Any, pl_module: nn.Module, work: Callable[[nn.Module], T]) -> T:
    """Call ``work(plain)`` on rank zero with a plain copy of the sharded ``pl_module``; every rank gets its result.

    A collective: every rank must call it. Only rank zero holds the full weights (CPU) and runs ``work``
    (e.g. writes files). An error there is raised on every rank, so no rank waits forever.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result: Any = None
    error: BaseException | None = None
    if trainer.is_global_zero:
        try:
            result = work(plain_copy(pl_module, state))
        except Exception as err:  # handed to the other ranks below, then raised here too
            error = err
    del state
    result, message = trainer.strategy.broadcast(
        (result, None if error is None else f"{type(error).__name__}: {error}"), src=0
    )
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank zero failed on the consolidated copy of the model: {message}")
    return result
