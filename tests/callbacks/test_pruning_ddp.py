import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_pruning.py")


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_process_ddp_masks_agree(tmp_path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), strategy], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert set(r0["masks"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
    pruned = sum(int((~m).sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    assert abs(pruned / total - 0.7) < 1e-3
    for name, weight in r0["weights"].items():
        assert torch.equal(weight, r1["weights"][name])  # ranks stay in lock-step
    parent = torch.load(tmp_path / "parent.pt")
    for name, mask in r0["masks"].items():
        assert torch.equal(parent[name], r0["weights"][name])
        assert (parent[name][~mask] == 0).all()
