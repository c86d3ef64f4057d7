"""Shared pieces of the two-process FSDP2 scripts (``ModelParallelStrategy`` + ``fully_shard`` on CPU, gloo).

Both ranks read the same batches (``use_distributed_sampler=False``), so the averaged gradient equals one
process's gradient on that batch and a single-process run of the same seed is the reference.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from tests.helpers import TinyMLP, random_classification, trainer

# hidden=30 splits 15 + 15 rows, classes=5 splits the head 3 + 2 (uneven shards).
MODEL_ARGS: dict[str, Any] = {"hidden": 30, "classes": 5}
TRAINER_ARGS: dict[str, Any] = {
    "max_steps": 12,
    "max_epochs": None,
    "use_distributed_sampler": False,
    "limit_val_batches": 0,
}


class PlainMLP(TinyMLP):
    """TinyMLP training on one fixed batch per epoch.

    Every step sees the same batch, so a run resumed from a checkpoint sees what the uninterrupted run saw
    whatever Lightning replays at the resume point (it restarts an epoch-end checkpoint's epoch).
    """

    def train_dataloader(self) -> DataLoader:
        data = random_classification(n=16, features=self.hparams.features, classes=self.hparams.classes)
        return DataLoader(data, batch_size=16, shuffle=False)


class ShardedMLP(PlainMLP):
    """PlainMLP whose ``configure_model`` shards every Linear and the root with FSDP2."""

    def configure_model(self) -> None:
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(self)


class SaveFull(pl.Callback):
    """At train end: full weights (``full_tensor``), local shards, metrics; rank zero the consolidated dict."""

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        full = {n: p.full_tensor().detach().clone() for n, p in pl_module.named_parameters()}
        local = {n: p.to_local().detach().clone() for n, p in pl_module.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}  # not sharded by fully_shard
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compress/")}
        consolidated = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # KnowledgeDistillation's hint adapters (plain modules outside the student) and their optimizer state.
        adapters = {k: v.detach().clone() for c in trainer.callbacks for k, v in _adapters(c).state_dict().items()}
        own = [c.hints.own for c in trainer.callbacks if getattr(getattr(c, "hints", None), "own", None)]
        state = own[0].state if own else trainer.optimizers[0].state
        params = [p for c in trainer.callbacks for p in _adapters(c).parameters()]
        moments = [{k: v.clone() for k, v in state[p].items()} for p in params if p in state]
        rank = trainer.global_rank
        torch.save(
            {
                "full": full,
                "local": local,
                "buffers": buffers,
                "metrics": metrics,
                "consolidated": consolidated,
                "adapters": adapters,
                "adapter_optimizer_state": moments,
            },
            os.path.join(self.out, f"{self.tag}_rank{rank}.pt"),
        )


class SaveAtStep(SaveFull):
    """``SaveFull``'s record at one step instead of at train end.

    ``when="start"``: before the step's batch (in a run resumed at ``step``: right after the restore);
    ``"end"``: after its optimizer step (``global_step`` has moved on to ``step + 1`` then).
    """

    def __init__(self, out: str, tag: str, step: int, when: str = "start") -> None:
        super().__init__(out, tag)
        self.step, self.when = step, when

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.when == "start" and trainer.global_step == self.step:
            super().on_train_end(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.when == "end" and trainer.global_step == self.step + 1:
            super().on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass


def _adapters(callback: pl.Callback) -> torch.nn.Module:
    return getattr(callback, "adapters", None) or torch.nn.ModuleDict()


def fsdp2_trainer(out: str, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet two-process CPU trainer under ``ModelParallelStrategy`` (data parallel 2, tensor parallel 1)."""
    args = {**TRAINER_ARGS, **kwargs}
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return trainer(out, callbacks, devices=2, strategy=strategy, **args)


def record_error(out: str, tag: str, rank: int, err: BaseException) -> None:
    """Write the message of an expected refusal for the test to read."""
    with open(os.path.join(out, f"{tag}_rank{rank}.err"), "w", encoding="utf-8") as fh:
        fh.write(f"{type(err).__name__}: {err}")
