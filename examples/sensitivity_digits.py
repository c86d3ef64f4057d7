"""Measure which layers of the digits CNN tolerate pruning and low bit widths, then prune accordingly.

    python examples/sensitivity_digits.py

1. Train the CNN for a few epochs (plain fp32).
2. `sensitivity` prunes each layer alone to 50/75/90% and quantizes it alone to 2/4/8 bits, runs the
   model's own `validation_step` on each variant and restores the layer (no training involved).
3. The measured drops become per-layer `overrides` within a budget of 1 accuracy point, and a second
   fit prunes with them.
"""

import time

import pytorch_lightning as pl

from lightning_compress import GradualPruning
from lightning_compress.demo import DigitsCNN, DigitsDataModule
from lightning_compress.sensitivity import sensitivity

if __name__ == "__main__":
    pl.seed_everything(0)
    model, data = DigitsCNN(), DigitsDataModule()
    pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False).fit(model, data)

    start = time.perf_counter()
    result = sensitivity(model, [data.val_dataloader()], sparsities=(0.5, 0.75, 0.9), bits=(2, 4, 8))
    print(result.to_markdown())
    print(f"sweep: {len(result.rows)} measurements in {time.perf_counter() - start:.1f} s")
    overrides = result.pruning_overrides(budget=0.01)  # each layer alone loses at most 1 point of val_acc
    bits = result.bits_overrides(budget=0.01)
    print(f"pruning overrides: {overrides}\nQAT bit overrides: {bits}")

    pruning = GradualPruning(target_sparsity=0.5, overrides=overrides, end_epoch=2, update_every_n_steps=5)
    trainer = pl.Trainer(max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    print(f"val_acc={metrics['val_acc']:.4f}  sparsity={metrics['compress/sparsity']:.4f}")
