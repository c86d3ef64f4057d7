"""GradualPruning(structure="channels", shrink=True): bad arguments, masked == shrunk, mid-fit removal, resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("torch_pruning")

from lightning_compress import GradualPruning, load_shrunk  # noqa: E402
from lightning_compress.functional.shrink import resize_to_state_dict_  # noqa: E402
from tests.helpers import trainer  # noqa: E402
from tests.zoo import ZOO  # noqa: E402
from tests.zoo.resnet import ResNetClassifier  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"structure": "unstructured", "shrink": True}, r"shrink=True needs structure='channels'.*'unstructured'"),
        ({"structure": "2:4", "shrink": True}, r"needs structure='channels'.*got structure='2:4'"),
        ({"structure": "block:1x4", "coupled": True}, r"coupled=True needs structure='channels'"),
        ({"structure": "channels", "shrink": True, "coupled": False}, r"shrink=True needs coupled=True"),
        ({"structure": "channels", "shrink": True, "make_permanent": False}, r"make_permanent=False cannot"),
        ({"structure": "channels", "shrink_at_step": 5}, r"shrink_at_step=5 needs shrink=True"),
        ({"structure": "channels", "shrink": "yes"}, r"shrink must be True or False, got 'yes'"),
        ({"structure": "channels", "shrink": True, "shrink_at_step": -1}, r"shrink_at_step"),
        ({"structure": "channels", "channel_multiple": 8}, r"channel_multiple=8 rounds the widths of coupled"),
        ({"structure": "channels", "shrink": True, "channel_multiple": 0}, r"channel_multiple must be an integer >= 1"),
    ],
)
def test_bad_configurations(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        GradualPruning(0.5, **kwargs)


class Snapshot(pl.Callback):
    """Deep copy of the masked model when training ends, before GradualPruning's on_fit_end removes channels."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masked = copy.deepcopy(pl_module).eval()


def test_shrink_at_fit_end_equals_masked_model(tmp_path: Any) -> None:
    case = ZOO["resnet_basic"]()
    pruning = GradualPruning(0.5, structure="channels", shrink=True, end_step=10, update_every_n_steps=2)
    snap = Snapshot()
    run = trainer(tmp_path, [pruning, snap], max_epochs=-1, max_steps=14, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    model = case.module.eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - snap.masked(x)).abs().max() <= 1e-5
    before = sum(p.numel() for p in snap.masked.parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.5 * before  # half the channels of producer and consumer: ~a quarter of the weights
    # every layer still has channels; every group kept at least one
    assert all(m.out_channels >= 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    section = run.callbacks[0].report_section(run, model)
    rows = {r["model"]: r for r in section["shrink"]["masked_vs_shrunk"]}
    assert rows["masked"]["params"] == before and rows["shrunk"]["params"] == after
    assert rows["shrunk"]["flops"] < rows["masked"]["flops"]
    assert {"bytes", "latency_ms"} <= set(rows["shrunk"])
    assert section["shrink"]["max_abs_output_diff_masked_vs_shrunk"] <= 1e-5
    assert section["channel_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_shrink_mid_fit_then_resume_and_plain_load(tmp_path: Any) -> None:
    case = ZOO["resnet_basic"]()
    pruning = GradualPruning(
        0.5, structure="channels", shrink=True, shrink_at_step=8, end_step=6, update_every_n_steps=2
    )
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=12, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    assert pruning._coupled.shrunk_at_step == 8
    shrunk_params = sum(p.numel() for p in case.module.parameters())
    assert shrunk_params < sum(p.numel() for p in ResNetClassifier().parameters())
    # training went on after the removal on the small model, with the optimizer's moments sliced along
    optimizer = run.optimizers[0]
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert optimizer.state[p]["exp_avg"].shape == p.shape
    ckpt = tmp_path / "shrunk.ckpt"
    run.save_checkpoint(ckpt)

    # fit(ckpt_path=...) on a fresh full-size model: resized before the strict load, then trains on
    fresh = ResNetClassifier()
    resumed = GradualPruning(
        0.5, structure="channels", shrink=True, shrink_at_step=8, end_step=6, update_every_n_steps=2
    )
    run2 = trainer(tmp_path / "2", [resumed], max_epochs=-1, max_steps=14, limit_val_batches=0)
    run2.fit(fresh, case.train_loader, ckpt_path=str(ckpt))
    assert run2.global_step == 14
    assert sum(p.numel() for p in fresh.parameters()) == shrunk_params
    assert resumed._coupled.shrunk

    # plain loads: load_shrunk, and resize + load_state_dict on the user's own instance
    loaded = load_shrunk(ResNetClassifier, str(ckpt)).eval()
    plain = ResNetClassifier().eval()
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    resize_to_state_dict_(plain, state)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 16, 16)
    case.module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), case.module(x))
        assert torch.equal(plain(x), case.module(x))


def test_shrink_at_step_before_schedule_end_is_refused(tmp_path: Any) -> None:
    case = ZOO["resnet_basic"]()
    pruning = GradualPruning(0.5, structure="channels", shrink=True, shrink_at_step=3, end_step=6)
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=8, limit_val_batches=0)
    with pytest.raises(
        ValueError, match=r"shrink_at_step must be >= the end of the pruning schedule \(end_step 6\), got 3"
    ):
        run.fit(case.module, case.train_loader)
    assert run.global_step == 0


def test_missing_example_input_is_refused_in_setup(tmp_path: Any) -> None:
    case = ZOO["resnet_basic"]()
    case.module.example_input_array = None
    run = trainer(tmp_path, [GradualPruning(0.5, structure="channels", shrink=True)], max_steps=2)
    with pytest.raises(ValueError, match=r"has no `example_input_array`.*HINT"):
        run.fit(case.module, case.train_loader)
    assert run.global_step == 0


def test_coupled_without_shrink_keeps_size_but_zeros_are_removable(tmp_path: Any) -> None:
    case = ZOO["mobilenet_v3"]()
    pruning = GradualPruning(0.5, structure="channels", coupled=True, end_step=6, update_every_n_steps=2)
    run = trainer(tmp_path, [pruning], max_epochs=-1, max_steps=8, limit_val_batches=0)
    run.fit(case.module, case.train_loader)
    assert not pruning._coupled.shrunk
    bn = case.module.model.features[1].block[0][1]
    # a removed channel's BatchNorm γ and β are zero together
    dead = bn.weight == 0
    assert dead.any() and (bn.bias[dead] == 0).all()


def test_channel_multiple_leaves_widths_in_multiples(tmp_path: Any) -> None:
    case = ZOO["resnet_basic"]()
    original = {n: m.out_channels for n, m in case.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    pruning = GradualPruning(
        0.5,
        structure="channels",
        shrink=True,
        channel_multiple=8,
        end_step=6,
        update_every_n_steps=2,
        exclude=["model.fc"],
    )
    trainer(tmp_path, [pruning], max_epochs=-1, max_steps=8, limit_val_batches=0).fit(case.module, case.train_loader)
    widths = {n: m.out_channels for n, m in case.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert any(widths[n] < original[n] for n in widths)  # something was cut
    # every width is a multiple of 8, or untouched (a group kept whole)
    assert all(w % 8 == 0 or w == original[n] for n, w in widths.items()), widths
