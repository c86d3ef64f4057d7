import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torch_pruning")
pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_shrink.py")


@pytest.mark.xdist_group("ddp")
def test_two_process_ddp_shrinks_identically(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    for name, value in r0.items():
        # same shapes everywhere (same channels removed) and, after 4 more DDP steps on the small model, the
        # same weights; BatchNorm running statistics are per process (the last batch differs) under DDP
        assert value.shape == r1[name].shape, name
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, r1[name]), name
    assert r0["model.conv1.weight"].shape[0] < 8
    # attention heads (a small BERT, second fit in the same processes): the same heads removed on both ranks
    h0, h1 = torch.load(tmp_path / "rank0_heads.pt"), torch.load(tmp_path / "rank1_heads.pt")
    for name, value in h0.items():
        assert value.shape == h1[name].shape and torch.equal(value, h1[name]), name
    query = [v.shape[0] for k, v in h0.items() if k.endswith("attention.self.query.weight")]
    assert sum(query) == 32  # 4 of 8 heads of 8 left in the 2 layers together (global ranking)
    assert "removed" in result.stderr + result.stdout
