"""Two-process FSDP2 runs of QuantizationAwareTraining, pruning + QAT together, KnowledgeDistillation, and the
refusals (TensorDecomposition, QAT export_dir) under ModelParallelStrategy + fully_shard (CPU, gloo).

One launch, several fits; each writes ``<tag>_rank<r>.pt`` (``SaveFull``) or ``<tag>_rank<r>.err``.

Usage: python fsdp2_quantization.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch

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


SCENARIOS = {
    "qat": lambda: [QuantizationAwareTraining(weight_bits=8, activation_bits=8)],
    "prune_qat": lambda: [
        GradualPruning(0.7, end_step=10, update_every_n_steps=2),
        QuantizationAwareTraining(weight_bits=4, activation_bits=8),
    ],
    "kd": lambda: [KnowledgeDistillation(teacher=teacher(), alpha=0.5, temperature=2.0)],
}
REFUSED = {
    "decomposition": lambda out: [TensorDecomposition(rank=0.5, measure_latency=False)],
    "qat_export": lambda out: [QuantizationAwareTraining(export_dir=os.path.join(out, "export"))],
    "kd_self": lambda out: [KnowledgeDistillation(teacher="self")],
}


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = 0
    for tag, callbacks in SCENARIOS.items():
        pl.seed_everything(0)
        model = ShardedMLP(**MODEL_ARGS)
        t = fsdp2_trainer(os.path.join(out, tag), [*callbacks(), SaveFull(out, tag)])
        t.fit(model)
        rank = t.global_rank
    for tag, callbacks in REFUSED.items():
        try:
            fsdp2_trainer(os.path.join(out, tag), callbacks(out)).fit(ShardedMLP(**MODEL_ARGS))
        except ValueError as err:
            record_error(out, tag, rank, err)


if __name__ == "__main__":
    main(sys.argv[1])
