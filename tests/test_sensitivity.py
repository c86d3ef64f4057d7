"""Per-layer sensitivity sweeps, checked against masks and quantization computed here in float64."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining
from lightning_compress.sensitivity import sensitivity


class TwoBranch(pl.LightningModule):
    """``main(x) + 0 * unused(x)``: pruning ``unused`` cannot change anything, pruning ``main`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + 0.0 * self.unused(x)

    def validation_step(self, batch, batch_idx) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), batch_size=len(x))


def data(n_batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n_batches)]


def loss_with(model: TwoBranch, batches, weight: torch.Tensor) -> float:
    """The validation loss with main.weight replaced, in float64, averaged over samples."""
    total = 0.0
    for x, y in batches:
        logits = x.double() @ weight.double().t() + model.main.bias.detach().double()
        total += float(F.cross_entropy(logits, y, reduction="sum"))
    return total / sum(len(x) for x, _ in batches)


def test_values_match_masks_and_quantization_computed_by_hand() -> None:
    torch.manual_seed(0)
    model, batches = TwoBranch(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sensitivity(model, [batches], sparsities=(0.5,), bits=(3,))
    w = model.main.weight.detach()
    # Magnitude pruning at 50%: the 9 smallest |w| of 18, found by a float64 sort.
    keep = torch.ones(18, dtype=torch.bool)
    keep[w.double().abs().flatten().argsort(stable=True)[:9]] = False
    pruned = w * keep.reshape(w.shape)
    # 3-bit symmetric per output row: codes in [-3, 3], scale max|w| / 3, round half to even.
    scale = w.double().abs().amax(dim=1, keepdim=True) / 3
    quantized = (w.double() / scale).round().clamp(-3, 3) * scale
    rows = {(r.layer, r.kind): r.value for r in result.rows}
    assert result.metric == "val_loss" and result.mode == "min"
    assert result.baseline == pytest.approx(loss_with(model, batches, w), abs=1e-5)
    assert rows[("main", "sparsity")] == pytest.approx(loss_with(model, batches, pruned), abs=1e-5)
    assert rows[("main", "bits")] == pytest.approx(loss_with(model, batches, quantized.float()), abs=1e-5)
    assert rows[("unused", "sparsity")] == pytest.approx(result.baseline, abs=1e-6)
    for k, v in model.state_dict().items():  # every layer restored exactly
        assert torch.equal(v, before[k]), k


def test_overrides_keep_each_layer_within_the_budget_and_feed_the_callbacks() -> None:
    torch.manual_seed(0)
    model, batches = TwoBranch(), data()
    result = sensitivity(model, [batches], sparsities=(0.25, 0.5, 0.9), bits=(2, 4, 8))
    drops = {(r.layer, r.kind, r.level): result.drop(r) for r in result.rows}
    prune = result.pruning_overrides(budget=0.0)
    assert prune["unused"] == 0.9  # costs nothing at any level
    allowed = [lv for lv in (0.25, 0.5, 0.9) if drops[("main", "sparsity", lv)] <= 0.0]
    assert prune["main"] == max(allowed, default=0.0)
    bits = result.bits_overrides(budget=0.01)
    assert bits["unused"] == 2
    assert bits["main"] == min([b for b in (2, 4, 8) if drops[("main", "bits", b)] <= 0.01], default=8)
    # The overrides are what the callbacks accept.
    GradualPruning(0.5, overrides=prune)
    QuantizationAwareTraining(overrides={k: v for k, v in bits.items()})
    assert "| main |" in result.to_markdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsities": (90,)}, r"sparsities\[0\] must be a number in \[0, 1\), got 90. HINT: a fraction"),
        ({"bits": (16,)}, r"bits\[0\] must be one of"),
        ({"sparsities": (), "bits": ()}, "give at least one level"),
        ({"metric": "val_acc"}, r"metric 'val_acc' is not logged by validation_step; it logs \['val_loss'\]"),
        ({"max_batches": 0}, "max_batches must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_naming_what_exists(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sensitivity(TwoBranch(), [data(1)], **kwargs)
