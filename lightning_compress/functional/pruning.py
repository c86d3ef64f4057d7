"""How pruning masks are computed: scores, structures and mask updates, in pure torch.

A *structure* splits a weight, viewed as a matrix ``[out, in * kernel]``, into groups that are kept or
dropped together:

- ``unstructured``: every weight is its own group.
- ``channels``: one group per output channel (filter / row), scored by its Ln norm.
- ``block`` (``"block:1x4"`` or ``"1x4"``): ``rows x cols`` tiles of the matrix.
- ``n:m`` (``"2:4"``): in every run of ``m`` consecutive input weights keep the ``n`` largest. Gradual
  N:M converts a growing share of the runs, so the final sparsity is exactly ``1 - n/m``.

Masks only grow: what was pruned stays pruned (its score is ``-inf`` so it is chosen first), and a
sparsity below the current one never revives anything.

Sharded tensors (FSDP2, ``Shard(0)``): :func:`layer_masks` and :func:`global_masks` take each rank's
shard of the scores and masks and a process ``group``; every count and selection is then a collective
over that group (:mod:`~lightning_compress.functional.distributed`), so the masks equal those one process
computes on the full tensors, without gathering any weight. Only the small per-group summaries of a
global ranking over groups of unequal sizes (one number per channel or block) are gathered. The caller
makes sure no group spans two shards.

Example::

    >>> import torch
    >>> w = torch.tensor([[0.1, -2.0, 0.3, 4.0], [-5.0, 0.2, 6.0, -0.4]])
    >>> structure = parse_structure("2:4")
    >>> mask = layer_masks({"w": w.abs()}, {}, {"w": 0.5}, structure)["w"]
    >>> mask.int().tolist()
    [[0, 1, 0, 1], [1, 0, 1, 0]]
    >>> layer_masks({"w": w.abs()}, {}, {"w": 0.25}, parse_structure("unstructured"))["w"].int().tolist()
    [[0, 1, 1, 1], [1, 0, 1, 1]]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_compress.functional import distributed as D

StructureKind = Literal["unstructured", "channels", "heads", "block", "n:m"]
Criterion = Literal["magnitude", "random", "taylor", "wanda", "sparsegpt"]
# "sparsegpt" is not a score: it chooses masks and updates weights together (functional/sparsegpt.py).
CRITERIA: tuple[str, ...] = ("magnitude", "random", "taylor", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Structure:
    """A parsed pruning structure (see the module docstring)."""

    kind: StructureKind
    block: tuple[int, int] = (1, 1)
    n: int = 0
    m: int = 0

    @property
    def max_sparsity(self) -> float:
        """Highest sparsity the structure can reach (``1 - n/m`` for N:M, below 1 otherwise)."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else 1.0

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        return self.kind


_STRUCTURE_HELP = "'unstructured', 'channels', 'heads', an N:M pattern such as '2:4', or a block such as 'block:1x4'"


