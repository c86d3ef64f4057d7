"""TensorDecomposition on every zoo model, alone and next to pruning / QAT in every order.

Each run ends in a model that runs in eval mode on its example input with the parameter count the
report states (counted here, shared parameters once), or is refused before the first training step
with a message that names the layer and the way out.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining, TensorDecomposition
from lightning_compress.functional import decomposition as dec
from lightning_compress.functional.quantization import is_qat
from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO
from tests.zoo.common import ZooCase

# Fast and deterministic: no latency measurement (tested in tests/callbacks), every layer that shrinks.
FAST = dict(rank=0.25, measure_latency=False, min_reduction=1.0)

# Models whose default selection includes Linear layers that the parent reads by `.weight`.
# (The zoo's ViT has its own attention module, which calls its projections like any layer.)
REFUSED = {
    # The output layer shares the token embedding's weight: a factor chain would untie it.
    "hf_gpt2": re.escape("model.lm_head.weight is tied to model.transformer.wte.weight"),
    "transformer_encoder": re.escape(
        "cannot replace 'encoder.layers.0.self_attn.out_proj' (nn.MultiheadAttention reads out_proj.weight "
        "in its forward); 'encoder.layers.0.linear1' (TransformerEncoderLayer's fast path reads linear1.weight)"
    ),
    "transformer_seq2seq": re.escape(
        "'transformer.decoder.layers.0.multihead_attn.out_proj' (nn.MultiheadAttention reads out_proj.weight "
        "in its forward); 'transformer.decoder.layers.0.linear1' (TransformerDecoderLayer's fast path"
    ),
}


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def build(name: str) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    return ZOO[name]()


def run(model: nn.Module, example: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if isinstance(example, dict):
            return model(**example)
        if isinstance(example, tuple):
            return model(*example)
        return model(example)


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def fit(case: ZooCase, tmp_path: Any, callbacks: list[pl.Callback], steps: int = 2) -> StepCounter:
    counter = StepCounter()
    t = trainer(tmp_path, [*callbacks, counter], max_epochs=-1, max_steps=steps, limit_val_batches=0)
    t.fit(case.module, case.train_loader)
    return counter


@pytest.mark.parametrize("name", list(ZOO))
def test_decomposition_alone(name: str, tmp_path: Any) -> None:
    case = build(name)
    before = unique_params(case.module)
    if name in REFUSED:
        counter = StepCounter()
        t = trainer(tmp_path, [TensorDecomposition(**FAST), counter], max_steps=2, limit_val_batches=0)
        with pytest.raises(ValueError, match=REFUSED[name]) as error:
            t.fit(case.module, case.train_loader)
        assert "HINT: exclude=" in str(error.value)
        assert counter.batches == 0 and unique_params(case.module) == before
        # The hint's patterns work: the rest of the model is decomposed and still runs.
        hint = eval(str(error.value).split("HINT: exclude=")[1].rstrip("."))  # noqa: S307 - our own list literal
        decomposition = TensorDecomposition(exclude=hint, **FAST)
        fit(case, tmp_path, [decomposition])
    else:
        decomposition = TensorDecomposition(**FAST)
        fit(case, tmp_path, [decomposition])
    after = unique_params(case.module)
    section = decomposition.last_report.sections["decomposition"]
    assert section["params_before"] == before and section["params_after"] == after
    decomposed = [r for r in section["layers"] if r["status"] == "decomposed"]
    assert decomposed and after < before
    # The per-layer rows add up to the model's change.
    assert before - after == sum(r["params_before"] - r["params_after"] for r in decomposed)
    for row in decomposed:
        assert isinstance(case.module.get_submodule(row["layer"]), nn.Sequential)
    out = run(case.module, case.example_input)
    logits = out.logits if hasattr(out, "logits") else out
    assert torch.isfinite(logits).all()


def test_gpt2_conv1d_is_decomposed_and_the_tied_head_is_kept(tmp_path: Any) -> None:
    case = build("hf_gpt2")
    gpt2 = case.module.model
    conv1d = gpt2.transformer.h[0].mlp.c_fc  # transformers' Conv1D, weight stored [in, out] = [32, 64]
    assert type(conv1d).__name__ == "Conv1D" and tuple(conv1d.weight.shape) == (32, 64)
    decomposition = TensorDecomposition(exclude=["model.lm_head"], **FAST)  # tied: refused unless excluded
    fit(case, tmp_path, [decomposition])
    rows = {r["layer"]: r for r in decomposition.rows}
    assert "model.lm_head" not in rows
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    # Conv1D 32 -> 64 at a quarter of its 2048 weights: rank floor(512 / 96) = 5, two Linear factors.
    chain = gpt2.transformer.h[0].mlp.c_fc
    assert [type(m).__name__ for m in chain] == ["Linear", "Linear"]
    assert [tuple(m.weight.shape) for m in chain] == [(5, 32), (64, 5)]
    assert rows["model.transformer.h.0.mlp.c_fc"]["params_after"] == 5 * 32 + 64 * 5 + 64


def test_conv1d_factors_reproduce_its_transposed_weight() -> None:
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(12, 7).double()  # nf=12 outputs, nx=7 inputs: weight [7, 12]
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    chain, error = dec.decompose(layer, dec.LayerPlan("svd", (7,)))  # full rank: exact
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(chain(x), layer(x), rtol=1e-9, atol=1e-9)
    assert error < 1e-10
    # Truncated: the Eckart-Young error of the weight as an [out, in] matrix.
    s = torch.linalg.svdvals(layer.weight.detach().T)
    _, error = dec.decompose(layer, dec.LayerPlan("svd", (3,)))
    assert error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-9)
    assert dec.params_of(layer, None) == 7 * 12 + 12 and dec.params_of(layer, dec.LayerPlan("svd", (3,))) == 3 * 19 + 12


# ---------------------------------------------------------------------------- with pruning and QAT
def _pruning() -> GradualPruning:
    return GradualPruning(target_sparsity=0.5, end_step=2, update_every_n_steps=1)


MAKERS = {"decomposition": lambda: TensorDecomposition(**FAST), "pruning": _pruning, "qat": QuantizationAwareTraining}
ORDERS = [
    *[list(p) for p in itertools.permutations(["decomposition", "pruning"])],
    *[list(p) for p in itertools.permutations(["decomposition", "qat"])],
    *[list(p) for p in itertools.permutations(["decomposition", "pruning", "qat"])],
]


@pytest.mark.parametrize("order", ORDERS, ids=["+".join(o) for o in ORDERS])
def test_decomposition_with_pruning_or_qat_is_refused_before_step_one(order: list[str], tmp_path: Any) -> None:
    case = build("resnet_basic")
    state = {k: v.clone() for k, v in case.module.state_dict().items()}
    counter = StepCounter()
    t = trainer(tmp_path, [*[MAKERS[n]() for n in order], counter], max_steps=2, limit_val_batches=0)
    # The first conflicting callback on the trainer is named (in trainer order).
    other = next(n for n in order if n != "decomposition")
    kind = {"pruning": "GradualPruning", "qat": "QuantizationAwareTraining"}[other]
    with pytest.raises(ValueError, match=re.escape(f"TensorDecomposition and {kind} on this trainer both select")):
        t.fit(case.module, case.train_loader)
    assert counter.batches == 0
    # Whatever the order, the refused fit gives the user's model back as it was (QAT undoes its swap).
    assert not any(is_qat(m) for m in case.module.modules())
    assert case.module.state_dict().keys() == state.keys()
    for k, v in state.items():  # no training step changed a weight
        torch.testing.assert_close(case.module.state_dict()[k], v)


def test_disjoint_layers_combine(tmp_path: Any) -> None:
    # Pruning the classifier and decomposing the convs: no layer in common, both compressions survive.
    case = build("resnet_basic")
    pruning = GradualPruning(target_sparsity=0.5, end_step=2, update_every_n_steps=1, include=["model.fc"])
    decomposition = TensorDecomposition(exclude=["model.fc"], **FAST)
    fit(case, tmp_path, [pruning, decomposition], steps=3)
    assert float((case.module.model.fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert any(r["status"] == "decomposed" for r in decomposition.rows)
    assert torch.isfinite(run(case.module, case.example_input)).all()


@pytest.mark.parametrize("earlier", ["pruning", "qat"])
def test_model_compressed_in_an_earlier_fit_is_refused(earlier: str, tmp_path: Any) -> None:
    case = build("resnet_basic")
    fit(case, tmp_path / "first", [MAKERS[earlier]()], steps=3)
    counter = StepCounter()
    t = trainer(tmp_path / "second", [TensorDecomposition(**FAST), counter], max_steps=2, limit_val_batches=0)
    expected = "exactly zero (pruned)" if earlier == "pruning" else "it is quantization-aware (QATConv2d)"
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
        t.fit(case.module, case.train_loader)
    assert "would silently undo earlier compression of 'model.conv1'" in str(error.value)
    assert counter.batches == 0
