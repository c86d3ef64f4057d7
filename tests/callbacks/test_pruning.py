import glob
import math
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
from lightning_compress.schedules import Exponential, Polynomial
from tests.helpers import TinyMLP, trainer

WEIGHTS = ["net.0.weight", "net.2.weight", "net.4.weight"]
SIZES = {"net.0.weight": 32 * 16, "net.2.weight": 32 * 32, "net.4.weight": 4 * 32}
TOTAL = sum(SIZES.values())  # 1664 weights in TinyMLP's three Linear layers


# ----------------------------------------------------------------------------- independent references
# The expected sparsity is written out here from the published formulas, in float64 Python arithmetic,
# and never read from GradualPruning (its `target_at`, `_metrics` or `_masks`).
def reference_sparsity(schedule: str, step: int, t0: int, t1: int, s_f: float, **shape: float) -> float:
    """Scheduled total sparsity at ``step`` for a window ``[t0, t1]`` going from 0 to ``s_f``."""
    if schedule == "constant":
        return s_f
    if step < t0:
        return 0.0
    p = min(step - t0, t1 - t0) / (t1 - t0)
    if schedule == "cubic":  # Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n))^3, s_i = 0
        return s_f + (0.0 - s_f) * (1.0 - p) ** 3
    if schedule == "polynomial":
        return s_f * (1.0 - (1.0 - p) ** shape["power"])
    if schedule == "linear":
        return s_f * p
    if schedule == "exponential":
        rate = shape.get("rate", 5.0)
        return s_f * (1.0 - math.exp(-rate * p)) / (1.0 - math.exp(-rate))
    if schedule == "one_shot":
        return s_f
    raise AssertionError(schedule)


def reference_update_steps(t0: int, t1: int, every: int, last_step: int) -> list[int]:
    """Steps at which masks change: every ``every`` steps from ``t0`` up to ``t1``, and ``t1`` itself."""
    steps = list(range(t0, min(t1, last_step) + 1, every))
    if t1 <= last_step and t1 not in steps:
        steps.append(t1)
    return steps


def count_for(sparsity_value: float, numel: int) -> int:
    """Number of pruned weights for a sparsity: round(s * n), refusing a test case that sits on a tie."""
    value = sparsity_value * numel
    assert abs(value - math.floor(value) - 0.5) > 1e-6, f"ambiguous rounding of {value}: choose other test values"
    return round(value)


