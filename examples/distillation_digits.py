"""Train a teacher CNN on scikit-learn's bundled digits, then distil it into a 4x smaller student.

    python examples/distillation_digits.py

The student is an ordinary LightningModule: its ``training_step`` returns its own cross-entropy, and
``KnowledgeDistillation`` adds the soft-target term (and a hint on the hidden layer) to that loss. The
teacher is loaded from its checkpoint file with the student's class and the teacher's saved
hyperparameters.
"""

import os

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_compress import KnowledgeDistillation
from lightning_compress.demo import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    pl.seed_everything(0)
    data = DigitsDataModule()

    # 1. The teacher: a wider DigitsCNN, trained normally.
    teacher_trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    teacher_trainer.fit(DigitsCNN(width=8, hidden=64), data)
    teacher_path = os.path.join("outputs", "distillation_digits", "teacher.ckpt")
    teacher_trainer.save_checkpoint(teacher_path)

    # 2. The student: 4x fewer parameters, the same LightningModule class, one callback added.
    distillation = KnowledgeDistillation(
        teacher=teacher_path,  # a checkpoint path, an nn.Module, or "self"
        alpha=0.7,  # weight of the soft-target term; the student's own loss gets 0.3
        temperature=4.0,  # softens both distributions; the loss is scaled by T^2 (Hinton et al. 2015)
        features={"head.1": "head.1"},  # FitNets hint: student hidden (32) -> teacher hidden (64) via an adapter
        feature_weight=0.1,
    )
    trainer = pl.Trainer(
        max_epochs=6,
        callbacks=[distillation],
        logger=CSVLogger("outputs", name="distillation_digits"),
        log_every_n_steps=5,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsCNN(width=4, hidden=32), data)
    # The report (also written as compression_report.json/.md in the log dir) is printed at fit end.
    metrics = trainer.callback_metrics
    print(
        f"teacher val_acc={float(teacher_trainer.callback_metrics['val_acc']):.4f}  "
        f"student val_acc={float(metrics['val_acc']):.4f}  "
        f"teacher agreement={float(metrics['compress/teacher_agreement']):.4f}"
    )
