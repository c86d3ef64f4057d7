"""Decompose a digits CNN with TensorDecomposition, fine-tune it, and reload the decomposed checkpoint.

PYTHONPATH=$PWD python examples/decomposition_digits.py
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_compress import TensorDecomposition, load_decomposed
from lightning_compress.demo import DigitsCNN, DigitsDataModule


def main() -> None:
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = DigitsCNN()
    decomposition = TensorDecomposition(
        rank=0.25,  # each decomposed layer keeps ~25% of its parameters
        apply_at_epoch=6,  # decompose after 6 epochs, then fine-tune the factors
        exclude=["classifier"],
        latency_batch=256,  # per-layer CPU latency, original vs decomposed, in the report
    )
    trainer = pl.Trainer(
        max_epochs=10,
        accelerator="cpu",
        callbacks=[decomposition],
        default_root_dir="outputs/decomposition_example",
        enable_progress_bar=False,
        logger=False,
    )
    trainer.fit(model, data)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})

    path = "outputs/decomposition_example/decomposed.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_decomposed(DigitsCNN, path)  # plain DigitsCNN.load_from_checkpoint would miss the factors
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    reloaded.eval()
    print("reloaded model matches:", torch.allclose(model(x), reloaded(x)))
    print(reloaded.features[3])


if __name__ == "__main__":
    main()
