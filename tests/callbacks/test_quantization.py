from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining, convert_to_int8
from lightning_compress.demo import DigitsCNN, DigitsDataModule
from lightning_compress.functional.qat import FoldedBatchNorm2d, is_qat, prepare_, qat_modules
from tests.helpers import TinyMLP, trainer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


class Recorder(pl.Callback):
    """Per-step snapshots of the observer state, taken before each training step runs."""

    def __init__(self) -> None:
        self.ranges: list[torch.Tensor] = []
        self.enabled: list[bool] = []
        self.at_train_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_train_start = {k: v.clone() for k, v in pl_module.state_dict().items() if "range" in k or "scale" in k}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.ranges.append(pl_module.net[0].activation_range.clone())
        self.enabled.append(pl_module.net[0].fake_quant_enabled)


# ------------------------------------------------------------------------------------ bad configurations
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight_bits=16), ValueError, r"weight_bits must be one of \[2, 3, 4, 5, 6, 7, 8\], got 16"),
        (dict(weight_bits=1), ValueError, "HINT: bits per value"),
        (dict(weight_bits=8.0), ValueError, "weight_bits"),
        (dict(activation_bits=4), ValueError, r"activation_bits must be one of \[8\]"),
        (dict(start_step=-1), ValueError, "start_step must be a non-negative integer"),
        (
            dict(start_step=10, freeze_observers_step=5),
            ValueError,
            "freeze_observers_step must be > start_step",
        ),
        (dict(freeze_bn_step=0), ValueError, "freeze_bn_step must be > start_step"),
        (dict(ema_decay=1.0), ValueError, r"ema_decay must be a number in \[0, 1\)"),
        (dict(types=["Conv3d"]), ValueError, "HINT: other layers"),
        (dict(include="net.0"), TypeError, "HINT: write"),
        (dict(overrides={"net.0": 12}), ValueError, r"overrides\['net.0'\]"),
        (dict(name="a b"), ValueError, "name must be"),
        (dict(target_cpu="avx512"), ValueError, r"target_cpu must be one of \['auto', 'vnni', 'avx2', 'arm64'\]"),
        (dict(export_weight_dtype="int4"), ValueError, "export_weight_dtype must be one of"),
    ],
)
def test_bad_arguments_rejected_in_init(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**kwargs)


class NoQuantizable(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Bilinear(16, 16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[1](x, x)


class Subclassed(TinyMLP):
    class MyLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    def __init__(self) -> None:
        super().__init__()
        self.net[0] = self.MyLinear(16, 32)


class SharedHidden(TinyMLP):
    """Two hidden Linear layers sharing one weight: both selected, quantizing each would untie them."""

    def __init__(self) -> None:
        super().__init__(hidden=16)
        self.net[2] = nn.Linear(16, 16)
        self.net.insert(4, nn.Linear(16, 16))
        self.net.insert(5, nn.ReLU())
        self.net[4].weight = self.net[2].weight


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (SharedHidden, {}, r"tied to another parameter: net.2.weight is also net.4.weight"),
        (SharedHidden, dict(include=["net.2"]), r"net.2.weight is tied to net.4.weight .*HINT: exclude=\['net.2'\]"),
        (TinyMLP, dict(include=["encoder.*"]), "include pattern 'encoder.*' matches no module"),
        (TinyMLP, dict(exclude=["net.9"]), "exclude pattern 'net.9' matches no module"),
        (TinyMLP, dict(overrides={"head": 4}), "overrides pattern 'head' matches no quantized layer"),
        (NoQuantizable, {}, "No module was selected"),
        (Subclassed, {}, r"only plain nn.Linear"),
    ],
)
def test_model_dependent_errors_before_first_step(tmp_path, model: type, kwargs: dict, match: str) -> None:
    module = model()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [QuantizationAwareTraining(**kwargs)], enable_checkpointing=True).fit(module)
    for k, v in module.state_dict().items():  # no step ran
        assert torch.equal(v, before[k])
    assert not any(p.suffix in (".ckpt", ".json", ".md") for p in tmp_path.rglob("*"))


