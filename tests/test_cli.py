import glob
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lightning_compress.cli import build_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def ours(cli) -> list:
    return [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_compress")]


def plain(value: Any) -> Any:
    """A comparable form of a constructor argument: modules by class and parameter shapes, objects by repr."""
    if isinstance(value, nn.Module):
        return type(value).__qualname__, [(k, tuple(v.shape)) for k, v in value.state_dict().items()]
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def argument(callback: Any, name: str) -> Any:
    """The ``__init__`` argument ``name`` of ``callback``, read back from the attribute of the same name.

    Window arguments (``start_step`` ... ``end_epoch``) live on the callback's ``window`` (a StepWindow); an
    argument resolved into another object keeps the value given as ``<name>_spec`` (the distillation teacher).
    """
    if hasattr(callback, f"{name}_spec"):
        return getattr(callback, f"{name}_spec")
    for holder in (callback, getattr(callback, "window", None)):
        if holder is not None and hasattr(holder, name):
            return getattr(holder, name)
    raise AssertionError(f"{type(callback).__name__} keeps no attribute for {name!r}: extend this test")


def init_arguments(callback: Any) -> dict[str, Any]:
    """Every ``__init__`` argument of ``callback``, in a comparable form."""
    names = [n for n in inspect.signature(type(callback).__init__).parameters if n != "self"]
    return {n: plain(argument(callback, n)) for n in names}


def given_callbacks(path: str) -> list[dict[str, Any]]:
    with open(path) as fh:
        return yaml.safe_load(fh)["trainer"]["callbacks"]


def check_reload(tmp_path, first: Any, config_path: str, first_root: str) -> None:
    saved = glob.glob(os.path.join(first_root, "**", "config.yaml"), recursive=True)
    assert len(saved) == 1
    # The old tools' complaint: a saved CLI config that cannot be loaded again. These can, with every value.
    again = build_cli(
        [
            "fit",
            "--config",
            saved[0],
            f"--trainer.default_root_dir={tmp_path / 'again'}",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    assert [type(cb) for cb in ours(again)] == [type(cb) for cb in ours(first)]
    assert [cb.state_key for cb in ours(again)] == [cb.state_key for cb in ours(first)]
    for a, b in zip(ours(first), ours(again), strict=True):
        assert init_arguments(b) == init_arguments(a), type(a).__name__
    # and the values are the ones the YAML file gives (a dropped argument would come back as its default)
    for cb, spec in zip(ours(again), given_callbacks(config_path), strict=True):
        for key, value in spec.get("init_args", {}).items():
            attribute = argument(cb, key)
            if isinstance(value, dict) and "class_path" in value:  # a module given by class_path
                # built here from the YAML (its hparams are not evidence: LightningCLI stamps the main
                # model's hparams on every LightningModule it instantiates, a nested teacher included)
                module_name, _, class_name = value["class_path"].rpartition(".")
                reference = getattr(importlib.import_module(module_name), class_name)(**value.get("init_args", {}))
                assert plain(attribute) == plain(reference), key
            elif isinstance(attribute, bool | int | float | str | list | dict):
                assert plain(attribute) == plain(value), f"{type(cb).__name__}.{key}"
            else:  # a parsed object given by name: "cubic" -> Cubic(...), "channels" -> Structure("channels")
                given = str(value).replace("_", "")
                parsed = (type(attribute).__name__.lower(), str(attribute).replace("_", ""))
                assert given in parsed, f"{type(cb).__name__}.{key}"


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_and_saved_config_reloads(tmp_path, monkeypatch, config: str) -> None:
    monkeypatch.chdir(tmp_path)  # configs write relative paths (outputs/...)
    config_path = os.path.join(ROOT, "configs", config)
    first = build_cli(
        [
            "fit",
            "--config",
            config_path,
            f"--trainer.default_root_dir={tmp_path / 'first'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=1",
        ]
    )
    reports = glob.glob(str(tmp_path / "first" / "**" / "compression_report.json"), recursive=True)
    assert len(reports) == 1
    with open(reports[0]) as fh:
        report = json.load(fh)
    assert report["summary"]["params"] > 0 and report["layers"]
    check_reload(tmp_path, first, config_path, str(tmp_path / "first"))


def test_main_config_reaches_qat_and_writes_the_promised_files(tmp_path, monkeypatch) -> None:
    """configs/main.yaml, run past its QAT start_step: the int8 .pt and .onnx files load, run and agree."""
    import onnxruntime as ort

    from lightning_compress.demo import DigitsDataModule

    monkeypatch.chdir(tmp_path)  # the config writes to outputs/main (README: outputs/main/int8, lightning_logs)
    config_path = os.path.join(ROOT, "configs", "main.yaml")
    qat = next(cb for cb in given_callbacks(config_path) if cb["class_path"].endswith("QuantizationAwareTraining"))
    start = qat["init_args"]["start_step"]
    cli = build_cli(
        ["fit", "--config", config_path, f"--trainer.max_steps={start + 3}", "--trainer.limit_val_batches=1"]
    )
    assert cli.trainer.global_step == start + 3  # fake quantization ran for 3 optimizer steps
    assert os.path.abspath(qat["init_args"]["export_dir"]) == str(tmp_path / "outputs" / "main" / "int8")

    reports = glob.glob(str(tmp_path / "outputs" / "main" / "lightning_logs" / "version_*" / "compression_report.*"))
    assert sorted(os.path.basename(r) for r in reports) == ["compression_report.json", "compression_report.md"]
    with open(next(r for r in reports if r.endswith(".json"))) as fh:
        report = json.load(fh)
    assert set(report["sections"]) >= {"pruning", "quantization"}
    assert 0 < report["summary"]["sparsity"] < 0.8  # pruning is under way (window ends at epoch 5)

    int8 = torch.load(tmp_path / "outputs" / "main" / "int8" / "model_int8.pt", weights_only=False)
    assert any(t.dtype == torch.int8 for t in int8.state_dict().values())
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    x, y = next(iter(data.val_dataloader()))
    int8.eval()
    with torch.no_grad():
        torch_top1 = int8(x).argmax(1).numpy()
    session = ort.InferenceSession(str(tmp_path / "outputs" / "main" / "int8" / "model_int8.onnx"))
    (name,) = [i.name for i in session.get_inputs()]
    onnx_top1 = np.concatenate([session.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))]).argmax(1)
    assert (onnx_top1 == torch_top1).mean() >= 0.95  # the two int8 models predict alike
    assert (torch_top1 == y.numpy()).mean() > 0.5  # and they learned something (10 classes)


def test_console_script_exits_zero(tmp_path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "lightning-compress")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lightning_compress.cli"]
    result = subprocess.run(
        [
            *command,
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "pruning.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
