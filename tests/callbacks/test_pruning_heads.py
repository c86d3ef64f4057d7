"""GradualPruning(structure="heads", shrink=True): masked == shrunk, mid-fit removal, resume, plain reload, refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("transformers")

from lightning_compress import GradualPruning, load_shrunk  # noqa: E402
from lightning_compress.targets import tied_parameters
from tests.helpers import trainer  # noqa: E402
from tests.zoo import ZOO  # noqa: E402
from tests.zoo.common import loaders, majority_tokens  # noqa: E402
from tests.zoo.hf import TinyBert  # noqa: E402


def data() -> Any:
    return loaders(majority_tokens(256, 64, 16), majority_tokens(64, 64, 16, seed=1))[0]


class Snapshot(pl.Callback):
    """The masked model as training ends, before GradualPruning's on_fit_end removes the heads."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masked = copy.deepcopy(pl_module).eval()


def test_coupled_false_is_refused() -> None:
    with pytest.raises(ValueError, match=r"structure='heads' always masks .* coupled=False is not accepted"):
        GradualPruning(0.5, structure="heads", coupled=False)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_heads_shrunk_at_fit_end_equal_the_masked_model(name: str, tmp_path: Any) -> None:
    case = ZOO[name]()
    # No exclude needed for a tied output head (GPT-2's lm_head is wte): heads never touch it.
    ties = tied_parameters(case.module)
    pruning = GradualPruning(0.5, structure="heads", shrink=True, end_step=4, update_every_n_steps=2)
    snap = Snapshot()
    run = trainer(tmp_path, [pruning, snap], max_epochs=-1, max_steps=6, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    assert tied_parameters(case.module) == ties  # still tied, nothing untied or cut
    assert all(not t.name.endswith("lm_head.weight") for t in pruning._targets)
    x = case.example_input
    with torch.no_grad():
        masked, shrunk = snap.masked(x), case.module.eval()(x)
    assert (masked - shrunk).abs().max() <= 1e-5
    # 2 heads (Llama: 2 key/value groups of 2 query heads) per layer, one of each removed in every layer
    q = [m for n, m in case.module.named_modules() if n.endswith(("attn.c_attn", "self_attn.q_proj"))]
    assert [layer.weight.shape for layer in q] == (
        [torch.Size([32, 48])] * 2 if name == "hf_gpt2" else [torch.Size([16, 32])] * 2
    )
    section = pruning.report_section(run, case.module)
    assert section["channel_sparsity"] == 0.5 and section["shrink"]["channels_removed"] == 2


def test_heads_shrunk_mid_fit_then_resume_and_load_shrunk(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = TinyBert()
    pruning = GradualPruning(
        0.5, structure="heads", shrink=True, shrink_at_step=6, end_step=4, update_every_n_steps=2, scope="layer"
    )
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=8, limit_val_batches=0)
    run.fit(module, data())
    attn = module.model.bert.encoder.layer[0].attention.self
    assert pruning._coupled.shrunk_at_step == 6 and attn.num_attention_heads == 2 and attn.all_head_size == 16
    assert pruning._coupled.max_abs_diff <= 1e-5
    optimizer = run.optimizers[0]
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for g in optimizer.param_groups for p in g["params"])
    ckpt = tmp_path / "heads.ckpt"
    run.save_checkpoint(ckpt)

    resumed = GradualPruning(
        0.5, structure="heads", shrink=True, shrink_at_step=6, end_step=4, update_every_n_steps=2, scope="layer"
    )
    fresh = TinyBert()
    run2 = trainer(tmp_path / "2", [resumed], max_epochs=-1, max_steps=10, limit_val_batches=0)
    run2.fit(fresh, data(), ckpt_path=str(ckpt))
    assert run2.global_step == 10 and fresh.model.bert.encoder.layer[1].attention.self.num_attention_heads == 2

    loaded = load_shrunk(TinyBert, str(ckpt)).eval()
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("transformer_encoder", r"encoder\.layers\.0\.self_attn: nn\.MultiheadAttention cannot hold fewer heads"),
        ("vit_tiny", r"model\.blocks\.0\.attn: the forward fails once a head is removed"),
    ],
)
def test_models_without_removable_heads_are_refused_before_step_one(name: str, reason: str, tmp_path: Any) -> None:
    case = ZOO[name]()
    run = trainer(tmp_path, [GradualPruning(0.5, structure="heads", shrink=True)], max_steps=2)
    with pytest.raises(
        ValueError, match=rf"no attention heads of .* can be removed\. Attentions kept whole: .*{reason}"
    ):
        run.fit(case.module, case.train_loader)
    assert run.global_step == 0
