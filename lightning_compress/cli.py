"""``lightning-compress``: Lightning's CLI with the compression callbacks available from YAML.

Any LightningModule / LightningDataModule can be named by ``class_path``; callbacks go under
``trainer.callbacks``. See ``configs/`` for ready-made files, e.g.::

    lightning-compress fit --config configs/pruning.yaml
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` defaults to ``sys.argv``). The saved ``config.yaml`` reloads as it is."""
    return LightningCLI(
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