def lowest_magnitudes(weights: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean 'pruned' sets: the ``k`` smallest |w| over all given tensors together (float64 reference)."""
    flat = torch.cat([w.double().abs().flatten() for w in weights.values()])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[flat.argsort(stable=True)[:k]] = True
    parts = pruned.split([w.numel() for w in weights.values()])
    return {name: part.reshape(w.shape) for (name, w), part in zip(weights.items(), parts, strict=True)}


class WeightLog(pl.Callback):
    """Copies the selected weights (and their optimizer state) at the start of every training step.

    One instance is placed *before* GradualPruning (what the pruning decision sees) and one *after* it
    (what the step trains with). Keyed by ``trainer.global_step``; with gradient accumulation the first
    batch of a step is kept.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.state: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.weights:
            return
        params = {n: pl_module.get_parameter(n) for n in self.names}
        self.weights[step] = {n: p.detach().clone() for n, p in params.items()}
        opt_state = trainer.optimizers[0].state
        self.state[step] = {
            n: [v.clone() for v in opt_state.get(p, {}).values() if v.shape == p.shape] for n, p in params.items()
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append({n: pl_module.get_parameter(n).detach().clone() for n in self.names})

    def zeros(self, step: int) -> dict[str, torch.Tensor]:
        return {n: w == 0 for n, w in self.weights[step].items()}


class Probe:
    """What the model looked like before and after GradualPruning at every step; no callback internals."""

    def __init__(self, names: list[str]) -> None:
        self.before = WeightLog(names)
        self.after = WeightLog(names)

    @property
    def steps(self) -> list[int]:
        return sorted(self.after.weights)

    def pruned(self, step: int) -> dict[str, int]:
        return {n: int(z.sum()) for n, z in self.after.zeros(step).items()}

    def total_pruned(self, step: int) -> int:
        return sum(self.pruned(step).values())

    def final_sparsity(self) -> dict[str, float]:
        last = self.after.after_step[-1]
        return {n: float((w == 0).double().mean()) for n, w in last.items()}

    def revived(self) -> int:
        """Weights that were zero at the start of a step and nonzero later (after any optimizer step)."""
        count = 0
        steps = self.steps
        for i, step in enumerate(steps):
            zero = self.after.zeros(step)
            later = [self.after.weights[s] for s in steps[i + 1 :]] + self.after.after_step[-1:]
            for weights in later:
                count += sum(int((weights[n][zero[n]] != 0).sum()) for n in zero)
        return count


def fit(
    tmp_path, pruning: GradualPruning, model: pl.LightningModule | None = None, names: list[str] | None = None, **kwargs
) -> tuple[pl.LightningModule, Probe]:
    model = model or TinyMLP()
    probe = Probe(names or WEIGHTS)
    trainer(tmp_path, [probe.before, pruning, probe.after], **kwargs).fit(model)
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
        (
            {"criterion": "l1"},
            r"criterion must be one of \['magnitude', 'random', 'taylor', 'wanda', 'sparsegpt'\], got 'l1'",
        ),
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
        ({"structure": "1x3"}, r"1x3 blocks"),
        ({"structure": "2:4", "include": ["net.0"], "types": ["Linear"]}, None),  # 16 inputs divide by 4
        ({"overrides": {"net.9": 0.5}}, "overrides pattern 'net.9' matches no pruned parameter"),
        ({"types": ["Conv2d"]}, r"No module was selected.*Linear"),
    ],
)
def test_model_dependent_errors_before_first_step(tmp_path, kwargs: dict, match: str | None) -> None:
    pruning = GradualPruning(target_sparsity=0.5, **kwargs)
    t = trainer(tmp_path, [pruning, NeverTrains()] if match else [pruning], logger=CSVLogger(tmp_path), max_epochs=1)
    if match is None:  # 16 inputs divide by 4: accepted, and net.0 ends exactly 2:4 while the rest stays dense
        model = TinyMLP()
        t.fit(model)
        runs = (model.net[0].weight.detach() == 0).reshape(-1, 4).sum(1)
        assert (runs == 2).all()
        assert int((model.net[2].weight == 0).sum()) == 0 and int((model.net[4].weight == 0).sum()) == 0
        return
    with pytest.raises(ValueError, match=match):
        t.fit(TinyMLP())
    assert not glob.glob(str(tmp_path / "**" / "compression_report*"), recursive=True)
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)


def test_2_4_refuses_a_layer_whose_inputs_do_not_divide_by_4(tmp_path) -> None:
    class Odd(TinyMLP):
        def __init__(self) -> None:
            super().__init__(features=6)  # net.0 has 6 inputs

    t = trainer(tmp_path, [GradualPruning(structure="2:4"), NeverTrains()], max_epochs=1)
    with pytest.raises(ValueError, match=r"'net\.0\.weight'.*6 inputs per output.*HINT: exclude it"):
        t.fit(Odd())


# ----------------------------------------------------------------------------- schedule and masks
# (schedule argument, closed-form name, its shape parameters, start, end, every, scope, trainer kwargs)
SCHEDULE_CASES = [
    ("cubic", "cubic", {}, 2, 12, 2, "global", {}),
    ("cubic", "cubic", {}, 3, 14, 4, "layer", {}),  # 14 is off the period: the last update is still at 14
    ("linear", "linear", {}, 0, 10, 3, "global", {}),
    ("linear", "linear", {}, 5, 13, 1, "layer", {}),
    ("exponential", "exponential", {"rate": 5.0}, 1, 11, 2, "global", {}),
    (Exponential(rate=2.0), "exponential", {"rate": 2.0}, 0, 9, 1, "layer", {}),
    (Polynomial(power=2.0), "polynomial", {"power": 2.0}, 4, 12, 2, "global", {}),
    ("one_shot", "one_shot", {}, 5, 9, 2, "global", {}),
    ("constant", "constant", {}, 3, 9, 3, "layer", {}),
    ("cubic", "cubic", {}, 1, 7, 2, "global", {"accumulate_grad_batches": 2}),  # 4 optimizer steps per epoch
]


