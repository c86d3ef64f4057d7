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


def test_masks_equal_the_wanda_reference_on_the_inputs_seen_before_the_update(tmp_path) -> None:
    model = FrozenMLP()
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None
    )
    weight = model.net[0].weight.detach().clone()
    # One update, at step 3: before it, the training forwards of steps 0, 1 and 2.
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
    trainer(tmp_path, [pruning], max_epochs=-1, max_steps=4, limit_val_batches=0).fit(model)
    inputs = torch.cat(seen[:3]).double()
    norms = inputs.pow(2).sum(dim=0).sqrt()  # per input feature, over every sample of the 3 batches
    scores = weight.double().abs() * norms[None, :]
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[scores.flatten().argsort(stable=True)[: scores.numel() // 2]] = False
    assert torch.equal(model.net[0].weight.detach().flatten() != 0, expected)
    # ... and not what magnitude alone would have chosen on these weights.
    magnitude = torch.ones(scores.numel(), dtype=torch.bool)
    magnitude[weight.abs().flatten().argsort(stable=True)[: scores.numel() // 2]] = False
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
