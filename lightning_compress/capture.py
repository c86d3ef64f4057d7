"""Recording a module's forward calls with hooks: the one capture mechanism every callback uses.

Two recorders share the rule for which calls are *real* forward calls:

- :class:`FirstCallSample`: one sample of the first real call of the LightningModule (what the base
  callback counts FLOPs on when there is no ``example_input_array``); it removes its own hook after.
- :class:`CallRecorder`: while *armed*, the arguments and output of the first real call and the
  outputs of named layers during that call (what distillation hands to the teacher and the losses).

A call is not real when Lightning routes ``training_step(batch, batch_idx)`` / ``validation_step(...)``
through the module's ``__call__`` under DDP (its forward redirection): those arguments are a batch,
not forward inputs. The redirection is only visible before the call starts, so it is decided in a
forward *pre*-hook. Inside a ``torch.compile`` region there is no redirection (a traced call is the
user's own ``self(...)``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> recorder = CallRecorder()
    >>> recorder.attach(net)
    >>> recorder.attach_layer(net[0], "hidden")
    >>> recorder.arm()
    >>> _ = net(torch.zeros(5, 3))
    >>> _ = net(torch.ones(5, 3))  # only the first call while armed is kept
    >>> recorder.disarm()
    >>> float(recorder.args[0].sum()), tuple(recorder.layer_outputs["hidden"].shape)
    (0.0, (5, 4))
    >>> recorder.detach()
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_compress._lightning_internals import is_forward_redirection
from lightning_compress.inputs import CapturedCall, first_sample


def is_redirected_call(module: nn.Module) -> bool:
    """Whether the call now starting on ``module`` is Lightning's forward redirection (not a real forward).

    Call it from a forward pre-hook: the redirection patches ``forward`` only for the call's duration.
    """
    return not torch.compiler.is_compiling() and is_forward_redirection(module)


class FirstCallSample:
    """One sample (the first row of every batched tensor) of the first real forward call of a module.

    The hook removes itself after recording, so it costs nothing afterwards.
    """

    def __init__(self) -> None:
        self.call: CapturedCall | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, module: nn.Module) -> None:
        """Start watching ``module`` (no-op once a call was recorded or while already watching)."""
        if self.call is None and self._handle is None:
            self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hook (the recorded call, if any, stays)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Inside a compiled region a hook cannot remove itself; the first eager call will record.
        if torch.compiler.is_compiling() or is_forward_redirection(module):
            return
        self.call = first_sample(args, kwargs)
        self.detach()


class CallRecorder:
    """While armed, records the first real forward call of a module and named layers' outputs in it.

    ``args``, ``kwargs`` and ``output`` describe the call; ``layer_outputs`` maps each key given to
    :meth:`attach_layer` to that layer's output during the call. Hold it armed around the code whose
    call matters (a ``training_step``), read it, then :meth:`clear` so the activations are released.
    """

    def __init__(self) -> None:
        self.armed = False
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        self.output: Any = None
        self.layer_outputs: dict[str, Any] = {}
        self._redirected: list[bool] = []  # one entry per call of the module in progress, innermost last
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ---- hooks
    def attach(self, module: nn.Module) -> None:
        """Record calls of ``module`` (its args, kwargs and output)."""
        self._handles.append(module.register_forward_pre_hook(self._before_call, with_kwargs=True))
        self._handles.append(module.register_forward_hook(self._after_call, with_kwargs=True))

    def attach_layer(self, layer: nn.Module, key: str) -> None:
        """Record ``layer``'s output under ``key`` during the recorded call (its first use there only)."""
        self._handles.append(layer.register_forward_hook(self._layer_hook(key)))

    def detach(self) -> None:
        """Remove every hook this recorder put on modules."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- recording window
    def arm(self) -> None:
        """Forget the last call and record the next one."""
        self.clear()
        self.armed = True

    def disarm(self) -> None:
        """Stop recording (what was recorded stays readable)."""
        self.armed = False

    def clear(self) -> None:
        """Drop the references to the recorded call (and so to its activations)."""
        self.armed, self.args, self.kwargs, self.output, self.layer_outputs = False, None, {}, None, {}
        self._redirected = []

    @property
    def seen(self) -> bool:
        """Whether a call was recorded since the last :meth:`arm`."""
        return self.args is not None

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._redirected.append(is_redirected_call(module))

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        redirected = self._redirected.pop() if self._redirected else False
        if self.armed and not self.seen and not redirected:
            self.args, self.kwargs, self.output = args, kwargs, output

    def _layer_hook(self, key: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # Only inside the recorded call (while `seen` is still False) and only its first use of the layer.
            if self.armed and not self.seen and key not in self.layer_outputs:
                self.layer_outputs[key] = output

        return hook


class InputLog:
    """Detached copies of the inputs of real forward calls of a module: one call each time it is armed.

    What one-shot reconstruction (``GradualPruning(criterion="sparsegpt")``) replays through the model.

    Example::

        >>> net = nn.Linear(3, 2)
        >>> log = InputLog()
        >>> log.attach(net)
        >>> log.arm()
        >>> _ = net(torch.ones(4, 3))
        >>> _ = net(torch.zeros(4, 3))  # not armed any more
        >>> len(log.calls), float(log.calls[0].args[0].sum()), log.armed
        (1, 12.0, False)
        >>> log.remove()
    """

    def __init__(self) -> None:
        self.calls: list[CapturedCall] = []
        self.armed = False
        self._keep = True
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, module: nn.Module) -> None:
        """Watch ``module`` (once; attaching again moves the hook)."""
        self.remove()
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def remove(self) -> None:
        """Remove the hook (the recorded calls stay)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.armed = False

    def arm(self, keep: bool = True) -> None:
        """Record the next real call; ``keep=False``: only disarm on it (a check that the module is called)."""
        self.armed, self._keep = True, keep

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed or is_redirected_call(module):
            return
        if not self._keep:
            self.armed = False
            return

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone()

        self.calls.append(
            CapturedCall(apply_to_collection(args, torch.Tensor, copy), apply_to_collection(kwargs, torch.Tensor, copy))
        )
        self.armed = False