@pytest.mark.parametrize(
    "schedule,reference,shape,t0,t1,every,scope,trainer_kwargs",
    SCHEDULE_CASES,
    ids=[f"{c[1]}-{c[3]}..{c[4]}-every{c[5]}-{c[6]}" + ("-accum2" if c[7] else "") for c in SCHEDULE_CASES],
)
def test_zeros_follow_the_closed_form_schedule_at_every_step(
    tmp_path, schedule, reference: str, shape: dict, t0: int, t1: int, every: int, scope: str, trainer_kwargs: dict
) -> None:
    s_f = 0.8
    pruning = GradualPruning(
        s_f, schedule=schedule, start_step=t0, end_step=t1, update_every_n_steps=every, scope=scope
    )
    model, probe = fit(tmp_path, pruning, max_epochs=2, **trainer_kwargs)
    steps = probe.steps
    assert steps == list(range(steps[-1] + 1))
    updates = reference_update_steps(t0, t1, every, steps[-1])
    for step in steps:
        done = [u for u in updates if u <= step]
        level = reference_sparsity(reference, done[-1], t0, t1, s_f, **shape) if done else 0.0
        if scope == "layer":
            expected = {n: count_for(level, SIZES[n]) for n in WEIGHTS}
            assert probe.pruned(step) == expected, f"step {step}"
        else:
            assert probe.total_pruned(step) == count_for(level, TOTAL), f"step {step}"
        if step in updates:  # the pruned set is exactly the lowest |w| of the weights the update saw
            before = probe.before.weights[step]
            if scope == "layer":
                want = {n: lowest_magnitudes({n: before[n]}, expected[n])[n] for n in WEIGHTS}
            else:
                want = lowest_magnitudes(before, count_for(level, TOTAL))
            for name in WEIGHTS:
                assert torch.equal(probe.after.zeros(step)[name], want[name]), f"{name} at step {step}"
        elif done:  # between updates the pruned set does not change
            assert all(torch.equal(probe.after.zeros(step)[n], probe.after.zeros(done[-1])[n]) for n in WEIGHTS)
    assert probe.revived() == 0


def test_default_window_ends_at_three_quarters_of_training(tmp_path) -> None:
    pruning = GradualPruning(0.5, update_every_n_steps=4)  # 2 epochs x 8 batches: end = int(0.75 * 16) = 12
    _, probe = fit(tmp_path, pruning, max_epochs=2)
    for step in probe.steps:
        last = max(u for u in (0, 4, 8, 12) if u <= step)
        assert probe.total_pruned(step) == count_for(reference_sparsity("cubic", last, 0, 12, 0.5), TOTAL)


def test_epoch_arguments_are_converted_to_steps(tmp_path) -> None:
    pruning = GradualPruning(0.5, start_epoch=0.5, end_epoch=2, update_every_n_steps=3, schedule="linear")
    _, probe = fit(tmp_path, pruning, max_epochs=3)  # 8 steps per epoch: window 4..16, updates 4, 7, 10, 13, 16
    for step in probe.steps:
        done = [u for u in (4, 7, 10, 13, 16) if u <= step]
        level = reference_sparsity("linear", done[-1], 4, 16, 0.5) if done else 0.0
        assert probe.total_pruned(step) == count_for(level, TOTAL), f"step {step}"


