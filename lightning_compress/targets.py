r"""Select the modules and parameters a callback compresses.

Everything here is plain data a YAML file can say: name patterns and type names.

- A pattern is a shell glob (``"encoder.*"``, ``"*.conv?"``) or, with a ``re:`` prefix, a regular
  expression matched against the whole name (``"re:layers\.[0-3]\..*"``).
- A pattern matches a module's qualified name or a parameter's full name, so
  ``"encoder.layers.0.self_attn.in_proj_weight"`` selects that raw parameter alone.
- ``types`` are class names (``"Linear"``, ``"Conv2d"``); a subclass matches its parents' names.

A pattern that matches nothing is an error that lists what does exist, raised in the callback's
``setup`` before any training step.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> [t.name for t in select_parameters(model, types=["Linear", "Conv2d"])]
    ['0.weight', '3.weight']
    >>> [t.name for t in select_parameters(model, types=["Linear", "Conv2d"], exclude=["0"])]
    ['3.weight']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# "Conv1D" is Hugging Face's transposed Linear (GPT-2's attention and MLP layers), not torch's Conv1d.
DEFAULT_PRUNABLE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D")

# Layer types whose weight holds the output channels in dim 1, not dim 0: Hugging Face's Conv1D stores a
# Linear's weight as [in, out]; transposed convolutions store [in, out / groups, *kernel].
_OUTPUT_IN_DIM_1: frozenset[str] = frozenset({"Conv1D", "_ConvTransposeNd"})

# Which parameters of a module hold its weights. MultiheadAttention keeps its input projection as raw
# parameters that its forward reads directly (not through a Linear), so they are named here;
# `out_proj` is an ordinary Linear submodule and is selected as one.
_WEIGHT_NAMES: dict[str, tuple[str, ...]] = {
    "MultiheadAttention": ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


@dataclass(frozen=True)
class ParameterTarget:
    """One selected parameter: ``module_name`` + ``param_name`` inside ``module``."""

    module_name: str
    param_name: str
    module: nn.Module

    @property
    def name(self) -> str:
        """Full parameter name, as in ``model.named_parameters()``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def parameter(self) -> torch.Tensor:
        """The parameter tensor itself (looked up live, so module swaps are seen)."""
        return getattr(self.module, self.param_name)

    @property
    def output_axis(self) -> int:
        """The dimension of the weight that indexes output channels (1 for HF ``Conv1D``, else 0)."""
        return 1 if self.param_name == "weight" and type_names(self.module) & _OUTPUT_IN_DIM_1 else 0

    def out_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) viewed with the output channels in dim 0, as masks expect.

        Its own inverse: ``t.out_first(t.out_first(x))`` is ``x``.
        """
        return tensor.transpose(0, 1) if self.output_axis else tensor


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches any glob / ``re:`` pattern (whole-name match)."""
    return any(_compile(p).fullmatch(name) for p in patterns)


def type_names(module: nn.Module) -> set[str]:
    """Class names of ``module`` and its bases, so ``"Linear"`` also matches Linear subclasses."""
    return {cls.__name__ for cls in type(module).__mro__}


def validate_patterns(argument: str, patterns: Sequence[str] | None) -> list[str]:
    """Check that ``patterns`` is a list of strings with valid regexes; return it as a list."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise TypeError(
            f"{argument} must be a list of name patterns, got the string {patterns!r}. HINT: write [{patterns!r}]."
        )
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{argument} must contain strings, got {p!r} ({type(p).__name__}).")
        try:
            _compile(p)
        except re.error as err:
            raise ValueError(f"{argument} has an invalid regular expression {p!r}: {err}.") from None
    return out


def _listing(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def select_modules(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules whose name matches ``include`` (all if empty), not ``exclude``, of one of ``types``.

    Raises:
        ValueError: if an include/exclude pattern matches no module, or nothing is selected; the
            message lists the modules that exist.
    """
    include, exclude, types = list(include or []), list(exclude or []), list(types or [])
    candidates = [(name, m) for name, m in model.named_modules() if name and (not types or type_names(m) & set(types))]
    _check_patterns_match(model, include, exclude, [n for n, _ in candidates], types)
    selected = [(n, m) for n, m in candidates if (not include or matches(n, include)) and not matches(n, exclude)]
    if not selected:
        raise ValueError(_nothing_selected_message(model, include, exclude, types))
    chosen = {n for n, _ in selected}
    _refuse_partial_ties(
        model, [f"{n}.{p}" if n else p for n, m in selected for p, _ in m.named_parameters(recurse=False)], chosen
    )
    return selected


