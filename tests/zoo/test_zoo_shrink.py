"""GradualPruning(structure="channels", shrink=True) on the zoo: a plain smaller model with the masked outputs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("torch_pruning")

from lightning_compress import GradualPruning  # noqa: E402
from tests.helpers import trainer  # noqa: E402
from tests.zoo import NEEDS_TRANSFORMERS, ZOO  # noqa: E402
from tests.zoo.test_zoo import call  # noqa: E402

# What shrinks on each architecture (the rest is kept whole, with its reason in the report):
# conv nets: every channel group; transformers: the FFN hidden units only (residual width is
# LayerNorm-coupled; attention heads are reshaped by the attention's own forward).
SHRINKABLE = ["resnet_basic", "resnet_bottleneck", "mobilenet_v3", "vit_tiny", "transformer_encoder", "hf_bert"]


class Snapshot(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masked = copy.deepcopy(pl_module).eval()


def logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", SHRINKABLE)
def test_shrunk_equals_masked_on_zoo(name: str, tmp_path: Any) -> None:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    case = ZOO[name]()
    pruning = GradualPruning(0.5, structure="channels", shrink=True, end_step=6, update_every_n_steps=2)
    snap = Snapshot()
    run = trainer(tmp_path, [pruning, snap], max_epochs=-1, max_steps=8, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    case.module.eval()
    with torch.no_grad():
        diff = (logits(call(case.module, case.example_input)) - logits(call(snap.masked, case.example_input))).abs()
    assert float(diff.max()) <= 1e-5
    before = sum(p.numel() for p in snap.masked.parameters())
    after = sum(p.numel() for p in case.module.parameters())
    assert after < before
    # a plain model: no hooks, no masks left on it
    assert not any(m._forward_pre_hooks for m in case.module.modules())


def test_untraceable_zoo_model_fails_in_setup(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    case = ZOO["hf_gpt2"]()
    pruning = GradualPruning(0.5, structure="channels", shrink=True, exclude=["model.lm_head"])
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"could not trace .* on the example input: TypeError.*HINT: .*coupled=False"):
        run.fit(case.module, case.train_loader)
    assert run.global_step == 0
