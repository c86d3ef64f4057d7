"""KnowledgeDistillation on every zoo model: one real step matches a hand-written distillation loss.

The teacher is a second instance of the same architecture (another seed), so the logits it produces
for the student's own inputs differ; the first training step's returned loss must equal
``(1 - alpha) * task + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`` computed here with plain
torch on the same batch, and the model must run in eval mode afterwards with its parameter count unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_compress import KnowledgeDistillation
from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO
from tests.zoo.common import ZooCase

ALPHA, T = 0.3, 2.0


def build(name: str, seed: int) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return ZOO[name]()


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class FirstStep(pl.Callback):
    """Records the first batch and the loss the (wrapped) training_step returned for it."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.loss: torch.Tensor | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        if self.batch is None:
            self.batch = batch
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        if self.loss is None:
            self.loss = outputs["loss"].detach()


@pytest.mark.parametrize("name", list(ZOO))
def test_distillation_step_matches_hand_computation(name: str, tmp_path: Any) -> None:
    teacher = build(name, seed=1).module.eval()
    case = build(name, seed=0)
    params_before = sum(p.numel() for p in case.module.parameters())
    kd = KnowledgeDistillation(teacher=teacher, alpha=ALPHA, temperature=T, log_agreement=False)
    probe = FirstStep()
    trainer(tmp_path, [kd, probe], max_epochs=-1, max_steps=2, limit_val_batches=0).fit(case.module, case.train_loader)
    assert kd.teacher_forward_calls == 2
    # Reference: the student as it was before step 1, on the recorded batch, in plain torch.
    reference = build(name, seed=0).module
    reference.load_state_dict(probe.weights)
    reference.train()
    *inputs, target = probe.batch
    with torch.no_grad():
        student = logits_of(reference(*inputs)).float()
        teacher_logits = logits_of(teacher(*inputs)).float()
    flat_s, flat_t = student.reshape(-1, student.shape[-1]), teacher_logits.reshape(-1, student.shape[-1])
    task = F.cross_entropy(flat_s, target.reshape(-1))
    p_teacher = F.softmax(flat_t / T, dim=-1)
    kl = (p_teacher * (F.log_softmax(flat_t / T, dim=-1) - F.log_softmax(flat_s / T, dim=-1))).sum(-1).mean()
    expected = (1 - ALPHA) * task + ALPHA * T**2 * kl
    torch.testing.assert_close(probe.loss, expected, rtol=1e-4, atol=1e-5)
    # The student is still a plain model of the same size that runs in eval mode.
    assert sum(p.numel() for p in case.module.parameters()) == params_before
    case.module.eval()
    with torch.no_grad():
        example = case.example_input
        out = case.module(*example) if isinstance(example, tuple) else case.module(example)
    assert torch.isfinite(logits_of(out)).all()
