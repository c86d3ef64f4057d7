"""GradualPruning on every zoo architecture: the model still runs, the zeros are where the metrics say,
no layer is emptied, structured zeros are whole output channels, and tied weights are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_compress import GradualPruning
from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO
from tests.zoo.common import ZooCase
from tests.zoo.test_zoo import call

# Models whose output layer shares the embedding's weight: selecting it alone is refused.
TIED = {"hf_gpt2": "model.lm_head"}


def build(name: str) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    return ZOO[name]()


def fit(case: ZooCase, pruning: GradualPruning, tmp_path: Any) -> Any:
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=case.max_steps, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    return run


@pytest.mark.parametrize("structure", ["unstructured", "channels"])
@pytest.mark.parametrize("name", list(ZOO))
def test_pruning_on_zoo(name: str, structure: str, tmp_path: Any) -> None:
    case = build(name)
    exclude = [TIED[name]] if name in TIED else None
    pruning = GradualPruning(
        0.5, structure=structure, end_step=case.max_steps // 2, update_every_n_steps=2, exclude=exclude
    )
    run = fit(case, pruning, tmp_path)
    params = dict(case.module.named_parameters())
    names = list(pruning._masks)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    # The metric is the zeros counted here, and the target is met (a structure may overshoot by a group).
    assert run.callback_metrics["compress/sparsity"].item() == pytest.approx(zeros / total, abs=1e-6)
    assert zeros / total >= 0.5 - 0.01
    for n in names:
        weight = params[n].detach()
        assert weight.count_nonzero() > 0, f"{n} was emptied"
        if structure == "channels" and weight.dim() >= 2:
            # Zeros come in whole output channels: dim 1 for HF Conv1D ([in, out]), dim 0 otherwise.
            axis = 1 if type(dict(case.module.named_modules())[n.rpartition(".")[0]]).__name__ == "Conv1D" else 0
            rows = weight.transpose(0, axis).reshape(weight.shape[axis], -1)
            dead = (rows == 0).all(dim=1)
            assert int(dead.sum()) * rows.shape[1] == int((rows == 0).sum()), f"{n}: zeros are not whole channels"
    case.module.eval()
    with torch.no_grad():
        out = call(case.module, case.example_input)
    logits = out.logits if hasattr(out, "logits") else out
    assert torch.isfinite(logits).all()


def test_tied_output_layer_is_refused_before_the_first_step(tmp_path: Any) -> None:
    case = build("hf_gpt2")
    wte = case.module.model.transformer.wte.weight.detach().clone()
    pruning = GradualPruning(0.5, end_step=4)
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to .*wte.weight.*HINT: exclude"):
        run.fit(case.module, case.train_loader)
    assert run.global_step == 0
    assert torch.equal(case.module.model.transformer.wte.weight, wte)
