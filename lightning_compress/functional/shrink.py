"""Coupled channel groups, and physically removing pruned channels so a model becomes smaller and faster.

A *channel group* is every parameter slice that one channel of a layer's output touches: the producing
conv / linear's output row and bias, the BatchNorm that normalises it (γ, β, running statistics), every
other conv writing into the same residual sum (and their BatchNorms), a depthwise conv on the way, and
the consumers' input columns. A channel is kept or removed for the whole group at once; then

- masking the group's slices (rows, columns, biases, γ, β) makes the channel identically zero and
  unread, so
- removing those slices (:func:`shrink_`) gives a plain, smaller model whose outputs equal the masked
  model's up to float rounding.

Which groups are found, and which stay whole:

- Conv (1-3d, depthwise included) / Linear chains, BatchNorm, residual sums, concatenation, flatten:
  grouped and removable. A transformer's FFN (``fc1`` rows + ``fc2`` columns) is such a group.
- A group that touches a LayerNorm / GroupNorm / RMSNorm, an embedding, a raw ``nn.Parameter`` (a
  position embedding), ``nn.MultiheadAttention``, a grouped (non-depthwise) conv, or any other layer
  type stays whole: removing a zero channel there changes the normalisation statistics or needs a
  layer-specific rewrite. That is the residual width of a transformer (LayerNorm) and the attention
  heads (the ``qkv`` rows reach ``proj`` through a reshape into heads, so one row is not one channel;
  the attention's forward reads its head count from its own attributes: whole heads are
  :mod:`lightning_compress.functional.heads`' job). Each kept group is listed with its reason.
- A group keeps at least one channel (a layer is thinned, never emptied).

Dependency analysis: Torch-Pruning's ``DependencyGraph`` (``pip install lightning-compress[shrink]``).
It was chosen over an analysis of our own on ``torch.export`` / fx graphs because it already maps
channel indices through residual sums, concatenation, split, flatten, depthwise convs and
squeeze-excite multiplications (tested on torchvision / timm / Hugging Face models by its users), it
accepts externally chosen indices (``get_pruning_group(layer, fn, idxs)``, every member carrying its
``root_idxs``), and it traces through autograd, so models ``torch.export`` refuses (data-dependent
Python control flow) still work. Only the analysis is borrowed: which slices form a group is turned
into plain data (:class:`ChannelGroup`, names and index lists) right away, and masks, removal and
reloading are done here on that data, so the zeros masked during training are exactly the slices
removed, a shrunk checkpoint loads without Torch-Pruning (:func:`resize_to_state_dict_` needs only the
checkpoint's shapes), and Torch-Pruning's own index choices never enter.

Example::

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> groups, kept_whole = channel_groups(model, x)
    >>> [(g.name, g.size) for g in groups]
    [('0', 8)]
    >>> keep = {"0": torch.tensor([True, False] * 4)}
    >>> apply_masks_(model, groups, keep)
    >>> masked = model(x)
    >>> result = shrink_(model, groups, keep)
    >>> model[0].out_channels, model[1].num_features, model[3].in_channels
    (4, 4, 4)
    >>> bool((model(x) - masked).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_compress.inputs import as_call

INSTALL_HINT = "HINT: pip install 'lightning-compress[shrink]' (installs torch-pruning, MIT)."

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SUPPORTED = (*_CONV, nn.Linear, *_NORM)

Scope = Literal["global", "layer"]


def torch_pruning_available() -> bool:
    """Whether the optional dependency ``torch-pruning`` can be imported."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Member:
    """One layer's side of a channel group.

    Attributes:
        module: qualified module name.
        role: ``"out"`` (the layer produces the channels: rows, bias, BatchNorm) or ``"in"`` (it reads them:
            input columns).
        idxs: indices along that side of the layer.
        root_idxs: for each of ``idxs``, the group channel it belongs to (flatten maps one channel to several
            columns; concatenation offsets them).
    """

    module: str
    role: Literal["out", "in"]
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels kept or removed together. ``name`` is the root layer's name, ``size`` its channel count."""

    name: str
    size: int
    members: tuple[Member, ...]

    @property
    def producers(self) -> list[str]:
        """Conv / linear layers whose outputs are the group's channels."""
        return [m.module for m in self.members if m.role == "out"]


