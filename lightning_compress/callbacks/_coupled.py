"""GradualPruning's coupled-channel mode: group discovery, group masks, and the physical removal.

Kept apart from :mod:`lightning_compress.callbacks.pruning` so the callback only calls in here: it asks
for the parameters to mask (:meth:`CoupledChannels.setup`), for new masks at an update
(:meth:`CoupledChannels.masks`), and for the removal (:meth:`CoupledChannels.shrink`). The pure
work lives in :mod:`lightning_compress.functional.shrink`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_compress._lightning_internals import rewrap_ddp, strategy_is
from lightning_compress.functional import ffn as FFN
from lightning_compress.functional import heads as H
from lightning_compress.functional import shrink as S
from lightning_compress.inputs import as_call
from lightning_compress.targets import ParameterTarget


class CoupledChannels:
    """Channel groups of one model and what was done with them."""

    def __init__(self, kind: str = "channels") -> None:
        self.kind = kind  # "channels" (traced groups) or "heads" (attention layouts)
        self.groups: list[S.ChannelGroup] = []
        self.kept_whole: dict[str, str] = {}
        self.shrunk = False
        self.rows: list[dict[str, Any]] = []
        self.removed: dict[str, int] = {}
        self.max_abs_diff: float | None = None
        self.shrunk_at_step: int | None = None
        self._load_hook: torch.utils.hooks.RemovableHandle | None = None

    # ---------------------------------------------------------------- setup
    def setup(self, pl_module: pl.LightningModule, selected: list[ParameterTarget]) -> list[ParameterTarget]:
        """Find the groups whose layers are all ``selected``; return the parameters to mask.

        Raises (before any training step) when there is no example input, when the analysis cannot trace the
        model, or when no group can be cut.
        """
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            raise ValueError(
                f"GradualPruning(structure='{self.kind}', coupled=True / shrink=True) runs the model to find which "
                f"{self.kind} are coupled (and tries a removal), and {type(pl_module).__name__} has no "
                "`example_input_array`. HINT: set `self.example_input_array = torch.zeros(<one batch of inputs>)` in "
                "__init__ (a tuple for several inputs, a dict for keyword inputs)."
            )
        modules = {t.module_name for t in selected if t.param_name == "weight"}
        if self.kind == "heads":
            self.groups, self.kept_whole = H.head_groups(pl_module, example, selected=modules)
        else:
            self.groups, self.kept_whole = _channel_groups(pl_module, example, modules)
        if not self.groups:
            raise ValueError(self._nothing_to_cut(type(pl_module).__name__))
        names = S.coupled_parameters(pl_module, self.groups)
        modules_by_name = dict(pl_module.named_modules())
        return [
            ParameterTarget(module, attr, modules_by_name[module])
            for module, _, attr in (n.rpartition(".") for n in names)
        ]

    def _nothing_to_cut(self, model: str) -> str:
        reasons = "; ".join(f"{k}: {v}" for k, v in self.kept_whole.items())
        if self.kind == "heads":
            return (
                f"GradualPruning(structure='heads'): no attention heads of {model} can be removed. "
                f"{f'Attentions kept whole: {reasons}. ' if reasons else 'No attention module was found. '}"
                f"Recognised layouts: {H.LAYOUTS}. HINT: structure='channels' for the FFN units, or 'unstructured'."
            )
        return (
            f"GradualPruning(structure='channels', coupled=True): no channel group of {model} can be cut. "
            f"Groups kept whole: {reasons or 'no conv / linear layers'}. HINT: check include / exclude, or use "
            "structure='unstructured'."
        )

    def register_resize_hook(self, pl_module: pl.LightningModule) -> None:
        """Before any ``load_state_dict`` of the module, resize its layers to the state dict's shapes.

        So ``fit(ckpt_path=...)`` on a checkpoint taken after the removal loads strictly into the fresh,
        full-size model (the optimizer is then created over the resized parameters).
        """
        self.remove_hook()

        def resize(module: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
            if S.resize_to_state_dict_(module, state_dict, prefix):
                self.shrunk = True

        self._load_hook = pl_module.register_load_state_dict_pre_hook(resize)

    def remove_hook(self) -> None:
        """Detach the resize hook from the user's module."""
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    # ---------------------------------------------------------------- masks
    def masks(
        self,
        pl_module: pl.LightningModule,
        element_scores: Mapping[str, torch.Tensor],
        current: Mapping[str, torch.Tensor],
        sparsity: float | Mapping[str, float],
        scope: S.Scope,
        norm: float,
        multiple: int = 1,
    ) -> dict[str, torch.Tensor]:
        """New parameter masks: a ``sparsity`` share of channels removed, chosen per group."""
        scores = S.channel_scores(pl_module, self.groups, element_scores, norm)
        live = S.keep_from_masks(pl_module, self.groups, current) if current else {}
        keep = S.choose_channels(scores, live, sparsity, scope, multiple=multiple)
        return S.param_masks(pl_module, self.groups, keep)

    def channel_sparsity(self, pl_module: pl.LightningModule, masks: Mapping[str, torch.Tensor]) -> float:
        """Share of the groups' channels that are removed (masked, or already cut away)."""
        if self.shrunk:
            total = sum(g.size for g in self.groups)
            return sum(self.removed.values()) / total if total else 0.0
        if not masks:
            return 0.0
        live = S.keep_from_masks(pl_module, self.groups, masks)
        total = sum(v.numel() for v in live.values())
        return 1.0 - sum(int(v.sum()) for v in live.values()) / total if total else 0.0

    # ---------------------------------------------------------------- removal
    @torch.no_grad()
    def shrink(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        masks: Mapping[str, torch.Tensor],
        on_replace: Callable[[str, torch.nn.Parameter, torch.nn.Parameter, list[tuple[int, torch.Tensor]]], None],
    ) -> None:
        """Remove the masked channels from ``pl_module`` (every rank the same: masks are broadcast).

        ``on_replace(name, old, new, cuts)`` is called for every parameter replaced by a smaller one, to swap
        it in the optimizers and slice whatever else is shaped like it (masks, optimizer moments). Measures
        the masked and the shrunk model on the example input for the report.
        """
        keep = S.keep_from_masks(pl_module, self.groups, masks)
        example = getattr(pl_module, "example_input_array", None)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            before = S.measure(pl_module, example, latency=trainer.is_global_zero)
            reference = _outputs(pl_module, example)
            result = S.shrink_(
                pl_module,
                self.groups,
                keep,
                on_replace=lambda old, new, cuts: on_replace(names[id(old)], old, new, cuts),
            )
            after = S.measure(pl_module, example, latency=trainer.is_global_zero)
            now = _outputs(pl_module, example)
        finally:
            pl_module.train(was_training)
        self.max_abs_diff = max(
            (float((a.float() - b.float()).abs().max()) for a, b in zip(reference, now, strict=True) if a.numel()),
            default=0.0,
        )
        self.removed = result.removed
        self.shrunk = True
        self.shrunk_at_step = trainer.global_step
        self.rows = [{"model": "masked", **before}, {"model": "shrunk", **after}]
        if strategy_is(trainer.strategy, "DDPStrategy") and trainer.world_size > 1 and trainer.training:
            rewrap_ddp(trainer.strategy)  # DDP's reducer holds buckets sized for the old parameters
        rank_zero_info(
            f"GradualPruning: removed {sum(self.removed.values())} of {sum(g.size for g in self.groups)} "
            f"{self.kind} in {len(self.groups)} groups at step {trainer.global_step}: params "
            f"{result.params_before} -> {result.params_after}, max output difference {self.max_abs_diff:.2e}."
        )

    def report(self) -> dict[str, Any]:
        """The report section's ``shrink`` part."""
        return {
            "shrunk": self.shrunk,
            "shrunk_at_step": self.shrunk_at_step,
            "unit": self.kind,  # what the counts below count: channels or heads
            "channels_removed": sum(self.removed.values()),
            "channels_in_groups": sum(g.size for g in self.groups),
            "max_abs_output_diff_masked_vs_shrunk": self.max_abs_diff,
            "masked_vs_shrunk": self.rows,
            "groups": [
                {"group": g.name, "channels": g.size, "removed": self.removed.get(g.name), "layers": len(g.members)}
                for g in self.groups
            ],
            "kept_whole": [{"group": k, "reason": v} for k, v in self.kept_whole.items()],
        }

    def state(self) -> dict[str, Any]:
        """Checkpoint part: whether the model was shrunk, and what the report says about it."""
        return {
            "shrunk": self.shrunk,
            "removed": self.removed,
            "rows": self.rows,
            "max_abs_diff": self.max_abs_diff,
            "shrunk_at_step": self.shrunk_at_step,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        self.shrunk = bool(state.get("shrunk", False)) or self.shrunk
        self.removed = dict(state.get("removed", {}))
        self.rows = list(state.get("rows", []))
        self.max_abs_diff = state.get("max_abs_diff")
        self.shrunk_at_step = state.get("shrunk_at_step")


def _channel_groups(
    pl_module: pl.LightningModule, example: Any, selected: set[str]
) -> tuple[list[S.ChannelGroup], dict[str, str]]:
    """Traced channel groups; where the trace fails, the FFN units of known transformer layouts instead."""
    try:
        return S.channel_groups(pl_module, example, selected=selected)
    except RuntimeError as err:
        groups, kept = FFN.ffn_groups(pl_module, example, selected=selected)
        if not groups:
            raise ValueError(
                f"GradualPruning(structure='channels', coupled=True): {err}. HINT: prune this model with "
                "coupled=False (per-layer channel zeros that cannot be removed), or structure='unstructured'."
            ) from err
        reason = f"{err}; only the FFN units of known layouts (GPT-2, Llama-style) are pruned"
        rank_zero_warn(f"GradualPruning(structure='channels'): {reason}.")
        return groups, {"": reason, **kept}


def _outputs(model: torch.nn.Module, example: Any) -> list[torch.Tensor]:
    if example is None:
        return []
    args, kwargs = as_call(example)
    device = next(model.parameters()).device
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return [t.detach().clone() for t in S._flatten(model(*args, **kwargs)) if t.is_floating_point()]


def load_shrunk(
    cls: type[pl.LightningModule], checkpoint_path: str, map_location: Any = None, **kwargs: Any
) -> pl.LightningModule:
    """``cls.load_from_checkpoint`` for a checkpoint of a model whose channels ``GradualPruning(shrink=True)`` removed.

    The LightningModule is built from its saved hyperparameters at full size, its layers are resized to the
    checkpoint's shapes (:func:`~lightning_compress.functional.shrink.resize_to_state_dict_`), and the
    weights are then loaded strictly. Torch-Pruning is not needed.

    Example::

        >>> from lightning_compress import load_shrunk
        >>> # trainer.fit(model)  with GradualPruning(structure="channels", shrink=True)
        >>> # trainer.save_checkpoint("shrunk.ckpt"); model = load_shrunk(MyModule, "shrunk.ckpt")
    """
    from lightning_fabric.utilities.cloud_io import _load as pl_load

    checkpoint = pl_load(checkpoint_path, map_location=map_location or "cpu", weights_only=False)
    # Built from the saved hyperparameters (as load_from_checkpoint does); its own strict=False load would
    # still refuse the smaller shapes, so the layers are resized first and the weights loaded here.
    model = cls(**{**checkpoint.get("hyper_parameters", {}), **kwargs})
    S.resize_to_state_dict_(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model
