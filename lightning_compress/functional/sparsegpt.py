"""One-shot SparseGPT-style pruning: masks chosen and surviving weights updated to reconstruct each layer's output.

SparseGPT (Frantar & Alistarh 2023; reference code IST-DASLab/sparsegpt, ``sparsegpt.py``) prunes a layer
``y = W x`` so that ``||W X - Ŵ X||²`` stays small on calibration inputs ``X``:

1. ``H = 2 X Xᵀ / n`` (one ``[in, in]`` matrix per layer), accumulated by forward pre-hooks over every
   token of the calibration batches; inputs that never fire (``H_jj = 0``) get their weights zeroed.
2. Dampening ``H + damp · mean(diag H) · I`` keeps the inverse stable; ``U`` = upper Cholesky factor of
   ``H⁻¹`` (so ``Uᵀ U = H⁻¹``).
3. Columns are visited in blocks of ``block_size``. Per block the mask is chosen by the OBS saliency
   ``w² / U_jj²`` (unstructured: the block's lowest ``sparsity`` share; N:M: per run of M columns, the
   ``M - N`` lowest, chosen when the run starts). Each column's pruning error ``(w - q) / U_jj`` is then
   pushed onto the columns after it (``W[:, j:] -= err · U[j, j:]``): the Optimal Brain Surgeon update
   restricted to the columns not yet visited. Pruning the first column is exactly OBS:
   ``δ = -w_q / [H⁻¹]_qq · H⁻¹[q, :]``.

Cost and memory, per layer with a weight ``[out, in]`` and ``t`` calibration tokens: the Hessian takes
``O(t · in²)`` to accumulate and ``in² · 4`` bytes to hold (float32; 4 MiB for ``in = 1024``, 64 MiB for
``in = 4096``), the Cholesky factorisations ``O(in³)``, the column sweep ``O(out · in²)``. Layers are processed
in *stages* (by default one per numbered block of the model, ``blocks.3.*``; ``sequential=False``: all
layers in one stage): only one stage's Hessians exist at a time, and every stage runs the calibration
inputs through the model again, so later layers see the inputs of the already pruned earlier ones (as
the reference does block by block). Total cost: one forward pass over the calibration inputs per stage.

Only ``nn.Linear`` and Hugging Face ``Conv1D`` weights are supported (the layers whose input is a vector
of features); structures ``"unstructured"`` and N:M.

Example::

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> layer = nn.Linear(16, 4)
    >>> masks = sparsegpt_prune_(layer, [torch.randn(64, 16)], 0.5, structure="2:4", block_size=8)
    >>> masks["weight"].reshape(4, 4, 4).sum(-1).unique().tolist()  # 2 of every 4 kept
    [2]
    >>> bool((layer.weight[~masks["weight"]] == 0).all())
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress._validation import check_int, check_range
from lightning_compress.functional import distributed as D
from lightning_compress.functional.pruning import Structure, parse_structure
from lightning_compress.inputs import run
from lightning_compress.targets import ParameterTarget, select_parameters, type_names

SUPPORTED_TYPES: tuple[str, ...] = ("Linear", "Conv1D")


def sparsegpt_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    structure: Structure | str = "unstructured",
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned and reconstructed weight, and its mask (``True`` = kept), of one ``[out, in]`` matrix.

    Computes in float64 for a float64 weight, in float32 otherwise (as the reference does).

    Args:
        weight: ``[out, in]``, not modified.
        hessian: ``[in, in]``, ``2 X Xᵀ / n`` of the layer's inputs (not modified).
        sparsity: share of each block's weights to prune (unstructured); ignored for N:M.
        structure: ``"unstructured"`` or an N:M pattern such as ``"2:4"`` (keep N of every M inputs).
        block_size: columns per block (a multiple of M for N:M).
        damp: dampening, as a fraction of the mean diagonal of ``hessian``.
    """
    structure = parse_structure(structure) if isinstance(structure, str) else structure
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs never seen: their weights contribute nothing on the calibration data
    columns = w.shape[1]
    h.diagonal().add_(damp * torch.diag(h).mean())
    # U with Uᵀ U = H⁻¹: the row U[j, j:] is the OBS update direction of column j once columns < j are fixed.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        _sweep_block_(w, pruned, hinv, start, end, sparsity, structure)
    return w.to(weight.dtype), ~pruned


