import glob
import json
import os
import subprocess
import sys

import pytest

from lightning_compress.cli import build_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def ours(cli) -> list:
    return [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_compress")]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_and_saved_config_reloads(tmp_path, monkeypatch, config: str) -> None:
    monkeypatch.chdir(tmp_path)  # configs write relative paths (outputs/...)
    first = build_cli(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", config),
            f"--trainer.default_root_dir={tmp_path / 'first'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=1",
        ]
    )
    reports = glob.glob(str(tmp_path / "first" / "**" / "compression_report.json"), recursive=True)
    assert len(reports) == 1
    with open(reports[0]) as fh:
        report = json.load(fh)
    assert report["summary"]["params"] > 0 and report["layers"]
    saved = glob.glob(str(tmp_path / "first" / "**" / "config.yaml"), recursive=True)
    assert len(saved) == 1
    # The old tools' complaint: a saved CLI config that cannot be loaded again. These can.
    again = build_cli(
        [
            "fit",
            "--config",
            saved[0],
            f"--trainer.default_root_dir={tmp_path / 'again'}",
            "--trainer.limit_train_batches=2",
        ]
    )
    assert [type(cb) for cb in ours(again)] == [type(cb) for cb in ours(first)]
    assert [cb.state_key for cb in ours(again)] == [cb.state_key for cb in ours(first)]


def test_console_script_exits_zero(tmp_path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "lightning-compress")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lightning_compress.cli"]
    result = subprocess.run(
        [
            *command,
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "pruning.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
