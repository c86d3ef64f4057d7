"""QAT vs PTQ vs fp32 on digits, int8 file sizes, and int8 latency in onnxruntime and PyTorch.

Two models, each measured in one process:
- the digits CNN (``lightning_compress.demo.DigitsCNN``), and
- a Linear-heavy MLP on the same data: 64 -> 1024 -> 1024 -> 1024 -> 1024 -> 10.

For each: fp32 training, PTQ (the same module swap, calibrated on a few batches of the trained fp32 model,
no training), QAT (``QuantizationAwareTraining`` in the same training run length), accuracy of each, the
converted int8 PyTorch model and our int8 ONNX export; file sizes; onnxruntime latency (2 intra-op
threads, median over interleaved repeats) of the fp32 export, our int8 export and onnxruntime's own
``quantize_dynamic`` of the fp32 export (the anchor).

    PYTHONPATH=$PWD python benchmarks/qat_int8.py [--epochs 8] [--repeats 200] [--anchor-only | --defaults-only]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import QuantizationAwareTraining, convert_to_int8, export_onnx
from lightning_compress.demo import DigitsCNN, DigitsDataModule
from lightning_compress.functional.int8_compile import compile_int8
from lightning_compress.functional.qat import calibrate_, prepare_

warnings.filterwarnings("ignore")


class DigitsMLP(DigitsCNN):
    """The Linear-heavy model: the digits task through four 1024-wide Linear layers."""

    def __init__(self, hidden: int = 1024, lr: float = 1e-3) -> None:
        super().__init__(lr=lr)
        self.features = nn.Flatten()
        self.head = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(hidden, 10)


def fit(model: pl.LightningModule, dm: DigitsDataModule, epochs: int, callbacks: list, root: str) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def nbytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def ort_session(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def interleaved_median_ms(fns: dict[str, Any], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median latency of each function, measured in interleaved rounds so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats // rounds):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run(
    title: str, make: Any, epochs: int, qat_kwargs: dict, batch: int, repeats: int, tmp: str, seeds: list[int]
) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dm = DigitsDataModule()
    dm.setup()
    x_val, y_val = dm.val_set.tensors
    steps_per_epoch = len(dm.train_dataloader())
    acc: dict[str, list[float]] = {k: [] for k in ("fp32", "ptq", "ptq_int8", "qat", "int8", "compiled")}
    for seed in seeds:
        # fp32
        pl.seed_everything(seed, verbose=False)
        fp32_s = make()
        fit(fp32_s, dm, epochs, [], tmp)
        acc["fp32"].append(accuracy(fp32_s, x_val, y_val))

        # PTQ: the trained fp32 model, swapped and calibrated on 8 training batches, no training
        ptq = copy.deepcopy(fp32_s)
        prepare_(ptq, fold_bn=True)
        calibrate_(ptq, dm.train_dataloader(), num_batches=8)
        acc["ptq"].append(accuracy(ptq, x_val, y_val))
        acc["ptq_int8"].append(accuracy(convert_to_int8(ptq), x_val, y_val))

        # QAT: the same training run (same seed) with the callback
        pl.seed_everything(seed, verbose=False)
        qat_s = make()
        qat = QuantizationAwareTraining(
            start_step=steps_per_epoch, freeze_bn_step=(epochs - 2) * steps_per_epoch,
            freeze_observers_step=(epochs - 1) * steps_per_epoch, **qat_kwargs,
        )  # fmt: skip
        fit(qat_s, dm, epochs, [qat], tmp)
        acc["qat"].append(accuracy(qat_s, x_val, y_val))
        acc["int8"].append(accuracy(convert_to_int8(qat_s), x_val, y_val))
        acc["compiled"].append(accuracy(compile_int8(qat_s, x_val), x_val, y_val))
        if seed == seeds[0]:
            fp32, qat_model = fp32_s, qat_s
    int8 = convert_to_int8(qat_model)
    with torch.no_grad():
        agree_torch = float((int8(x_val).argmax(1) == qat_model(x_val).argmax(1)).float().mean())

    # sizes: state_dicts with torch.save
    fp32_sd, int8_sd = nbytes(fp32.state_dict()), nbytes(int8.state_dict())

    # ONNX: fp32 export, our int8 export, onnxruntime's quantize_dynamic of the fp32 export
    example = x_val[:1]
    p_fp32, p_ours, p_dyn = (os.path.join(tmp, f"{title}_{k}.onnx") for k in ("fp32", "int8", "dynamic"))
    fp32.eval()
    torch.onnx.export(
        fp32, (example,), p_fp32, dynamo=False, opset_version=17, input_names=["input"],
        output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )  # fmt: skip
    export_onnx(qat_model, p_ours, example)
    quantize_dynamic(p_fp32, p_dyn, weight_type=QuantType.QInt8)
    sessions = {k: ort_session(p) for k, p in (("fp32", p_fp32), ("ours", p_ours), ("dynamic", p_dyn))}
    onnx_acc = {}
    for k, s in sessions.items():
        logits = s.run(None, {"input": x_val.numpy()})[0]
        onnx_acc[k] = float((logits.argmax(1) == y_val.numpy()).mean())
    ours_logits = sessions["ours"].run(None, {"input": x_val.numpy()})[0]
    with torch.no_grad():
        agree_onnx = float((ours_logits.argmax(1) == qat_model(x_val).numpy().argmax(1)).mean())
    xb = torch.randn(batch, *x_val.shape[1:]).clamp(0, 1).numpy()
    ort_ms = interleaved_median_ms({k: (lambda s=s: s.run(None, {"input": xb})) for k, s in sessions.items()}, repeats)

    # PyTorch eager latency: fp32 vs the converted int8 model (2 threads)
    torch.set_num_threads(2)
    xt = torch.from_numpy(xb)
    with torch.no_grad():
        torch_ms = interleaved_median_ms({"fp32": lambda: fp32(xt), "int8": lambda: int8(xt)}, repeats)
    torch.set_num_threads(1)

    size = {k: os.path.getsize(p) for k, p in (("fp32", p_fp32), ("ours", p_ours), ("dynamic", p_dyn))}
    return [
        f"## {title}",
        "",
        f"Training: {epochs} epochs; QAT from step {qat.start_step}, BatchNorm frozen at "
        f"{qat.freeze_bn_step}, observers frozen at {qat.freeze_observers_step}; PTQ calibrated on 8 "
        f"batches. QAT options: {qat_kwargs or 'defaults'}.",
        "",
        f"| model | val accuracy, mean over seeds {seeds} | per seed |",
        "| --- | ---: | --- |",
        row("fp32", acc["fp32"]),
        row("PTQ, fake-quant", acc["ptq"]),
        row("PTQ, int8 PyTorch", acc["ptq_int8"]),
        row("QAT, fake-quant", acc["qat"]),
        row("QAT, int8 PyTorch (`convert_to_int8`)", acc["int8"]),
        row("QAT, int8 PyTorch kernels (`compile_int8`)", acc["compiled"]),
        f"| QAT, int8 ONNX (`export_onnx`, onnxruntime), seed {seeds[0]} | {onnx_acc['ours']:.2%} | |",
        f"| fp32 ONNX + onnxruntime `quantize_dynamic`, seed {seeds[0]} | {onnx_acc['dynamic']:.2%} | |",
        "",
        f"QAT - fp32: {statistics.mean(acc['qat']) - statistics.mean(acc['fp32']):+.2%} (mean); "
        f"PTQ - fp32: {statistics.mean(acc['ptq']) - statistics.mean(acc['fp32']):+.2%}.",
        "",
        f"Top-1 agreement with the fake-quant model: int8 PyTorch {agree_torch:.2%}, int8 ONNX {agree_onnx:.2%}.",
        "",
        "| size | bytes | fp32 / this |",
        "| --- | ---: | ---: |",
        f"| fp32 state_dict (torch.save) | {fp32_sd} | 1.00x |",
        f"| int8 state_dict (torch.save) | {int8_sd} | {fp32_sd / int8_sd:.2f}x |",
        f"| fp32 ONNX | {size['fp32']} | 1.00x |",
        f"| our int8 ONNX | {size['ours']} | {size['fp32'] / size['ours']:.2f}x |",
        f"| `quantize_dynamic` ONNX | {size['dynamic']} | {size['fp32'] / size['dynamic']:.2f}x |",
        "",
        f"| latency, batch {batch}, median | ms | speed-up vs fp32 |",
        "| --- | ---: | ---: |",
        f"| onnxruntime fp32 | {ort_ms['fp32']:.3f} | 1.00x |",
        f"| onnxruntime, our int8 export | {ort_ms['ours']:.3f} | {speed(ort_ms, 'ours')} |",
        f"| onnxruntime, `quantize_dynamic` | {ort_ms['dynamic']:.3f} | {speed(ort_ms, 'dynamic')} |",
        f"| PyTorch eager fp32 | {torch_ms['fp32']:.3f} | 1.00x |",
        f"| PyTorch eager int8 (`convert_to_int8`) | {torch_ms['int8']:.3f} | {speed(torch_ms, 'int8')} |",
        "",
    ]


def speed(ms: dict[str, float], key: str) -> str:
    return f"{ms['fp32'] / ms[key]:.2f}x"


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def row(label: str, values: list[float]) -> str:
    return f"| {label} | {statistics.mean(values):.2%} | {', '.join(f'{v:.2%}' for v in values)} |"


def anchor_mlp(repeats: int, tmp: str) -> list[str]:
    """The anchor setting: 4 x Linear(1024, 1024) + ReLU, batch 64, random weights (no training)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())]).eval()
    x = torch.randn(64, 1024)
    paths = {k: os.path.join(tmp, f"anchor_{k}.onnx") for k in ("fp32", "ours", "ours_s8", "ours_7bit", "dynamic")}
    seven = copy.deepcopy(model)
    torch.onnx.export(
        model, (x,), paths["fp32"], dynamo=False, opset_version=17, input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )  # fmt: skip
    quantize_dynamic(paths["fp32"], paths["dynamic"], weight_type=QuantType.QInt8)
    prepare_(model)
    calibrate_(model, [x])
    export_onnx(model, paths["ours"], x[:1])
    export_onnx(model, paths["ours_s8"], x[:1], weight_dtype="int8")
    prepare_(seven, weight_bits=7)
    calibrate_(seven, [x])
    export_onnx(seven, paths["ours_7bit"], x[:1])
    sessions = {k: ort_session(p) for k, p in paths.items()}
    xi = x.numpy()
    ms = interleaved_median_ms({k: (lambda s=s: s.run(None, {"input": xi})) for k, s in sessions.items()}, repeats)
    with torch.no_grad():
        refs = {k: (seven if k == "ours_7bit" else model)(x).numpy() for k in sessions}
    err = {
        k: float(np.abs(s.run(None, {"input": xi})[0] - refs[k]).max() / np.abs(refs[k]).max())
        for k, s in sessions.items()
    }
    size = {k: os.path.getsize(p) for k, p in paths.items()}
    names = {
        "fp32": "fp32",
        "ours": "ours, 8-bit weights (stored uint8: exact kernels)",
        "ours_s8": "ours, 8-bit weights forced `weight_dtype='int8'`",
        "ours_7bit": "ours, `weight_bits=7` (int8 codes within ±63)",
        "dynamic": "`quantize_dynamic` (QInt8)",
    }
    lines = [
        "## Anchor setting: 4 x Linear(1024, 1024), batch 64 (random weights, PTQ-calibrated on the batch)",
        "",
        "| onnxruntime | ms | speed-up | bytes | smaller | max abs error / max output, vs own fake-quant |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, label in names.items():
        lines.append(
            f"| {label} | {ms[k]:.3f} | {speed(ms, k)} | {size[k]} | {size['fp32'] / size[k]:.2f}x | {err[k]:.4f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--anchor-only", action="store_true", help="only the 4 x 1024 MLP latency table")
    parser.add_argument("--defaults-only", action="store_true", help="no anchor, only the default QAT options")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = [
        "# QAT int8 benchmark",
        "",
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, onnxruntime {ort_version()}; "
        f"{os.cpu_count()} CPU cores shared with other jobs: noisy timings; ratios from one process.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out += [] if args.defaults_only else anchor_mlp(args.repeats, tmp)
        cnn_options = ({}, {"weight_bits": 7}, {"fold_bn": False})
        for kwargs in [] if args.anchor_only else cnn_options[: 1 if args.defaults_only else None]:
            out += run("Digits CNN", DigitsCNN, args.epochs, kwargs, 256, args.repeats, tmp, args.seeds)
        for kwargs in [] if args.anchor_only else ({}, {"weight_bits": 7})[: 1 if args.defaults_only else None]:
            title = "Linear-heavy MLP (64-1024x4-10)"
            out += run(title, DigitsMLP, args.epochs, kwargs, 64, args.repeats, tmp, args.seeds)
    print("\n".join(out))


if __name__ == "__main__":
    main()
