import os
import subprocess
import sys

import pytest

pytest.importorskip("torch_pruning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shrink_config_runs(tmp_path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "lightning-compress")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lightning_compress.cli"]
    result = subprocess.run(
        [
            *command,
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "shrink.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.callbacks.init_args.end_step=2",
            "--trainer.callbacks.init_args.shrink_at_step=3",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed" in result.stdout + result.stderr
