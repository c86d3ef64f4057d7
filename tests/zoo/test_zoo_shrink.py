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
# LayerNorm-coupled; attention heads are structure="heads", tests/callbacks/test_pruning_heads.py).
# GPT-2 cannot be traced: its FFN units are found by layout instead (lightning_compress/functional/ffn.py).
SHRINKABLE = [
    "resnet_basic",
    "resnet_bottleneck",
    "mobilenet_v3",
    "vit_tiny",
    "transformer_encoder",
    "transformer_seq2seq",
    "hf_bert",
]


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


def test_untraced_gpt2_prunes_its_ffn_units_by_layout(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    case = ZOO["hf_gpt2"]()
    pruning = GradualPruning(
        0.5, structure="channels", shrink=True, end_step=4, update_every_n_steps=2, exclude=["model.lm_head"]
    )
    snap = Snapshot()
    run = trainer(tmp_path, [pruning, snap], max_epochs=-1, max_steps=6, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"could not trace .*TypeError.*only the FFN units of known layouts"):
        run.fit(case.module, case.train_loader)
    with torch.no_grad():
        diff = (call(case.module.eval(), case.example_input) - call(snap.masked, case.example_input)).abs()
    assert float(diff.max()) <= 1e-5
    mlp = case.module.model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape[1] == mlp.c_proj.weight.shape[0] < 64  # n_inner 64, global ranking


class Untraceable(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.example_input_array = torch.zeros(1, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + None  # type: ignore[operator]


def test_untraceable_model_without_known_layout_fails_in_setup(tmp_path: Any) -> None:
    pruning = GradualPruning(0.5, structure="channels", shrink=True)
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=2, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 4)), batch_size=2)
    with pytest.raises(ValueError, match=r"could not trace .* on the example input: TypeError.*HINT: .*coupled=False"):
        run.fit(Untraceable(), loader)
    assert run.global_step == 0
