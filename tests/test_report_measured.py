import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger

from lightning_compress import (
    CompressionReporter,
    GradualPruning,
    QuantizationAwareTraining,
    TensorDecomposition,
    convert_to_int8,
    load_compressed,
)
from lightning_compress.callbacks.report import run_validation
from tests.helpers import TinyMLP, trainer

pytestmark = pytest.mark.xdist_group("report_measured")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real fit: pruning + QAT with export + CompressionReporter, logging to TensorBoard and MLflow."""
    out = tmp_path_factory.mktemp("run")
    tb = TensorBoardLogger(str(out), name="tb")
    mlflow = MLFlowLogger(
        experiment_name="report",
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
        artifact_location=(out / "mlartifacts").as_uri(),
    )
    reporter = CompressionReporter(latency=True, latency_batch=8, latency_threads=1, latency_repeats=5)
    pruning = GradualPruning(0.7, end_step=8, update_every_n_steps=2, exclude=["net.4"])
    qat = QuantizationAwareTraining(start_step=2, export_dir=str(out / "int8"))
    model = TinyMLP(hidden=64)
    t = trainer(out, [reporter, pruning, qat], max_epochs=2, logger=[tb, mlflow], log_every_n_steps=2)
    t.fit(model)
    with open(os.path.join(tb.log_dir, "compression_report.json")) as fh:
        report = json.load(fh)
    return {"out": out, "tb": tb, "mlflow": mlflow, "model": model, "report": report, "trainer": t}


def test_every_size_is_labelled_and_measured_ones_match_the_files(run) -> None:
    report, model = run["report"], run["model"]
    assert {row["kind"] for row in report["sizes"]} == {"measured", "estimated"}
    on_disk = [row for row in report["sizes"] if row["path"]]
    assert {os.path.basename(r["path"]) for r in on_disk} == {
        "model_int8.pt",
        "model_int8.onnx",
        "model_compressed.lcz",
    }
    for row in on_disk:
        assert row["kind"] == "measured" and row["bytes"] == os.path.getsize(row["path"])
    # baseline: the original model's fp32 state_dict file, measured independently on a fresh copy
    # (torch.save stores the file's name inside the archive: a few bytes differ between names)
    torch.save(TinyMLP(hidden=64).state_dict(), run["out"] / "model.pt")
    summary = report["summary"]
    assert summary["baseline_bytes_measured"] == os.path.getsize(run["out"] / "model.pt")
    # the headline is the smallest file on disk, named
    best = min(on_disk, key=lambda r: r["bytes"])
    assert summary["ratio_artifact"] == best["path"] and summary["size_bytes_measured"] == best["bytes"]
    assert summary["ratio"] == pytest.approx(summary["baseline_bytes_measured"] / best["bytes"])
    assert os.path.basename(best["path"]) == "model_compressed.lcz"
    assert report["summary_kinds"]["ratio"] == "measured" and report["summary_kinds"]["ratio_estimated"] == "estimated"
    # counts from the zeros, checked independently
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert summary["params"] == params and summary["nonzero_params"] == params - zeros
    # the callback's own estimate is labelled as one
    assert "size_bytes_estimated" in report["sections"]["quantization"]
    assert "size_bytes" not in report["sections"]["quantization"]


def test_compressed_artifact_loads_to_the_int8_model(run) -> None:
    path = run["report"]["summary"]["ratio_artifact"]
    loaded = load_compressed(path)
    int8 = convert_to_int8(run["model"]).eval()
    x = torch.randn(16, 16)
    assert torch.equal(loaded(x), int8(x))


def test_quality_and_latency_are_measured(run) -> None:
    sections = run["report"]["sections"]
    quality = sections["quality before and after fit-end transforms"]
    models = [r["model"] for r in quality["rows"]]
    assert models == ["as trained (before fit-end transforms)", "int8 (convert_to_int8)"]
    # independent reference: the int8 model's validation loss computed here
    int8 = convert_to_int8(run["model"]).eval()
    x, y = (torch.cat(t) for t in zip(*run["model"].val_dataloader(), strict=True))
    assert quality["rows"][1]["val_loss"] == pytest.approx(float(F.cross_entropy(int8(x), y)), rel=1e-5)
    latency = sections["latency (measured)"]
    assert latency["batch"] == 8 and latency["threads"] == 1
    timed = {r["model"]: r for r in latency["rows"]}
    assert isinstance(timed["original (fp32)"]["median_ms"], float) and timed["original (fp32)"]["median_ms"] > 0
    assert any("model_int8.onnx" in name and r["runtime"] == "onnxruntime" for name, r in timed.items())
    techniques = {r["technique"]: r["realized by"] for r in sections["what each technique realizes"]["rows"]}
    assert "storage only" in techniques["GradualPruning"] and "onnxruntime" in techniques["QuantizationAwareTraining"]


def test_pictures_and_report_reach_tensorboard_and_mlflow(run) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = run["tb"].log_dir
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tb_dir, "*.png")))
    assert pngs == ["compression_history.png", "compression_layers.png", "compression_tradeoff.png"]
    events = EventAccumulator(tb_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"compress/layers", "compress/history", "compress/tradeoff"} <= set(events.Tags()["images"])
    assert "compress/final/ratio" in events.Tags()["scalars"]
    # the configuration went in as a second hparams record (the accumulator shows only the first one)
    (event_file,) = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
    with open(event_file, "rb") as fh:
        raw = fh.read()
    assert (
        b"compress/GradualPruning/target_sparsity" in raw and b"compress/QuantizationAwareTraining/weight_bits" in raw
    )

    mlflow = run["mlflow"]
    client = MlflowClient(tracking_uri=mlflow._tracking_uri)
    names = {os.path.basename(a.path) for a in client.list_artifacts(mlflow.run_id, "compression")}
    assert {"compression_report.json", "compression_report.md", "compression_layers.png"} <= names
    params = client.get_run(mlflow.run_id).data.params
    assert params["compress/GradualPruning/target_sparsity"] == "0.7"


def test_progress_bar_shows_the_compression_state(run) -> None:
    bar = run["trainer"].progress_bar_metrics
    assert "compress/sparsity" in bar and "compress/weight_bits" in bar


def test_decomposition_at_fit_end_is_evaluated_before_and_after(tmp_path) -> None:
    reporter = CompressionReporter(save_compressed=False, plots=False, tolerance=-10.0)
    decomposition = TensorDecomposition(rank=2, min_reduction=1.0, skip_slower=False, measure_latency=False)
    model = TinyMLP(hidden=32)
    t = trainer(tmp_path, [reporter, decomposition], max_epochs=1)
    with pytest.warns(UserWarning, match="got worse by more than tolerance=-10.0"):
        t.fit(model)
    with open(tmp_path / "compression_report.json") as fh:
        quality = json.load(fh)["sections"]["quality before and after fit-end transforms"]
    rows = {r["model"]: r for r in quality["rows"]}
    assert set(rows) == {"as trained (before fit-end transforms)", "after fit-end transforms (the LightningModule)"}
    # independent reference: the decomposed model's loss on the validation data
    x, y = (torch.cat(v) for v in zip(*model.val_dataloader(), strict=True))
    with torch.no_grad():
        expected = float(F.cross_entropy(model.eval()(x), y))
    assert rows["after fit-end transforms (the LightningModule)"]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert "warning" in quality


def test_no_validation_data_is_said(tmp_path) -> None:
    model = TinyMLP()
    model.val_dataloader = None  # type: ignore[assignment]
    t = trainer(tmp_path, [CompressionReporter(plots=False), QuantizationAwareTraining()], max_epochs=1)
    t.fit(model)
    with open(tmp_path / "compression_report.json") as fh:
        quality = json.load(fh)["sections"]["quality before and after fit-end transforms"]
    assert "no validation dataloader" in quality["note"]
    assert run_validation(t, model) == "not measured: no validation dataloader"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_batch": 0}, "latency_batch must be an integer >= 1"),
        ({"latency_threads": 0}, "latency_threads must be None or an integer >= 1"),
        ({"codec": "gzip"}, "codec must be"),
        ({"tolerance": float("nan")}, "tolerance must be None or a finite number"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CompressionReporter(**kwargs)
