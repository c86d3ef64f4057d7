"""``lightning-compress``: Lightning's CLI with the compression callbacks available from YAML.

Any LightningModule / LightningDataModule can be named by ``class_path``; callbacks go under
``trainer.callbacks``. See ``configs/`` for ready-made files, e.g.::

    lightning-compress fit --config configs/main.yaml
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand; return the CLI.

    The ``config.yaml`` it saves in the log dir loads again as it is.
    """
    return LightningCLI(args=args, run=run, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the process exits with status 0 on success)."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
