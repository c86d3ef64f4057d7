"""benchmarks/byte_lm.py keeps running: its data, its bits-per-byte metric and a few steps of each path."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def byte_lm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("byte_lm", ROOT / "benchmarks" / "byte_lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_files_are_every_tenth_and_windows_shift_by_one(byte_lm: ModuleType, tmp_path: Any) -> None:
    files = []
    for i in range(20):
        files.append(tmp_path / f"{i}.py")
        files[-1].write_bytes(bytes([65 + i]) * 50)
    train, held = byte_lm.split_bytes(files)
    assert held.tolist() == [65] * 50 + [10] + [75] * 50 + [10]  # files 0 and 10, each ending in a newline
    assert len(train) == 18 * 51
    batch = next(byte_lm.windows(torch.arange(1000), context=8, batch=3, seed=0))
    assert batch.shape == (3, 9) and torch.equal(batch[:, 1:], batch[:, :-1] + 1)
    assert all(p.suffix == ".py" for p in byte_lm.source_files("pytest", max_files=5))


def test_bits_per_byte_of_uniform_predictions_is_eight(byte_lm: ModuleType) -> None:
    class Uniform(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 256)

    held = torch.randint(0, 256, (200,))
    assert byte_lm.bits_per_byte(Uniform(), held, context=16, max_windows=5) == pytest.approx(math.log2(256))


def test_a_few_steps_of_every_path_run(byte_lm: ModuleType, tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    args = byte_lm.parse_args(["--quick"])
    data = torch.randint(0, 256, (4000,))
    model = byte_lm.ByteLM(args.d, args.layers, args.heads, args.context)
    byte_lm.fit(model, data, args, 2, 0, [])
    calibration = [next(byte_lm.windows(data, args.context, 4, seed=1))[:, :-1]]
    for criterion in ("wanda", "sparsegpt"):
        assert byte_lm.sparsity_of(byte_lm.one_shot(model, criterion, "2:4", calibration)) == pytest.approx(0.5)
    byte_lm.fit(model, data, args, 3, 0, [byte_lm.gradual("sparsegpt", "unstructured", 3, 2)])
    assert byte_lm.sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    ptq = byte_lm.ptq(model, byte_lm.quantized_names(model), 16, calibration)
    assert math.isfinite(byte_lm.bits_per_byte(ptq, data, args.context, 4))
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
