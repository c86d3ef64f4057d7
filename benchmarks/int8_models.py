"""int8 latency, size and error of five model shapes: our export vs onnxruntime's quantizers vs fp32.

Models (random init, PTQ-calibrated with ``calibrate_`` on 4 batches of the input distribution; QAT
accuracy is measured in ``qat_int8.py``/``qat.md``; here the point is which kernels run and how fast):

- ``digits_cnn``: ``lightning_compress.demo.DigitsCNN`` (conv-BN-ReLU x2, max-pool, Linear), 1x8x8.
- ``resnet``: the test zoo's ResNet of BasicBlocks [2, 1, 1] at widths 8-16-32, 3x64x64.
- ``mobilenet_v3``: the test zoo's MobileNetV3-style net (depthwise, squeeze-excite, Hardswish), 3x64x64.
- ``resnet18_width``: the zoo ResNet class with ResNet-18's blocks [2, 2, 2, 2] and widths 64-512, 3x64x64.
- ``bert_encoder``: Hugging Face ``BertModel`` (4 layers, hidden 256, 4 heads, FFN 1024), 64 tokens,
  classifier on the pooled output.
- ``mlp_4x1024``: 4 x Linear(1024, 1024) with ReLU.

For each: onnxruntime (``--threads`` intra-op threads) on the fp32 export, our ``export_onnx``,
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, calibrated on the same batches)
and ``quantize_dynamic`` (int8 weights); PyTorch eager fp32 vs ``convert_to_int8``. Second table, PyTorch
only: fp32 eager, fp32 ``torch.compile`` (Inductor, ``freezing``), ``convert_to_int8`` eager and
``compile_int8`` (oneDNN int8 kernels with the QAT scales), with the count of int8 kernels in Inductor's
generated code. Latency: median of interleaved rounds at batch 1 and 32. Error: max |output - fp32
PyTorch output| / max |fp32 output|.

    PYTHONPATH=$PWD python benchmarks/int8_models.py [--repeats 60] [--threads 2] [--models resnet ...] [--torch-only]

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a shared, oversubscribed machine
the spinning threads of one candidate (eager ATen, Inductor's C++ kernels) steal the cores of the next.
Measured here at load average 10 on 2 cores: the MLP's ``compile_int8`` took 104 ms a call interleaved
with eager fp32 under the default policy, 0.47 ms with passive waiting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see the docstring)

import argparse
import copy
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress import convert_to_int8, export_onnx
from lightning_compress.demo import DigitsCNN
from lightning_compress.export.cpu import cpu_int8_features
from lightning_compress.functional.int8 import int8_layers
from lightning_compress.functional.int8_compile import compile_int8, int8_kernel_calls
from lightning_compress.functional.qat import calibrate_, prepare_

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger


class BertClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=128, attn_implementation="eager",
        )  # fmt: skip
        self.bert = BertModel(config)
        self.head = nn.Linear(256, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=input_ids).pooler_output)


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]]:
    from tests.zoo.mobilenet import MobileNetV3
    from tests.zoo.resnet import BasicBlock, ResNet

    return {
        "digits_cnn": (DigitsCNN, lambda n: torch.randn(n, 1, 8, 8)),
        "resnet": (lambda: ResNet(BasicBlock, [2, 1, 1], [8, 16, 32]), lambda n: torch.randn(n, 3, 64, 64)),
        "mobilenet_v3": (MobileNetV3, lambda n: torch.randn(n, 3, 64, 64)),
        # ResNet-18's block layout and widths (the zoo ResNet above is toy-width): 3x64x64
        "resnet18_width": (
            lambda: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512]),
            lambda n: torch.randn(n, 3, 64, 64),
        ),
        "bert_encoder": (BertClassifier, lambda n: torch.randint(0, 1000, (n, 64))),
        "mlp_4x1024": (mlp, lambda n: torch.randn(n, 1024)),
    }


def session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spin-waiting between runs: idle onnxruntime threads would steal the cores from the next candidate.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.optimized_model_filepath = path + ".opt.onnx"
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def float_kernels(path: str) -> int:
    import onnx

    ops = Counter(n.op_type for n in onnx.load(path + ".opt.onnx").graph.node)
    return sum(ops[k] for k in ("Conv", "FusedConv", "Gemm", "FusedGemm"))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median ms of each function over interleaved rounds (load drifts hit all of them alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, repeats // rounds)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


class Reader:
    """CalibrationDataReader for onnxruntime's quantize_static."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.items = iter([{name: b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantized_pair(
    build: Callable[[], nn.Module], data: Callable[[int], torch.Tensor], with_batches: bool = False
) -> Any:
    """The fp32 model (seed 0) and its PTQ-calibrated copy (4 batches of 32), and the batches if asked."""
    torch.manual_seed(0)
    fp32 = build().eval()
    calibration = [data(32) for _ in range(4)]
    qat = copy.deepcopy(fp32)
    prepare_(qat, fold_bn=True)
    calibrate_(qat, calibration)
    return (fp32, qat, calibration) if with_batches else (fp32, qat)


