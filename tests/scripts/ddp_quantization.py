"""Two-process CPU DDP run of QuantizationAwareTraining; every rank writes its observer state.

Usage: python ddp_quantization.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lightning_compress import QuantizationAwareTraining  # noqa: E402
from lightning_compress.functional.qat import qat_modules  # noqa: E402
from tests.helpers import TinyMLP, ddp_trainer  # noqa: E402


class Dump(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        state["__metrics__"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compress/")}
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))
        assert all(m.observer_enabled is False for _, m in qat_modules(pl_module))  # frozen at step 6


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = TinyMLP()
    qat = QuantizationAwareTraining(start_step=1, freeze_observers_step=6)
    trainer = ddp_trainer(
        out,
        [qat, Dump(out)],
        # DDP's default broadcast_buffers would copy rank 0's observer buffers at every forward and hide
        # whether the callback keeps ranks in agreement itself; turn it off to test the callback.
        strategy=DDPStrategy(broadcast_buffers=False),
        limit_train_batches=4,
        limit_val_batches=0,
    )
    trainer.fit(model)


if __name__ == "__main__":
    main(sys.argv[1])
