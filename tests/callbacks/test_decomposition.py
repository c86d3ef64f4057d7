"""TensorDecomposition in real Trainer runs: validation, fit end, fine-tuning, checkpoints, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import TensorDecomposition, load_decomposed
from lightning_compress.functional import decomposition as F
from lightning_compress.functional import decomposition_plan as planning
from tests.helpers import TinyMLP, random_classification, trainer
from tests.scripts.ddp_decomposition import TinyCNN

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_decomposition.py")
QUIET = dict(measure_latency=False, min_reduction=1.0)


class Spy(Callback):
    """Records what happened: training steps, and model state when fit ends (before later callbacks act)."""

    def __init__(self) -> None:
        self.batches = 0
        self.weights_at_fit_end: dict[str, torch.Tensor] = {}
        self.state_at_fit_start: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state_at_fit_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights_at_fit_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


BAD_INIT = [
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=-2), "rank must be an int >= 1"),
    (dict(rank=1.5), r"float ratio in \(0, 1\]"),
    (dict(rank=25.0), "HINT: write 25"),
    (dict(rank=True), "rank must be"),
    (dict(rank="auto"), "rank must be"),
    (dict(energy=0.0), r"energy must be a number in \(0, 1\]"),
    (dict(energy=95), "HINT: a fraction"),
    (dict(budget=1.0), "budget must be a number in"),
    (dict(budget=0.5, budget_metric="bytes"), "budget_metric"),
    (dict(method="tt"), "method must be one of"),
    (dict(rank=0.5, energy=0.9), "at most one of rank, energy, budget"),
    (dict(apply_at=-1), "apply_at must be"),
    (dict(apply_at="end"), "apply_at must be"),
    (dict(apply_at=5, apply_at_epoch=1.0), "not both"),
    (dict(apply_at_epoch=-1), "apply_at_epoch"),
    (dict(types=["Conv1d"]), "types must be"),
    (dict(types="Linear"), "list of name patterns"),
    (dict(min_reduction=0.5), "min_reduction"),
    (dict(n_iter_max=0), "n_iter_max"),
    (dict(tol=0), "tol must be"),
    (dict(latency_batch=0), "latency_batch"),
    (dict(num_threads=0), "num_threads must be None"),
    (dict(num_threads=2.0), "num_threads must be None"),
    (dict(include=["re:("]), "invalid regular expression"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INIT, ids=[str(k) for k, _ in BAD_INIT])
def test_bad_configuration_is_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        TensorDecomposition(**kwargs)


BAD_FOR_MODEL = [
    (dict(include=["encoder.*"]), "include pattern 'encoder.*' matches no module"),
    (dict(method="cp"), "Conv2d layers only"),
    (dict(method="tucker2", types=["Linear"]), "Conv2d layers only"),
    (dict(rank=32, types=["Conv2d"]), "rank=32 is larger than layer 'features.0'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_FOR_MODEL, ids=[str(k) for k, _ in BAD_FOR_MODEL])
def test_model_dependent_errors_before_the_first_step(tmp_path: Any, kwargs: dict, message: str) -> None:
    spy = Spy()
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(tmp_path / "run", [TensorDecomposition(**kwargs), spy], max_steps=3, enable_checkpointing=True)
    with pytest.raises(ValueError, match=message):
        t.fit(model)
    assert spy.batches == 0
    assert model.state_dict().keys() == before.keys()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


def _deepspeed() -> pl.strategies.Strategy:
    # deepspeed is not installed here and the constructor requires it; the refusal reads only the class.
    # DeepSpeedStrategy subclasses DDPStrategy, which is why it needs its own check.
    return pl.strategies.DeepSpeedStrategy.__new__(pl.strategies.DeepSpeedStrategy)


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda: pl.strategies.DDPStrategy(start_method="spawn"), "DDPStrategy (spawn)"),
        (lambda: pl.strategies.FSDPStrategy(), "FSDPStrategy"),
        (_deepspeed, "DeepSpeedStrategy"),
    ],
    ids=["ddp_spawn", "fsdp", "deepspeed"],
)
def test_unsupported_strategy_is_refused_in_setup(make: Any, shown: str) -> None:
    model = TinyCNN()
    keys = set(model.state_dict())
    stand_in = types.SimpleNamespace(strategy=make())  # setup reads only the strategy before refusing
    with pytest.raises(ValueError, match=re.escape(f"with save_path); got {shown}.")):
        TensorDecomposition().setup(stand_in, model, "fit")  # type: ignore[arg-type]
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "needs save_path=..."),
        ({"apply_at": 5, "save_path": "d.pt"}, "TensorDecomposition(apply_at=5) cannot decompose mid-fit"),
        ({"apply_at_epoch": 0.5, "save_path": "d.pt"}, "TensorDecomposition(apply_at_epoch=0.5) cannot decompose"),
    ],
)
def test_model_parallel_strategy_needs_fit_end_and_save_path(kwargs: dict[str, Any], expected: str) -> None:
    # Under FSDP2 a plain copy is decomposed at fit end and saved (tests/callbacks/test_fsdp2.py runs it).
    stand_in = types.SimpleNamespace(strategy=pl.strategies.ModelParallelStrategy())
    with pytest.raises(ValueError, match=re.escape(expected)):
        TensorDecomposition(**kwargs).setup(stand_in, TinyCNN(), "fit")  # type: ignore[arg-type]


def test_save_path_writes_the_decomposed_model_in_one_process(tmp_path: Any) -> None:
    model = TinyCNN()
    path = tmp_path / "out" / "decomposed.pt"
    callback = TensorDecomposition(rank=0.5, measure_latency=False, save_path=str(path))
    trainer(tmp_path, [callback], max_steps=2).fit(model)
    saved = torch.load(path, weights_only=False)
    assert saved.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name
    with pytest.raises(ValueError, match="save_path must be None or a file path"):
        TensorDecomposition(save_path="")


def test_skip_slower_default_keeps_a_layer_measured_slower(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Deterministic timings: the chain of head.1 (the Linear) measures slower, every other chain faster.
    def timings(layer: nn.Module, chain: nn.Module, sample: torch.Tensor) -> tuple[float, float]:
        return (0.001, 0.003) if isinstance(layer, nn.Linear) else (0.002, 0.001)

    monkeypatch.setattr(planning, "measure_pair", timings)
    decomposition = TensorDecomposition(rank=0.3, min_reduction=1.0, exclude=["classifier"])
    assert decomposition.skip_slower and decomposition.measure_latency  # the defaults under test
    model = TinyCNN(scheduler=False)
    trainer(tmp_path, [decomposition], max_steps=2).fit(model)
    assert isinstance(model.head[1], nn.Linear)  # kept
    assert isinstance(model.features[0], nn.Sequential) and isinstance(model.features[2], nn.Sequential)
    rows = {r["layer"]: r for r in decomposition.rows}
    assert rows["head.1"]["status"] == "skipped: measured slower (3.000 ms vs 1.000 ms)"
    assert (rows["head.1"]["latency_ms_before"], rows["head.1"]["latency_ms_after"]) == (1.0, 3.0)
    assert rows["head.1"]["params_after"] == rows["head.1"]["params_before"] == 512 * 64 + 64
    assert rows["features.2"]["status"] == "decomposed"
    assert "head.1" not in decomposition.plans
    # skip_slower=False replaces it anyway, with the measured times in the report.
    decomposition = TensorDecomposition(rank=0.3, min_reduction=1.0, exclude=["classifier"], skip_slower=False)
    model = TinyCNN(scheduler=False)
    trainer(tmp_path, [decomposition], max_steps=2).fit(model)
    assert isinstance(model.head[1], nn.Sequential)
    assert decomposition.rows[-1]["status"] == "decomposed" and decomposition.rows[-1]["latency_ms_after"] == 3.0


def test_fit_end_decomposes_with_reference_factors(tmp_path: Any) -> None:
    spy = Spy()
    decomposition = TensorDecomposition(rank=0.3, **QUIET)
    model = TinyCNN(scheduler=False)
    t = trainer(tmp_path, [spy, decomposition], max_steps=4)
    t.fit(model)
    # Linear: the chain is the best rank-r approximation of the trained weight (Eckart-Young).
    w = spy.weights_at_fit_end["head.1.weight"]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = model.head[1][0].out_features
    # rank 17: floor(0.3 * 512 * 64 / (512 + 64)); 17 * 576 = 9792 <= 9830.4 params < 18 * 576
    assert r == 17
    product = model.head[1][1].weight @ model.head[1][0].weight
    torch.testing.assert_close(product, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.head[1][1].bias, spy.weights_at_fit_end["head.1.bias"])
    # Conv 16->32 3x3: Tucker-2 ranks (13, 6) = floor(a * (32, 16)) for the root a = 0.426 of
    # 4608 a^2 + 1280 a = 0.3 * 4608; their factors hold 16*6 + 6*13*9 + 13*32 = 1214 <= 1382.4 weights.
    chain = model.features[2]
    assert F.plan_from_chain(chain) == F.LayerPlan("tucker2", (13, 6))
    assert [tuple(m.weight.shape) for m in chain] == [(6, 16, 1, 1), (13, 6, 3, 3), (32, 13, 1, 1)]
    # The grouped conv is left alone with its reason.
    assert isinstance(model.features[4], nn.Conv2d)
    rows = {r["layer"]: r for r in decomposition.rows}
    assert "groups=4" in rows["features.4"]["status"]
    assert rows["head.1"]["error"] == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-3)
    # Metrics and report describe the decomposed model.
    params = sum(p.numel() for p in model.parameters())
    assert decomposition._metrics["params"] == params
    assert decomposition._metrics["ratio"] == pytest.approx(
        sum(v.numel() for v in spy.weights_at_fit_end.values()) / params
    )
    report = json.loads((tmp_path / "compression_report.json").read_text())
    section = report["sections"]["decomposition"]
    assert section["params_after"] == params and report["summary"]["params"] == params
    assert [row["layer"] for row in section["layers"]] == [
        "features.0",
        "features.2",
        "features.4",
        "head.1",
        "classifier",
    ]


def test_mid_fit_decomposition_fine_tunes_with_rebuilt_optimizer(tmp_path: Any) -> None:
    class Probe(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:  # right after the decomposition (this probe runs after it)
                self.just_decomposed = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    probe = Probe()
    decomposition = TensorDecomposition(rank=0.3, apply_at=3, **QUIET)
    model = TinyCNN()
    t = trainer(tmp_path, [decomposition, probe], max_steps=7)
    t.fit(model)
    assert "head.1.0.weight" in probe.just_decomposed
    final = model.state_dict()
    assert not torch.equal(final["head.1.0.weight"], probe.just_decomposed["head.1.0.weight"])  # factors trained
    optimizer = t.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(optimizer.state[p] for p in model.parameters())  # every parameter was stepped
    # The per-step StepLR kept its position across the rebuild: 7 decays, not 4.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**7)
    params_now = sum(p.numel() for p in model.parameters())
    params_dense = sum(p.numel() for p in TinyCNN().parameters())
    assert t.callback_metrics["compress/params"] == params_now
    assert float(t.callback_metrics["compress/ratio"]) == pytest.approx(params_dense / params_now, rel=1e-6)


def test_apply_at_epoch_and_budget(tmp_path: Any) -> None:
    decomposition = TensorDecomposition(budget=0.4, apply_at_epoch=1, **QUIET)
    model = TinyCNN()
    before = sum(p.numel() for p in model.parameters())
    t = trainer(tmp_path, [decomposition], max_epochs=2)
    t.fit(model)
    assert decomposition._apply_step == 8  # 64 samples / batch 8
    assert sum(p.numel() for p in model.parameters()) <= 0.4 * before


def test_energy_ranks_follow_the_trained_spectrum(tmp_path: Any) -> None:
    spy = Spy()
    decomposition = TensorDecomposition(energy=0.8, types=["Linear"], **QUIET)
    model = TinyMLP()
    trainer(tmp_path, [spy, decomposition], max_steps=3).fit(model)
    for name in ("net.0", "net.2", "net.4"):
        s = torch.linalg.svdvals(spy.weights_at_fit_end[f"{name}.weight"])
        assert F.plan_from_chain(model.get_submodule(name)).ranks == (F.energy_rank(s, 0.8),)


def test_layers_that_do_not_pay_are_skipped_with_reasons(tmp_path: Any) -> None:
    decomposition = TensorDecomposition(rank=0.9, min_reduction=2.0, measure_latency=True, latency_batch=4)
    model = TinyCNN(scheduler=False)
    keys = set(model.state_dict())
    trainer(tmp_path, [decomposition], max_steps=2).fit(model)
    assert set(model.state_dict()) == keys  # nothing replaced
    statuses = [r["status"] for r in decomposition.rows]
    assert sum("MAC reduction" in s for s in statuses) == 4 and sum("groups=4" in s for s in statuses) == 1
    # With a low rank and no MAC floor, the latency of each replaced layer is measured on this CPU.
    decomposition = TensorDecomposition(rank=0.2, min_reduction=1.0, measure_latency=True, skip_slower=False)
    trainer(tmp_path, [decomposition], max_steps=2).fit(TinyCNN(scheduler=False))
    measured = [r for r in decomposition.rows if r["status"] == "decomposed"]
    assert len(measured) == 4 and all(r["latency_ms_before"] > 0 and r["latency_ms_after"] > 0 for r in measured)


def test_resume_after_decomposition_rebuilds_structure_before_weights(tmp_path: Any) -> None:
    ckpts = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    first = TensorDecomposition(rank=0.3, apply_at=2, **QUIET)
    model = TinyCNN()
    trainer(tmp_path, [first, checkpoint], max_steps=4, enable_checkpointing=True).fit(model)
    plans = dict(first.plans)
    assert len(plans) == 4

    # From a checkpoint taken after the decomposition: a fresh model is rebuilt, weights load strictly.
    spy, second = Spy(), TensorDecomposition(rank=0.3, apply_at=2, **QUIET)
    resumed_model = TinyCNN()
    saved = torch.load(ckpts / "step=3.ckpt", weights_only=False)
    t = trainer(tmp_path, [second, spy], max_steps=6)
    t.fit(resumed_model, ckpt_path=str(ckpts / "step=3.ckpt"))
    assert second.plans == plans and second._applied
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(spy.state_at_fit_start[k], v)
    assert spy.batches == 3 and t.global_step == 6
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**6)
    assert len(second.rows) == 5  # the report rows travelled in the callback state

    # From a checkpoint taken before it: the decomposition happens after resuming, with the same plans.
    third = TensorDecomposition(rank=0.3, apply_at=2, **QUIET)
    again = TinyCNN()
    trainer(tmp_path, [third], max_steps=4).fit(again, ckpt_path=str(ckpts / "step=1.ckpt"))
    assert third.plans == plans and third._applied


def test_post_training_checkpoint_loads_with_helper_and_in_validate(tmp_path: Any) -> None:
    model = TinyCNN()
    t = trainer(tmp_path, [TensorDecomposition(rank=0.25, **QUIET)], max_steps=3)
    t.fit(model)
    path = str(tmp_path / "decomposed.ckpt")
    t.save_checkpoint(path)
    loaded = load_decomposed(TinyCNN, path)
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        TinyCNN.load_from_checkpoint(path)  # why the helper exists
    # A Trainer with the callback attached restores it too (validate / test / predict with ckpt_path).
    fresh = TinyCNN()
    results = trainer(tmp_path, [TensorDecomposition(rank=0.25)]).validate(fresh, ckpt_path=path, verbose=False)
    assert results[0]["val_loss"] > 0 and isinstance(fresh.head[1], nn.Sequential)


def test_repeated_fit_does_not_decompose_factors_again(tmp_path: Any) -> None:
    decomposition = TensorDecomposition(rank=0.3, **QUIET)
    model = TinyCNN()
    trainer(tmp_path, [decomposition], max_steps=2).fit(model)
    structure = [n for n, _ in model.named_modules()]
    trainer(tmp_path, [decomposition], max_steps=4).fit(model)
    assert [n for n, _ in model.named_modules()] == structure


@pytest.mark.xdist_group("ddp")
def test_ddp_two_processes_agree(tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)], timeout=240, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["plans"] == ranks[1]["plans"] and len(ranks[0]["plans"]) == 4
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key
    for r in ranks:
        assert r["global_step"] == 6
        assert r["optimizer_params"] == r["model_params"] == r["ddp_params"]  # optimizer and DDP rebuilt
        assert r["lr"] == pytest.approx(0.05 * 0.9**6)


def test_unreached_apply_step_decomposes_at_fit_end_with_a_warning(tmp_path: Any) -> None:
    model = TinyCNN()
    with pytest.warns(UserWarning, match="apply_at step 50 was not reached"):
        trainer(tmp_path, [TensorDecomposition(apply_at=50, **QUIET)], max_steps=2).fit(model)
    assert isinstance(model.head[1], nn.Sequential)


def test_yaml_config_builds_the_callback() -> None:
    from lightning_compress.cli import build_cli as main

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "decomposition.yaml")
    cli = main(["--config", config, "--trainer.logger=false"], run=False)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TensorDecomposition)]
    assert (callback.rank, callback.apply_at_epoch, callback.exclude) == (0.25, 5, ["classifier"])


def test_failure_in_setup_leaves_no_hook_on_the_model(tmp_path: Any) -> None:
    """A decomposition refused in `setup` must not leave its load_state_dict pre-hook on the user's module."""
    model = TinyMLP()
    decomposition = TensorDecomposition(rank=10_000, **QUIET)  # larger than any layer allows: refused in setup
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[decomposition],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="rank=10000 is larger than"):
        trainer.fit(model, DataLoader(random_classification(), batch_size=16))
    assert len(model._load_state_dict_pre_hooks) == 0


