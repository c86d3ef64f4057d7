"""A byte-level transformer LM on the Python sources of an installed package: pruning and 4-bit weights.

Bits per byte on held-out source files (files never trained on) for:

- dense (after training, and after the same number of extra fine-tuning steps the compressed rows get);
- 50% unstructured and 2:4 pruning of every Linear in the transformer blocks (per-layer sparsity), with
  magnitude, Wanda (``|W| · ||X||`` from calibration batches) and SparseGPT-style reconstruction, each
  (a) one-shot on the trained model, no training after, and (b) with ``GradualPruning`` during a short
  fine-tuning: magnitude and Wanda on the cubic schedule, SparseGPT one-shot at step 0 from the next
  calibration batches, masks then fixed while fine-tuning goes on;
- 4-bit group-wise weights (every Linear, group 32; embeddings 8-bit per row): PTQ (calibration only) vs
  QAT vs QAT + self-distillation (QAD) during the same fine-tuning;
- exported ONNX sizes (fp32, our int8 weight-only export, onnxruntime ``quantize_dynamic``, 4-bit
  ``MatMulNBits``) and their onnxruntime CPU latency (interleaved medians).

Run: ``OMP_NUM_THREADS=1 python benchmarks/byte_lm.py`` (``--help`` for sizes; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress import GradualPruning, KnowledgeDistillation, QuantizationAwareTraining
from lightning_compress import export_onnx as lc_export_onnx
from lightning_compress.functional import pruning as P
from lightning_compress.functional.activation_stats import InputNorms
from lightning_compress.functional.int8 import convert_to_int8
from lightning_compress.functional.latency import compare_ms, onnx_runner
from lightning_compress.functional.qat import calibrate_, prepare_
from lightning_compress.functional.sparsegpt import sparsegpt_prune_
from lightning_compress.targets import select_parameters

BLOCK_LINEARS = ["re:blocks\\.\\d+\\.(qkv|proj|fc1|fc2)"]


# ---------------------------------------------------------------- data
def source_files(package: str = "torch", max_files: int = 400) -> list[Path]:
    """Python files of an installed package, in a fixed order (the same list on every machine with it)."""
    module = __import__(package)
    root = Path(module.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if p.stat().st_size > 2000)
    random.Random(0).shuffle(files)
    return files[:max_files]


def split_bytes(files: list[Path], held_out_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated bytes of the training files and of the held-out files (every ``held_out_every``-th)."""
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        (held if i % held_out_every == 0 else train).extend(path.read_bytes() + b"\n")
    return torch.tensor(list(train), dtype=torch.long), torch.tensor(list(held), dtype=torch.long)


def windows(data: torch.Tensor, context: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random ``[batch, context + 1]`` windows of ``data`` (input = ``[:, :-1]``, target = ``[:, 1:]``)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + context + 1] for s in starts.tolist()])


