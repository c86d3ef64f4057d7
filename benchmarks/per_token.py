"""Per-token (dynamic) int8 inputs vs per-tensor inputs vs 4-bit weights, exported to onnxruntime.

The transformer-style workload of torchao's int8-dynamic-activation schemes: a stack of 4 Linear(1024)
layers with GELU, input ``[batch, tokens, 1024]``. Every variant is prepared with
:func:`~lightning_compress.functional.qat.prepare_`, observed on the same batches, converted and
exported with :func:`~lightning_compress.export_onnx`; onnxruntime's own ``quantize_dynamic`` (per
tensor, dynamic) on the fp32 export is the anchor. Latency is the median of interleaved repeats in one
process. Errors on held-out inputs with outlier tokens (1 token in 16 is 20x larger, as in transformer
activations): "token error" is the mean over tokens of ||int8 - fp32|| / ||fp32|| (per-token inputs keep
the ordinary tokens precise), "max error" is max |int8 - fp32| / max |fp32|.

``--model byte_lm`` runs the same variants on the byte-level transformer LM of ``byte_lm.py`` (random
init, d=128, 4 blocks, Linear layers only; its inputs are byte ids, so there are no outlier tokens by
construction), where per-layer graph overhead weighs more than on 1024-wide layers.

Usage::

    PYTHONPATH=. python benchmarks/per_token.py --threads 2 --tokens 32
    PYTHONPATH=. python benchmarks/per_token.py --model byte_lm --threads 1 --batch 8 --tokens 127
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from benchmarks.int8_models import interleaved, session
from lightning_compress import convert_to_int8, export_onnx
from lightning_compress.export.cpu import cpu_int8_features
from lightning_compress.functional.qat import prepare_


def stack() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def tokens(batch: int, n: int, seed: int) -> torch.Tensor:
    """Normal inputs with 1 token in 16 scaled by 20 (outlier tokens, as transformer activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 1024, generator=g)
    x[:, ::16] *= 20
    return x


VARIANTS: dict[str, dict[str, Any]] = {
    "int8 weights, per-tensor inputs": dict(weight_bits=8),
    "int8 weights, per-token inputs": dict(weight_bits=8, activation_granularity="token"),
    "4-bit g32 weights only": dict(weight_bits=4, activation_bits=None, group_size=32),
    "4-bit g32 weights, per-token inputs": dict(weight_bits=4, group_size=32, activation_granularity="token"),
}


def byte_lm() -> nn.Module:
    from benchmarks.byte_lm import ByteLM

    torch.manual_seed(0)
    return ByteLM().eval()


def byte_ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int, int], torch.Tensor], str]] = {
    "mlp": (stack, tokens, "4 x Linear(1024) + GELU, input [batch, tokens, 1024] with outlier tokens"),
    "byte_lm": (byte_lm, byte_ids, "byte-level LM (d=128, 4 blocks), input [batch, tokens] byte ids"),
}


def export_variant(
    build: Callable[[], nn.Module], kwargs: dict[str, Any], calibration: list[torch.Tensor], path: str
) -> None:
    model = build()
    prepare_(model, **kwargs)
    model.train()
    with torch.no_grad():
        for x in calibration:
            model(x)
    export_onnx(convert_to_int8(model.eval()), path, calibration[0][:1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    build, data, title = MODELS[args.model]
    calibration = [data(4, args.tokens, seed) for seed in range(4)]
    x = data(args.batch, args.tokens, 100)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": os.path.join(tmp, "fp32.onnx")}
        torch.onnx.export(build().eval(), (x,), paths["fp32"], dynamo=False, input_names=["input"], opset_version=17)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        paths["onnxruntime quantize_dynamic (anchor)"] = os.path.join(tmp, "dyn.onnx")
        quantize_dynamic(paths["fp32"], paths["onnxruntime quantize_dynamic (anchor)"], weight_type=QuantType.QInt8)
        for i, (name, kwargs) in enumerate(VARIANTS.items()):
            paths[name] = os.path.join(tmp, f"v{i}.onnx")
            export_variant(build, kwargs, calibration, paths[name])
        sessions = {k: session(p, args.threads) for k, p in paths.items()}
        feed = {"input": x.numpy()}
        reference = sessions["fp32"].run(None, feed)[0]
        runs: dict[str, Callable[[], Any]] = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
        ms = interleaved(runs, args.repeats)
        print(f"CPU: {platform.processor() or platform.machine()}; int8 features: {cpu_int8_features()}")
        print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {args.threads}")
        print(f"{title}: batch {args.batch}, {args.tokens} tokens\n")
        print("| variant | bytes | vs fp32 size | ms | speed vs fp32 | token error | max error |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        fp32_bytes = os.path.getsize(paths["fp32"])
        for name, path in paths.items():
            out = sessions[name].run(None, feed)[0]
            err = float(np.abs(out - reference).max() / np.abs(reference).max())
            token_err = float((np.linalg.norm(out - reference, axis=-1) / np.linalg.norm(reference, axis=-1)).mean())
            size = os.path.getsize(path)
            print(
                f"| {name} | {size} | {fp32_bytes / size:.2f}x | {ms[name]:.3f} | {ms['fp32'] / ms[name]:.2f}x "
                f"| {token_err:.4f} | {err:.4f} |"
            )


if __name__ == "__main__":
    main()