def _sweep_block_(
    w: torch.Tensor,
    pruned: torch.Tensor,
    hinv: torch.Tensor,
    start: int,
    end: int,
    sparsity: float,
    structure: Structure,
) -> None:
    """Prune columns ``start:end`` of ``w`` in place, push their errors onto the later columns."""
    block = w[:, start:end].clone()
    hinv_block = hinv[start:end, start:end]
    diag = torch.diag(hinv_block)
    errors = torch.zeros_like(block)
    mask = torch.zeros_like(block, dtype=torch.bool)  # True = pruned
    if structure.kind == "unstructured":
        saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
        k = round(saliency.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
    m, drop = structure.m, structure.m - structure.n
    for i in range(end - start):
        if structure.kind == "n:m" and i % m == 0:
            # Chosen on the weights as updated so far (the run's columns already carry earlier errors).
            saliency = block[:, i : i + m].pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
            mask[:, i : i + m].scatter_(1, torch.topk(saliency, drop, dim=1, largest=False).indices, True)
        col = block[:, i]
        kept = torch.where(mask[:, i], torch.zeros_like(col), col)
        err = (col - kept) / hinv_block[i, i]
        block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
        block[:, i] = kept  # exactly zero where pruned (the update above leaves rounding noise)
        errors[:, i] = err
    w[:, start:end] = block
    w[:, end:] -= errors @ hinv[start:end, end:]
    pruned[:, start:end] = mask


class Hessians:
    """``2 X Xᵀ / n`` of named layers' inputs, accumulated by forward pre-hooks (every call, any mode).

    Every layer's sum starts at zero (float64 for a float64 weight, float32 otherwise, on the weight's
    device), so every process holds the same tensors whichever layers ran on it, and
    :meth:`all_reduce_` is the same sequence of collectives on every rank.

    Args:
        layers: ``{name: nn.Linear or Conv1D}`` to watch.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self._names = list(layers)
        self._sums: dict[str, torch.Tensor] = {}
        for name, module in layers.items():
            weight = module.weight
            features = weight.shape[0] if "Conv1D" in type_names(module) else weight.shape[1]  # Conv1D: [in, out]
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            self._sums[name] = torch.zeros(features, features, dtype=dtype, device=weight.device)
        self._counts: dict[str, int] = dict.fromkeys(self._names, 0)
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            total = self._sums[name]
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(total.dtype)
            total.addmm_(x.T, x)
            self._counts[name] += x.shape[0]

        return record

    def missing(self) -> list[str]:
        """Watched layers that saw no input (over every process once :meth:`all_reduce_` ran)."""
        return [n for n in self._names if self._counts[n] == 0]

    def all_reduce_(self) -> None:
        """Add up every process's sums and token counts (a collective: every rank watches the same layers)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not self._names:
            return
        for name in self._names:
            dist.all_reduce(self._sums[name])
        counts = all_reduce_counts(self._counts, self._sums[self._names[0]].device)
        self._counts = dict(zip(self._names, counts, strict=True))

    def hessian(self, name: str) -> torch.Tensor:
        """``2 X Xᵀ / n`` of layer ``name`` over every token seen."""
        return self._sums[name] * (2.0 / self._counts[name])

    def remove(self) -> None:
        """Remove the hooks and drop the sums."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._sums, self._counts = [], {}, {}


def all_reduce_counts(counts: Mapping[str, int], device: torch.device) -> list[int]:
    """``counts``' values (in order) summed over every process, through a tensor on ``device``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not counts:
        return list(counts.values())
    t = torch.tensor(list(counts.values()), dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(c) for c in t.tolist()]


class _Calls:
    """How many input rows each watched layer received (forward pre-hooks; no copies)."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.counts = dict.fromkeys(layers, 0)
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.counts[name] += 1

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def stages(names: Sequence[str]) -> list[list[str]]:
    """Group module names by their numbered block (``"h.3.attn.q"`` → ``"h.3"``), in order of appearance.

    A name with no numbered component is its own stage.

    Example::

        >>> stages(["embed", "h.0.q", "h.0.fc", "h.1.q", "head"])
        [['embed'], ['h.0.q', 'h.0.fc'], ['h.1.q'], ['head']]
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
        groups.setdefault(match[1] if match else name, []).append(name)
    return list(groups.values())


def sparsegpt_prune_(
    model: nn.Module,
    calibration_inputs: Iterable[Any],
    sparsity: float | Mapping[str, float],
    *,
    structure: str = "unstructured",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str] = SUPPORTED_TYPES,
    block_size: int = 128,
    damp: float = 0.01,
    sequential: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune ``model``'s Linear / Conv1D weights in place, SparseGPT-style, from calibration inputs.

    Args:
        model: the model (or a single layer); set to eval mode during calibration, restored after.
        calibration_inputs: model inputs (a tensor, a tuple of args or a dict of kwargs each), iterated once
            per stage (a list, not a generator, when there are several stages).
        sparsity: share of each layer's weights to prune, or ``{parameter name: share}`` (a layer not in it
            is left dense); for N:M, ``1 - N/M`` (pruned N of every M) or 0 (left dense), nothing else. A
            layer at 0 is left exactly as it is (its mask keeps everything).
        structure: ``"unstructured"`` or an N:M pattern such as ``"2:4"``.
        include: name patterns of the layers to prune (all by default; see
            :func:`~lightning_compress.targets.select_parameters`).
        exclude: name patterns to leave dense.
        types: layer class names (``"Linear"``, ``"Conv1D"``).
        block_size: columns per block of the sweep.
        damp: Hessian dampening, a fraction of its mean diagonal.
        sequential: one stage per numbered block (later layers calibrated on pruned earlier ones, one
            stage's Hessians in memory); ``False``: every layer from one pass over the dense model.

    Returns:
        ``{parameter name: mask}`` in the parameter's layout, ``True`` = kept.

    Raises:
        ValueError: unsupported structure or layer type, a sharded weight, an N:M sparsity other than
            ``1 - N/M`` or 0, a layer no input reached (raised before any weight changes).
    """
    targets = select_parameters(model, include=include, exclude=exclude, types=types)
    parsed = check_sparsegpt_arguments(structure, block_size, damp)
    check_sparsegpt_targets(targets)
    shares = {t.name: _share(sparsity, t.name, parsed) for t in targets}
    return prune_targets_(model, targets, calibration_inputs, shares, parsed, block_size, damp, sequential)


def check_sparsegpt_arguments(structure: str | Structure, block_size: int, damp: float) -> Structure:
    """Validate the arguments of the reconstruction; returns the parsed structure."""
    parsed = parse_structure(structure) if isinstance(structure, str) else structure
    if parsed.kind not in ("unstructured", "n:m"):
        raise ValueError(
            f"SparseGPT reconstruction supports structure 'unstructured' or an N:M pattern such as '2:4', got "
            f"'{parsed}': it updates the surviving weights of each row, which whole channels or blocks do not "
            "leave. HINT: criterion='magnitude' or 'wanda' for channels and blocks."
        )
    check_int("block_size", block_size, minimum=1)
    if parsed.kind == "n:m" and block_size % parsed.m:
        raise ValueError(f"block_size must be a multiple of M={parsed.m} for structure '{parsed}', got {block_size}.")
    check_range("damp", damp, 0.0, float("inf"), hint=" HINT: a fraction of the Hessian's mean diagonal, e.g. 0.01.")
    return parsed


def check_sparsegpt_targets(targets: Sequence[ParameterTarget]) -> None:
    """Refuse weights the reconstruction cannot handle: other layer types, sharded (DTensor) weights."""
    if not targets:
        raise ValueError(f"SparseGPT reconstruction found no layer to prune; supported types: {list(SUPPORTED_TYPES)}.")
    wrong = [
        f"{t.name} ({type(t.module).__name__})" for t in targets if not type_names(t.module) & set(SUPPORTED_TYPES)
    ]
    if wrong:
        raise ValueError(
            f"SparseGPT reconstruction supports {list(SUPPORTED_TYPES)} weights (inputs are feature vectors), got "
            f"{wrong}. HINT: types=['Linear', 'Conv1D'], or exclude them."
        )
    sharded = [t.name for t in targets if D.is_dtensor(t.parameter)]
    if sharded:
        raise ValueError(
            f"SparseGPT reconstruction needs whole weights and Hessians on one process; {sharded} are sharded "
            "DTensors (FSDP2). HINT: prune a consolidated copy, or use criterion='magnitude' or 'wanda'."
        )


def _share(sparsity: float | Mapping[str, float], name: str, structure: Structure) -> float:
    share = sparsity.get(name, 0.0) if isinstance(sparsity, Mapping) else sparsity
    argument = f"sparsity[{name!r}]" if isinstance(sparsity, Mapping) else "sparsity"
    if structure.kind == "n:m":
        return check_nm_share(argument, share, structure)
    return check_range(argument, share, 0.0, 1.0, high_open=True)


def check_nm_share(argument: str, share: float, structure: Structure) -> float:
    """An N:M layer is either pruned N of every M (share ``1 - N/M``) or left dense (0); nothing in between."""
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise TypeError(f"{argument} must be a number, got {type(share).__name__} {share!r}.")
    if share == 0:
        return 0.0
    if abs(share - structure.max_sparsity) <= 1e-9:
        return structure.max_sparsity
    raise ValueError(
        f"{argument} with structure '{structure}' must be {structure.max_sparsity} (pruned {structure}) or 0 "
        f"(left dense), got {share}: an N:M pattern has one sparsity."
    )


@torch.no_grad()
def prune_targets_(
    model: nn.Module,
    targets: Sequence[ParameterTarget],
    calibration_inputs: Iterable[Any],
    sparsity: Mapping[str, float],
    structure: Structure,
    block_size: int,
    damp: float,
    sequential: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`sparsegpt_prune_` on already selected and checked ``targets`` (what callbacks call).

    Under ``torch.distributed`` every process must call it with its own calibration inputs: the Hessians
    are summed over processes, so every rank computes the same weights.
    """
    dense = {t.name for t in targets if sparsity[t.name] == 0}  # left as they are
    by_module = {t.module_name: t for t in targets if t.name not in dense}
    plan = (stages(list(by_module)) if sequential else [list(by_module)]) if by_module else []
    calls = calibration_inputs if len(plan) == 1 else list(calibration_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # dropout off: the Hessian is of the inputs the layers see at inference
    masks = {
        t.name: torch.ones_like(t.out_first(t.parameter.data), dtype=torch.bool) for t in targets if t.name in dense
    }
    try:
        for index, stage in enumerate(plan):
            hessians = Hessians({name: by_module[name].module for name in stage})
            # The first pass also counts the calls of every later stage's layers: a layer no input reaches is
            # refused before any weight changes (later stages run the same inputs through the model).
            later = _Calls({name: by_module[name].module for s in plan[1:] for name in s}) if index == 0 else None
            try:
                for call in calls:
                    run(model, call)
                hessians.all_reduce_()
                missing = hessians.missing()
                if later is not None:
                    device = next(iter(by_module.values())).parameter.device
                    counts = all_reduce_counts(later.counts, device)
                    missing += [n for n, c in zip(later.counts, counts, strict=True) if c == 0]
                if missing:
                    raise ValueError(
                        f"SparseGPT reconstruction saw no input of {missing}: their forward never ran on the "
                        "calibration inputs (a module that reads their weight directly, such as "
                        "nn.MultiheadAttention's out_proj, or an unused layer). HINT: exclude them."
                    )
                for name in stage:
                    t = by_module[name]
                    weight = t.out_first(t.parameter.data)
                    new, keep = sparsegpt_weight(
                        weight, hessians.hessian(name), sparsity[t.name], structure=structure,
                        block_size=block_size, damp=damp,
                    )  # fmt: skip
                    weight.copy_(new)
                    masks[t.name] = t.out_first(keep).contiguous()
            finally:
                hessians.remove()
                if later is not None:
                    later.remove()
    finally:
        for module, mode in modes.items():
            module.training = mode
    return {t.name: masks[t.name] for t in targets}