class WindowData(torch.utils.data.IterableDataset):
    """``steps * batch`` training windows, as batches (an iterable dataset: no epoch over the whole text)."""

    def __init__(self, data: torch.Tensor, context: int, batch: int, steps: int, seed: int) -> None:
        self.data, self.context, self.batch, self.steps, self.seed = data, context, batch, steps, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        it = windows(self.data, self.context, self.batch, self.seed)
        return (next(it) for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


# ---------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block; attention written with Linear layers so every weight's input is observable."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(pl.LightningModule):
    """A small byte-level transformer LM (vocabulary 256)."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, context: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(self.positions[: ids.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(100, total // 10 + 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


def fit(model: ByteLM, data: torch.Tensor, args: argparse.Namespace, steps: int, seed: int, callbacks: list) -> None:
    """``steps`` optimizer steps on random training windows."""
    loader = torch.utils.data.DataLoader(WindowData(data, args.context, args.batch, steps, seed), batch_size=None)
    # Lightning keeps the modes of a model handed to fit (a copy of an evaluated model is in eval mode):
    # train as a user would, with dropout and friends in training mode.
    model.train()
    with tempfile.TemporaryDirectory() as root:  # the callbacks' reports go there, not into the working directory
        _fit(model, loader, steps, callbacks, root)


def _fit(model: ByteLM, loader: Any, steps: int, callbacks: list, root: str) -> None:
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)


@torch.no_grad()
def bits_per_byte(model: nn.Module, held: torch.Tensor, context: int, max_windows: int) -> float:
    """Mean cross-entropy in bits over every position of non-overlapping held-out windows."""
    model.eval()
    n = min(max_windows, (len(held) - 1) // context)
    x = held[: n * context + 1]
    inputs, targets = x[:-1].view(n, context), x[1:].view(n, context)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(inputs[i : i + 32])
        total += float(F.cross_entropy(logits.reshape(-1, 256), targets[i : i + 32].reshape(-1), reduction="sum"))
    return total / (n * context) / math.log(2)


# ---------------------------------------------------------------- pruning
def block_linears(model: nn.Module) -> list[Any]:
    return select_parameters(model, include=BLOCK_LINEARS, types=["Linear"])


def sparsity_of(model: nn.Module) -> float:
    params = [t.parameter for t in block_linears(model)]
    return 1.0 - sum(int(p.count_nonzero()) for p in params) / sum(p.numel() for p in params)


@torch.no_grad()
def one_shot(model: ByteLM, criterion: str, structure: str, calibration: list[torch.Tensor]) -> ByteLM:
    """A pruned copy: 50% of every block Linear (or 2:4), no training after."""
    pruned = copy.deepcopy(model)
    if criterion == "sparsegpt":
        sparsegpt_prune_(pruned, calibration, 0.5, structure=structure, include=BLOCK_LINEARS, types=["Linear"])
        return pruned
    targets = block_linears(pruned)
    norms: dict[str, torch.Tensor] = {}
    if criterion == "wanda":
        stats = InputNorms({t.name: t.module for t in targets})
        pruned.train()  # the statistics are recorded on training-mode forwards (no dropout in this model)
        for ids in calibration:
            pruned(ids)
        norms = stats.norms()
        stats.remove()
    scores = {t.name: P.element_scores(t.parameter, criterion, input_norms=norms.get(t.name)) for t in targets}
    masks = P.layer_masks(scores, {}, dict.fromkeys(scores, 0.5), P.parse_structure(structure))
    for t in targets:
        t.parameter.mul_(masks[t.name])
    return pruned


def gradual(criterion: str, structure: str, steps: int, calibration_batches: int) -> GradualPruning:
    """``GradualPruning`` over a fine-tuning of ``steps`` steps (SparseGPT: one-shot at step 0, then fixed)."""
    common = {
        "structure": structure,
        "criterion": criterion,
        "scope": "layer",
        "include": BLOCK_LINEARS,
        "types": ["Linear"],
        "target_sparsity": 0.5,
    }
    if criterion == "sparsegpt":
        return GradualPruning(schedule="one_shot", start_step=0, calibration_batches=calibration_batches, **common)
    return GradualPruning(end_step=max(1, int(0.6 * steps)), update_every_n_steps=max(1, steps // 20), **common)


# ---------------------------------------------------------------- quantization
def quantized_names(model: nn.Module) -> dict[str, int]:
    """Every Linear at the 4-bit setting, the two embeddings at 8 bits (one scale per row)."""
    return {
        n: (8 if isinstance(m, nn.Embedding) else 4)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding)
    }


def ptq(model: ByteLM, bits: dict[str, int], group_size: int | None, calibration: list[torch.Tensor]) -> ByteLM:
    """Post-training quantization: the same module swap as QAT, calibrated, no training."""
    out = copy.deepcopy(model)
    prepare_(out, weight_bits=bits, activation_bits=None, modules=list(bits), group_size=group_size)
    calibrate_(out, calibration)
    return out


def qat(group_size: int, distill: bool, alpha: float, temperature: float) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        QuantizationAwareTraining(
            weight_bits=4,
            activation_bits=None,
            group_size=group_size,
            types=["Linear", "Embedding"],
            overrides={"tok": 8, "pos": 8},
        )
    ]
    if distill:
        callbacks.append(KnowledgeDistillation(teacher="self", alpha=alpha, temperature=temperature))
    return callbacks


# ---------------------------------------------------------------- export
def export_all(models: dict[str, nn.Module], sample: torch.Tensor, folder: str) -> dict[str, str]:
    """ONNX files: ``fp32`` (torch exporter), ``int8``/``4bit`` (:func:`export_onnx`), ``dynamic`` (onnxruntime)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {k: os.path.join(folder, f"{k}.onnx") for k in ("fp32", "int8", "dynamic", "4bit")}
    fp32 = models["fp32"].eval()
    torch.onnx.export(
        fp32,
        (sample,),
        paths["fp32"],
        input_names=["input"],
        output_names=["output"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    quantize_dynamic(paths["fp32"], paths["dynamic"], weight_type=QuantType.QInt8)
    lc_export_onnx(convert_to_int8(models["int8"]), paths["int8"], sample)
    lc_export_onnx(convert_to_int8(models["4bit"]), paths["4bit"], sample)
    return paths


def onnx_check(path: str, model: nn.Module, sample: torch.Tensor) -> float:
    """Largest |difference| between onnxruntime's logits and the PyTorch model's on ``sample``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: sample.numpy()})[0])
    with torch.no_grad():
        return float((got - model.eval()(sample)).abs().max())


# ---------------------------------------------------------------- the benchmark
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", default="torch", help="installed package whose .py files are the text")
    p.add_argument("--files", type=int, default=400, help="source files used (every 10th held out)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-steps", type=int, default=800)
    p.add_argument("--finetune-steps", type=int, default=120)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--calibration", type=int, default=8, help="calibration batches (of --batch windows)")
    p.add_argument("--eval-windows", type=int, default=400)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--latency-repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-pruning", action="store_true", help="only the dense and quantization rows")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.d, args.layers, args.heads, args.context, args.batch = 12, 32, 2, 2, 32, 4
        args.train_steps, args.finetune_steps, args.calibration, args.eval_windows = 4, 4, 2, 8
        args.latency_repeats = 2
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row of the benchmark; returns ``{"bpb": {row: bits per byte}, ...}``."""
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    train, held = split_bytes(source_files(args.package, args.files))
    calib_it = windows(train, args.context, args.batch, seed=10_000)
    calibration = [next(calib_it)[:, :-1] for _ in range(args.calibration)]
    bpb: dict[str, float] = {}
    times: dict[str, float] = {}
    sparsity: dict[str, float] = {}

    def record(key: str, make: Callable[[], ByteLM], pruned: bool = False) -> ByteLM:
        start = time.perf_counter()
        model = make()
        times[key] = time.perf_counter() - start
        bpb[key] = bits_per_byte(model, held, args.context, args.eval_windows)
        if pruned:
            sparsity[key] = sparsity_of(model)
        print(f"[byte_lm] {key}: {bpb[key]:.4f} bits/byte, {times[key]:.1f} s", file=sys.stderr, flush=True)
        return model

    def train_dense() -> ByteLM:
        model = ByteLM(args.d, args.layers, args.heads, args.context, lr=args.lr)
        fit(model, train, args, args.train_steps, args.seed, [])
        return model

    dense = record("dense", train_dense)

    def finetune(callbacks: list) -> ByteLM:
        model = copy.deepcopy(dense)
        model.lr = args.finetune_lr
        fit(model, train, args, args.finetune_steps, args.seed + 1, callbacks)
        return model

    record("dense, fine-tuned", lambda: finetune([]))
    for structure in () if args.skip_pruning else ("unstructured", "2:4"):
        for criterion in ("magnitude", "wanda", "sparsegpt"):
            key = f"{structure} {criterion}"
            record(f"{key} one-shot", lambda c=criterion, s=structure: one_shot(dense, c, s, calibration), True)
            cb = gradual(criterion, structure, args.finetune_steps, args.calibration)
            record(f"{key} fine-tuned", lambda cb=cb: finetune([cb]), True)
    bits = quantized_names(dense)
    ptq4 = record("4-bit PTQ", lambda: ptq(dense, bits, args.group_size, calibration))
    record("4-bit QAT", lambda: finetune(qat(args.group_size, False, args.kd_alpha, args.kd_temperature)))
    qad4 = record("4-bit QAT + KD", lambda: finetune(qat(args.group_size, True, args.kd_alpha, args.kd_temperature)))
    int8 = record("int8 PTQ (weights)", lambda: ptq(dense, dict.fromkeys(bits, 8), None, calibration))
    return {
        "bpb": bpb,
        "sparsity": sparsity,
        "times": times,
        "models": {"fp32": dense, "int8": int8, "4bit": qad4, "4bit_ptq": ptq4},
    }


def export_and_time(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    """File sizes, onnxruntime agreement with PyTorch, and interleaved onnxruntime latency."""
    sample = torch.randint(0, 256, (1, args.context), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        paths = export_all(models, sample, folder)
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        diffs = {
            k: onnx_check(paths[k], convert_to_int8(models[k]) if k != "fp32" else models[k], sample)
            for k in ("fp32", "int8", "4bit")
        }
        runners = {k: onnx_runner(p, sample, batch=1, threads=args.threads) for k, p in paths.items()}
        ms = compare_ms(runners, threads=args.threads, repeats=args.latency_repeats, rounds=5)
    return {"sizes": sizes, "diffs": diffs, "ms": ms}


def report(args: argparse.Namespace, result: dict[str, Any], onnx: dict[str, Any]) -> str:
    import onnxruntime

    bpb, sparsity, times = result["bpb"], result["sparsity"], result["times"]
    lines = [
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.machine()}, "
        f"{args.threads} threads; model d={args.d}, {args.layers} layers, {args.heads} heads, context "
        f"{args.context}; {args.train_steps} training steps of {args.batch} windows, fine-tuning "
        f"{args.finetune_steps} steps at lr {args.finetune_lr}; calibration {args.calibration} batches.",
        "",
        "| row | bits/byte (held out) | sparsity of block Linears | wall s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, value in bpb.items():
        s = f"{sparsity[key]:.3f}" if key in sparsity else ""
        t = f"{times[key]:.1f}" if key in times else ""
        lines.append(f"| {key} | {value:.4f} | {s} | {t} |")
    gap = bpb["4-bit PTQ"] - bpb["dense"]
    trained = ("4-bit QAT", "4-bit QAT + KD")
    # Against the dense model before fine-tuning (the fine-tuning steps alone also lower bits/byte) and against
    # the dense model fine-tuned for the same steps (the fair reference): the share of the PTQ gap closed.
    literal = {k: (bpb["4-bit PTQ"] - bpb[k]) / gap if gap > 0 else float("nan") for k in trained}
    fair = {k: 1 - (bpb[k] - bpb["dense, fine-tuned"]) / gap if gap > 0 else float("nan") for k in trained}
    lines += [
        "",
        f"4-bit gap PTQ - fp32: {gap:+.4f} bits/byte; share closed vs the dense model: QAT {literal[trained[0]]:.0%}, "
        f"QAT + KD {literal[trained[1]]:.0%}; vs the dense model fine-tuned as long: QAT {fair[trained[0]]:.0%}, "
        f"QAT + KD {fair[trained[1]]:.0%}",
        "",
    ]
    sizes, ms = onnx["sizes"], onnx["ms"]
    lines += [
        "| ONNX file | bytes | vs fp32 | onnxruntime ms (1 x context) | speed vs fp32 | max abs diff to torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in ("fp32", "int8", "dynamic", "4bit"):
        diff = f"{onnx['diffs'][k]:.2e}" if k in onnx["diffs"] else ""
        lines.append(
            f"| {k} | {sizes[k]} | {sizes['fp32'] / sizes[k]:.2f}x smaller | {ms[k]:.3f} | "
            f"{ms['fp32'] / ms[k]:.2f}x | {diff} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    result = run(args)
    text = report(args, result, export_and_time(result["models"], args))
    print(text)
    return text


if __name__ == "__main__":
    main()
