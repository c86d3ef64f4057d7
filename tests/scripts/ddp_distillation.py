"""Two-process CPU DDP run of KnowledgeDistillation with hint adapters; writes each rank's results.

Usage: python tests/scripts/ddp_distillation.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_compress import KnowledgeDistillation  # noqa: E402
from tests.callbacks.kd_models import TwoInputNet, two_input_data  # noqa: E402
from tests.helpers import ddp_trainer  # noqa: E402


class OddValidation(TwoInputNet):
    """Odd validation batches skip ``self(...)``: under DDP the only call of the module is then Lightning's
    forward redirection of ``validation_step(batch, batch_idx)``, which must not be taken for a forward."""

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        if batch_idx % 2 == 0:
            return super().validation_step(batch, batch_idx)
        x, extra, y = batch
        logits = self.out(torch.relu(self.mid(torch.relu(self.a(x) + self.b(extra)) * 0.5)))
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))

    def val_dataloader(self):  # noqa: ANN201
        return torch.utils.data.DataLoader(two_input_data(32, seed=1), batch_size=8)  # 2 batches per process


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    teacher = TwoInputNet(width=32)
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=2.0, features={"mid": "mid"})
    initial: dict[str, torch.Tensor] = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001
            if not initial:  # adapters exist from the first step on; copy them after one update
                initial.update({k: v.detach().clone() for k, v in kd.adapters.state_dict().items()})

    trainer = ddp_trainer(str(out), [kd, Snap()])
    model = OddValidation()
    trainer.fit(model)
    rank = trainer.global_rank
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "student": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "adapters": {k: v.detach().cpu() for k, v in kd.adapters.state_dict().items()},
            "adapters_initial": initial,
        },
        out / f"rank{rank}.pt",
    )
    meta = {
        "teacher_wrapped": isinstance(kd.teacher, torch.nn.parallel.DistributedDataParallel),
        "teacher_frozen": not any(p.requires_grad for p in kd.teacher.parameters()) and not kd.teacher.training,
        "teacher_forward_calls": kd.teacher_forward_calls,
        "train_batches": trainer.num_training_batches * trainer.max_epochs,
        "val_batches": 1 * trainer.max_epochs,  # the even batch of the two each process validates
        "agreement": kd.last_agreement,
        "world_size": trainer.world_size,
        "pid": os.getpid(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
