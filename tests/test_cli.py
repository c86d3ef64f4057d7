import glob
import json
import os

import pytest

from lightning_compress.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config", ["pruning.yaml"])
def test_config_runs_and_saved_config_reloads(tmp_path, config: str) -> None:
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", config),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
    ]
    cli = main(args)
    report = glob.glob(str(tmp_path / "**" / "compression_report.json"), recursive=True)
    assert len(report) == 1
    with open(report[0]) as fh:
        summary = json.load(fh)["summary"]
    assert summary["sparsity"] > 0.1
    saved = glob.glob(str(tmp_path / "**" / "config.yaml"), recursive=True)
    assert len(saved) == 1
    # Complaint of the old tools: a saved CLI config that cannot be loaded again. This one can.
    again = main(
        [
            "fit",
            "--config",
            saved[0],
            f"--trainer.default_root_dir={tmp_path / 'again'}",
            "--trainer.limit_train_batches=2",
        ]
    )
    ours = [cb for cb in again.trainer.callbacks if type(cb).__module__.startswith("lightning_compress")]
    first = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_compress")]
    assert [type(cb) for cb in ours] == [type(cb) for cb in first]
    assert ours[0].target_sparsity == first[0].target_sparsity