# ---------------------------------------------------------------------------- analysis
def channel_groups(
    model: nn.Module,
    example_input: Any,
    *,
    selected: Collection[str] | None = None,
    verify: bool = True,
    timeout_s: float = 120.0,
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Trace ``model`` on ``example_input`` and return its removable channel groups.

    Args:
        model: the model (put in eval mode while it is traced, so BatchNorm statistics do not move).
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        selected: names of the conv / linear layers whose outputs may be pruned; a group with any other
            producer stays whole (e.g. an excluded classifier). ``None``: every layer.
        verify: on a copy, mask and remove one channel of every group and compare the outputs; groups where
            the forward fails or the outputs change (a reshape into heads, a normalisation the analysis does
            not know) stay whole.
        timeout_s: give up on the analysis after this many seconds (its group search can explode on some
            graphs, e.g. rotary position embeddings); enforced in the main thread only.

    Returns:
        ``(groups, kept_whole)``: the removable groups, and ``{root layer: reason}`` for groups that stay.

    Raises:
        ImportError: torch-pruning is not installed.
        RuntimeError: the model cannot be traced (the message names the failure).
    """
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError(f"channel groups need torch-pruning, which is not installed. {INSTALL_HINT}") from err

    names = {m: n for n, m in model.named_modules()}
    args, kwargs = as_call(example_input)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.enable_grad(), _time_limit(timeout_s):
            # It warns about raw nn.Parameters (position embeddings); groups touching them stay whole below.
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=kwargs if kwargs else args,
                forward_fn=lambda m, _: m(*args, **kwargs),
                output_transform=_tensor_outputs_sum,
                verbose=False,
            )
            raw = list(dg.get_all_groups(root_module_types=(*_CONV, nn.Linear)))
    except Exception as err:
        raise RuntimeError(
            f"the dependency analysis (torch-pruning) could not trace {type(model).__name__} on the example "
            f"input: {type(err).__name__}: {err}"
        ) from err
    finally:
        model.train(was_training)

    groups: list[ChannelGroup] = []
    try:
        converted = [(names.get(g[0].dep.target.module, "?"), len(g[0].idxs), *_members(g, dg, names)) for g in raw]
    finally:
        # The graph holds autograd nodes of the parameters in reference cycles; until they are collected, a
        # parameter resized later (shrink_) would meet its stale gradient accumulator in the next backward.
        del raw, dg
        gc.collect()
    kept: dict[str, str] = {}
    for root, size, members, reason in converted:
        if reason is None:
            producers = [
                m.module for m in members if m.role == "out" and isinstance(_get(model, m.module), _CONV + (nn.Linear,))
            ]
            outside = [p for p in producers if selected is not None and p not in selected]
            if outside:
                reason = f"its channels are also produced by {outside[0]!r}, which is not selected for pruning"
        if reason is None and not any(m.role == "in" for m in members):
            # Nothing reads the channels: they are the model's output (a classifier's logits).
            reason = "its channels are the model's output"
        if reason is None and size < 2:
            reason = "one channel (a group keeps at least one)"
        if reason is None:
            read = {r for m in members if m.role == "in" for r in m.root_idxs}
            if len(read) < size:
                # Some channels flow into an operation, not a layer (q/k rows reshaped into heads):
                # cutting them changes that operation's input shape.
                reason = f"{size - len(read)} of its {size} channels are not read by a layer (e.g. heads of a qkv)"
        if reason is not None:
            kept[root] = reason
            continue
        groups.append(ChannelGroup(root, size, tuple(members)))
    if verify and groups:
        groups, bad = verified_groups(model, groups, example_input)
        kept.update(bad)
    return groups, kept


def verified_groups(
    model: nn.Module, groups: list[ChannelGroup], example_input: Any, unit: str = "channel"
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The groups whose removal keeps the masked model's outputs (tried on a copy), and why the others fail."""
    bad = _trial(model, groups, example_input, unit=unit)
    return [g for g in groups if g.name not in bad], bad


def _trial(
    model: nn.Module, groups: list[ChannelGroup], example_input: Any, tol: float = 1e-4, unit: str = "channel"
) -> dict[str, str]:
    """Remove one masked channel per group from a copy and compare outputs; ``{group: reason}`` where it fails.

    The graph analysis cannot see what a forward does with a tensor's size (``view(b, n, heads, head_dim)``)
    or a normalisation it does not know; the trial does. All groups are tried at once; only if that fails
    is each group tried alone, to name the culprits.
    """
    import copy

    def attempt(chosen: list[ChannelGroup]) -> str | None:
        trial = copy.deepcopy(model).eval()
        keep = {g.name: torch.arange(g.size) != g.size // 2 for g in chosen}
        apply_masks_(trial, chosen, keep)
        args, kwargs = as_call(example_input)
        with torch.no_grad():
            before = list(_flatten(trial(*args, **kwargs)))
            try:
                shrink_(trial, chosen, keep)
                after = list(_flatten(trial(*args, **kwargs)))
            except Exception as err:  # the forward itself tells why the cut is not possible
                return f"the forward fails once a {unit} is removed ({type(err).__name__}: {str(err)[:120]})"
        for a, b in zip(before, after, strict=False):
            if a.shape != b.shape:
                return f"removing a {unit} changes an output's shape ({tuple(a.shape)} -> {tuple(b.shape)})"
            if a.is_floating_point():
                diff = float((a - b).abs().max()) if a.numel() else 0.0
                scale = float(a.abs().max()) if a.numel() else 0.0
                if diff > tol * max(1.0, scale):
                    return f"removing a masked {unit} changes the outputs by {diff:.2g}"
        return None

    if attempt(groups) is None:
        return {}
    return {g.name: reason for g in groups if (reason := attempt([g])) is not None}


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(*_: Any) -> None:
        raise TimeoutError(f"the analysis took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tensor_outputs_sum(output: Any) -> torch.Tensor:
    # Torch-Pruning back-propagates from the output: sum every floating tensor in whatever structure
    # the model returns (a tensor, a tuple, a Hugging Face ModelOutput).
    tensors = [t for t in _flatten(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.sum() for t in tensors)  # type: ignore[return-value]


def _flatten(value: Any) -> Iterable[Any]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _flatten(v)


def _members(group: Any, dg: Any, names: Mapping[nn.Module, str]) -> tuple[list[Member], str | None]:
    """The group's members as plain data, or the reason the group must stay whole."""
    merged: dict[tuple[str, str], dict[int, int]] = {}
    for item in group:
        target = item.dep.target.module
        if isinstance(target, nn.Parameter):
            return [], "it reaches a raw nn.Parameter (e.g. a position embedding)"
        if type(target).__module__.startswith("torch_pruning"):
            continue  # a graph operation (add, cat, reshape, ...): no parameters of its own
        name = names.get(target)
        if not isinstance(target, _SUPPORTED):
            if not any(True for _ in target.parameters(recurse=False)) and not list(target.buffers(recurse=False)):
                continue  # an activation or pooling module: nothing to cut
            return [], f"it reaches {name!r} ({type(target).__name__}), which cannot drop a channel exactly"
        if isinstance(target, _CONV) and target.groups > 1 and not _depthwise(target):
            return [], f"it reaches the grouped conv {name!r} (groups={target.groups})"
        role: Literal["out", "in"] = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        if isinstance(target, _NORM) or _depthwise(target):
            role = "out"  # one axis: the channel itself
        seen = merged.setdefault((name, role), {})
        for idx, root in zip(item.idxs, item.root_idxs, strict=True):
            if seen.setdefault(int(idx), int(root)) != int(root):
                # Two channels land on one index: a reshape into heads (qkv -> proj), not a channel map.
                return [], f"{name!r} mixes several channels per index (e.g. attention heads after a reshape)"
    members = [
        Member(name, role, tuple(sorted(mapping)), tuple(mapping[i] for i in sorted(mapping)))
        for (name, role), mapping in merged.items()
    ]
    return members, None


def _depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, _CONV) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
    )


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2): a Linear storing its weight [in, out]. Matched by name so that
    # transformers stays optional.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _slots(module: nn.Module, role: str) -> list[tuple[str, int, bool]]:
    """``(attribute, dim, is_parameter)`` of every tensor of ``module`` indexed by the member's channels."""
    if _is_conv1d(module):
        slots = [("weight", 1, True), ("bias", 0, True)] if role == "out" else [("weight", 0, True)]
    elif isinstance(module, _NORM):
        slots = [("weight", 0, True), ("bias", 0, True), ("running_mean", 0, False), ("running_var", 0, False)]
    elif role == "out" or _depthwise(module):
        slots = [("weight", 0, True), ("bias", 0, True)]
    else:
        slots = [("weight", 1, True)]
    return [(a, d, p) for a, d, p in slots if getattr(module, a, None) is not None]


def coupled_parameters(model: nn.Module, groups: Iterable[ChannelGroup]) -> list[str]:
    """Full names of every parameter some group cuts (in model order), e.g. to mask them."""
    wanted = set()
    for group in groups:
        for member in group.members:
            for attr, _, is_param in _slots(_get(model, member.module), member.role):
                if is_param:
                    wanted.add(f"{member.module}.{attr}" if member.module else attr)
    return [n for n, _ in model.named_parameters() if n in wanted]


# ---------------------------------------------------------------------------- masks
def _index(member: Member, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(member.idxs, dtype=torch.long, device=device),
        torch.tensor(member.root_idxs, dtype=torch.long, device=device),
    )


def param_masks(
    model: nn.Module, groups: Iterable[ChannelGroup], keep: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Boolean masks (``True`` = keep) of every coupled parameter for the channels ``keep[group]`` keeps."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        kept = keep[group.name]
        for member in group.members:
            module = _get(model, member.module)
            for attr, dim, is_param in _slots(module, member.role):
                if not is_param:
                    continue
                name = f"{member.module}.{attr}" if member.module else attr
                p = params[name]
                mask = masks.setdefault(name, torch.ones_like(p, dtype=torch.bool))
                idxs, roots = _index(member, p.device)
                dropped = idxs[~kept.to(p.device)[roots]]
                mask.index_fill_(dim, dropped, False)
    return masks


@torch.no_grad()
def apply_masks_(model: nn.Module, groups: Iterable[ChannelGroup], keep: Mapping[str, torch.Tensor]) -> None:
    """Zero every slice of the removed channels (weights, biases, BatchNorm γ and β), in place."""
    params = dict(model.named_parameters())
    for name, mask in param_masks(model, groups, keep).items():
        params[name].mul_(mask.to(params[name].dtype))


def keep_from_masks(
    model: nn.Module, groups: Iterable[ChannelGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Which channels of each group are still live: a channel is removed when *all* its slices are masked."""
    out = {}
    for group in groups:
        live = torch.zeros(group.size, dtype=torch.bool)
        for member in group.members:
            module = _get(model, member.module)
            for attr, dim, is_param in _slots(module, member.role):
                name = f"{member.module}.{attr}" if member.module else attr
                if not is_param:
                    continue
                if name not in masks:  # an unmasked parameter keeps every channel alive
                    live[:] = True
                    continue
                mask = masks[name].cpu()
                idxs, roots = _index(member, torch.device("cpu"))
                any_live = mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(dim=1)[idxs]
                live |= torch.zeros(group.size).index_add_(0, roots, any_live.float()) > 0
        out[group.name] = live
    return out


def channel_scores(
    model: nn.Module, groups: Iterable[ChannelGroup], element_scores: Mapping[str, torch.Tensor], norm: float = 2.0
) -> dict[str, torch.Tensor]:
    """Importance of every channel of every group.

    Each weight (conv / linear weight, BatchNorm γ) contributes the Ln norm of the channel's slice of its
    element scores, divided by that weight's mean over the group's channels, so a wide consumer does not
    outvote a narrow producer; biases and β are not scored. ``element_scores`` maps parameter names to
    per-weight scores (|w|, Taylor, random), shaped like the parameters.
    """
    out = {}
    for group in groups:
        total = torch.zeros(group.size)
        for member in group.members:
            module = _get(model, member.module)
            for attr, dim, is_param in _slots(module, member.role):
                name = f"{member.module}.{attr}" if member.module else attr
                if not is_param or attr != "weight" or name not in element_scores:
                    continue
                s = element_scores[name].detach().float().cpu()
                rows = s.movedim(dim, 0).reshape(s.shape[dim], -1)
                idxs, roots = _index(member, torch.device("cpu"))
                value = torch.zeros(group.size).index_add_(
                    0, roots, torch.linalg.vector_norm(rows[idxs], ord=norm, dim=1)
                )
                mean = value.mean()
                total += value / mean if mean > 0 else value
        out[group.name] = total
    return out


def choose_channels(
    scores: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    scope: Scope = "global",
    multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Which channels to keep (``True``) so that a ``sparsity`` share of channels is removed.

    Removed channels stay removed (masks only grow) and every group keeps its best channel. ``"layer"``
    scope removes ``sparsity[group]`` of each group; ``"global"`` ranks all channels together, each
    divided by its group's mean live score (raw norms differ by orders of magnitude between groups).
    With ``multiple > 1`` each group keeps a multiple of that many channels (rounded up, never above what
    is still live): CPU convolution kernels work on blocks of 8 or 16 channels, and a width of 37 runs
    much slower than 40.

    Example::

        >>> import torch
        >>> scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 1.0])}
        >>> {k: v.tolist() for k, v in choose_channels(scores, {}, 0.5, scope="layer").items()}
        {'a': [False, False, True, True], 'b': [True, False]}
    """
    from lightning_compress.functional.pruning import _lowest, _per_layer_normalised, _protect_best

    names = list(scores)
    values = []
    for n in names:
        v = scores[n].float().clone()
        if n in current:
            v[~current[n].cpu()] = -math.inf
        values.append(v)
    out = {}
    if scope == "layer":
        for n, v in zip(names, values, strict=True):
            level = sparsity[n] if isinstance(sparsity, Mapping) else sparsity
            done = int(torch.isneginf(v).sum())
            k = max(min(round(level * v.numel()), v.numel() - 1), done)
            out[n] = ~_lowest(v, k)
        return _round_up_kept(out, values, multiple)
    level = float(sparsity) if not isinstance(sparsity, Mapping) else float(next(iter(sparsity.values()), 0.0))
    values = _protect_best(_per_layer_normalised(values))
    flat = torch.cat(values) if values else torch.zeros(0)
    selectable = int((flat != math.inf).sum())
    k = max(min(round(level * flat.numel()), selectable), int(torch.isneginf(flat).sum()))
    keep = ~_lowest(flat, k)
    return _round_up_kept(dict(zip(names, keep.split([v.numel() for v in values]), strict=True)), values, multiple)


def _round_up_kept(keep: dict[str, torch.Tensor], values: list[torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Give back the best dropped-but-live channels of each group until it keeps a multiple of ``multiple``.

    Never revives a channel removed at an earlier update (``-inf``): widths only shrink, and because the
    earlier width was rounded up too, the rounded width is always reachable from the live channels.
    """
    if multiple <= 1:
        return keep
    out = {}
    for (name, kept), v in zip(keep.items(), values, strict=True):
        live = ~torch.isneginf(v)
        want = min(-(-int(kept.sum()) // multiple) * multiple, int(live.sum()))
        extra = want - int(kept.sum())
        if extra > 0:
            candidates = (live & ~kept).nonzero().flatten()
            best = candidates[v[candidates].argsort(descending=True, stable=True)[:extra]]
            kept = kept.clone()
            kept[best] = True
        out[name] = kept
    return out


# ---------------------------------------------------------------------------- removal
@dataclass
class ShrinkResult:
    """What :func:`shrink_` removed: ``{group: channels removed}`` and parameters before / after."""

    removed: dict[str, int]
    params_before: int
    params_after: int


@torch.no_grad()
def shrink_(
    model: nn.Module,
    groups: Iterable[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    *,
    on_replace: Callable[[nn.Parameter, nn.Parameter, list[tuple[int, torch.Tensor]]], None] | None = None,
) -> ShrinkResult:
    """Remove the channels ``keep`` drops from every layer of their group, in place.

    Every cut parameter is replaced by a new, smaller ``nn.Parameter`` (resizing one in place would leave
    autograd's cached accumulator, and DDP's buckets, at the old shape); ``on_replace(old, new, cuts)``
    is called for each, with ``cuts`` the ``(dim, kept indices)`` applied, e.g. to swap the parameter in an
    optimizer and slice its state the same way. Module attributes (``out_channels``, ``in_features``,
    ``num_features``, a depthwise conv's ``groups``) follow.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> groups, _ = channel_groups(model, torch.randn(1, 4))
        >>> result = shrink_(model, groups, {"0": torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)})
        >>> model, result.params_before, result.params_after
        (Sequential(
          (0): Linear(in_features=4, out_features=4, bias=True)
          (1): ReLU()
          (2): Linear(in_features=4, out_features=2, bias=True)
        ), 44, 30)
    """
    groups = list(groups)
    before = sum(p.numel() for p in model.parameters())
    # (module, attribute) -> {dim: indices removed along that dim}
    cut: dict[tuple[str, str], dict[int, set[int]]] = {}
    removed: dict[str, int] = {}
    for group in groups:
        kept = keep[group.name].cpu().bool()
        if kept.numel() != group.size or not kept.any():
            raise ValueError(
                f"keep[{group.name!r}] must be a boolean vector of {group.size} channels with at least one True, "
                f"got {kept.numel()} with {int(kept.sum())} True."
            )
        removed[group.name] = int((~kept).sum())
        for member in group.members:
            module = _get(model, member.module)
            gone = {i for i, r in zip(member.idxs, member.root_idxs, strict=True) if not kept[r]}
            for attr, dim, _ in _slots(module, member.role):
                cut.setdefault((member.module, attr), {}).setdefault(dim, set()).update(gone)
    touched: set[str] = set()
    for (module_name, attr), dims in cut.items():
        if not any(dims.values()):
            continue
        module = _get(model, module_name)
        tensor = getattr(module, attr)
        new = tensor.detach()
        applied = []
        for dim, gone in sorted(dims.items()):
            if not gone:
                continue
            kept_idx = torch.tensor(
                [i for i in range(new.shape[dim]) if i not in gone], dtype=torch.long, device=tensor.device
            )
            new = new.index_select(dim, kept_idx)
            applied.append((dim, kept_idx))
        new = new.contiguous()
        if isinstance(tensor, nn.Parameter):
            replacement = nn.Parameter(new, requires_grad=tensor.requires_grad)
            setattr(module, attr, replacement)
            if on_replace is not None:
                on_replace(tensor, replacement, applied)
        else:
            module._buffers[attr] = new
        touched.add(module_name)
    for module_name in touched:
        _sync_attributes(_get(model, module_name))
    if touched:
        from lightning_compress.functional.heads import sync_head_counts_

        sync_head_counts_(model)
    return ShrinkResult(removed, before, sum(p.numel() for p in model.parameters()))


def _sync_attributes(module: nn.Module) -> None:
    """Make a layer's size attributes agree with its (resized) tensors."""
    if isinstance(module, _NORM):
        module.num_features = (
            module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
        )
    elif isinstance(module, _CONV):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.in_channels = module.groups = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif _is_conv1d(module):
        module.nx, module.nf = module.weight.shape


def resize_to_state_dict_(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Resize conv / linear / BatchNorm layers to the shapes a (shrunk) ``state_dict`` holds, in place.

    Attention head counts follow the resized projections
    (:func:`~lightning_compress.functional.heads.sync_head_counts_`).
    Values are left uninitialised: a strict ``load_state_dict`` right after fills them. Which channels were
    removed does not matter for loading, so no pruning history is needed and neither is torch-pruning.
    Returns the names of the resized modules.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> resize_to_state_dict_(fresh, small.state_dict())
        ['0', '2']
        >>> fresh.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    resized = []
    for name, module in model.named_modules():
        if not isinstance(module, _SUPPORTED) and not _is_conv1d(module):
            continue
        changed = False
        for attr, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{prefix}{name}.{attr}" if name else f"{prefix}{attr}"
            if key not in state_dict or not hasattr(state_dict[key], "shape"):
                continue
            shape = tuple(state_dict[key].shape)
            if shape == tuple(tensor.shape):
                continue
            new = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                module._buffers[attr] = new
            changed = True
        if changed:
            _sync_attributes(module)
            resized.append(name)
    if resized:
        from lightning_compress.functional.heads import sync_head_counts_

        sync_head_counts_(model)
    return resized


# ---------------------------------------------------------------------------- measurement
def measure(model: nn.Module, example_input: Any, *, latency: bool = True, min_run_time: float = 0.1) -> dict[str, Any]:
    """Params, FLOPs, bytes on disk, and median one-thread CPU latency of one forward on ``example_input``."""
    from lightning_compress.functional.stats import module_flops, serialized_bytes

    out: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": serialized_bytes(model.state_dict()),
    }
    if example_input is None:
        return out
    args, kwargs = as_call(example_input)
    out["flops"] = module_flops(model, *args, **kwargs).get("", 0)
    if latency:
        out["latency_ms"] = round(cpu_latency(model, example_input, min_run_time=min_run_time) * 1e3, 4)
    return out


def cpu_latency(model: nn.Module, example_input: Any, *, min_run_time: float = 0.1) -> float:
    """Best-of-rounds seconds of one eval forward on CPU, one thread (steady when other processes share cores)."""
    import copy

    args, kwargs = as_call(example_input)
    cpu = copy.deepcopy(model).cpu().eval()
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            cpu(*args, **kwargs)
            best = math.inf
            deadline = time.perf_counter() + min_run_time
            while time.perf_counter() < deadline or best == math.inf:
                start = time.perf_counter()
                cpu(*args, **kwargs)
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best
