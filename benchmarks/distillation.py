"""Student alone vs student + KnowledgeDistillation from a larger trained teacher, in one process.

Same data (scikit-learn digits, fixed 80/20 split), same student architecture and initialisation, same
epochs and optimizer, for each seed:

1. a teacher (wide ``DigitsCNN``) is trained once and frozen;
2. the student is trained alone, and from the same initial weights with ``KnowledgeDistillation``
   (soft targets; optionally also a FitNets hint on the hidden layer) from that teacher.

Printed: validation accuracy of the teacher and of both students per seed, their mean ± standard
deviation, and the cost: median training step time of the student alone and with KD (runs of 3 epochs,
the first not timed), and of one teacher forward on a training-sized batch, interleaved over
``--timing-repeats`` repeats in the same process, with the ratio ``kd_step / (plain_step + teacher_forward)``.

    python benchmarks/distillation.py                 # 5 seeds, 6 epochs, teacher DigitsCNN(8, 64)
    python benchmarks/distillation.py --student mlp --student-hidden 16   # an MLP student, same teacher

``--student mlp`` replaces the student by ``DigitsMLP`` (a one-hidden-layer MLP on the flattened 8x8
image, ``--student-hidden`` units); the teacher is still a ``DigitsCNN``. ``--timing-repeats 0`` skips
the cost part. Besides mean ± sd, the paired difference (KD - alone, same seed) is summarised by its
standard error, ``mean / SE`` and the number of seeds where KD is better, equal and worse.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress import KnowledgeDistillation
from lightning_compress.demo import DigitsCNN, DigitsDataModule


class Digits(DigitsDataModule):
    """The demo data, optionally with only the first ``fraction`` of the (shuffled) training split."""

    def __init__(self, fraction: float = 1.0) -> None:
        super().__init__(batch_size=64)
        self.fraction = fraction

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.fraction < 1.0:
            keep = max(1, round(self.fraction * len(self.train_set)))
            self.train_set = Subset(self.train_set, range(keep))


class DigitsMLP(pl.LightningModule):
    """A one-hidden-layer MLP on the flattened 8x8 digits: a much weaker student than any ``DigitsCNN``.

    Same conventions as ``DigitsCNN`` (Adam, ``train_loss``, ``val_acc``); the hidden Linear is ``head.1``
    there as well, so ``--hint`` works with either student.
    """

    def __init__(self, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class StepTimer(pl.Callback):
    """Intervals between consecutive training batch ends, epoch boundaries and the first epoch excluded."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch > 0:
            self.times.append(now - self._last)
        self._last = now


def run(model: pl.LightningModule, epochs: int, callbacks: list[pl.Callback], root: str, fraction: float) -> float:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(model, Digits(fraction))
    return float(trainer.callback_metrics["val_acc"])


