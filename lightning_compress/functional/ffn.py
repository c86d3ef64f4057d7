"""FFN hidden units found by layout, for transformers the dependency analysis cannot trace.

Torch-Pruning's graph analysis (:func:`~lightning_compress.functional.shrink.channel_groups`) finds the FFN
units of most transformers by tracing, but fails on some: Hugging Face GPT-2 raises ``TypeError: unsupported
operand type(s) for +: 'int' and 'NoneType'`` during the trace, and on Llama the group search runs into the
time limit (rotary embeddings).
Their FFN blocks have fixed, well-known layouts, so the units are written out here instead:

- ``c_fc`` / ``c_proj`` (Conv1D, GPT-2): unit ``i`` is ``c_fc``'s output ``i`` (weight column, bias) and
  ``c_proj``'s weight row ``i``;
- ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama-style gated MLP): rows ``i`` of ``gate_proj`` and
  ``up_proj``, column ``i`` of ``down_proj``.

Both are :class:`~lightning_compress.functional.shrink.ChannelGroup` s, so masks, removal and reloading are
the channel path's; every group is tried on a copy (one masked unit removed, outputs compared) first.

Example::

    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=12))
    >>> groups, kept = ffn_groups(model, torch.zeros(1, 8, dtype=torch.long))
    >>> [(g.name, g.size) for g in groups]
    [('h.0.mlp', 12)]
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from lightning_compress.functional.shrink import ChannelGroup, Member, verified_groups


def _units(module: nn.Module) -> tuple[int, list[tuple[str, str]]] | None:
    """``(hidden units, [(child, role)])`` if ``module`` is a recognised FFN block."""
    child = dict(module.named_children())
    if {"c_fc", "c_proj"} <= set(child) and all(type(child[c]).__name__ == "Conv1D" for c in ("c_fc", "c_proj")):
        width = child["c_fc"].weight.shape[1]
        if child["c_proj"].weight.shape[0] == width:
            return width, [("c_fc", "out"), ("c_proj", "in")]
    parts = ("gate_proj", "up_proj", "down_proj")
    if set(parts) <= set(child) and all(isinstance(child[p], nn.Linear) for p in parts):
        width = child["gate_proj"].out_features
        if child["up_proj"].out_features == width == child["down_proj"].in_features:
            return width, [("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in")]
    return None


def ffn_groups(
    model: nn.Module, example_input: Any = None, *, selected: Collection[str] | None = None, verify: bool = True
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Every FFN block of a recognised layout as one group of hidden units, and ``{block: reason}`` for the rest.

    Args:
        model: the model.
        example_input: as :func:`~lightning_compress.functional.shrink.channel_groups`'s; needed with ``verify``.
        selected: names of the layers that may be pruned; a block with any other layer stays whole.
        verify: remove one masked unit of every group on a copy and compare the outputs first.
    """
    groups, kept = [], {}
    for name, module in model.named_modules():
        found = _units(module)
        if found is None:
            continue
        width, parts = found
        names = [(f"{name}.{c}" if name else c, role) for c, role in parts]
        if selected is not None and not {n for n, _ in names} <= set(selected):
            kept[name] = f"its layers {sorted({n for n, _ in names} - set(selected))} are not selected for pruning"
        elif width < 2:
            kept[name] = "one unit (a group keeps at least one)"
        else:
            units = tuple(range(width))
            groups.append(ChannelGroup(name, width, tuple(Member(n, role, units, units) for n, role in names)))  # type: ignore[arg-type]
    if verify and groups and example_input is not None:
        groups, bad = verified_groups(model, groups, example_input, unit="unit")  # tried on a copy
        kept.update(bad)
    return groups, kept