def bench(
    name: str, build: Callable[[], nn.Module], data: Callable[[int], torch.Tensor], args: Any, tmp: str
) -> tuple[nn.Module, nn.Module]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, qat, calibration = quantized_pair(build, data, with_batches=True)
    int8 = convert_to_int8(qat)
    paths = {k: os.path.join(tmp, f"{name}_{k}.onnx") for k in ("fp32", "ours", "static", "dynamic")}
    torch.onnx.export(
        fp32, (data(1),), paths["fp32"], dynamo=False, opset_version=17, input_names=["input"],
        output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )  # fmt: skip
    export_onnx(qat, paths["ours"], data(1))
    # onnxruntime's recommended pre-processing (shape inference, graph optimization) before its quantizers.
    pre = os.path.join(tmp, f"{name}_pre.onnx")
    quant_pre_process(paths["fp32"], pre)
    quantize_static(
        pre, paths["static"], Reader("input", calibration), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip
    quantize_dynamic(pre, paths["dynamic"], weight_type=QuantType.QInt8)
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    torch.set_num_threads(args.threads)
    lines = []
    for batch in (1, 32):
        x = data(batch)
        feed = {"input": x.numpy()}
        with torch.no_grad():
            reference = fp32(x).numpy()
            fake = qat(x).numpy()
        scale = float(np.abs(reference).max())
        errors = {k: float(np.abs(s.run(None, feed)[0] - reference).max()) / scale for k, s in sessions.items()}
        errors["ours_vs_fake_quant"] = float(np.abs(sessions["ours"].run(None, feed)[0] - fake).max()) / scale
        fns: dict[str, Callable[[], Any]] = {k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}
        with torch.no_grad():
            fns["torch_fp32"] = lambda x=x: fp32(x)
            fns["torch_int8"] = lambda x=x: int8(x)
            ms = interleaved(fns, args.repeats)
        base, tbase = ms["fp32"], ms["torch_fp32"]
        lines.append(
            f"| {name} | {batch} | {ms['fp32']:.3f} | {ms['ours']:.3f} ({base / ms['ours']:.2f}x) | "
            f"{ms['static']:.3f} ({base / ms['static']:.2f}x) | {ms['dynamic']:.3f} ({base / ms['dynamic']:.2f}x) | "
            f"{ms['torch_fp32']:.3f} | {ms['torch_int8']:.3f} ({tbase / ms['torch_int8']:.2f}x) | "
            f"{errors['ours']:.4f} / {errors['ours_vs_fake_quant']:.4f} | {errors['static']:.4f} | "
            f"{errors['dynamic']:.4f} |"
        )
        print(lines[-1], flush=True)
    sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    kernels = {k: float_kernels(p) for k, p in paths.items() if k != "fp32"}
    lines.append(
        f"<!-- {name}: bytes fp32 {sizes['fp32']}, ours {sizes['ours']}, static {sizes['static']}, dynamic "
        f"{sizes['dynamic']}; fp32 Conv/Gemm kernels left: ours {kernels['ours']}, static {kernels['static']}, "
        f"dynamic {kernels['dynamic']} -->"
    )
    print(lines[-1], flush=True)
    return fp32, qat


def torch_rows(name: str, fp32: nn.Module, qat: nn.Module, data: Callable[[int], torch.Tensor], args: Any) -> list[str]:
    """fp32 eager / fp32 compiled / convert_to_int8 / compile_int8 in PyTorch, batch 1 and 32."""
    from torch._inductor.utils import run_and_get_code

    torch.set_num_threads(args.threads)
    int8 = convert_to_int8(qat)
    try:
        compiled, code = run_and_get_code(compile_int8, qat, data(32))
    except (ValueError, RuntimeError) as err:
        return [f"| {name} | — | compile_int8 refused: {str(err)[:200]} |"]
    fp32_compiled = torch.compile(fp32, dynamic=False)
    rows = []
    for batch in (1, 32):
        x = data(batch)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            reference, fake = fp32(x), qat(x)
            scale = float(reference.abs().max())
            err = float((compiled(x) - fake).abs().max()) / scale
            err_fp32 = float((compiled(x) - reference).abs().max()) / scale
            fns = {
                "fp32": lambda x=x: fp32(x),
                "fp32_compiled": lambda x=x: fp32_compiled(x),
                "int8": lambda x=x: int8(x),
                "compiled": lambda x=x: compiled(x),
            }
            ms = interleaved(fns, args.repeats)
        base = ms["fp32"]
        rows.append(
            f"| {name} | {batch} | {base:.3f} | {ms['fp32_compiled']:.3f} ({base / ms['fp32_compiled']:.2f}x) | "
            f"{ms['int8']:.3f} ({base / ms['int8']:.2f}x) | **{ms['compiled']:.3f} ({base / ms['compiled']:.2f}x)** | "
            f"{int8_kernel_calls(code)} / {len(int8_layers(int8))} | {err_fp32:.4f} / {err:.4f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--torch-only", action="store_true", help="only the PyTorch table")
    args = parser.parse_args()
    import onnxruntime

    features = cpu_int8_features()
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"onnxruntime {onnxruntime.__version__}, "
        f"{platform.machine()} flags {list(features.flags)} -> target {features.target}; {args.threads} threads"
    )
    if not args.torch_only:
        print(
            "| model | batch | fp32 ONNX ms | ours ms (x fp32) | quantize_static ms | quantize_dynamic ms | "
            "torch fp32 ms | torch int8 ms | err ours vs fp32 / vs fake-quant | err static | err dynamic |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    selected = {k: v for k, v in models().items() if not args.models or k in args.models}
    prepared = {}
    if not args.torch_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (build, data) in selected.items():
                prepared[name] = bench(name, build, data, args, tmp)
    print(
        "\n| model | batch | torch fp32 eager ms | fp32 `torch.compile` ms (x eager) | `convert_to_int8` ms | "
        "`compile_int8` ms | int8 kernels / int8 layers | err vs fp32 / vs fake-quant |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (build, data) in selected.items():
        fp32, qat = prepared[name] if name in prepared else quantized_pair(build, data)
        torch_rows(name, fp32, qat, data, args)


if __name__ == "__main__":
    main()
