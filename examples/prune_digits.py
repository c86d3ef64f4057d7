"""Train a small CNN on scikit-learn's bundled digits and prune it to 80% sparsity while it trains.

    python examples/prune_digits.py

Nothing in the LightningModule knows about pruning: the callback is all it takes.
"""

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_compress import GradualPruning
from lightning_compress.demo import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    pl.seed_everything(0)
    pruning = GradualPruning(
        target_sparsity=0.8,  # total fraction of zero weights at the end of the schedule
        schedule="cubic",  # Zhu & Gupta: prune fast early, gently near the end
        end_epoch=6,  # reach 80% after 6 of 8 epochs, then fine-tune at that sparsity
        update_every_n_steps=5,
        exclude=["classifier"],  # keep the last layer dense
    )
    trainer = pl.Trainer(max_epochs=8, callbacks=[pruning], logger=CSVLogger("outputs", name="prune_digits"))
    trainer.fit(DigitsCNN(), DigitsDataModule())
    # The report (also written as compression_report.json/.md in the log dir) is printed at fit end.
    metrics = trainer.callback_metrics
    print(f"val_acc={metrics['val_acc']:.4f}  sparsity={metrics['compress/sparsity']:.4f}")
