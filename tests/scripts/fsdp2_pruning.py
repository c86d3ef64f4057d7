"""Two-process FSDP2 runs of GradualPruning (ModelParallelStrategy + fully_shard, CPU, gloo).

One launch, several fits (each writes ``<tag>_rank<r>.pt`` via ``SaveFull``):

- ``global``: global unstructured magnitude with SGD momentum; distributed checkpoints every 3 steps.
- ``resume``: ``fit(ckpt_path=<step 9 checkpoint of "global">)``, which must end where ``global`` ended.
- ``mixed``: channels / layer scope / Taylor on the hidden layers, random unstructured on the (unevenly
  sharded) head, AdamW.
- ``nm``: 2:4 global on the first layer.
- ``refused``: a block structure whose groups cross the 15-row shards, refused before step 1 (``.err``).

Usage: python fsdp2_pruning.py OUT_DIR
"""

from __future__ import annotations

import glob
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import GradualPruning  # noqa: E402
from tests.scripts.fsdp2_common import (  # noqa: E402
    MODEL_ARGS,
    SaveAtStep,
    SaveFull,
    ShardedMLP,
    fsdp2_trainer,
    record_error,
)

SCENARIOS = {
    "global": lambda: [GradualPruning(0.7, end_step=10, update_every_n_steps=2)],
    "mixed": lambda: [
        GradualPruning(
            0.5,
            criterion="taylor",
            structure="channels",
            scope="layer",
            end_step=6,
            update_every_n_steps=2,
            include=["net.0", "net.2"],
        ),
        GradualPruning(0.6, criterion="random", end_step=6, update_every_n_steps=2, include=["net.4"], name="head"),
    ],
    "nm": lambda: [GradualPruning(structure="2:4", end_step=6, update_every_n_steps=2, include=["net.0"])],
}


def fit(
    out: str, tag: str, ckpt_path: str | None = None, extra: list[pl.Callback] = (), **kwargs: object
) -> pl.Trainer:
    pl.seed_everything(0)
    adamw = tag == "mixed"
    model = ShardedMLP(**MODEL_ARGS, optimizer="adamw" if adamw else "sgd", lr=0.01 if adamw else 0.05)
    callbacks = SCENARIOS["global" if tag == "resume" else tag]()
    t = fsdp2_trainer(os.path.join(out, tag), [*callbacks, SaveFull(out, tag), *extra], **kwargs)
    t.fit(model, ckpt_path=ckpt_path)
    return t


def main(out: str) -> None:
    torch.set_num_threads(1)
    ckpt = ModelCheckpoint(
        dirpath=os.path.join(out, "ckpt"), every_n_epochs=3, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = fit(out, "global", extra=[ckpt, SaveAtStep(out, "global_after9", 9, "end")], enable_checkpointing=True)
    # Step 9: mid-schedule (updates every 2 steps until 10) and not an update step, so step 9 trains with the
    # masks of step 8, recomputed from the zeros (Lightning restores callback state after on_fit_start here).
    first = glob.glob(os.path.join(out, "ckpt", "*-step=9.ckpt"))[0]
    fit(out, "resume", ckpt_path=first, extra=[SaveAtStep(out, "resume_after9", 9, "end")])
    fit(out, "mixed")
    fit(out, "nm")
    try:
        pl.seed_everything(0)
        refused = GradualPruning(0.5, structure="block:2x2", end_step=6, include=["net.2"])
        fsdp2_trainer(os.path.join(out, "refused"), [refused]).fit(ShardedMLP(**MODEL_ARGS))
    except ValueError as err:
        record_error(out, "refused", trainer.global_rank, err)


if __name__ == "__main__":
    main(sys.argv[1])