def test_two_instances_need_distinct_names(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning refuses it at construction
        trainer(
            tmp_path,
            [QuantizationAwareTraining(include=["net.0"]), QuantizationAwareTraining(include=["net.2"])],
        )
    model = TinyMLP()
    callbacks = [
        QuantizationAwareTraining(include=["net.0"], name="a"),
        QuantizationAwareTraining(include=["net.2"], weight_bits=4, name="b"),
    ]
    t = trainer(tmp_path, callbacks, max_epochs=1)
    t.fit(model)
    assert (model.net[0].weight_bits, model.net[2].weight_bits) == (8, 4) and not is_qat(model.net[4])
    assert {"compress/a/weight_bits", "compress/b/weight_bits"} <= set(t.callback_metrics)


# ------------------------------------------------------------------------------------ a real fit
def test_fit_logs_metrics_and_follows_phases(tmp_path) -> None:
    model, rec = TinyMLP(), Recorder()
    qat = QuantizationAwareTraining(start_step=3, freeze_observers_step=8, overrides={"net.4": 4})
    t = trainer(tmp_path, [qat, rec], max_epochs=2)  # 8 batches/epoch -> 16 steps
    t.fit(model)
    assert [type(m).__name__ for m in model.net] == ["QATLinear", "ReLU", "QATLinear", "ReLU", "QATLinear"]
    # Before start_step nothing is observed or quantized; afterwards ranges move until the freeze.
    assert rec.enabled == [False] * 3 + [True] * 13
    assert all(torch.isinf(r).all() for r in rec.ranges[:4])
    assert not torch.equal(rec.ranges[5], rec.ranges[8])
    assert all(torch.equal(r, rec.ranges[9]) for r in rec.ranges[9:])
    assert torch.equal(model.net[0].activation_range, rec.ranges[9])
    # Metrics, against a reference computation of the parameter bytes.
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    weights = {
        "net.0": (8, model.net[0].weight),
        "net.2": (8, model.net[2].weight),
        "net.4": (4, model.net[4].weight),
    }
    quantized = sum(w.numel() * b / 8 + w.shape[0] * 4 for b, w in weights.values())
    size = fp32 - sum(w.numel() * 4 for _, w in weights.values()) + quantized
    bits = sum(w.numel() * b for b, w in weights.values()) / sum(w.numel() for _, w in weights.values())
    metrics = t.callback_metrics
    assert float(metrics["compress/size_bytes"]) == pytest.approx(size)
    assert float(metrics["compress/ratio"]) == pytest.approx(fp32 / size, rel=1e-5)
    assert float(metrics["compress/weight_bits"]) == pytest.approx(bits)
    assert qat.layer_bits() == {"net.0": 8.0, "net.2": 8.0, "net.4": 4.0}
    report = qat.last_report
    assert report is not None and [r["weight_bits"] for r in report.sections["quantization"]["layers"]] == [
        8,
        8,
        4,
    ]
    assert {s.name: s.bits for s in report.layers}["net.4"] == 4


class GatedMLP(TinyMLP):
    """A keyword-only input next to the positional one (module level: the export pickles the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x) + self.side(x if gate is None else x * gate)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x, gate=torch.ones_like(x)), y)


def test_keyword_input_model_trains_and_exports(tmp_path) -> None:
    model = GatedMLP()
    qat = QuantizationAwareTraining(export_dir=str(tmp_path / "export"), target_cpu="avx2")
    trainer(tmp_path, [qat], max_epochs=1, limit_val_batches=0).fit(model)
    assert is_qat(model.side) and model.side.activation_observed
    section = qat.last_report.sections["quantization"]
    # The report says which storage the export chose for the named CPU, and why.
    assert section["onnx_target_cpu"] == "avx2" and "saturate" in section["onnx_storage_reason"]
    assert section["onnx_weight_storage"] == "int8 for codes within ±64, else uint8"
    # The export at fit end rebuilds the captured call with its keyword input (it raised TypeError).
    assert sorted(os.listdir(tmp_path / "export")) == ["model_int8.onnx", "model_int8.pt"]
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "export" / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "gate"]
    x, gate = torch.randn(8, 16), torch.rand(8, 16)
    got = session.run(None, {"input": x.numpy(), "gate": gate.numpy()})[0]
    model.eval()
    with torch.no_grad():
        expected = model(x, gate=gate)
    assert (torch.from_numpy(got).argmax(1) == expected.argmax(1)).float().mean() >= 0.95
    gate_ignored = session.run(None, {"input": x.numpy(), "gate": np.ones((8, 16), np.float32)})[0]
    assert not np.allclose(got, gate_ignored)  # the gate is a real graph input, not a traced constant


# ------------------------------------------------------------------------------------ resume
def test_resume_restores_observers_with_strict_loading(tmp_path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    qat = QuantizationAwareTraining(start_step=2, freeze_observers_step=12)
    first = TinyMLP()
    trainer(tmp_path, [qat, ckpt_cb], max_epochs=1, enable_checkpointing=True).fit(first)
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert "net.0.activation_range" in checkpoint["state_dict"]

    # A fresh model and callback, resumed from the file: the swap in setup makes strict loading work.
    rec = Recorder()
    second = TinyMLP()
    t = trainer(tmp_path, [QuantizationAwareTraining(start_step=2, freeze_observers_step=12), rec], max_epochs=2)
    t.fit(second, ckpt_path=str(path))
    for key, value in rec.at_train_start.items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key
    assert rec.enabled == [True] * 8  # steps 8..15, all past start_step
    assert all(torch.equal(r, rec.ranges[4]) for r in rec.ranges[4:])  # frozen from step 12
    assert not torch.equal(rec.ranges[0], rec.ranges[3])  # still observing at steps 8..11
    assert t.global_step == 16

    # A plain model cannot silently swallow the QAT state; a prepared one loads it strictly.
    prepared = TinyMLP()
    prepare_(prepared)
    prepared.load_state_dict(checkpoint["state_dict"], strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TinyMLP().load_state_dict(checkpoint["state_dict"], strict=True)

    # Resuming with other bits fails loudly instead of mixing scales.
    with pytest.raises(ValueError, match="same weight_bits"):
        trainer(tmp_path, [QuantizationAwareTraining(weight_bits=4)], max_epochs=3).fit(TinyMLP(), ckpt_path=str(path))


def test_repeated_fit_keeps_observed_state(tmp_path) -> None:
    model, qat = TinyMLP(), QuantizationAwareTraining(freeze_observers_step=4)
    trainer(tmp_path, [qat], max_epochs=1).fit(model)
    frozen = model.net[0].activation_range.clone()
    trainer(tmp_path, [qat], max_epochs=1).fit(model)  # global_step restarts at 0: observing again
    assert is_qat(model.net[0]) and len(list(qat_modules(model))) == 3
    assert not torch.equal(model.net[0].activation_range, frozen)


# ------------------------------------------------------------------------------------ with pruning
def test_qat_with_gradual_pruning_in_one_fit(tmp_path) -> None:
    model = TinyMLP()
    pruning = GradualPruning(target_sparsity=0.5, end_step=8, update_every_n_steps=2)
    qat = QuantizationAwareTraining(start_step=0)
    trainer(tmp_path, [pruning, qat], max_epochs=2).fit(model)
    int8 = convert_to_int8(model)
    weights = [model.net[i].weight for i in (0, 2, 4)]
    zero_count = sum(int((w == 0).sum()) for w in weights)
    assert zero_count / sum(w.numel() for w in weights) >= 0.5  # pruned during QAT (global ranking)
    for i in (0, 2, 4):
        layer = model.net[i]
        zeros = layer.weight == 0
        # Reference codes in float64 from the layer's stored scale: round(w / s), clamped to ±127.
        w64, s64 = layer.weight.detach().double(), layer.weight_scale.double()
        codes = torch.clamp(torch.round(w64 / s64[:, None]), -127, 127)
        assert torch.all(codes[zeros] == 0)
        assert torch.equal(int8.net[i].weight_int8.long(), codes.long())
    assert pruning._masks  # masks still enforced: the pruning callback saw the swapped layers' parameters
    for t in pruning._targets:
        assert torch.all(t.parameter[~pruning._masks[t.name]] == 0)


# ------------------------------------------------------------------------------ digits, conversion, export
def _bytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def test_digits_qat_convert_and_export(tmp_path) -> None:
    pl.seed_everything(0)
    dm, model = DigitsDataModule(), DigitsCNN()
    fp32_bytes = _bytes(model.state_dict())
    qat = QuantizationAwareTraining(freeze_bn_step=30, freeze_observers_step=40, export_dir=str(tmp_path / "export"))
    t = trainer(tmp_path, [qat], max_epochs=2, limit_train_batches=25)
    t.fit(model, dm)
    assert isinstance(model.features[1], FoldedBatchNorm2d)
    int8 = convert_to_int8(model)
    assert fp32_bytes / _bytes(int8.state_dict()) >= 3.8
    x = torch.cat([b[0] for b in dm.val_dataloader()])
    model.eval()
    with torch.no_grad():
        agree = float((int8(x).argmax(1) == model(x).argmax(1)).float().mean())
    assert agree >= 0.99
    files = sorted(os.listdir(tmp_path / "export"))
    assert files == ["model_int8.onnx", "model_int8.pt"]
    reloaded = torch.load(tmp_path / "export" / "model_int8.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), int8(x))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "export" / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert float((torch.from_numpy(logits).argmax(1) == int8(x).argmax(1)).float().mean()) >= 0.99


# ------------------------------------------------------------------------------------ DDP
@pytest.mark.xdist_group("ddp")
def test_ddp_observers_identical_on_ranks(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_quantization.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0.pop("__metrics__") == r1.pop("__metrics__")
    assert r0.keys() == r1.keys() and any(k.endswith("activation_range") for k in r0)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert all(torch.isfinite(v).all() for k, v in r0.items() if k.endswith("activation_range"))


def test_per_token_activations_refuse_convs_before_the_first_step(tmp_path: Path) -> None:
    model = DigitsCNN(width=4, hidden=8)
    before = copy.deepcopy(model.state_dict())
    qat = QuantizationAwareTraining(activation_granularity="token", export_dir=str(tmp_path / "out"))
    t = trainer(tmp_path, [qat], max_steps=2)
    with pytest.raises(ValueError, match=r"activation_granularity='token'.*are convolutions.*types=\['Linear'"):
        t.fit(model, DigitsDataModule(batch_size=16))
    assert t.global_step == 0 and not any(is_qat(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"activation_granularity must be one of \['tensor', 'token'\], got 'dynamic'"):
        QuantizationAwareTraining(activation_granularity="dynamic")


def test_model_passed_in_eval_mode_is_observed_on_training_batches_only(tmp_path: Path) -> None:
    """Lightning keeps a model passed to fit in eval mode (as Hugging Face's from_pretrained returns it)."""
    model = TinyMLP().eval()
    qat = QuantizationAwareTraining(start_step=0)
    trainer(tmp_path, [qat], max_steps=3, limit_val_batches=0).fit(model)
    layers = dict(qat_modules(model))
    assert layers and not any(m.training for m in layers.values())  # the user's mode is kept
    for name, layer in layers.items():
        w = layer.weight.detach()
        # The scale of the weight as trained (float64 reference), not the initial 1s.
        expected = (w.double().abs().amax(1) / 127).float()
        # Observed at the start of the last step, before its optimizer update: close to the final weights.
        torch.testing.assert_close(layer.weight_scale, expected, rtol=0.05, atol=0)
        assert layer.activation_observed, name
    ranges = {n: m.activation_range.clone() for n, m in layers.items()}
    x = torch.randn(8, 16) * 100  # an eval-mode forward outside a training batch observes nothing
    model(x)
    assert all(torch.equal(m.activation_range, ranges[n]) for n, m in layers.items())
