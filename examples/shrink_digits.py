"""Prune half of a digits CNN's channels per coupled group while it trains, then remove them for real.

    pip install 'lightning-compress[examples,shrink]'
    python examples/shrink_digits.py

The pruned channels are zero in every layer they touch (conv rows, BatchNorm γ/β, the next layer's input
columns) and are cut away at step 60, so the last epochs train a smaller CNN, and the model that comes
out is a plain, smaller `DigitsCNN` with the masked model's outputs.
"""

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_compress import GradualPruning, load_shrunk
from lightning_compress.demo import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    pl.seed_everything(0)
    pruning = GradualPruning(
        target_sparsity=0.5,  # half of the channels, ranked across all groups
        structure="channels",
        shrink=True,  # choose channels per coupled group and remove them
        shrink_at_step=60,  # remove them mid-fit: the rest of training runs on the smaller model
        end_step=50,
        update_every_n_steps=5,
    )
    trainer = pl.Trainer(max_epochs=4, callbacks=[pruning], logger=CSVLogger("outputs", name="shrink_digits"))
    model = DigitsCNN()
    before = sum(p.numel() for p in DigitsCNN().parameters())
    trainer.fit(model, DigitsDataModule())
    trainer.save_checkpoint("shrunk.ckpt")
    reloaded = load_shrunk(DigitsCNN, "shrunk.ckpt")  # a fresh DigitsCNN resized to the checkpoint
    after = sum(p.numel() for p in reloaded.parameters())
    print(f"val_acc={trainer.callback_metrics['val_acc']:.4f}  params {before} -> {after}")
