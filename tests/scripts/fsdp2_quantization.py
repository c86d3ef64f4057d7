"""Two-process FSDP2 runs of QuantizationAwareTraining (with its fit-end int8 export), pruning + QAT together,
KnowledgeDistillation, TensorDecomposition at fit end (saved), and the refusals (mid-fit decomposition, no
save_path, a self-teacher) under ModelParallelStrategy + fully_shard (CPU, gloo).

One launch, several fits; each writes ``<tag>_rank<r>.pt`` (``SaveFull``) or ``<tag>_rank<r>.err``.

Usage: python fsdp2_quantization.py OUT_DIR
"""

from __future__ import annotations

import glob
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lightning_compress import (  # noqa: E402
    GradualPruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    TensorDecomposition,
)
from tests.scripts.fsdp2_common import (  # noqa: E402
    MODEL_ARGS,
    PlainMLP,
    SaveAtStep,
    SaveFull,
    ShardedMLP,
    fsdp2_trainer,
    record_error,
)


def teacher() -> PlainMLP:
    """A wider teacher with its own seed, leaving the global random state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return PlainMLP(hidden=40, classes=MODEL_ARGS["classes"])


# Each scenario's callbacks, given the run's own directory (fit-end exports are written there).
SCENARIOS = {
    "qat": lambda out: [
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, export_dir=os.path.join(out, "export"))
    ],
    "prune_qat": lambda out: [
        GradualPruning(0.7, end_step=10, update_every_n_steps=2),
        QuantizationAwareTraining(weight_bits=4, activation_bits=8),
    ],
    "kd": lambda out: [KnowledgeDistillation(teacher=teacher(), alpha=0.5, temperature=2.0)],
    # A hint from the 30-wide student layer to the 40-wide teacher layer: a learned Linear(30, 40) adapter.
    "kd_hints": lambda out: [KnowledgeDistillation(teacher=teacher(), alpha=0.5, features={"net.2": "net.2"})],
    "decomposition": lambda out: [
        TensorDecomposition(rank=0.5, measure_latency=False, save_path=os.path.join(out, "decomposed.pt"))
    ],
}
REFUSED = {
    "decomposition_mid_fit": lambda out: [TensorDecomposition(apply_at=4, save_path=os.path.join(out, "d.pt"))],
    "decomposition_no_path": lambda out: [TensorDecomposition(rank=0.5, measure_latency=False)],
    "kd_self": lambda out: [KnowledgeDistillation(teacher="self")],
}


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = 0
    for tag, callbacks in SCENARIOS.items():
        pl.seed_everything(0)
        model = ShardedMLP(**MODEL_ARGS)
        run_dir = os.path.join(out, tag)
        extra: list[pl.Callback] = []
        if tag == "kd_hints":  # distributed checkpoints at steps 4, 8, 12 for the resume below
            extra = [
                ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_epochs=4, save_top_k=-1),
                SaveAtStep(out, "kd_hints_at8", 8),
            ]
        t = fsdp2_trainer(run_dir, [*callbacks(run_dir), SaveFull(out, tag), *extra], enable_checkpointing=bool(extra))
        t.fit(model)
        rank = t.global_rank
    # Resume the hint run from step 8: adapters and their optimizer state come back from the checkpoint.
    pl.seed_everything(0)
    first = glob.glob(os.path.join(out, "ckpt", "*-step=8.ckpt"))[0]
    resumed = [*SCENARIOS["kd_hints"](out), SaveFull(out, "kd_hints_resume"), SaveAtStep(out, "kd_hints_resume_at8", 8)]
    fsdp2_trainer(os.path.join(out, "kd_hints_resume"), resumed).fit(ShardedMLP(**MODEL_ARGS), ckpt_path=first)
    for tag, callbacks in REFUSED.items():
        try:
            fsdp2_trainer(os.path.join(out, tag), callbacks(out)).fit(ShardedMLP(**MODEL_ARGS))
        except ValueError as err:
            record_error(out, tag, rank, err)


if __name__ == "__main__":
    main(sys.argv[1])
