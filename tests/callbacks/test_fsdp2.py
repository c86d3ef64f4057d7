"""Every callback under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on two CPU processes (gloo).

Each scenario script runs its fits in one two-process launch; the test compares what the ranks wrote
with each other and with a single-process run of the same seed on the same batches (both ranks read the
same batch, so the averaged gradient is one process's gradient). FSDP1 and DeepSpeed are refused in
``setup`` with a message naming what is supported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_compress import GradualPruning
from lightning_compress.functional import distributed as D
from tests.helpers import trainer
from tests.scripts.fsdp2_common import MODEL_ARGS, TRAINER_ARGS, PlainMLP
from tests.scripts.fsdp2_pruning import SCENARIOS as PRUNING

SCRIPTS = Path(__file__).parent.parent / "scripts"


def run_script(name: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def ranks(out: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return torch.load(out / f"{tag}_rank0.pt"), torch.load(out / f"{tag}_rank1.pt")


def single_process(tmp_path: Path, tag: str, callbacks: list[pl.Callback], **model_args: Any) -> dict[str, Any]:
    """The reference: the same seed, model, batches and callbacks in one process."""
    pl.seed_everything(0)
    model = PlainMLP(**MODEL_ARGS, **model_args)
    t = trainer(tmp_path / f"single_{tag}", callbacks, **TRAINER_ARGS)
    t.fit(model)
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}, "trainer": t}


def assert_ranks_agree(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    assert r0["metrics"] == r1["metrics"]
    for name, full in r0["full"].items():
        assert torch.equal(full, r1["full"][name]), name
        # Each rank holds its own rows of the full tensor: rank 0 the first ones.
        assert torch.equal(torch.cat([r0["local"][name], r1["local"][name]]), full), name


@pytest.mark.xdist_group("ddp")
def test_gradual_pruning_under_fsdp2(tmp_path: Path) -> None:
    run_script("fsdp2_pruning.py", tmp_path)
    # Zeros expected from the configuration alone (weights 30x16, 30x30, 5x30; biases not pruned).
    expected_zeros = {
        "global": {"all": round(0.7 * (480 + 900 + 150))},
        "mixed": {"net.0.weight": 15 * 16, "net.2.weight": 15 * 30, "net.4.weight": round(0.6 * 150)},
        "nm": {"net.0.weight": 480 // 2},
    }
    for tag, optimizer in (("global", "sgd"), ("mixed", "adamw"), ("nm", "sgd")):
        r0, r1 = ranks(tmp_path, tag)
        assert_ranks_agree(r0, r1)
        full = r0["full"]
        zeros = {k: int((v == 0).sum()) for k, v in full.items() if k.endswith("weight")}
        for name, count in expected_zeros[tag].items():
            assert (sum(zeros.values()) if name == "all" else zeros[name]) == count, (tag, name, zeros)
        assert r0["metrics"]["compress/sparsity"] == pytest.approx(r0["metrics"]["compress/target_sparsity"])
        lr = 0.01 if optimizer == "adamw" else 0.05
        ref = single_process(tmp_path, tag, PRUNING[tag](), optimizer=optimizer, lr=lr)
        for name, weight in ref["weights"].items():
            assert torch.equal(full[name] == 0, weight == 0), (tag, name)  # identical masks
            torch.testing.assert_close(full[name], weight, rtol=1e-4, atol=1e-5)
        single_metrics = {k: float(v) for k, v in ref["trainer"].callback_metrics.items() if k.startswith("compress/")}
        assert r0["metrics"] == pytest.approx(single_metrics)

    # Resume from the distributed checkpoint at step 9 (mid-schedule, between updates): the same end, bit for bit.
    (g0, _), (s0, s1) = ranks(tmp_path, "global"), ranks(tmp_path, "resume")
    assert_ranks_agree(s0, s1)
    for name, weight in g0["full"].items():
        assert torch.equal(s0["full"][name], weight), name
    # ... and its first step, taken before the next mask update, kept the pruned weights at zero.
    (a0, _), (b0, _) = ranks(tmp_path, "global_after9"), ranks(tmp_path, "resume_after9")
    for name, weight in a0["full"].items():
        assert torch.equal(b0["full"][name], weight), name

    # The consolidated full state dict (rank zero) loads into a plain model, zeros included.
    plain = PlainMLP(**MODEL_ARGS)
    plain.load_state_dict(g0["consolidated"], strict=True)
    for name, weight in plain.state_dict().items():
        assert torch.equal(weight, g0["full"][name]), name

    # The fit-end report counted the sharded model without gathering it: nonzeros as counted here.
    report = json.loads((tmp_path / "global" / "compression_report.json").read_text())
    assert report["summary"]["nonzero_params"] == sum(int((v != 0).sum()) for v in g0["full"].values())
    assert report["summary"]["ratio"] is None and "sharded" in report["summary"]["ratio_artifact"]
    assert report["summary"]["flops"] == 2 * (16 * 30 + 30 * 30 + 30 * 5)

    # A block structure crossing the 15-row shards is refused before step 1, on both ranks alike.
    for rank in (0, 1):
        message = (tmp_path / f"refused_rank{rank}.err").read_text()
        assert "block:2x2" in message and "[15, 15] rows per rank" in message and "Accepted under FSDP2" in message


@pytest.mark.xdist_group("ddp")
def test_quantization_distillation_decomposition_and_refusals_under_fsdp2(tmp_path: Path) -> None:
    from lightning_compress import convert_to_int8
    from lightning_compress.functional.qat import prepare_
    from tests.scripts.fsdp2_quantization import SCENARIOS

    run_script("fsdp2_quantization.py", tmp_path)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    for tag in SCENARIOS:
        r0, r1 = ranks(tmp_path, tag)
        assert_ranks_agree(r0, r1)
        for name, buffer in r0["buffers"].items():  # observed ranges and scales: identical on the ranks
            assert torch.equal(buffer, r1["buffers"][name]), (tag, name)
        ref = single_process(tmp_path, tag, SCENARIOS[tag](str(tmp_path / f"single_{tag}")))
        if tag == "decomposition":
            _check_decomposed(tmp_path, r0, x)
            continue
        for name, weight in ref["weights"].items():
            got = r0["full"].get(name, r0["buffers"].get(name))
            torch.testing.assert_close(got, weight, rtol=1e-4, atol=1e-5, msg=f"{tag} {name}")
            if tag == "prune_qat" and name.endswith("weight"):
                assert torch.equal(got == 0, weight == 0), name  # identical masks
        if tag == "prune_qat":
            zeros = sum(int((v == 0).sum()) for k, v in r0["full"].items() if k.endswith("weight"))
            assert zeros == round(0.7 * (480 + 900 + 150))
        report = json.loads((tmp_path / tag / "compression_report.json").read_text())
        assert report["summary"]["nonzero_params"] == sum(int((v != 0).sum()) for v in r0["full"].values())
        if tag == "qat":
            # The consolidated model, prepared like the callback did, converts to the int8 model one process gets.
            plain = PlainMLP(**MODEL_ARGS)
            prepare_(plain, modules=["net.0", "net.2", "net.4"], activation_bits=8, fold_bn=True)
            plain.load_state_dict(r0["consolidated"], strict=True)
            ref_model = ref["trainer"].lightning_module
            torch.testing.assert_close(convert_to_int8(plain)(x), convert_to_int8(ref_model)(x))
            _check_int8_export(tmp_path, convert_to_int8(plain), x)
    _check_hint_resume(tmp_path)
    for rank in (0, 1):  # refused in setup, before step 1, on both ranks alike
        err = {
            tag: (tmp_path / f"{tag}_rank{rank}.err").read_text()
            for tag in ("decomposition_mid_fit", "decomposition_no_path", "kd_self")
        }
        assert "apply_at=4" in err["decomposition_mid_fit"] and "mid-fit" in err["decomposition_mid_fit"]
        assert "HINT" in err["decomposition_mid_fit"]
        assert "needs save_path" in err["decomposition_no_path"]
        assert "teacher='self'" in err["kd_self"] and "HINT" in err["kd_self"]
    assert not (tmp_path / "decomposition_mid_fit" / "d.pt").exists()


def _check_hint_resume(tmp_path: Path) -> None:
    """KD hint adapters under FSDP2: saved in the distributed checkpoint and restored with their optimizer state."""
    at8, restored = ranks(tmp_path, "kd_hints_at8"), ranks(tmp_path, "kd_hints_resume_at8")
    end, resumed = ranks(tmp_path, "kd_hints"), ranks(tmp_path, "kd_hints_resume")
    assert set(at8[0]["adapters"]) == {"net__2.weight"} and at8[0]["adapter_optimizer_state"]
    for rank in (0, 1):
        for run in (at8, restored, end, resumed):  # adapters identical on the ranks
            assert run[rank]["adapters"].keys() == run[0]["adapters"].keys()
            for k, v in run[rank]["adapters"].items():
                assert torch.equal(v, run[0]["adapters"][k]), k
        # Right after the restore: what the uninterrupted run had at step 8, momentum included.
        for k, v in at8[rank]["adapters"].items():
            assert torch.equal(restored[rank]["adapters"][k], v), k
        for x, y in zip(at8[rank]["adapter_optimizer_state"], restored[rank]["adapter_optimizer_state"], strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        # And the same end, bit for bit: student and adapters.
        for name, weight in end[rank]["full"].items():
            assert torch.equal(resumed[rank]["full"][name], weight), name
        for k, v in end[rank]["adapters"].items():
            assert torch.equal(resumed[rank]["adapters"][k], v), k


def _check_int8_export(tmp_path: Path, consolidated_int8: torch.nn.Module, x: torch.Tensor) -> None:
    """QAT's fit-end export under FSDP2: rank zero wrote the int8 model of the gathered weights, and its ONNX."""
    import onnxruntime as ort

    written = torch.load(tmp_path / "qat" / "export" / "model_int8.pt", weights_only=False)
    single = torch.load(tmp_path / "single_qat" / "export" / "model_int8.pt", weights_only=False)
    # Exactly the int8 model of the consolidated weights; what one process writes within training noise.
    assert torch.equal(written(x), consolidated_int8(x))
    torch.testing.assert_close(written(x), single(x), rtol=1e-3, atol=1e-3)
    onnx_out = {}
    for run in ("qat", "single_qat"):
        session = ort.InferenceSession(str(tmp_path / run / "export" / "model_int8.onnx"))
        name = session.get_inputs()[0].name
        onnx_out[run] = torch.from_numpy(session.run(None, {name: x[:1].numpy()})[0])
    torch.testing.assert_close(onnx_out["qat"], onnx_out["single_qat"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(onnx_out["qat"], consolidated_int8(x[:1]), rtol=1e-3, atol=1e-3)
    report = json.loads((tmp_path / "qat" / "compression_report.json").read_text())
    assert json.dumps(report).count("model_int8.onnx") >= 1


def _check_decomposed(tmp_path: Path, r0: dict[str, Any], x: torch.Tensor) -> None:
    """TensorDecomposition at fit end under FSDP2: the saved plain model factors the gathered weights."""
    from lightning_compress.functional import decomposition as dec

    written = torch.load(tmp_path / "decomposition" / "decomposed.pt", weights_only=False)
    single = torch.load(tmp_path / "single_decomposition" / "decomposed.pt", weights_only=False)
    assert not any(D.is_dtensor(p) for p in written.parameters())
    assert set(written.state_dict()) == set(single.state_dict())
    for name, value in single.state_dict().items():
        torch.testing.assert_close(written.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    # Decomposing the consolidated weights here, layer by layer, gives the saved factors (same plan and seed).
    plain = PlainMLP(**MODEL_ARGS)
    plain.load_state_dict(r0["consolidated"], strict=True)
    for layer_name, layer in dict(plain.named_modules()).items():
        saved = written.get_submodule(layer_name)
        if isinstance(layer, torch.nn.Linear) and isinstance(saved, torch.nn.Sequential):
            plan = dec.structure_from_state_dict(plain, written.state_dict())[layer_name]
            chain, _ = dec.decompose(layer, plan, seed=0)
            for a, b in zip(chain.state_dict().values(), saved.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=layer_name)
    report = json.loads((tmp_path / "decomposition" / "compression_report.json").read_text())
    assert "decomposed.pt" in json.dumps(report)
    assert written(x).shape == (8, MODEL_ARGS["classes"])


# ---- FSDP1 and DeepSpeed: refused in setup, naming what is supported (no process group, no GPU needed)


def _callbacks() -> list[Any]:
    from lightning_compress import KnowledgeDistillation, QuantizationAwareTraining, TensorDecomposition

    return [
        GradualPruning(0.5),
        QuantizationAwareTraining(),
        KnowledgeDistillation(teacher=PlainMLP(**MODEL_ARGS)),
        TensorDecomposition(rank=0.5),
    ]


class DeepSpeedStrategy:
    """Stands in for Lightning's DeepSpeedStrategy, which cannot be built without deepspeed installed.

    Strategies are recognised by class name (both Lightning packages define their own classes).
    """


@pytest.mark.parametrize("kind", ["fsdp1", "deepspeed"])
@pytest.mark.parametrize("index", range(4))
def test_fsdp1_and_deepspeed_are_refused_in_setup(kind: str, index: int) -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    strategy = FSDPStrategy() if kind == "fsdp1" else DeepSpeedStrategy()
    callback = _callbacks()[index]
    name = type(strategy).__name__
    with pytest.raises(ValueError) as info:
        callback.setup(SimpleNamespace(strategy=strategy), PlainMLP(**MODEL_ARGS), "fit")
    message = str(info.value)
    assert name in message and ("Supported" in message or "supports" in message)
    if type(callback).__name__ != "TensorDecomposition":
        assert "ModelParallelStrategy" in message and "fully_shard" in message
    else:
        assert "strategy='ddp'" in message
