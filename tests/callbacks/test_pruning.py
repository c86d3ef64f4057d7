import glob
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress.functional.stats import sparsity
from tests.helpers import TinyMLP, trainer

WEIGHTS = ["net.0.weight", "net.2.weight", "net.4.weight"]


class Probe(pl.Callback):
    """Placed after GradualPruning: records what the model looks like at every step."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.rows: list[dict[str, Any]] = []
        self.revived = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        params = dict(pl_module.named_parameters())
        targets = self.pruning.target_at(step)
        self.rows.append(
            {
                "step": step,
                "updated": self.pruning._last_update_step == step,
                "target": targets,
                "measured": {n: sparsity(params[n]) for n in targets},
                "global": self.pruning._metrics["sparsity"],
                "global_target": self.pruning._metrics["target_sparsity"],
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning._masks.items():
            self.revived += int((params[name].detach()[~mask] != 0).sum())


def fit(
    tmp_path, pruning: GradualPruning, model: pl.LightningModule | None = None, **kwargs
) -> tuple[pl.LightningModule, Probe]:
    model = model or TinyMLP()
    probe = Probe(pruning)
    trainer(tmp_path, [pruning, probe], **kwargs).fit(model)
    return model, probe


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_sparsity": 90}, r"got 90\. HINT: a fraction, not a percentage"),
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, r"must be a number in \[0, 1\)"),
        ({"target_sparsity": "0.5"}, "must be a number"),
        ({"structure": "2:4", "target_sparsity": 0.7}, r"must be a number in \[0, 0.5\)"),
        ({"structure": "3:2"}, "needs N < M"),
        ({"structure": "rows"}, "structure must be 'unstructured', 'channels'"),
        ({"criterion": "l1"}, r"criterion must be one of \['magnitude', 'random', 'taylor'\], got 'l1'"),
        ({"scope": "model"}, "scope must be one of \\['global', 'layer'\\]"),
        ({"start_step": 10, "end_step": 10}, "end_step must be > start_step"),
        ({"start_step": -1}, "start_step must be a non-negative integer"),
        ({"start_epoch": 2, "end_epoch": 1}, "end_epoch must be > start_epoch"),
        ({"update_every_n_steps": 0}, "update_every_n_steps must be an integer >= 1"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"overrides": {"net.0": 2.0}}, r"overrides\['net.0'\] must be a number in"),
        ({"exclude": "net.4"}, r"HINT: write \['net.4'\]"),
        ({"rewind_to_step": 20, "end_step": 10}, "rewind_to_step must be < end_step"),
        ({"norm": 0}, r"norm must be a number in \(0, inf\]"),
        ({"name": "a/b"}, "name must be letters"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        GradualPruning(**kwargs)


class NeverTrains(pl.Callback):
    def on_train_batch_start(self, *args: Any) -> None:
        raise AssertionError("a training step ran despite the bad configuration")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"include": ["encoder.*"]}, r"include pattern 'encoder.\*' matches no module.*net\.0"),
        ({"structure": "2:4", "include": ["net.0"], "types": ["Linear"]}, None),  # 16 inputs divide by 4: fine
        ({"structure": "1x3"}, r"1x3 blocks"),
        ({"overrides": {"net.9": 0.5}}, "overrides pattern 'net.9' matches no pruned parameter"),
        ({"types": ["Conv2d"]}, r"No module was selected.*Linear"),
    ],
)
def test_model_dependent_errors_before_first_step(tmp_path, kwargs: dict, match: str | None) -> None:
    pruning = GradualPruning(target_sparsity=0.5, **kwargs)
    t = trainer(tmp_path, [pruning, NeverTrains()] if match else [pruning], logger=CSVLogger(tmp_path), max_epochs=1)
    if match is None:
        t.fit(TinyMLP())
        return
    with pytest.raises(ValueError, match=match):
        t.fit(TinyMLP())
    assert not glob.glob(str(tmp_path / "**" / "compression_report*"), recursive=True)
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)


# ----------------------------------------------------------------------------- schedule and masks
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_measured_sparsity_equals_schedule_at_every_update(tmp_path, scope: str) -> None:
    pruning = GradualPruning(0.8, start_step=2, end_step=12, update_every_n_steps=2, scope=scope)
    model, probe = fit(tmp_path, pruning, max_epochs=2)  # 16 steps
    updates = [r for r in probe.rows if r["updated"]]
    assert [r["step"] for r in updates] == [2, 4, 6, 8, 10, 12]
    for row in updates:
        if scope == "layer":  # every layer within one weight of its target
            for name, value in row["measured"].items():
                numel = dict(model.named_parameters())[name].numel()
                assert abs(value - row["target"][name]) * numel <= 0.5 + 1e-6
        assert row["global"] == pytest.approx(row["global_target"], abs=1e-3)
    assert probe.rows[-1]["global"] == pytest.approx(0.8, abs=1e-3)
    assert probe.rows[0]["global"] == 0.0  # nothing before start_step
    assert probe.revived == 0


@pytest.mark.parametrize(
    "model_kwargs,trainer_kwargs",
    [
        ({"optimizer": "sgd", "weight_decay": 0.1}, {}),
        ({"optimizer": "adamw", "weight_decay": 0.5, "lr": 0.05}, {}),
        ({"optimizer": "sgd"}, {"accumulate_grad_batches": 3}),
        ({"optimizer": "adamw"}, {"gradient_clip_val": 0.01}),
    ],
    ids=["sgd-momentum-wd", "adamw-decoupled-wd", "grad-accumulation", "grad-clipping"],
)
def test_pruned_weights_never_revive(tmp_path, model_kwargs, trainer_kwargs) -> None:
    pruning = GradualPruning(0.7, end_step=4, update_every_n_steps=1)
    model, probe = fit(tmp_path, pruning, TinyMLP(**model_kwargs), max_epochs=3, **trainer_kwargs)
    assert probe.revived == 0
    params = dict(model.named_parameters())
    assert sparsity(torch.cat([params[n].flatten() for n in WEIGHTS])) == pytest.approx(0.7, abs=1e-3)
    # A finished model is a plain model with zeros: same keys, no hooks, strict load into a fresh copy.
    assert model.state_dict().keys() == TinyMLP().state_dict().keys()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    TinyMLP().load_state_dict(model.state_dict())


def test_clipping_norm_excludes_pruned_gradients(tmp_path) -> None:
    pruning = GradualPruning(0.9, end_step=1, update_every_n_steps=1, schedule="one_shot")
    seen: list[float] = []

    class GradNorm(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # runs after GradualPruning's hook and before Lightning clips: what clipping will see
            masks = pruning._masks
            seen.append(sum(float(pl_module.get_parameter(n).grad[~m].abs().sum()) for n, m in masks.items()))

    trainer(tmp_path, [pruning, GradNorm()], max_epochs=1).fit(TinyMLP())
    assert seen and all(v == 0.0 for v in seen[1:])


def test_structures_end_exactly(tmp_path) -> None:
    pruning = GradualPruning(structure="2:4", end_step=6, update_every_n_steps=2)
    model, probe = fit(tmp_path, pruning)
    for name in WEIGHTS:
        runs = (dict(model.named_parameters())[name].detach() != 0).reshape(-1, 4).sum(1)
        assert (runs <= 2).all() and probe.rows[-1]["measured"][name] == pytest.approx(0.5, abs=0.01)

    channels = GradualPruning(0.5, structure="channels", scope="layer", end_step=6, exclude=["net.4"])
    model, _ = fit(tmp_path, channels)
    w = model.net[0].weight.detach()
    dead = (w == 0).all(dim=1)
    assert int(dead.sum()) == 16 and ((w != 0).all(dim=1) | dead).all()


def test_taylor_and_random_criteria_reach_target(tmp_path) -> None:
    for criterion in ("taylor", "random"):
        pruning = GradualPruning(0.6, criterion=criterion, end_step=8, update_every_n_steps=2)
        _, probe = fit(tmp_path, pruning)
        assert probe.rows[-1]["global"] == pytest.approx(0.6, abs=1e-3)
        assert probe.revived == 0


def test_overrides_and_exclude(tmp_path) -> None:
    pruning = GradualPruning(0.8, overrides={"net.4": 0.25}, exclude=["net.0"], end_step=6)
    model, probe = fit(tmp_path, pruning)
    final = probe.rows[-1]["measured"]
    assert set(final) == {"net.2.weight", "net.4.weight"}
    assert final["net.4.weight"] == pytest.approx(0.25, abs=0.01)
    assert final["net.2.weight"] == pytest.approx(0.8, abs=0.01)
    assert sparsity(model.net[0].weight) == 0.0


def test_epoch_arguments_are_converted_to_steps(tmp_path) -> None:
    pruning = GradualPruning(0.5, start_epoch=1, end_epoch=2, update_every_n_steps=1)
    _, probe = fit(tmp_path, pruning, max_epochs=3)  # 8 steps per epoch
    assert pruning._window == (8, 16)
    assert all(r["global"] == 0 for r in probe.rows if r["step"] < 8)


def test_rewind_to_step_restores_surviving_weights(tmp_path) -> None:
    snapshot: dict[str, torch.Tensor] = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1 and not snapshot:
                snapshot.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})
            if trainer.global_step == 6:
                for n, mask in pruning._masks.items():
                    assert torch.equal(pl_module.get_parameter(n).detach(), snapshot[n] * mask)
                pl_module.checked = True

    pruning = GradualPruning(0.5, rewind_to_step=1, end_step=6, update_every_n_steps=2)
    model = TinyMLP()
    trainer(tmp_path, [pruning, Snap()]).fit(model)
    assert getattr(model, "checked", False)
    # the snapshot is a real copy: training after step 1 did not change it
    assert not torch.equal(snapshot["net.0.weight"], model.net[0].weight.detach())


# ----------------------------------------------------------------------------- metrics, report, loggers
def test_metrics_reach_loggers_and_report_is_written(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruning = GradualPruning(0.75, end_step=8, update_every_n_steps=2)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [pruning], logger=[tb, csv], log_every_n_steps=1, max_epochs=2)
    t.fit(TinyMLP())

    events = EventAccumulator(tb.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("compress/sparsity", "compress/target_sparsity", "compress/nonzero_params", "compress/final/sparsity"):
        assert key in tags
    last = events.Scalars("compress/sparsity")[-1].value
    assert last == pytest.approx(0.75, abs=1e-3)
    assert "train_loss" in tags  # next to the user's metrics

    import csv as csvlib

    with open(os.path.join(csv.log_dir, "metrics.csv")) as fh:
        rows = list(csvlib.DictReader(fh))
    assert any(r.get("compress/sparsity") for r in rows)

    import json

    with open(os.path.join(t.log_dir, "compression_report.json")) as fh:
        report = json.load(fh)
    layers = {layer["name"]: layer for layer in report["layers"]}
    total = sum(layers[n]["params"] for n in ("net.0", "net.2", "net.4"))
    assert report["sections"]["pruning"]["measured_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert report["summary"]["nonzero_params"] < total
    assert report["summary"]["flops"] > report["summary"]["effective_flops"] > 0  # captured input
    assert os.path.exists(os.path.join(t.log_dir, "compression_report.md"))
    assert "compress/sparsity" in t.callback_metrics


def test_model_checkpoint_can_monitor_sparsity(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="compress/sparsity", mode="max", save_top_k=1)
    pruning = GradualPruning(0.6, end_step=10)
    trainer(tmp_path, [pruning, ckpt], enable_checkpointing=True, max_epochs=2).fit(TinyMLP())
    assert ckpt.best_model_score is not None and float(ckpt.best_model_score) == pytest.approx(0.6, abs=1e-3)


# ----------------------------------------------------------------------------- checkpoints
def test_resume_mid_schedule_restores_masks_and_position(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    first = GradualPruning(0.8, end_step=24, update_every_n_steps=4)
    trainer(tmp_path, [first, ckpt], enable_checkpointing=True, max_epochs=1).fit(TinyMLP())
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    state = saved["callbacks"][first.state_key]
    assert state["last_update_step"] == 4 and set(state["masks"]) == set(WEIGHTS)

    # A mid-training checkpoint is a plain model: strict load into a fresh copy, zeros included.
    plain = TinyMLP()
    plain.load_state_dict(saved["state_dict"])
    for name, mask in state["masks"].items():
        assert (plain.get_parameter(name).detach()[~mask] == 0).all()

    restored: dict[str, Any] = {}

    class AtResume(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            if not restored:
                restored["step"] = trainer.global_step
                restored["masks"] = {k: v.clone() for k, v in second._masks.items()}
                restored["last"] = second._last_update_step

    second = GradualPruning(0.8, end_step=24, update_every_n_steps=4)
    model = TinyMLP()
    trainer(tmp_path, [second, AtResume()], max_epochs=4).fit(model, ckpt_path=str(path))
    assert restored["step"] == 8 and restored["last"] == 4
    for name, mask in state["masks"].items():
        assert torch.equal(restored["masks"][name], mask)  # identical masks at the resume point
        assert not (second._masks[name] & ~mask).any()  # and they only grew afterwards
    assert second._metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_checkpoint_with_masks_that_do_not_fit_is_refused(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [GradualPruning(0.5, end_step=4), ckpt], enable_checkpointing=True, max_epochs=1).fit(TinyMLP())
    narrower = GradualPruning(0.5, end_step=4, exclude=["net.4"])
    with pytest.raises(ValueError, match=r"masks do not fit the model: net\.4\.weight \(not in the model\)"):
        trainer(tmp_path, [narrower, NeverTrains()], max_epochs=2).fit(
            TinyMLP(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_make_permanent_false_keeps_torch_reparametrisation_and_round_trips(tmp_path) -> None:
    pruning = GradualPruning(0.5, end_step=4, make_permanent=False)
    model, _ = fit(tmp_path, pruning, max_epochs=1)
    keys = model.state_dict().keys()
    assert "net.0.weight_orig" in keys and "net.0.weight_mask" in keys
    mask = model.net[0].weight_mask.bool().clone()
    # A later fit folds torch's reparametrisation back and keeps the mask.
    again = GradualPruning(0.5, end_step=4)
    trainer(tmp_path, [again], max_epochs=1).fit(model)
    assert "net.0.weight_orig" not in model.state_dict()
    assert not (model.net[0].weight.detach()[~mask] != 0).any()


# ----------------------------------------------------------------------------- models and combinations
class TinyTransformer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.encoder(x * scale).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x, scale=0.5), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        x = torch.randn(64, 5, 16)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,))), batch_size=16)


def test_transformer_attention_weights_are_pruned(tmp_path) -> None:
    pruning = GradualPruning(0.5, end_step=4, update_every_n_steps=1, include=["encoder.*"])
    model, probe = fit(tmp_path, pruning, TinyTransformer(), max_epochs=2)
    attn = model.encoder.layers[0].self_attn
    assert sparsity(attn.in_proj_weight) > 0.3 and sparsity(attn.out_proj.weight) > 0.3
    assert probe.rows[-1]["global"] == pytest.approx(0.5, abs=1e-3)
    assert probe.revived == 0


def test_two_instances_on_different_groups(tmp_path) -> None:
    a = GradualPruning(0.8, include=["net.0", "net.2"], name="hidden", end_step=6)
    b = GradualPruning(0.3, include=["net.4"], name="head", end_step=6, structure="channels", scope="layer")
    t = trainer(tmp_path, [a, b], max_epochs=1)
    model = TinyMLP()
    t.fit(model)
    assert a._metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert sparsity(model.net[4].weight) == pytest.approx(0.25)  # 1 of 4 output channels
    assert "compress/hidden/sparsity" in t.callback_metrics and "compress/head/sparsity" in t.callback_metrics

    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        trainer(tmp_path, [GradualPruning(0.5), GradualPruning(0.5)], max_epochs=1)


def test_repeated_fit_keeps_masks(tmp_path) -> None:
    pruning = GradualPruning(0.6, end_step=4, update_every_n_steps=2)
    model = TinyMLP()
    trainer(tmp_path, [pruning], max_epochs=1).fit(model)
    first = {k: v.clone() for k, v in pruning._masks.items()}
    trainer(tmp_path, [pruning], max_epochs=1).fit(model)
    for name, mask in first.items():
        assert not (pruning._masks[name] & ~mask).any()
        assert (model.get_parameter(name).detach()[~mask] == 0).all()
    assert pruning._metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_metrics_reach_mlflow(tmp_path) -> None:
    import mlflow
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="prune", tracking_uri=uri)
    trainer(tmp_path, [GradualPruning(0.5, end_step=4)], logger=logger, log_every_n_steps=1).fit(TinyMLP())
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(logger.run_id, "compress/sparsity")
    assert history and history[-1].value == pytest.approx(0.5, abs=1e-3)


class QuietMLP(TinyMLP):
    # Lightning 2.6.6 + torch 2.13: `self.log` inside a compiled training_step fails in dynamo, callbacks or not.
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_compiled_model_is_pruned(tmp_path) -> None:
    model = QuietMLP()
    pruning = GradualPruning(0.6, end_step=4, update_every_n_steps=1)
    trainer(tmp_path, [pruning], max_epochs=1).fit(torch.compile(model, backend="eager"))
    weights = torch.cat([model.get_parameter(n).detach().flatten() for n in WEIGHTS])
    assert sparsity(weights) == pytest.approx(0.6, abs=1e-3)