def test_epoch_arguments_count_optimizer_steps_under_accumulation(tmp_path) -> None:
    # 8 batches per epoch, 3 per optimizer step: Lightning steps after batches 3, 6 and at the epoch's end.
    pruning = GradualPruning(0.5, start_epoch=1, end_epoch=2, update_every_n_steps=1, schedule="linear")
    _, probe = fit(tmp_path, pruning, max_epochs=3, accumulate_grad_batches=3)
    assert probe.steps == list(range(9))  # ceil(8 / 3) = 3 optimizer steps per epoch
    for step in probe.steps:  # window 3..6
        level = reference_sparsity("linear", min(step, 6), 3, 6, 0.5)
        assert probe.total_pruned(step) == count_for(level, TOTAL), f"step {step}"


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
    assert probe.revived() == 0
    weights = torch.cat([model.get_parameter(n).detach().flatten() for n in WEIGHTS])
    assert int((weights == 0).sum()) == count_for(0.7, TOTAL)
    # The optimizer remembers nothing of a pruned weight: momentum / Adam moments are zero there at every step.
    for step in probe.steps:
        zeros = probe.after.zeros(step)
        for name in WEIGHTS:
            for value in probe.after.state[step][name]:
                assert not value[zeros[name]].any(), f"optimizer state of pruned {name} at step {step}"
    # A finished model is a plain model with zeros: same keys, no hooks, strict load into a fresh copy.
    assert model.state_dict().keys() == TinyMLP().state_dict().keys()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    TinyMLP().load_state_dict(model.state_dict())