def teacher_forward_time(teacher: torch.nn.Module, repeats: int = 200) -> float:
    x = torch.rand(64, 1, 8, 8)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            teacher(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student", choices=["cnn", "mlp"], default="cnn", help="DigitsCNN or DigitsMLP student")
    parser.add_argument("--student-width", type=int, default=4, help="channels of a cnn student")
    parser.add_argument("--student-hidden", type=int, default=32)
    parser.add_argument("--teacher-width", type=int, default=8)
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--hint", action="store_true", help="also a FitNets hint on head.1 (hidden layer)")
    parser.add_argument("--train-fraction", type=float, default=1.0, help="share of the training split used")
    parser.add_argument(
        "--teacher-fraction", type=float, default=None, help="share the teacher trains on (default: the students')"
    )
    parser.add_argument("--timing-repeats", type=int, default=5, help="0: accuracy only")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    root = tempfile.mkdtemp()

    pl.seed_everything(1234, verbose=False)
    teacher = DigitsCNN(width=args.teacher_width, hidden=args.teacher_hidden)
    teacher_fraction = args.train_fraction if args.teacher_fraction is None else args.teacher_fraction
    teacher_acc = run(teacher, args.teacher_epochs, [], root, teacher_fraction)
    teacher.eval()
    n_teacher = sum(p.numel() for p in teacher.parameters())

    def student() -> pl.LightningModule:
        if args.student == "mlp":
            return DigitsMLP(hidden=args.student_hidden)
        return DigitsCNN(width=args.student_width, hidden=args.student_hidden)

    if args.student == "mlp":
        student_name = f"DigitsMLP(hidden={args.student_hidden})"
    else:
        student_name = f"DigitsCNN(width={args.student_width}, hidden={args.student_hidden})"
    n_student = sum(p.numel() for p in student().parameters())
    print(
        f"teacher: DigitsCNN(width={args.teacher_width}, hidden={args.teacher_hidden}), {n_teacher} params, "
        f"trained on {teacher_fraction:.0%} of the training split, val_acc={teacher_acc:.4f}"
    )
    print(
        f"student: {student_name}, {n_student} params "
        f"({n_student / n_teacher:.3f}x), {args.epochs} epochs on {args.train_fraction:.0%} of the training split"
    )

    def make_kd() -> KnowledgeDistillation:
        return KnowledgeDistillation(
            teacher=teacher,
            alpha=args.alpha,
            temperature=args.temperature,
            features={"head.1": "head.1"} if args.hint else None,
            feature_weight=0.1,
        )

    # Accuracy: same initial weights, same data order, with and without the callback.
    plain_acc, kd_acc = [], []
    print("| seed | student alone | student + KD | KD - alone |")
    print("| ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        init = student().state_dict()
        for accs, callbacks in ((plain_acc, []), (kd_acc, [make_kd()])):
            model = student()
            model.load_state_dict(init)
            pl.seed_everything(seed, verbose=False)
            accs.append(run(model, args.epochs, callbacks, root, args.train_fraction))
        print(f"| {seed} | {plain_acc[-1]:.4f} | {kd_acc[-1]:.4f} | {kd_acc[-1] - plain_acc[-1]:+.4f} |")

    def mean_sd(values: list[float], sign: str = "") -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{sign}.4f} ± {sd:.4f}"

    diffs = [k - p for k, p in zip(kd_acc, plain_acc, strict=True)]
    print(f"| mean ± sd | {mean_sd(plain_acc)} | {mean_sd(kd_acc)} | {mean_sd(diffs, '+')} |")
    if len(diffs) > 1:
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        mean = statistics.mean(diffs)
        better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        print(
            f"paired KD - alone: mean {mean:+.4f}, SE {se:.4f}, mean/SE {mean / se if se else float('inf'):+.2f}; "
            f"KD better on {better}, equal on {len(diffs) - better - worse}, worse on {worse} of {len(diffs)} seeds"
        )
    if args.timing_repeats < 1:
        return

    # Cost: plain and KD runs interleaved, each followed by a teacher-forward timing, so that a load change
    # on a shared machine hits both sides of every ratio.
    ratios, plain_steps, kd_steps, forwards = [], [], [], []
    for _ in range(args.timing_repeats):
        medians = []
        for callbacks in ([], [make_kd()]):
            timer = StepTimer()
            run(student(), 3, [*callbacks, timer], root, args.train_fraction)
            medians.append(statistics.median(timer.times))
        forward = teacher_forward_time(teacher)
        plain_steps.append(medians[0])
        kd_steps.append(medians[1])
        forwards.append(forward)
        ratios.append(medians[1] / (medians[0] + forward))
    plain, with_kd, forward = (statistics.median(v) for v in (plain_steps, kd_steps, forwards))
    print()
    print(
        f"median step over {args.timing_repeats} interleaved repeats: student alone {plain * 1e3:.3f} ms, "
        f"student + KD {with_kd * 1e3:.3f} ms ({with_kd / plain:.2f}x); teacher forward (batch 64, no_grad) "
        f"{forward * 1e3:.3f} ms"
    )
    print(
        f"kd_step / (plain_step + teacher_forward): median {statistics.median(ratios):.3f}, "
        f"range {min(ratios):.3f}..{max(ratios):.3f}  (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
