"""Tied weights (one tensor owned by two modules, as language models tie lm_head to the embedding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import CompressionReport
from lightning_compress.functional.stats import model_stats
from lightning_compress.targets import select_modules, select_parameters, tied_parameters


class TiedLM(nn.Module):
    """Embedding -> Linear -> output layer sharing the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(12, 4)
        self.mid = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 12, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.mid(self.wte(tokens))))


def test_tied_parameters_lists_every_other_name() -> None:
    assert tied_parameters(TiedLM()) == {"wte.weight": ["lm_head.weight"], "lm_head.weight": ["wte.weight"]}
    assert tied_parameters(nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("select", [select_parameters, select_modules])
def test_selecting_one_side_of_a_tie_is_refused_naming_both(select) -> None:
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to wte.weight .*HINT: exclude=\['lm_head'\]"):
        select(TiedLM(), types=["Linear"])


def test_excluding_the_tied_layer_selects_the_rest() -> None:
    assert [t.name for t in select_parameters(TiedLM(), types=["Linear"], exclude=["lm_head"])] == ["mid.weight"]


def test_both_sides_selected_give_one_target() -> None:
    model = TiedLM()
    targets = select_parameters(model, types=["Linear", "Embedding"])
    # Embedding's weight and lm_head's weight are one tensor: one target, so it is pruned (and counted) once.
    assert [t.name for t in targets] == ["wte.weight", "mid.weight"]
    assert targets[0].parameter is model.lm_head.weight


def test_statistics_count_a_tied_tensor_once() -> None:
    model = TiedLM()
    with torch.no_grad():
        model.wte.weight[:6] = 0.0  # 24 of its 48 values
    expected_params = 12 * 4 + (4 * 4 + 4)  # the shared 12x4 matrix once, plus mid
    assert sum(row.params for row in model_stats(model)) == expected_params
    report = CompressionReport.from_model(model)
    assert report.summary["params"] == expected_params
    assert report.summary["nonzero_params"] == expected_params - 24 - int((model.mid.weight == 0).sum())