def parse_structure(spec: str) -> Structure:
    """Parse ``"unstructured"``, ``"channels"``, ``"heads"``, ``"2:4"``, ``"block:1x4"`` (or ``"1x4"``).

    ``"heads"`` (whole attention heads) is only chosen per coupled group
    (:mod:`lightning_compress.functional.heads`), never per layer.

    Raises:
        ValueError: naming what was received and what is accepted.

    Example::

        >>> parse_structure("block:2x4")
        Structure(kind='block', block=(2, 4), n=0, m=0)
        >>> parse_structure("4:2")
        Traceback (most recent call last):
        ...
        ValueError: structure '4:2' needs N < M (keep N of every M weights), got N=4, M=2.
    """
    if not isinstance(spec, str):
        raise ValueError(f"structure must be {_STRUCTURE_HELP}; got {spec!r}.")
    text = spec.strip().lower()
    if text in ("unstructured", "channels", "heads"):
        return Structure(kind=text)  # type: ignore[arg-type]
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"structure {spec!r} needs N < M (keep N of every M weights), got N={n}, M={m}.")
        return Structure(kind="n:m", n=n, m=m)
    if match := re.fullmatch(r"(?:block:)?(\d+)x(\d+)", text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise ValueError(f"structure {spec!r} needs a block of at least 1x1.")
        return Structure(kind="block", block=(rows, cols))
    raise ValueError(f"structure must be {_STRUCTURE_HELP}; got {spec!r}.")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a weight as ``[out, in * kernel]`` (a 1-D tensor becomes one row)."""
    # Explicit sizes rather than -1: an empty shard (a rank holding no rows) must reshape too.
    return t.reshape(1, t.numel()) if t.dim() < 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def check_fits(structure: Structure, name: str, shape: torch.Size | tuple[int, ...]) -> None:
    """Raise a ``ValueError`` naming the parameter when ``structure`` cannot tile a weight of ``shape``."""
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    if structure.kind == "n:m" and cols % structure.m:
        raise ValueError(
            f"structure '{structure}' needs the input size of {name!r} to divide by M={structure.m}, "
            f"but its weight {tuple(shape)} has {cols} inputs per output. HINT: exclude it, e.g. exclude=[{name!r}]."
        )
    if structure.kind == "block" and (rows % structure.block[0] or cols % structure.block[1]):
        raise ValueError(
            f"structure '{structure}' needs {name!r} (as a {rows}x{cols} matrix) to divide into "
            f"{structure.block[0]}x{structure.block[1]} blocks. HINT: exclude it or choose another block."
        )


def _tile(structure: Structure, shape: torch.Size) -> tuple[int, int]:
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    if structure.kind == "channels":
        return 1, cols
    if structure.kind == "n:m":
        return 1, structure.m
    return structure.block


def to_groups(t: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Rearrange ``t`` into ``[num_groups, group_size]`` for ``structure``."""
    bh, bw = _tile(structure, t.shape)
    mat = as_matrix(t)
    rows, cols = mat.shape
    return mat.reshape(rows // bh, bh, cols // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)


def from_groups(groups: torch.Tensor, structure: Structure, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_groups`: back to a tensor of ``shape``."""
    bh, bw = _tile(structure, shape)
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    return groups.reshape(rows // bh, cols // bw, bh, bw).permute(0, 2, 1, 3).reshape(shape)


def element_scores(
    weight: torch.Tensor,
    criterion: Criterion,
    *,
    taylor: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    input_norms: torch.Tensor | None = None,
    groups: int = 1,
    input_axis: int = 1,
    shard: tuple[torch.Size, int] | None = None,
) -> torch.Tensor:
    """Importance of each weight: ``|w|``, random, accumulated Taylor ``|w * grad|`` or Wanda's ``|w| * ||x||``.

    Taylor and Wanda fall back to magnitude while nothing has been accumulated (e.g. at step 0).

    Args:
        weight: the weight (or this rank's rows of it).
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"`` or ``"wanda"``.
        taylor: accumulated ``|w * grad|``, shaped like ``weight``.
        generator: the generator of the random criterion.
        input_norms: Wanda's per-input-feature norms (:func:`wanda_scores`).
        groups: the convolution's ``groups``, for Wanda.
        input_axis: the weight dimension indexing input features, for Wanda (0 for HF ``Conv1D``).
        shard: ``(full shape, first row)`` when ``weight`` is a row shard of a larger tensor: the random
            scores are drawn for the full tensor and sliced, so every rank consumes the generator as one
            process does and the scores equal that process's.
    """
    w = weight.detach()
    if criterion == "wanda" and input_norms is not None:
        return wanda_scores(w, input_norms, groups=groups, input_axis=input_axis)
    if criterion in ("magnitude", "wanda") or (criterion == "taylor" and (taylor is None or not torch.any(taylor))):
        return w.abs().float()
    if criterion == "taylor":
        return taylor.float()  # type: ignore[union-attr]
    if criterion == "random":
        if shard is not None:
            full, first = shard
            return torch.rand(full, generator=generator, device="cpu")[first : first + w.shape[0]].to(w.device)
        return torch.rand(w.shape, generator=generator, device="cpu").to(w.device)
    raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}.")


def wanda_scores(
    weight: torch.Tensor, input_norms: torch.Tensor, *, groups: int = 1, input_axis: int = 1
) -> torch.Tensor:
    """Wanda's importance ``|W[i, j]| * ||X_j||_2`` (Sun et al. 2023): magnitude times the input feature's norm.

    Args:
        weight: a Linear ``[out, in]``, a convolution ``[out, in / groups, *kernel]`` or, with
            ``input_axis=0``, Hugging Face's ``Conv1D`` ``[in, out]``.
        input_norms: L2 norm of each input feature (channel) over every token the layer saw
            (:class:`~lightning_compress.functional.activation_stats.InputNorms`).
        groups: the convolution's ``groups`` (a depthwise filter reads only its own input channel).
        input_axis: the weight dimension indexing input features (1, or 0 for ``Conv1D``).

    Example::

        >>> wanda_scores(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([10.0, 1.0])).tolist()
        [[10.0, 2.0], [30.0, 0.5]]
    """
    w = weight.detach().abs().float()
    norms = input_norms.to(w.device, torch.float32)
    if input_axis == 0:  # [in, out]
        return w * norms[:, None]
    out_channels, in_per_group = w.shape[0], w.shape[1]
    # Input channel read by weight [o, c]: group of o, then c within the group.
    group_of_output = torch.arange(out_channels, device=w.device) // (out_channels // groups)
    channel = group_of_output[:, None] * in_per_group + torch.arange(in_per_group, device=w.device)[None, :]
    scale = norms[channel]  # [out, in_per_group]
    return w * scale.reshape(out_channels, in_per_group, *([1] * (w.dim() - 2)))


def _group_scores(
    scores: torch.Tensor, mask: torch.Tensor | None, structure: Structure, norm: float, overwrite: bool = False
) -> torch.Tensor:
    if structure.kind == "unstructured":  # one weight per group: its (non-negative) score is the group's
        value = scores.reshape(-1)
        # A new tensor unless the caller gave its scores away: the global ranking marks each tensor's best
        # entry in place, and a copy costs one more float per weight.
        if not overwrite:
            return value.clone() if mask is None else value.masked_fill(~mask.reshape(-1), -math.inf)
        return value if mask is None else value.masked_fill_(~mask.reshape(-1), -math.inf)
    groups = to_groups(scores, structure)
    # Compared within a layer only (global scope divides by the layer's mean first), so no size factor.
    value = torch.linalg.vector_norm(groups, ord=norm, dim=1)
    if mask is not None:
        pruned = ~to_groups(mask, structure).any(dim=1)
        value = value.masked_fill(pruned, -math.inf)
    return value


def _nm_costs(
    scores: torch.Tensor, mask: torch.Tensor | None, structure: Structure
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per run: the cost of making it N:M (sum of its m-n smallest scores), and the scores to use inside it."""
    groups = to_groups(scores, structure).clone()
    converted = torch.zeros(groups.shape[0], dtype=torch.bool, device=groups.device)
    if mask is not None:
        gmask = to_groups(mask, structure)
        converted = ~gmask.all(dim=1)
        groups = groups.masked_fill(~gmask, -math.inf)  # keep what is pruned pruned
    smallest = groups.sort(dim=1).values[:, : structure.m - structure.n]
    cost = smallest.clamp_min(0).sum(dim=1).masked_fill(converted, -math.inf)
    return cost, groups


def _nm_mask(groups: torch.Tensor, chosen: torch.Tensor, structure: Structure, shape: torch.Size) -> torch.Tensor:
    keep = torch.ones_like(groups, dtype=torch.bool)
    drop_idx = groups.argsort(dim=1, stable=True)[:, : structure.m - structure.n]
    dropped = torch.zeros_like(keep).scatter_(1, drop_idx, True)
    keep[chosen] = ~dropped[chosen]
    return from_groups(keep, structure, shape)


def _lowest(values: torch.Tensor, k: int, group: Any = None) -> torch.Tensor:
    """Boolean selector of exactly the ``k`` lowest values (over all ranks of ``group`` when given).

    Ties go to the lowest index, so every process picks the same; what is already pruned (``-inf``) is
    chosen first. A bisection on the threshold (:func:`~lightning_compress.functional.distributed.lowest`):
    linear time like ``kthvalue``, but with one bool temporary where ``kthvalue`` copies the values and
    adds int64 indices (measured in ``benchmarks/scale.py``).
    """
    return D.lowest(values, k, group)


def _already_pruned(values: torch.Tensor) -> int:
    """Groups already pruned in this tensor (this rank's part of it)."""
    return int(torch.isneginf(values).sum())


def _protect_best(values: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """Each tensor's ``values`` with its best group at ``+inf``: a global ranking may thin a layer, never empty it.

    Sharded: the best of the whole tensor is protected (the first one, on the lowest rank holding it), as
    one process protects the first maximum of the full tensor. Marks ``values`` in place (they are the
    fresh group scores of :func:`_group_scores`): a copy would cost one more float per weight.
    """
    maxima = [float(v.max()) if v.numel() else -math.inf for v in values]
    if D.active(group):
        mine = torch.tensor(maxima, dtype=torch.float64, device=values[0].device)
        everyone = D.gather_rows(mine, group)[0].reshape(-1, len(values))
        rank = D.rank(group)
    else:
        everyone, rank = torch.tensor([maxima], dtype=torch.float64), 0
    out = []
    for i, v in enumerate(values):
        column = everyone[:, i]
        best = float(column.max())
        if best == -math.inf or int((column == best).nonzero()[0]) != rank:
            out.append(v)  # all pruned, or the best group lives on another rank
            continue
        v[int(v.argmax())] = math.inf
        out.append(v)
    return out


def _per_layer_normalised(values: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """Group scores divided by the mean of the layer's live groups, so one global ranking compares layers fairly.

    Raw channel norms differ by orders of magnitude between layers (a depthwise 3x3 filter vs a 512-wide
    projection, a classifier initialised small); ranked raw, whole layers go first. Divided by their
    layer's mean they compare a channel with its neighbours, as Torch-Pruning's global ranking does.
    The mean is summed in float64 (over all ranks when sharded, one all-reduce for all tensors).
    """
    sums: list[float] = []
    for v in values:
        live = v[torch.isfinite(v)]
        sums += [float(live.double().sum()), float(live.numel())]
    sums = D.sum_floats(sums, group, values[0].device if values else None)
    out = []
    for i, v in enumerate(values):
        total, count = sums[2 * i], sums[2 * i + 1]
        scale = total / count if count else 0.0
        out.append(v / scale if scale > 0 else v)
    return out


def layer_masks(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    structure: Structure,
    norm: float = 2.0,
    group: Any = None,
    overwrite_scores: bool = False,
) -> dict[str, torch.Tensor]:
    """New masks (``True`` = keep) giving each tensor its own ``sparsity[name]``.

    ``masks`` holds the current masks (missing = all kept); they only grow. With a process ``group``,
    ``scores`` and ``masks`` are this rank's row shards and every rank must call this (collectives).
    ``overwrite_scores=True`` lets unstructured selection work inside ``scores`` (they are left changed),
    saving a copy of one float per weight.
    """
    out: dict[str, torch.Tensor] = {}
    for name, score in scores.items():
        old = masks.get(name)
        if structure.kind == "n:m":
            cost, groups = _nm_costs(score, old, structure)
            total, done = D.sum_ints([cost.numel(), _already_pruned(cost)], group, cost.device)
            k = max(round(sparsity[name] / structure.max_sparsity * total), done)
            out[name] = _nm_mask(groups, _lowest(cost, k, group), structure, score.shape)
        else:
            values = _group_scores(score, old, structure, norm, overwrite_scores)
            total, done = D.sum_ints([values.numel(), _already_pruned(values)], group, values.device)
            # Never the whole tensor: at least one group stays (a layer is thinned, never removed).
            k = max(min(round(sparsity[name] * total), total - 1), done)
            keep = _lowest(values, k, group).logical_not_()
            del values  # the next tensor's scores take its place
            out[name] = from_groups(
                keep[:, None].expand(-1, to_groups(score, structure).shape[1]), structure, score.shape
            )
    return out


def global_masks(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    sparsity: float,
    structure: Structure,
    norm: float = 2.0,
    group: Any = None,
    overwrite_scores: bool = False,
) -> dict[str, torch.Tensor]:
    """New masks reaching ``sparsity`` over all tensors together: the lowest-scored groups anywhere go first.

    Channel and block scores are first divided by their layer's mean (see :func:`_per_layer_normalised`),
    and every tensor keeps its best group, so a layer is never emptied; when that leaves too few groups
    to reach ``sparsity``, the masks reach as close as they can (the caller measures and says so).

    With a process ``group``, ``scores`` and ``masks`` are this rank's row shards and every rank must
    call this (collectives). ``overwrite_scores=True`` lets unstructured selection work inside ``scores``
    (they are left changed), saving a copy of one float per weight. The tensors are never concatenated:
    the selection counts tensor by tensor (:func:`~lightning_compress.functional.distributed.lowest_each`).
    """
    names = list(scores)
    if structure.kind == "n:m":
        per = [_nm_costs(scores[n], masks.get(n), structure) for n in names]
        costs = torch.cat([c for c, _ in per])
        total, done = D.sum_ints([costs.numel(), _already_pruned(costs)], group, costs.device)
        k = max(round(sparsity / structure.max_sparsity * total), done)
        chosen = _lowest(costs, k, group).split([c.numel() for c, _ in per])
        return {n: _nm_mask(g, c, structure, scores[n].shape) for n, (_, g), c in zip(names, per, chosen, strict=True)}

    values = [_group_scores(scores[n], masks.get(n), structure, norm, overwrite_scores) for n in names]
    if structure.kind != "unstructured":
        values = _per_layer_normalised(values, group)
    values = _protect_best(values, group)
    sizes = [_group_size(scores[n], structure) for n in names]
    if len(set(sizes)) == 1:  # equal groups (always so for unstructured): a count, no sort needed
        total, selectable, done = D.sum_ints(
            [
                sum(v.numel() for v in values),
                sum(int(torch.count_nonzero(v != math.inf)) for v in values),
                sum(_already_pruned(v) for v in values),
            ],
            group,
            values[0].device if values else None,
        )
        parts = D.lowest_each(values, max(min(round(sparsity * total), selectable), done), group)
        del values
        parts = [part.logical_not_() for part in parts]
        if structure.kind == "unstructured":
            return {name: part.reshape(scores[name].shape) for name, part in zip(names, parts, strict=True)}
        return {
            name: from_groups(part[:, None].expand(-1, sizes[0]), structure, scores[name].shape)
            for name, part in zip(names, parts, strict=True)
        }
    # Groups of unequal sizes: prune by weights counted, which needs the order of all groups. Sharded, each
    # tensor's group scores (one number per channel or block) are gathered in rank order, which is the
    # full tensor's order; every rank then runs the same selection and keeps its own rows.
    gathered = [D.gather_rows(v, group) for v in values]
    full = [g for g, _ in gathered]
    flat = torch.cat(full)
    selectable = int((flat != math.inf).sum())
    weight = torch.cat([torch.full_like(v, s) for v, s in zip(full, sizes, strict=True)])
    order = flat.argsort(stable=True)
    # Prune the lowest groups until the pruned share of all weights is closest to the target.
    cumulative = weight[order].cumsum(0)
    target = sparsity * float(weight.sum())
    k = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=cumulative.dtype)))
    pruned_before = float(cumulative[k - 1]) if k > 0 else 0.0
    if k < len(order) and abs(float(cumulative[k]) - target) < abs(pruned_before - target):
        k += 1
    k = max(min(k, selectable), _already_pruned(flat))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:k]] = False
    out = {}
    parts = keep.split([v.numel() for v in full])
    for name, part, size, value, (_, first) in zip(names, parts, sizes, values, gathered, strict=True):
        mine = part[first : first + value.numel()]
        out[name] = from_groups(mine[:, None].expand(-1, size), structure, scores[name].shape)
    return out


def _group_size(scores: torch.Tensor, structure: Structure) -> int:
    """Weights per group (independent of how many rows this rank holds, so equal on every rank)."""
    if structure.kind == "unstructured":
        return 1
    bh, bw = _tile(structure, scores.shape)
    return bh * bw
