import os
import subprocess
import sys

import pytest
import torch

from lightning_compress import GradualPruning
from tests.callbacks.test_pruning import NeverTrains
from tests.callbacks.test_pruning_wanda import reference_mask
from tests.helpers import TinyMLP, trainer

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_pruning.py")


@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_process_ddp_masks_agree(tmp_path, strategy: str) -> None:
    """Taylor and random criteria give identical masks on both ranks; ddp_spawn's parent gets the zeros."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), strategy], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")["weights"]
    r1 = torch.load(tmp_path / "rank1.pt")["weights"]
    for name, weight in r0.items():
        assert torch.equal(weight, r1[name]), name  # ranks stay in lock-step: identical zeros and values
    hidden = torch.cat([r0["net.0.weight"].flatten(), r0["net.2.weight"].flatten()])
    assert int((hidden == 0).sum()) == round(0.7 * (512 + 1024))  # taylor: 1075 of 1536
    assert int((r0["net.4.weight"] == 0).sum()) == 64  # random: half of 4 x 32
    assert not (r0["net.4.weight"] == 0).all(dim=1).any()  # random, not whole rows
    parent = torch.load(tmp_path / "parent.pt")
    for name in ("net.0.weight", "net.2.weight", "net.4.weight"):
        assert torch.equal(parent[name], r0[name])


@pytest.mark.xdist_group("ddp")
def test_make_permanent_false_is_refused_under_ddp_spawn_before_any_step(tmp_path) -> None:
    pruning = GradualPruning(0.5, make_permanent=False)
    t = trainer(tmp_path, [pruning, NeverTrains()], strategy="ddp_spawn", devices=1, max_epochs=1)
    with pytest.raises(Exception, match=r"make_permanent=False cannot be used with a spawn strategy \(ddp_spawn\)"):
        t.fit(TinyMLP())


WANDA = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_wanda.py")


@pytest.mark.xdist_group("ddp")
def test_wanda_scores_use_the_inputs_of_every_rank(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, WANDA, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["initial"], r1["initial"])

    expected = reference_mask(r0["initial"], r0["inputs"] + r1["inputs"])  # the all-reduced statistics
    for r in (r0, r1):
        assert torch.equal(r["final"].flatten() != 0, expected)
    # The two ranks saw different data: one rank's inputs alone would have chosen differently.
    assert not torch.equal(reference_mask(r0["initial"], r0["inputs"]), expected)
