from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import KnowledgeDistillation
from lightning_compress.functional import distillation as D
from lightning_compress.schedules import Linear
from tests.callbacks.kd_models import TwoInputNet, params, two_input_data
from tests.helpers import trainer as make_trainer

ROOT = Path(__file__).resolve().parents[2]


class Recorder(pl.Callback):
    """Records logged metrics after every batch and what the optimizer holds at the end of training."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.group_sizes: list[int] = []
        self.optimizer_params: set[int] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compress/")})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = trainer.optimizers[0].param_groups
        self.group_sizes = [len(g["params"]) for g in groups]
        self.optimizer_params = {id(p) for g in groups for p in g["params"]}


# ---------------------------------------------------------------- bad configurations


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": 1.5}, ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"alpha": 70}, ValueError, "HINT: a fraction, not a percentage"),
        ({"alpha": -0.1}, ValueError, "alpha must be a number in"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a number"),
        ({"initial_alpha": 2.0}, ValueError, "initial_alpha must be a number in"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a number in \(0, inf\), got 0.0"),
        ({"temperature": -2}, ValueError, r"temperature must be a number in \(0, inf\)"),
        ({"temperature": float("inf")}, ValueError, r"temperature must be a number in \(0, inf\)"),
        ({"initial_temperature": 0}, ValueError, "initial_temperature must be"),
        ({"loss": "l1"}, ValueError, r"loss must be one of \['kl', 'mse'\]"),
        ({"alpha_schedule": "cosine"}, ValueError, "alpha_schedule must be one of"),
        ({"start_step": -1}, ValueError, "start_step must be a non-negative integer"),
        ({"start_epoch": -3}, ValueError, "start_epoch must be a non-negative number of epochs, got -3"),
        ({"start_step": 5, "end_step": 5}, ValueError, "end_step must be > start_step"),
        ({"start_step": 2, "start_epoch": 1.0}, ValueError, "give start_step or start_epoch, not both"),
        ({"alpha": 0.0}, ValueError, "nothing would be distilled"),
        ({"features": {"a": 3}}, ValueError, "features must map student layer names"),
        ({"feature_weight": -1.0}, ValueError, r"feature_weight must be a number in \[0, inf\]"),
        ({"teacher_class": "x.Y"}, ValueError, "teacher_class only applies"),
        ({"teacher": "self", "teacher_class": "x.Y"}, ValueError, "teacher_class only applies"),
        ({"output_key": 1.5}, ValueError, "output_key must be"),
        ({"teacher": "missing/teacher.ckpt"}, ValueError, "'missing/teacher.ckpt' does not exist"),
        ({"teacher": 3}, TypeError, "teacher must be an nn.Module"),
        ({"name": "a b"}, ValueError, "name must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type, message: str) -> None:
    kwargs = {"teacher": nn.Linear(2, 2), **kwargs}
    with pytest.raises(error, match=message):
        KnowledgeDistillation(**kwargs)


class NoSelfCall(TwoInputNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, extra, y = batch
        return F.cross_entropy(self.forward(x, extra), y)  # bypasses __call__, so no forward hook


class Manual(TwoInputNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def _bad_teacher_file(tmp_path: Path) -> str:
    path = tmp_path / "not_a_checkpoint.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, m: dict(teacher=TwoInputNet(classes=5)), r"teacher output shape \(16, 5\) is incompatible"),
        (lambda p, m: dict(teacher=TwoInputNet(), features={"nope": "mid"}), r"student layer\(s\) \['nope'\].*'mid'"),
        (lambda p, m: dict(teacher=TwoInputNet(), features={"mid": "nope"}), r"teacher layer\(s\) \['nope'\]"),
        (lambda p, m: dict(teacher="self", features={"mid": "zzz"}), r"teacher layer\(s\) \['zzz'\]"),
        (lambda p, m: dict(teacher=nn.Linear(3, 3)), "the teacher .*Linear.* failed on the arguments"),
        (lambda p, m: dict(teacher=_bad_teacher_file(p)), "holds no module loadable with TwoInputNet"),
        (lambda p, m: dict(teacher=_bad_teacher_file(p), teacher_class="torch.nn.Linear"), "LightningModule subclass"),
        (lambda p, m: dict(teacher=_bad_teacher_file(p), teacher_class="nowhere.Net"), "cannot be imported"),
        (lambda p, m: dict(teacher=m.mid), "shares parameters with the student"),
    ],
)
def test_bad_configuration_fails_before_the_first_optimizer_step(tmp_path: Path, make: Any, message: str) -> None:
    model = TwoInputNet()
    before = params(model)
    kd = KnowledgeDistillation(**make(tmp_path, model))
    t = make_trainer(tmp_path / "run", [kd], enable_checkpointing=True)
    with pytest.raises((ValueError, RuntimeError), match=message):
        t.fit(model)
    assert t.global_step == 0
    for k, v in params(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not list((tmp_path / "run").rglob("*.ckpt")), "nothing may be written"
    assert "training_step" not in model.__dict__, "the wrapper must be removed after a failure"


@pytest.mark.parametrize(
    ("model", "message"), [(NoSelfCall(), "never called the LightningModule"), (Manual(), "manual optimization")]
)
def test_unsupported_training_steps_are_explained(tmp_path: Path, model: TwoInputNet, message: str) -> None:
    t = make_trainer(tmp_path, [KnowledgeDistillation(teacher=TwoInputNet())])
    with pytest.raises((ValueError, RuntimeError), match=message):
        t.fit(model)
    assert t.global_step == 0


# ---------------------------------------------------------------- numerics against a reference


@pytest.mark.parametrize(("loss", "return_dict"), [("kl", False), ("kl", True), ("mse", False)])
def test_one_step_matches_a_hand_written_distillation_step(tmp_path: Path, loss: str, return_dict: bool) -> None:
    student, teacher = TwoInputNet(return_dict=return_dict, lr=0.5), TwoInputNet(width=32)
    reference = copy.deepcopy(student)
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.3, temperature=2.0, loss=loss)
    make_trainer(tmp_path, [kd], max_steps=1).fit(student)

    x, extra, y = two_input_data()[:16]
    logits = reference(x, extra, scale=0.5)
    with torch.no_grad():
        teacher_logits = teacher(x, extra, scale=0.5)
    expected = D.distillation_loss(
        F.cross_entropy(logits, y), logits, teacher_logits, alpha=0.3, temperature=2.0, loss=loss
    )
    expected.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for k, v in params(student).items():
        torch.testing.assert_close(v, params(reference)[k], rtol=1e-5, atol=1e-6)


def test_teacher_sees_exactly_the_student_inputs_once_per_step(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=24)
    seen: list[tuple[Any, ...]] = []
    teacher.register_forward_hook(lambda m, a, kw, o: seen.append((a, kw)), with_kwargs=True)
    kd = KnowledgeDistillation(teacher=teacher, log_agreement=False)
    make_trainer(tmp_path, [kd], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(TwoInputNet())
    assert len(seen) == 3 == kd.teacher_forward_calls
    data = two_input_data()
    for i, (args, kwargs) in enumerate(seen):
        torch.testing.assert_close(args[0], data.tensors[0][16 * i : 16 * (i + 1)])
        torch.testing.assert_close(args[1], data.tensors[1][16 * i : 16 * (i + 1)])
        assert kwargs == {"scale": 0.5}


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=32)
    big, small = TwoInputNet(batch_size=16), TwoInputNet(batch_size=8)
    small.load_state_dict(big.state_dict())
    for model, accumulate in ((big, 1), (small, 2)):
        kd = KnowledgeDistillation(teacher=teacher, alpha=0.6, temperature=3.0, features={"mid": "mid"})
        make_trainer(tmp_path / str(accumulate), [kd], max_steps=1, accumulate_grad_batches=accumulate).fit(model)
    for k, v in params(big).items():
        torch.testing.assert_close(params(small)[k], v, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_runs_the_teacher_under_autocast(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=24)
    dtypes: list[torch.dtype] = []
    teacher.mid.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    kd = KnowledgeDistillation(teacher=teacher, features={"mid": "mid"})
    rec = Recorder()
    make_trainer(
        tmp_path,
        [kd, rec],
        precision="bf16-mixed",
        log_every_n_steps=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
    ).fit(TwoInputNet())
    # Two training steps and one validation batch (the agreement pass, outside validation_step's autocast).
    assert dtypes == [torch.bfloat16] * 3
    assert torch.isfinite(torch.tensor(rec.steps[-1]["compress/distill_loss"]))
    assert rec.steps[-1]["compress/feature_loss"] > 0
    assert next(kd.adapters.parameters()).dtype == torch.float32


def test_torch_compile(tmp_path: Path) -> None:
    student = TwoInputNet()
    compiled = torch.compile(student, backend="eager")
    kd = KnowledgeDistillation(teacher=TwoInputNet(width=24), log_agreement=False)
    rec = Recorder()
    make_trainer(
        tmp_path, [kd, rec], max_epochs=1, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1
    ).fit(compiled)
    assert kd.teacher_forward_calls == 2
    assert rec.steps[-1]["compress/distill_loss"] > 0
    # Lightning's compiled training_step (an instance attribute) is put back, not deleted
    restored = student.__dict__["training_step"]
    assert "KnowledgeDistillation" not in getattr(restored, "__qualname__", "")
    assert restored is not TwoInputNet.training_step


# ---------------------------------------------------------------- the teacher stays out of everything


def test_teacher_is_frozen_and_kept_out_of_module_optimizer_and_checkpoint(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=32)
    teacher_before = params(teacher)
    student = TwoInputNet()
    student_before = params(student)
    kd = KnowledgeDistillation(teacher=teacher, features={"a": "a"})
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = make_trainer(tmp_path, [kd, rec, ckpt], enable_checkpointing=True, max_epochs=2)
    t.fit(student)

    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in params(teacher).items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert any(not torch.equal(v, student_before[k]) for k, v in params(student).items())
    assert not {id(p) for p in teacher.parameters()} & rec.optimizer_params
    adapter = kd.adapters["a"]
    assert {id(p) for p in adapter.parameters()} <= rec.optimizer_params
    assert rec.group_sizes == [len(list(student.parameters())), 1]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(student.state_dict())
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("KnowledgeDistillation")]
    assert "teacher" not in state
    torch.testing.assert_close(state["adapters"]["a.weight"], adapter.weight.detach())
    assert state["adapter_shapes"] == {"a": ("linear", 16, 32)}
    # teardown restored the user's module and optimizer
    assert "training_step" not in student.__dict__
    assert not student._forward_hooks and not teacher._forward_hooks
    assert len(t.optimizers[0].param_groups) == 2  # kept, so a checkpoint saved after fit stays consistent
    TwoInputNet().load_state_dict(saved["state_dict"])  # the student's checkpoint loads into a plain model


def test_teacher_from_checkpoint_path(tmp_path: Path) -> None:
    trained = TwoInputNet(width=40)
    t = make_trainer(tmp_path / "teacher", [], max_steps=2)
    t.fit(trained)
    path = tmp_path / "teacher.ckpt"
    t.save_checkpoint(path)
    for teacher_class in (None, "tests.callbacks.kd_models.TwoInputNet"):
        kd = KnowledgeDistillation(teacher=str(path), teacher_class=teacher_class)
        make_trainer(tmp_path / "student", [kd], max_steps=1).fit(TwoInputNet())
        assert isinstance(kd.teacher, TwoInputNet) and kd.teacher.hparams.width == 40
        for k, v in params(kd.teacher).items():
            torch.testing.assert_close(v, params(trained)[k])


def test_self_teacher_is_the_fit_start_snapshot_and_survives_resume(tmp_path: Path) -> None:
    student = TwoInputNet(optimizer="adam", lr=0.01)
    initial = params(student)
    kd = KnowledgeDistillation(teacher="self", alpha=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [kd, ckpt], enable_checkpointing=True, max_epochs=1).fit(student)
    for k, v in params(kd.teacher).items():
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0)
    assert kd.teacher is not student and not kd.teacher._forward_hooks
    assert "teacher" not in dict(student.named_children())

    resumed_kd = KnowledgeDistillation(teacher="self", alpha=0.5)
    make_trainer(tmp_path, [resumed_kd], max_epochs=2).fit(
        TwoInputNet(optimizer="adam", lr=0.01), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for k, v in params(resumed_kd.teacher).items():  # the original snapshot, not the resumed weights
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0)


# ---------------------------------------------------------------- resume, schedules, metrics


def test_resume_with_adapters_continues_like_an_uninterrupted_run(tmp_path: Path) -> None:
    def callbacks() -> list[pl.Callback]:
        return [
            KnowledgeDistillation(
                teacher=teacher,
                alpha=0.4,
                temperature=3.0,
                features={"a": "a", "mid": "mid"},
                alpha_schedule="linear",
                initial_alpha=0.1,
                end_step=6,
            )
        ]

    teacher = TwoInputNet(width=32)
    start = TwoInputNet(optimizer="adam", lr=0.02)

    straight = copy.deepcopy(start)
    cb_straight = callbacks()
    make_trainer(tmp_path / "a", cb_straight, max_epochs=2).fit(straight)

    first = copy.deepcopy(start)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "b", [*callbacks(), ckpt], enable_checkpointing=True, max_epochs=1).fit(first)
    resumed = TwoInputNet(optimizer="adam", lr=0.02)  # fresh weights: all must come from the checkpoint
    cb_resumed = callbacks()
    make_trainer(tmp_path / "c", cb_resumed, max_epochs=2).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    for k, v in params(straight).items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=1e-5, atol=1e-6)
    for k, v in params(cb_straight[0].adapters).items():
        torch.testing.assert_close(params(cb_resumed[0].adapters)[k], v, rtol=1e-5, atol=1e-6)


def test_alpha_and_temperature_follow_their_schedules(tmp_path: Path) -> None:
    kd = KnowledgeDistillation(
        teacher=TwoInputNet(),
        alpha=0.9,
        initial_alpha=0.1,
        alpha_schedule="linear",
        temperature=1.0,
        initial_temperature=5.0,
        temperature_schedule=Linear(),
        start_step=1,
        end_step=3,
    )
    rec = Recorder()
    make_trainer(
        tmp_path, [kd, rec], max_epochs=1, limit_train_batches=4, limit_val_batches=0, log_every_n_steps=1
    ).fit(TwoInputNet())
    # logged during step s (global_step = s before the optimizer step)
    assert [round(s["compress/alpha"], 4) for s in rec.steps] == [0.1, 0.1, 0.5, 0.9]
    assert [round(s["compress/temperature"], 4) for s in rec.steps] == [5.0, 5.0, 3.0, 1.0]
    for s in rec.steps:
        total = (1 - s["compress/alpha"]) * s["compress/task_loss"] + s["compress/alpha"] * s["compress/distill_loss"]
        assert s["compress/task_loss_share"] == pytest.approx(
            (1 - s["compress/alpha"]) * s["compress/task_loss"] / total, rel=1e-4
        )


def test_validation_agreement_matches_a_direct_computation_and_is_monitorable(tmp_path: Path) -> None:
    teacher, student = TwoInputNet(width=32), TwoInputNet()
    kd = KnowledgeDistillation(teacher=teacher)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="compress/teacher_agreement", mode="max")
    t = make_trainer(tmp_path, [kd, ckpt], enable_checkpointing=True, max_epochs=2)
    t.fit(student)
    x, extra, _ = two_input_data(32, seed=1).tensors
    with torch.no_grad():
        expected = float(D.top1_agreement(student(x, extra, scale=0.5), teacher(x, extra, scale=0.5)))
    assert float(t.callback_metrics["compress/teacher_agreement"]) == pytest.approx(expected)
    assert kd.last_agreement == pytest.approx(expected)
    assert ckpt.best_model_path and ckpt.best_model_score is not None
    report = kd.last_report.to_json()
    assert '"teacher_agreement"' in report and '"teacher_forward_calls"' in report


def test_repeated_fit_keeps_adapters_and_restores_the_module(tmp_path: Path) -> None:
    student = TwoInputNet()
    kd = KnowledgeDistillation(teacher=TwoInputNet(width=32), features={"mid": "mid"})
    make_trainer(tmp_path, [kd], max_steps=2).fit(student)
    adapter = params(kd.adapters)
    t = make_trainer(tmp_path, [kd], max_steps=1, limit_val_batches=0)
    t.fit(student)
    assert any(not torch.equal(v, adapter[k]) for k, v in params(kd.adapters).items()), "adapters keep training"
    assert "training_step" not in student.__dict__ and len(t.optimizers[0].param_groups) == 2


def test_yaml_config_runs_and_saved_config_reloads(tmp_path: Path) -> None:
    from lightning_compress.cli import build_cli as main

    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "distillation.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
    ]
    cli = main(args)
    (kd,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    # (the teacher's hparams may show the student's: LightningCLI records the model config on every module)
    assert kd.teacher_forward_calls >= 3 and kd.teacher.features[0].out_channels == 64
    saved = next(tmp_path.rglob("config.yaml"))
    again = main(
        [
            "fit",
            "--config",
            str(saved),
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'again'}",
        ]
    )
    (kd2,) = [cb for cb in again.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert (kd2.alpha, kd2.temperature, kd2.features) == (kd.alpha, kd.temperature, kd.features)
    assert kd2.teacher_forward_calls == 1


@pytest.mark.xdist_group("ddp")
def test_ddp_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_distillation.py"), str(out)],
        timeout=240,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    meta = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for k, v in ranks[0]["student"].items():
        torch.testing.assert_close(ranks[1]["student"][k], v)
    for k, v in ranks[0]["adapters"].items():
        torch.testing.assert_close(ranks[1]["adapters"][k], v)
        assert not torch.equal(v, ranks[0]["adapters_initial"][k]), "adapters were trained"
    for m in meta:
        assert m["teacher_wrapped"] is False and m["teacher_frozen"] is True
        assert m["teacher_forward_calls"] == m["train_batches"] + m["val_batches"]
        assert 0.0 <= m["agreement"] <= 1.0
    assert meta[0]["agreement"] == meta[1]["agreement"]


def test_bf16_true_converts_the_teacher_to_the_students_dtype(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=24)
    kd = KnowledgeDistillation(teacher=teacher, log_agreement=False)
    student = TwoInputNet()
    make_trainer(tmp_path, [kd], precision="bf16-true", max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
        student
    )
    assert next(student.parameters()).dtype == torch.bfloat16
    assert next(kd.teacher.parameters()).dtype == torch.bfloat16
    assert kd.teacher_forward_calls == 2


class DictOutput(TwoInputNet):
    """A Hugging Face style forward: a dict with the logits under "logits" (and something else)."""

    def forward(self, x: torch.Tensor, extra: torch.Tensor, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {"hidden": self.a(x), "logits": super().forward(x, extra, scale=scale)}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, extra, y = batch
        return F.cross_entropy(self(x, extra, scale=0.5)["logits"], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, extra, y = batch
        self.log("val_loss", F.cross_entropy(self(x, extra, scale=0.5)["logits"], y))


@pytest.mark.parametrize("output_key", [None, "logits"])
def test_dict_outputs_use_their_logits(tmp_path: Path, output_key: str | None) -> None:
    student, teacher = DictOutput(lr=0.5), DictOutput(width=32)
    reference = copy.deepcopy(student)
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=2.0, output_key=output_key)
    make_trainer(tmp_path, [kd], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(student)
    x, extra, y = two_input_data()[:16]
    logits = reference(x, extra, scale=0.5)["logits"]
    with torch.no_grad():
        teacher_logits = teacher(x, extra, scale=0.5)["logits"]
    D.distillation_loss(F.cross_entropy(logits, y), logits, teacher_logits, alpha=0.5, temperature=2.0).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad if p.grad is not None else 0
    for k, v in params(student).items():
        torch.testing.assert_close(v, params(reference)[k], rtol=1e-5, atol=1e-6)
    assert kd.last_agreement is not None


def test_output_key_that_does_not_exist_is_explained(tmp_path: Path) -> None:
    kd = KnowledgeDistillation(teacher=DictOutput(), output_key="scores")
    with pytest.raises(ValueError, match="cannot find the logits.*output_key='scores'"):
        make_trainer(tmp_path, [kd], max_steps=1).fit(DictOutput())


def test_yaml_teacher_as_checkpoint_path(tmp_path: Path) -> None:
    from lightning_compress.cli import build_cli as main

    t = make_trainer(tmp_path / "teacher", [], max_steps=1)
    t.fit(TwoInputNet(width=48))
    t.save_checkpoint(tmp_path / "teacher.ckpt")
    config = tmp_path / "kd.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: false
  default_root_dir: {tmp_path / "student"}
  callbacks:
    - class_path: lightning_compress.KnowledgeDistillation
      init_args:
        teacher: {tmp_path / "teacher.ckpt"}
        alpha: 0.6
model:
  class_path: tests.callbacks.kd_models.TwoInputNet
"""
    )
    cli = main(["fit", "--config", str(config)])
    (kd,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert isinstance(kd.teacher, TwoInputNet) and kd.teacher.mid.in_features == 48
    assert kd.teacher_forward_calls == 3  # two training steps, one validation batch


def test_checkpoint_saved_after_fit_resumes(tmp_path: Path) -> None:
    teacher = TwoInputNet(width=32)
    kd = KnowledgeDistillation(teacher=teacher, features={"mid": "mid"})
    t = make_trainer(tmp_path, [kd], max_epochs=1, limit_val_batches=0)
    t.fit(TwoInputNet(optimizer="adam"))
    t.save_checkpoint(tmp_path / "after_fit.ckpt")
    resumed = KnowledgeDistillation(teacher=teacher, features={"mid": "mid"})
    t2 = make_trainer(tmp_path, [resumed], max_epochs=2, limit_val_batches=0)
    t2.fit(TwoInputNet(optimizer="adam"), ckpt_path=tmp_path / "after_fit.ckpt")
    for k, v in params(kd.adapters).items():
        assert not torch.equal(params(resumed.adapters)[k], v), "the resumed adapters trained on"
    adapter_state = t2.optimizers[0].state[resumed.adapters["mid"].weight]
    assert int(adapter_state["step"]) == 2 * 4  # Adam's step count continued from the checkpoint


def test_pruning_run_distils_from_its_own_dense_snapshot(tmp_path: Path) -> None:
    from lightning_compress import GradualPruning

    student = TwoInputNet()
    dense = params(student)
    pruning = GradualPruning(target_sparsity=0.5, end_step=4, update_every_n_steps=2, exclude=["out"])
    kd = KnowledgeDistillation(teacher="self", alpha=0.5, log_agreement=False)
    rec = Recorder()
    make_trainer(tmp_path, [pruning, kd, rec], max_epochs=2, limit_val_batches=0, log_every_n_steps=1).fit(student)
    assert float((student.mid.weight == 0).float().mean()) > 0.3  # the student is pruned ...
    for k, v in params(kd.teacher).items():  # ... its teacher is the dense model it started from
        torch.testing.assert_close(v, dense[k], rtol=0, atol=0)
    assert rec.steps[-1]["compress/distill_loss"] > 0 and "compress/sparsity" in rec.steps[-1]


def test_quantization_aware_distillation_teacher_is_the_float_model(tmp_path) -> None:
    """QAT + KD(teacher="self"): the student learns int8 while matching the float model it started as."""
    from lightning_compress import QuantizationAwareTraining
    from lightning_compress.demo import DigitsCNN, DigitsDataModule
    from lightning_compress.functional.qat import is_qat

    model = DigitsCNN(width=8, hidden=16)
    float_copy = copy.deepcopy(model).eval()  # BatchNorm and all, before any callback touched it
    kd = KnowledgeDistillation(teacher="self", alpha=0.5)
    t = make_trainer(tmp_path, [QuantizationAwareTraining(start_step=0), kd], max_steps=3, max_epochs=-1)
    t.fit(model, DigitsDataModule(batch_size=32))
    assert any(is_qat(m) for m in model.modules())
    assert not any(is_qat(m) for m in kd.teacher.modules())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(kd.teacher(x), float_copy(x), atol=1e-6)
