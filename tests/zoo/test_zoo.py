"""Every zoo model trains a few steps with a real Trainer and runs in eval mode on its example input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO, evaluate
from tests.zoo.common import ZooCase


def build(name: str) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    return ZOO[name]()


def call(model: torch.nn.Module, example: Any) -> torch.Tensor:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_fits_and_runs_in_eval(name: str, tmp_path: Any) -> None:
    case = build(name)
    before = evaluate(case.module, case.val_loader)
    trainer(tmp_path, [], max_epochs=-1, max_steps=case.max_steps, limit_val_batches=0).fit(
        case.module, case.train_loader
    )
    after = evaluate(case.module, case.val_loader)
    assert math.isfinite(after["loss"])
    assert after["loss"] < before["loss"], (before, after)
    case.module.eval()
    with torch.no_grad():
        out = call(case.module, case.example_input)
    assert torch.isfinite(out).all()
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_example_input_array_matches_the_case(name: str) -> None:
    """The module's ``example_input_array`` has the example's structure, so callbacks can count FLOPs on it."""
    case = build(name)
    ours, theirs = case.module.example_input_array, case.example_input
    assert type(ours) is type(theirs)
    if isinstance(ours, tuple):
        assert [t.shape for t in ours] == [t.shape for t in theirs]
    else:
        assert ours.shape == theirs.shape


def test_gpt2_head_is_tied_to_the_embedding() -> None:
    case = build("hf_gpt2")
    gpt2 = case.module.model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
