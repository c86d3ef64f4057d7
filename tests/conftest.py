import os

import pytest
import torch

# Two cores: one torch thread per test process keeps pytest-xdist workers from fighting.
torch.set_num_threads(1)
os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