def select_parameters(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str] | None = DEFAULT_PRUNABLE_TYPES,
    check_ties: bool = True,
) -> list[ParameterTarget]:
    """Weight parameters of the modules of ``types``, filtered by module or parameter name.

    A pattern may name a module (all its weights) or a full parameter name (that parameter only).
    ``check_ties=False`` leaves :func:`refuse_partial_ties` to the caller, for a caller that narrows the
    selection further (attention heads touch only the attention's layers, not a tied output head).

    Raises:
        ValueError: as :func:`select_modules`.
    """
    include, exclude, types = list(include or []), list(exclude or []), list(types or DEFAULT_PRUNABLE_TYPES)
    candidates: list[ParameterTarget] = []
    for module_name, module in model.named_modules():
        names = type_names(module) & set(types)
        if not names:
            continue
        weight_names = next((_WEIGHT_NAMES[n] for n in names if n in _WEIGHT_NAMES), ("weight",))
        for param_name in weight_names:
            if isinstance(getattr(module, param_name, None), torch.Tensor):
                candidates.append(ParameterTarget(module_name, param_name, module))

    def keys(t: ParameterTarget) -> tuple[str, str]:
        return t.module_name, t.name

    all_names = sorted({k for t in candidates for k in keys(t)})
    _check_patterns_match(model, include, exclude, all_names, types)
    selected = [
        t
        for t in candidates
        if (not include or any(matches(k, include) for k in keys(t))) and not any(matches(k, exclude) for k in keys(t))
    ]
    if not selected:
        raise ValueError(_nothing_selected_message(model, include, exclude, types))
    if check_ties:
        refuse_partial_ties(model, selected)
    # A tensor tied between two selected modules is one parameter: compress (and count) it once.
    seen: set[int] = set()
    unique = []
    for t in selected:
        if id(t.parameter) not in seen:
            seen.add(id(t.parameter))
            unique.append(t)
    return unique


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """For every parameter reachable under several names (a tied weight), its other names.

    Example::

        >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight  # tied, as language models tie the output layer to the embedding
        >>> tied_parameters(nn.ModuleDict({"emb": emb, "head": head}))
        {'emb.weight': ['head.weight'], 'head.weight': ['emb.weight']}
    """
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    return {n: [o for o in names if o != n] for names in names_of.values() if len(names) > 1 for n in names}


def refuse_partial_ties(model: nn.Module, targets: Sequence[ParameterTarget]) -> None:
    """Refuse a selected tensor that an unselected module also owns (it would change behind that module's back).

    Raises:
        ValueError: naming the tensor, the module it is tied to and the ``exclude`` that avoids it.
    """
    _refuse_partial_ties(model, [t.name for t in targets], {t.module_name for t in targets})


def _refuse_partial_ties(model: nn.Module, selected: list[str], modules: set[str]) -> None:
    ties = tied_parameters(model)
    for name in selected:
        outside = [o for o in ties.get(name, []) if o.rpartition(".")[0] not in modules]
        if outside:
            module = name.rpartition(".")[0] or name
            raise ValueError(
                f"{name} is tied to {', '.join(outside)} (one tensor, two modules): compressing {module!r} alone "
                "would change the other module too, or untie them; select both modules to compress the pair as "
                f"one. HINT: exclude={[module]!r}."
            )


def _check_patterns_match(
    model: nn.Module, include: list[str], exclude: list[str], names: list[str], types: list[str]
) -> None:
    for argument, patterns in (("include", include), ("exclude", exclude)):
        for p in patterns:
            if not any(matches(n, [p]) for n in names):
                raise ValueError(
                    f"{argument} pattern {p!r} matches no module or parameter of the selected types "
                    f"{types or 'any'}. Candidates are: {_listing(names)}. "
                    f"All modules: {_listing([n for n, _ in model.named_modules() if n])}."
                )


def _nothing_selected_message(model: nn.Module, include: list[str], exclude: list[str], types: list[str]) -> str:
    present = sorted({type(m).__name__ for m in model.modules()})
    return (
        f"No module was selected (include={include}, exclude={exclude}, types={types}). "
        f"The model has modules of types {present}; named modules: "
        f"{_listing([n for n, _ in model.named_modules() if n])}."
    )
