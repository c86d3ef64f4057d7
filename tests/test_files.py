"""Atomic writes: a failure while writing leaves the previous file, and no temporary file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_compress._files import save_atomically, write_atomically


def test_failed_write_keeps_the_previous_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    with pytest.raises(TypeError):
        write_atomically(str(path), [b"new first part", "not bytes"])  # type: ignore[list-item]
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_save_atomically_creates_the_directory_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "model.pt"
    save_atomically({"w": torch.arange(3)}, str(path))
    assert torch.load(path)["w"].tolist() == [0, 1, 2]
    assert os.listdir(path.parent) == ["model.pt"]


def test_unpicklable_object_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 - whatever pickle raises, nothing may be written
        save_atomically({"f": lambda: 0}, str(tmp_path / "model.pt"))
    assert os.listdir(tmp_path) == []
