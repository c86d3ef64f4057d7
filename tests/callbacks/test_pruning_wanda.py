"""criterion="wanda" in a real fit: masks from |W| times the norms of the inputs the layer really saw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import GradualPruning
from tests.helpers import TinyMLP, trainer


class FrozenMLP(TinyMLP):
    """lr = 0: the weights do not move, so the expected scores can be computed from the initial weights."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def one_update_setup() -> tuple[FrozenMLP, list[torch.Tensor], GradualPruning]:
    """A frozen MLP recording net.0's training inputs, and Wanda pruning net.0 once, at step 3 (after steps 0-2)."""
    model = FrozenMLP()
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None
    )
    pruning = GradualPruning(
        0.5,
        criterion="wanda",
        schedule="one_shot",
        start_step=3,
        end_step=4,
        include=["net.0"],
        scope="layer",
        update_every_n_steps=1,
    )
    return model, seen, pruning


def reference_mask(weight: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Keep-mask (flattened) of 50% by |W| * ||x_j||_2 over ``inputs``, in float64, ties to the lower index."""
    norms = torch.cat(inputs).double().pow(2).sum(dim=0).sqrt()  # per input feature, over every sample
    scores = weight.double().abs() * norms[None, :]
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort(stable=True)[: scores.numel() // 2]] = False
    return keep


def test_masks_equal_the_wanda_reference_on_the_inputs_seen_before_the_update(tmp_path) -> None:
    model, seen, pruning = one_update_setup()
    weight = model.net[0].weight.detach().clone()
    trainer(tmp_path, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0).fit(model)
    expected = reference_mask(weight, seen[:3])
    assert torch.equal(model.net[0].weight.detach().flatten() != 0, expected)
    # ... and not what magnitude alone would have chosen on these weights.
    magnitude = torch.ones(weight.numel(), dtype=torch.bool)
    magnitude[weight.abs().flatten().argsort(stable=True)[: weight.numel() // 2]] = False
    assert not torch.equal(expected, magnitude)


def test_weights_attention_reads_directly_are_refused_before_the_first_step(tmp_path) -> None:
    class Attention(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.attn(x[:, None], x[:, None], x[:, None])[0][:, 0]
            return self.net(h)

    pruning = GradualPruning(0.5, criterion="wanda")
    run = trainer(tmp_path, [pruning], max_steps=2, max_epochs=-1)
    with pytest.raises(ValueError, match=r"criterion='wanda' needs the inputs.*attn.in_proj_weight.*attn.out_proj"):
        run.fit(Attention())
    assert run.global_step == 0


def test_a_model_handed_to_fit_in_eval_mode_is_scored_on_its_training_inputs(tmp_path) -> None:
    # Lightning keeps the modes of a model passed to fit in eval mode: the statistics must not depend on them.
    model, _, pruning = one_update_setup()
    model.eval()
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    weight = model.net[0].weight.detach().clone()
    trainer(tmp_path, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0).fit(model)
    assert not model.net[0].training  # still in eval mode: the premise of this test
    assert torch.equal(model.net[0].weight.detach().flatten() != 0, reference_mask(weight, seen[:3]))
