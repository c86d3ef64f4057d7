"""Attention heads as coupled groups: found by layout, masked together, and physically removed.

One head is every slice its output depends on: its query, key and value rows (with their biases) and the
output projection's input columns that read it. Masking all of them makes the head contribute exactly
nothing, so cutting them (:func:`~lightning_compress.functional.shrink.shrink_`) gives a model with fewer
heads and the masked model's outputs. A head group is a plain
:class:`~lightning_compress.functional.shrink.ChannelGroup` whose "channels" are heads (for grouped-query
attention: key/value groups), so masks, scores, removal and reloading are the channel path's own.

Recognised layouts (``head_dim`` never changes; the head count is rewritten after a cut):

- a ``qkv`` Linear packed ``[3, heads, head_dim]`` and ``proj``, with ``num_heads`` and ``head_dim``
  attributes (timm-style ``Attention``);
- ``c_attn`` (Hugging Face Conv1D, q/k/v packed along dim 1) and ``c_proj``: GPT-2 (``num_heads``,
  ``split_size`` rewritten);
- ``self.query/key/value`` and ``output.dense``: BERT and models with its layout (``num_attention_heads``,
  ``all_head_size`` rewritten);
- ``q_proj/k_proj/v_proj`` and ``o_proj`` with ``head_dim``: Llama and models with its layout (the forward
  reads the head count from the shapes).

With grouped-query attention (Llama's ``num_key_value_heads`` < ``num_attention_heads``) a key/value head
serves several query heads, so the unit removed is one key/value head with all its query heads: the
forward's ``num_key_value_groups`` (query heads per key/value head) stays valid.

Not removable, listed with the reason: ``nn.MultiheadAttention`` (its ``in_proj_weight`` is
``[3 * embed_dim, embed_dim]`` and its forward derives ``head_dim = embed_dim // num_heads`` from the
*input* width, so fewer heads with the same model width cannot be represented), and any attention whose
forward breaks or changes once a masked head is cut (e.g. timm's ``reshape(B, N, C)`` back to the input
width): every group is tried on a copy first, as the channel analysis does.

Why not a library: ``transformers`` 5 removed ``prune_heads`` (no model in 5.24 defines it), and
Torch-Pruning's head pruning needs the head count of every qkv layer from the user and then cuts by its own
index choice; the layouts are few and their slices are fixed by the layout, so they are written out here.

Example::

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
    ...                     intermediate_size=32, max_position_embeddings=8)
    >>> model = BertModel(config).eval()
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> groups, kept_whole = head_groups(model, ids)
    >>> [(g.name, g.size) for g in groups]
    [('encoder.layer.0.attention', 4)]
    >>> from lightning_compress.functional.shrink import apply_masks_, shrink_
    >>> keep = {"encoder.layer.0.attention": torch.tensor([True, False, True, False])}
    >>> apply_masks_(model, groups, keep)
    >>> masked = model(ids).last_hidden_state
    >>> _ = shrink_(model, groups, keep)
    >>> model.encoder.layer[0].attention.self.num_attention_heads
    2
    >>> bool((model(ids).last_hidden_state - masked).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_compress.functional.shrink import ChannelGroup, Member

LAYOUTS = (
    "a 'qkv' Linear packed [3, heads, head_dim] with 'proj' (num_heads, head_dim attributes); Hugging Face "
    "GPT-2 'c_attn'/'c_proj'; BERT-style 'self.query/key/value' with 'output.dense'; 'q_proj/k_proj/v_proj/o_proj' "
    "with head_dim (Llama-style, grouped-query attention included)"
)


@dataclass(frozen=True)
class HeadLayout:
    """Where one attention's heads live.

    Attributes:
        name: the attention module (the group's name).
        q, k, v: ``(module, first row)`` of the query / key / value outputs (one module for a packed ``qkv``).
        o: the output projection, whose input columns read the heads.
        head_dim: width of one head.
        heads: query heads.
        kv_heads: key / value heads (``heads`` without grouped-query attention).
    """

    name: str
    q: tuple[str, int]
    k: tuple[str, int]
    v: tuple[str, int]
    o: str
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def modules(self) -> set[str]:
        """Every layer the heads touch."""
        return {self.q[0], self.k[0], self.v[0], self.o}

    def group(self) -> ChannelGroup:
        """The heads (key/value groups under GQA) as one coupled group of ``kv_heads`` units."""
        rep, d = self.heads // self.kv_heads, self.head_dim
        rows: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for unit in range(self.kv_heads):
            for h in range(unit * rep, (unit + 1) * rep):
                rows.setdefault((self.q[0], "out"), []).extend((self.q[1] + h * d + i, unit) for i in range(d))
                rows.setdefault((self.o, "in"), []).extend((h * d + i, unit) for i in range(d))
            for module, start in (self.k, self.v):
                rows.setdefault((module, "out"), []).extend((start + unit * d + i, unit) for i in range(d))
        members = tuple(
            Member(module, role, tuple(i for i, _ in sorted(pairs)), tuple(u for _, u in sorted(pairs)))  # type: ignore[arg-type]
            for (module, role), pairs in rows.items()
        )
        return ChannelGroup(self.name, self.kv_heads, members)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _width(module: nn.Module, out: bool = True) -> int | None:
    """Output (or input) width of a Linear or a Hugging Face Conv1D (weight ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[1] if out else module.weight.shape[0]
    return None


def _layout(name: str, m: nn.Module) -> HeadLayout | str | None:
    """The heads of ``m`` if it is a recognised attention, a reason if it is an attention that stays whole."""
    if isinstance(m, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention cannot hold fewer heads at the same model width: its forward derives "
            "head_dim = embed_dim // num_heads from the input width, and in_proj_weight is [3*embed_dim, embed_dim]"
        )
    child = {n: c for n, c in m.named_children()}
    d = getattr(m, "head_dim", None)
    if {"qkv", "proj"} <= set(child) and isinstance(getattr(m, "num_heads", None), int) and isinstance(d, int):
        n = m.num_heads
        if _width(child["qkv"]) == 3 * n * d and _width(child["proj"], out=False) == n * d:
            qkv = _join(name, "qkv")
            return HeadLayout(name, (qkv, 0), (qkv, n * d), (qkv, 2 * n * d), _join(name, "proj"), d, n, n)
    if {"c_attn", "c_proj"} <= set(child) and hasattr(m, "split_size") and isinstance(d, int):
        if getattr(m, "is_cross_attention", False):
            return "cross-attention (queries from q_attn, keys/values from c_attn) is not a recognised layout"
        n, c_attn = m.num_heads, _join(name, "c_attn")
        if _width(child["c_attn"]) == 3 * n * d and _width(child["c_proj"], out=False) == n * d:
            return HeadLayout(name, (c_attn, 0), (c_attn, n * d), (c_attn, 2 * n * d), _join(name, "c_proj"), d, n, n)
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(child) and isinstance(d, int):
        q, k = _width(child["q_proj"]), _width(child["k_proj"])
        if q and k and q % d == 0 and k % d == 0 and (q // d) % (k // d) == 0 and _width(child["v_proj"]) == k:
            parts = [(_join(name, p), 0) for p in ("q_proj", "k_proj", "v_proj")]
            return HeadLayout(name, *parts, _join(name, "o_proj"), d, q // d, k // d)  # type: ignore[arg-type]
    inner, output = child.get("self"), child.get("output")
    if inner is not None and output is not None and isinstance(getattr(output, "dense", None), nn.Linear):
        d, parts = getattr(inner, "attention_head_size", None), ("query", "key", "value")
        if isinstance(d, int) and all(isinstance(getattr(inner, p, None), nn.Linear) for p in parts):
            n = inner.query.out_features // d
            rows = [(_join(name, f"self.{p}"), 0) for p in parts]
            return HeadLayout(name, *rows, _join(name, "output.dense"), d, n, n)  # type: ignore[arg-type]
    return _unrecognised(child)


def _unrecognised(child: dict[str, nn.Module]) -> str | None:
    """A reason for a module that looks like an attention (q/k/v projections) in no recognised layout."""
    names = set(child)
    for projections in ({"qkv", "proj"}, {"c_attn", "c_proj"}, {"q_proj", "k_proj", "v_proj"}):
        if projections <= names:
            return (
                f"an attention with {sorted(projections)} in a layout that is not recognised (children "
                f"{sorted(names)}; recognised: qkv+proj with num_heads/head_dim, GPT-2 c_attn+c_proj, BERT "
                "self.query/key/value+output.dense, q_proj/k_proj/v_proj+o_proj with head_dim)"
            )
    return None


def attention_layouts(model: nn.Module) -> Iterator[tuple[str, HeadLayout | str]]:
    """``(name, layout or reason)`` of every attention module ``model`` holds, in module order."""
    for name, module in model.named_modules():
        found = _layout(name, module)
        if found is not None:
            yield name, found


def head_groups(
    model: nn.Module,
    example_input: Any = None,
    *,
    selected: Collection[str] | None = None,
    verify: bool = True,
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Every removable head group of ``model``, and ``{attention: reason}`` for attentions that stay whole.

    Args:
        model: the model.
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs; needed with ``verify``.
        selected: names of the layers that may be pruned; an attention with any other layer stays whole.
        verify: on a copy, mask and remove one head of every group and compare the outputs (the forward may
            reshape back to the input width, or read a head count this module does not rewrite).
    """
    from lightning_compress.functional.shrink import verified_groups

    groups, kept = [], {}
    for name, found in attention_layouts(model):
        if isinstance(found, str):
            kept[name] = found
        elif selected is not None and not found.modules <= set(selected):
            kept[name] = f"its layers {sorted(found.modules - set(selected))} are not selected for pruning"
        elif found.kv_heads < 2:
            kept[name] = "one head (key/value group); a layer keeps at least one"
        else:
            groups.append(found.group())
    if verify and groups and example_input is not None:
        groups, bad = verified_groups(model, groups, example_input, unit="head")  # tried on a copy
        kept.update(bad)
    return groups, kept


def sync_head_counts_(model: nn.Module) -> list[str]:
    """Rewrite the head-count attributes of every recognised attention from its (cut) weights; returns names.

    Head widths never change, so the counts follow from the projection widths: idempotent, and what a
    reloaded model needs after :func:`~lightning_compress.functional.shrink.resize_to_state_dict_`.
    """
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            continue
        child = dict(module.named_children())
        qkv, c_attn = _width(child["qkv"]) if "qkv" in child else None, None
        if "c_attn" in child:
            c_attn = _width(child["c_attn"])
        if (
            qkv is not None
            and "proj" in child
            and isinstance(getattr(module, "head_dim", None), int)
            and hasattr(module, "num_heads")
        ):
            new = {"num_heads": qkv // 3 // module.head_dim}
        elif c_attn is not None and "c_proj" in child and hasattr(module, "split_size"):
            width = c_attn // 3
            new = {"num_heads": width // module.head_dim, "split_size": width}
        elif "self" in child and isinstance(getattr(child["self"], "attention_head_size", None), int):
            module, size = child["self"], child["self"].attention_head_size
            width = module.query.out_features
            new = {"num_attention_heads": width // size, "all_head_size": width}
        else:
            continue  # q_proj/k_proj/v_proj layouts read the head count from the shapes (view(..., -1, head_dim))
        if any(getattr(module, k) != v for k, v in new.items()):
            for key, value in new.items():
                setattr(module, key, value)
            changed.append(name)
    return changed