class DriftingSGD(torch.optim.SGD):
    """An optimizer that moves every weight regardless of its gradient (like an EMA or a proximal step)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


class DriftingMLP(TinyMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return DriftingSGD(self.parameters(), lr=0.05)


def test_weights_stay_zero_whatever_the_optimizer_does(tmp_path) -> None:
    pruning = GradualPruning(0.5, end_step=4, update_every_n_steps=2)
    model, probe = fit(tmp_path, pruning, DriftingMLP(), max_epochs=1)
    assert probe.revived() == 0
    assert probe.total_pruned(probe.steps[-1]) == count_for(0.5, TOTAL)
    weights = torch.cat([model.get_parameter(n).detach().flatten() for n in WEIGHTS])
    assert int((weights == 0).sum()) == count_for(0.5, TOTAL)


def test_clipping_norm_excludes_pruned_gradients(tmp_path) -> None:
    pruning = GradualPruning(0.9, end_step=1, update_every_n_steps=1, schedule="one_shot")
    seen: list[float] = []

    class GradNorm(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # runs after GradualPruning's hook and before Lightning clips: what clipping will see
            seen.append(
                sum(
                    float(pl_module.get_parameter(n).grad[pl_module.get_parameter(n) == 0].abs().sum()) for n in WEIGHTS
                )
            )

    trainer(tmp_path, [pruning, GradNorm()], max_epochs=1).fit(TinyMLP())
    assert len(seen) == 8 and all(v == 0.0 for v in seen)


def test_structures_end_exactly(tmp_path) -> None:
    pruning = GradualPruning(structure="2:4", end_step=6, update_every_n_steps=2)
    model, _ = fit(tmp_path, pruning)
    for name in WEIGHTS:
        runs = (model.get_parameter(name).detach() == 0).reshape(-1, 4).sum(1)
        assert (runs == 2).all(), name  # exactly 2 of every 4: sparsity exactly 0.5

    channels = GradualPruning(0.5, structure="channels", scope="layer", end_step=6, exclude=["net.4"])
    model, _ = fit(tmp_path, channels)
    for layer in (model.net[0], model.net[2]):
        w = layer.weight.detach()
        dead = (w == 0).all(dim=1)
        assert int(dead.sum()) == 16 and ((w != 0).all(dim=1) | dead).all()
    assert int((model.net[4].weight == 0).sum()) == 0


@pytest.mark.parametrize("criterion", ["taylor", "random"])
def test_taylor_and_random_criteria_reach_target(tmp_path, criterion: str) -> None:
    pruning = GradualPruning(0.6, criterion=criterion, end_step=8, update_every_n_steps=2)
    _, probe = fit(tmp_path, pruning)
    for step in probe.steps:
        last = max(u for u in (0, 2, 4, 6, 8) if u <= step)
        assert probe.total_pruned(step) == count_for(reference_sparsity("cubic", last, 0, 8, 0.6), TOTAL)
    assert probe.revived() == 0
    if criterion == "random":  # not magnitude: the pruned set at the last update is not the lowest |w|
        want = lowest_magnitudes(probe.before.weights[8], count_for(0.6, TOTAL))
        assert any(not torch.equal(probe.after.zeros(8)[n], want[n]) for n in WEIGHTS)


def test_overrides_and_exclude(tmp_path) -> None:
    pruning = GradualPruning(0.8, overrides={"net.4": 0.25}, exclude=["net.0"], end_step=6)
    model, probe = fit(tmp_path, pruning, names=["net.2.weight", "net.4.weight"])
    final = probe.pruned(probe.steps[-1])
    assert final == {"net.4.weight": 32, "net.2.weight": count_for(0.8, 1024)}  # 0.25 * 128, round(819.2)
    assert sparsity(model.net[0].weight) == 0.0


def test_rewind_to_step_restores_surviving_weights(tmp_path) -> None:
    pruning = GradualPruning(0.5, rewind_to_step=1, end_step=6, update_every_n_steps=2)
    model, probe = fit(tmp_path, pruning)
    at_rewind, final = probe.before.weights[1], probe.after.weights[6]  # step 6 is the final update
    for name in WEIGHTS:
        kept = final[name] != 0
        assert torch.equal(final[name][kept], at_rewind[name][kept]), name  # survivors are back at step 1
    assert probe.total_pruned(6) == count_for(0.5, TOTAL)
    # before the final update the weights had trained away from the step-1 copy
    assert not torch.equal(probe.before.weights[6]["net.0.weight"], at_rewind["net.0.weight"])


# ----------------------------------------------------------------------------- metrics, report, loggers
def test_metrics_reach_loggers_and_report_is_written(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruning = GradualPruning(0.7, end_step=8, update_every_n_steps=2)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [pruning], logger=[tb, csv], log_every_n_steps=1, max_epochs=2)
    t.fit(TinyMLP())

    events = EventAccumulator(tb.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("compress/sparsity", "compress/target_sparsity", "compress/nonzero_params", "compress/final/sparsity"):
        assert key in tags
    # Every step's logged values, against the closed form at the last update (steps 0, 2, 4, 6, 8).
    series = {key: [(e.step, e.value) for e in events.Scalars(key)] for key in tags if key.startswith("compress/")}
    assert [step for step, _ in series["compress/sparsity"]] == list(range(16))
    for step in range(16):
        level = reference_sparsity("cubic", min(step - step % 2, 8), 0, 8, 0.7)
        nonzero = TOTAL - count_for(level, TOTAL)
        assert series["compress/nonzero_params"][step][1] == nonzero
        assert series["compress/sparsity"][step][1] == pytest.approx(1 - nonzero / TOTAL, rel=1e-6)
        assert series["compress/target_sparsity"][step][1] == pytest.approx(level, rel=1e-6, abs=1e-9)
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
    assert total == TOTAL + 32 + 32 + 4  # weights and biases
    assert report["sections"]["pruning"]["measured_sparsity"] == 1 - (TOTAL - count_for(0.7, TOTAL)) / TOTAL
    assert report["summary"]["nonzero_params"] == total - count_for(0.7, TOTAL)
    assert report["summary"]["flops"] > report["summary"]["effective_flops"] > 0  # captured input
    assert os.path.exists(os.path.join(t.log_dir, "compression_report.md"))
    assert "compress/sparsity" in t.callback_metrics


def test_model_checkpoint_can_monitor_sparsity(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="compress/sparsity", mode="max", save_top_k=1)
    pruning = GradualPruning(0.6, end_step=10)
    trainer(tmp_path, [pruning, ckpt], enable_checkpointing=True, max_epochs=2).fit(TinyMLP())
    assert ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(count_for(0.6, TOTAL) / TOTAL, rel=1e-6)


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

    second = GradualPruning(0.8, end_step=24, update_every_n_steps=4)
    probe = Probe(WEIGHTS)
    model = TinyMLP()
    trainer(tmp_path, [probe.before, second, probe.after], max_epochs=4).fit(model, ckpt_path=str(path))
    assert probe.steps == list(range(8, 32))  # resumed at step 8, not from 0
    for name, mask in state["masks"].items():
        assert torch.equal(probe.before.zeros(8)[name], ~mask)  # the checkpoint's masks at the resume point
    for step in probe.steps:  # and the schedule continues where it stopped (updates 8, 12, ..., 24)
        level = reference_sparsity("cubic", min(step - step % 4, 24), 0, 24, 0.8)
        assert probe.total_pruned(step) == count_for(level, TOTAL), f"step {step}"
    assert probe.revived() == 0


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
ATTENTION_AND_FFN = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]


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
    names = [f"encoder.layers.{i}.{p}" for i in (0, 1) for p in ATTENTION_AND_FFN]
    model, probe = fit(tmp_path, pruning, TinyTransformer(), names=names, max_epochs=2)
    total = 2 * (48 * 16 + 16 * 16 + 32 * 16 + 16 * 32)  # in_proj, out_proj, linear1, linear2 per layer
    assert sum(model.get_parameter(n).numel() for n in names) == total
    assert probe.total_pruned(probe.steps[-1]) == count_for(0.5, total)
    for step in (1, 2, 3, 4):  # every update prunes the globally lowest |w|, raw in_proj_weight included
        level = reference_sparsity("cubic", step, 0, 4, 0.5)
        want = lowest_magnitudes(probe.before.weights[step], count_for(level, total))
        assert all(torch.equal(probe.after.zeros(step)[n], want[n]) for n in names), f"step {step}"
    assert probe.revived() == 0


def test_two_instances_on_different_groups(tmp_path) -> None:
    a = GradualPruning(0.8, include=["net.0", "net.2"], name="hidden", end_step=6)
    b = GradualPruning(0.3, include=["net.4"], name="head", end_step=6, structure="channels", scope="layer")
    t = trainer(tmp_path, [a, b], max_epochs=1)
    model = TinyMLP()
    t.fit(model)
    hidden = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
    assert int((hidden == 0).sum()) == count_for(0.8, 512 + 1024)
    head = model.net[4].weight.detach()
    assert int((head == 0).all(dim=1).sum()) == 1 and int((head == 0).sum()) == 32  # 1 of 4 output channels
    assert "compress/hidden/sparsity" in t.callback_metrics and "compress/head/sparsity" in t.callback_metrics

    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        trainer(tmp_path, [GradualPruning(0.5), GradualPruning(0.5)], max_epochs=1)


def test_repeated_fit_keeps_masks(tmp_path) -> None:
    pruning = GradualPruning(0.6, end_step=4, update_every_n_steps=2)
    model = TinyMLP()
    trainer(tmp_path, [pruning], max_epochs=1).fit(model)
    first = {n: model.get_parameter(n).detach() == 0 for n in WEIGHTS}
    assert sum(int(z.sum()) for z in first.values()) == count_for(0.6, TOTAL)
    probe = Probe(WEIGHTS)
    trainer(tmp_path, [probe.before, pruning, probe.after], max_epochs=1).fit(model)
    for step in probe.steps:  # the second fit starts from the first one's zeros and keeps exactly those
        assert all(torch.equal(probe.after.zeros(step)[n], first[n]) for n in WEIGHTS), f"step {step}"
    assert probe.revived() == 0


def test_metrics_reach_mlflow(tmp_path) -> None:
    import mlflow
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="prune", tracking_uri=uri)
    trainer(tmp_path, [GradualPruning(0.5, end_step=4)], logger=logger, log_every_n_steps=1).fit(TinyMLP())
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(logger.run_id, "compress/sparsity")
    assert history and history[-1].value == pytest.approx(count_for(0.5, TOTAL) / TOTAL, rel=1e-6)


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
    assert int((weights == 0).sum()) == count_for(0.6, TOTAL)


def test_a_layer_is_never_emptied_and_the_shortfall_is_said(tmp_path) -> None:
    # net.4 has 4 output channels: 90% per layer would be round(3.6) = 4 channels, the whole layer.
    pruning = GradualPruning(0.9, include=["net.4"], structure="channels", scope="layer", end_step=4)
    model = TinyMLP()
    with pytest.warns(UserWarning, match=r"reached sparsity 0.750 of the target 0.900.*never emptied"):
        trainer(tmp_path, [pruning], max_epochs=1).fit(model)
    head = model.net[4].weight.detach()
    assert int((head == 0).all(dim=1).sum()) == 3  # 3 of 4 channels, one kept