def test_progress_estimate_comes_before_the_first_layer_then_one_line_per_layer(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    # Lightning stops its logger's propagation when the root logger has no handler; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("pytorch_lightning"), "propagate", True)
    messages_when_factoring: list[list[str]] = []
    decompose = F.decompose

    def spy(*args: Any, **kwargs: Any) -> Any:
        messages_when_factoring.append([r.getMessage() for r in caplog.records])
        return decompose(*args, **kwargs)

    monkeypatch.setattr(F, "decompose", spy)
    callback = TensorDecomposition(method="cp", rank=0.3, types=["Conv2d"], num_threads=1, **QUIET)
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [callback], max_steps=1).fit(TinyCNN(scheduler=False))
    assert torch.get_num_threads() == before
    # Two 3x3 convs are factored (the grouped one is skipped without factoring).
    assert len(messages_when_factoring) == 2
    estimate = [m for m in messages_when_factoring[0] if "estimated" in m]
    assert len(estimate) == 1, "the estimate must be out before the first layer is factored"
    assert re.search(r"factoring 2 of 3 layers \(cp: 2\), CP on 1 thread\(s\); estimated [\d.]+ s", estimate[0])
    lines = [r.getMessage() for r in caplog.records if re.search(r"\[\d/2\]", r.getMessage())]
    assert [line.split("]")[0].rsplit("[", 1)[1] for line in lines] == ["1/2", "2/2"]
    rows = {r["layer"]: r for r in callback.rows}
    for line, name in zip(lines, ["features.0", "features.2"], strict=True):
        pattern = rf"{name}: cp rank {rows[name]['ranks']}, \d+\.\d s \(estimated \d+\.\d s\), error \d\.\d{{3}}"
        assert re.search(pattern, line), line
        assert "decomposed" in line and "s left" in line
    final = [r.getMessage() for r in caplog.records if "layers in" in r.getMessage()]
    assert len(final) == 1 and ", estimated " in final[0]
