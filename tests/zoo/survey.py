"""Survey: every compression callback, alone and combined, on every zoo model; what works and what breaks.

Not a test (pytest collects only ``test_*.py``): a diagnostic that never fails, it records per model x
technique whether the run works, is refused before step 1, crashes, or finishes but is silently wrong,
and checks the callbacks' own numbers (``compress/...`` metrics, ``compression_report.json``) against
independent measurements of the final model.

Run from the repository root::

    PYTHONPATH=$PWD python tests/zoo/survey.py                       # everything (~2-3 min, 1 thread)
    PYTHONPATH=$PWD python tests/zoo/survey.py --models hf_gpt2 --techniques prune qat
    PYTHONPATH=$PWD python tests/zoo/survey.py --json survey.json    # also write the raw results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    TensorDecomposition,
    convert_to_int8,
    export_onnx,
)
from lightning_compress.functional.quantization import Int8Layer, qat_modules
from tests.zoo import ZOO, ZooCase, evaluate

# ---------------------------------------------------------------------------------------------- techniques


def prune(case: ZooCase, name: str | None = None, **kw: Any) -> GradualPruning:
    """50% unstructured magnitude pruning reached at 60% of the run, masks updated every 2 steps."""
    args: dict[str, Any] = dict(target_sparsity=0.5, end_step=max(2, int(case.max_steps * 0.6)), update_every_n_steps=2)
    args.update(kw)
    return GradualPruning(name=name, **args)


def qat(case: ZooCase, name: str | None = None) -> QuantizationAwareTraining:
    """8-bit weights and activations from step 0 (the defaults)."""
    return QuantizationAwareTraining(name=name)


_TEACHERS: dict[str, nn.Module] = {}


def trained_teacher(case: ZooCase) -> nn.Module:
    """The same architecture after a plain fit of ``case.max_steps`` steps (cached per model).

    ``teacher="self"`` would copy the *untrained* student at fit start and pull it towards noise.
    """
    if case.name not in _TEACHERS:
        torch.manual_seed(1)
        teacher_case = ZOO[case.name]()
        quiet_trainer(os.path.join(tempfile.gettempdir(), "zoo-teacher"), [], case.max_steps).fit(
            teacher_case.module, teacher_case.train_loader
        )
        _TEACHERS[case.name] = teacher_case.module.eval()
    return _TEACHERS[case.name]


def kd(case: ZooCase, name: str | None = None) -> KnowledgeDistillation:
    """Distillation (alpha 0.5, T 4) from a trained teacher of the same architecture."""
    return KnowledgeDistillation(teacher=trained_teacher(case), alpha=0.5, name=name)


def decompose(case: ZooCase, name: str | None = None) -> TensorDecomposition:
    """Default rank (0.25) at fit end; no latency measurement, so tiny layers are not skipped as slower."""
    return TensorDecomposition(measure_latency=False, name=name)


ALL_FOUR = [("prune", prune), ("qat", qat), ("kd", kd), ("decompose", decompose)]


def has(case: ZooCase, type_name: str) -> bool:
    return any(type(m).__name__ == type_name for m in case.module.modules())


# The variants after "all4_reversed" look past a first refusal: they run only where it applies
# (None = not applicable) and use the configuration a refusal's HINT or the README suggests.
TECHNIQUES: dict[str, Callable[[ZooCase], list[pl.Callback] | None]] = {
    "none": lambda case: [],
    "prune": lambda case: [prune(case)],
    "prune_channels": lambda case: [prune(case, structure="channels")],
    "qat": lambda case: [qat(case)],
    "kd": lambda case: [kd(case)],
    "decompose": lambda case: [decompose(case)],
    # names keep the metric keys apart (QAT and decomposition both log compress/ratio)
    "all4": lambda case: [make(case, name) for name, make in ALL_FOUR],
    "all4_reversed": lambda case: [make(case, name) for name, make in reversed(ALL_FOUR)],
    # nn.MultiheadAttention: QAT's HINT says exclude out_proj; then int8 conversion and the eval fast path
    "qat_excl_out_proj": lambda case: (
        [QuantizationAwareTraining(exclude=["*out_proj"])] if has(case, "MultiheadAttention") else None
    ),
    "decompose_excl_out_proj": lambda case: (
        [TensorDecomposition(measure_latency=False, exclude=["*out_proj"])] if has(case, "MultiheadAttention") else None
    ),
    # Hugging Face Conv1D (GPT-2): asked for by type name
    "prune_conv1d": lambda case: [prune(case, types=["Conv1D"])] if has(case, "Conv1D") else None,
    "prune_conv1d_channels": lambda case: (
        [prune(case, types=["Conv1D"], structure="channels")] if has(case, "Conv1D") else None
    ),
    "qat_conv1d": lambda case: [QuantizationAwareTraining(types=["Linear", "Conv1D"])] if has(case, "Conv1D") else None,
    "decompose_conv1d": lambda case: (
        [TensorDecomposition(measure_latency=False, types=["Linear", "Conv1D"])] if has(case, "Conv1D") else None
    ),
}


# ---------------------------------------------------------------------------------------------- measurements


def call(model: nn.Module, example: Any) -> torch.Tensor:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def unique_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters once each (``named_parameters`` already skips the second name of a tied weight)."""
    return list(model.named_parameters())


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    total = sum(t.numel() for t in tensors)
    return 0.0 if total == 0 else sum(int((t == 0).sum()) for t in tensors) / total


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Matrix/conv weights (dim >= 2, not embeddings / positions), each tensor once."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            seen.add(id(module.weight))
    for _, p in unique_params(model):
        if p.dim() >= 2 and id(p) not in seen and p.shape[0] > 1:
            seen.add(id(p))
            out.append(p.detach())
    return out


def where(err: BaseException) -> str:
    """Innermost frame inside lightning_compress (else the innermost frame), as ``file:line func``."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "lightning_compress" in f.filename]
    f = (ours or frames)[-1]
    return f"{f.filename.split('site-packages/')[-1].split('/wt/zoo/')[-1]}:{f.lineno} {f.name}"


def short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gpt2_tie(model: nn.Module) -> dict[str, Any] | None:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "transformer") or not hasattr(inner.transformer, "wte"):
        return None
    head = inner.lm_head
    wte = inner.transformer.wte.weight
    head_weight = getattr(head, "weight", None)
    return {
        "tied": head_weight is wte,
        "lm_head_type": type(head).__name__,
        "lm_head_params": sum(p.numel() for p in head.parameters()),
        "wte_zero_fraction": round(zero_fraction([wte.detach()]), 4),
    }


def quiet_trainer(out_dir: str, callbacks: list[pl.Callback], max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=out_dir,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def layer_kinds(model: nn.Module) -> dict[str, list[str]]:
    """Names of the weight layers by kind, to see what a technique did and did not select."""
    kinds: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(m, nn.Embedding):
            kinds.setdefault(type(m).__name__, []).append(name)
    return kinds


def zeroed_channels_with_live_bn(model: nn.Module) -> list[str]:
    """Convs with an all-zero output channel whose following BatchNorm still adds a nonzero shift there.

    Pairs are found the torchvision way: ``convN``/``bnN`` attributes, or neighbours in an ``nn.Sequential``.
    Such a channel is not removable: the block's output changes if it is cut out.
    """
    found = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        if isinstance(parent, nn.Sequential):
            keys = list(children)
            pairs += list(zip(keys, keys[1:], strict=False))
        for c, b in pairs:
            conv, bn = children.get(c), children.get(b)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                dead = conv.weight.detach().flatten(1).abs().sum(1) == 0
                shift = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                live = int((dead & (shift.abs() > 1e-6)).sum())
                if live:
                    found.append(f"{parent_name}.{c}:{live}/{int(dead.sum())}")
    return found


def run_case(model_name: str, technique: str, root: str) -> dict[str, Any]:
    """Fit one zoo model with one technique and check everything checkable afterwards."""
    torch.manual_seed(0)
    case = ZOO[model_name]()
    model = case.module
    result: dict[str, Any] = {"model": model_name, "technique": technique, "status": "works", "problems": []}
    params_before = sum(p.numel() for _, p in unique_params(model))
    try:
        made = TECHNIQUES[technique](case)
    except Exception as err:  # constructor refusal
        result.update(status="refused", step=0, detail=short(err), where=where(err))
        return result
    if made is None:
        result["status"] = "n/a"
        return result
    callbacks = made
    out_dir = os.path.join(root, f"{model_name}-{technique}")
    trainer = quiet_trainer(out_dir, callbacks, case.max_steps)
    t0 = time.perf_counter()
    try:
        trainer.fit(model, case.train_loader)
    except Exception as err:
        status = "refused" if trainer.global_step == 0 else "crash"
        result.update(status=status, step=trainer.global_step, detail=short(err), where=where(err))
        return result
    result["fit_s"] = round(time.perf_counter() - t0, 2)

    # 1. the final model runs in eval mode on the example input
    model.eval()
    try:
        with torch.no_grad():
            reference = call(model, case.example_input)
        if not torch.isfinite(reference).all():
            result["problems"].append("eval output not finite")
    except Exception as err:
        result.update(status="crash", detail=f"eval forward after fit: {short(err)}", where=where(err))
        return result
    result["val"] = {k: round(v, 4) for k, v in evaluate(model, case.val_loader).items()}

    # 2. independent measurements vs. what the callbacks and the report say
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compress/")}
    params_after = sum(p.numel() for _, p in unique_params(model))
    weights = weight_tensors(model)
    result["measured"] = {
        "params_before": params_before,
        "params_after": params_after,
        "weight_zero_fraction": round(zero_fraction(weights), 4),
        "qat_layers": sum(1 for _ in qat_modules(model)),
    }
    tie = gpt2_tie(model)
    if tie is not None:
        result["measured"]["gpt2_tie"] = tie
        if not tie["tied"]:
            result["problems"].append(
                f"lm_head no longer tied to wte ({tie['lm_head_type']}, {tie['lm_head_params']} params)"
            )
        if tie["wte_zero_fraction"] > 0:
            result["problems"].append(
                f"token embedding wte has {tie['wte_zero_fraction']:.1%} zeros (pruned through the tie)"
            )
    result["metrics"] = {k: round(v, 4) for k, v in metrics.items()}

    for cb in callbacks:
        if isinstance(cb, GradualPruning):
            targets = {id(t.parameter): t for t in cb._targets}.values()
            tensors = [t.parameter.detach() for t in targets]
            ours = zero_fraction(tensors) if tensors else float("nan")
            key = "compress/sparsity" if cb.name is None else f"compress/{cb.name}/sparsity"
            present = {id(p) for p in model.parameters()}
            gone = sum(1 for t in targets if id(t.parameter) not in present)
            if gone:
                result["problems"].append(
                    f"{gone}/{len(tensors)} pruned weights were replaced after pruning; final model's matrix "
                    f"weights hold {result['measured']['weight_zero_fraction']:.4f} zeros (pruning ended at {ours:.4f})"
                )
            result["measured"]["pruned_targets"] = len(tensors)
            if cb.structure.kind == "channels":
                rows, cols, depthwise = 0, 0, []
                for t in targets:
                    w = t.parameter.detach()
                    if w.dim() == 2:
                        rows += int((w.abs().sum(1) == 0).sum())  # whole dim-0 slices zero
                        cols += int((w.abs().sum(0) == 0).sum())  # whole dim-1 slices zero
                    if isinstance(t.module, nn.Conv2d) and t.module.groups > 1:
                        dead = int((w.flatten(1).abs().sum(1) == 0).sum())
                        depthwise.append(f"{t.module_name}:{dead}/{w.shape[0]}")
                result["measured"]["zero_dim0_slices"] = rows
                result["measured"]["zero_dim1_slices"] = cols
                if depthwise:
                    result["measured"]["depthwise_zeroed_channels"] = depthwise
                conv1d = [t for t in targets if type(t.module).__name__ == "Conv1D"]
                if conv1d:
                    w = conv1d[0].parameter.detach()
                    result["problems"].append(
                        f"Conv1D weight [in, out]: {int((w.abs().sum(1) == 0).sum())} zero rows (inputs) and "
                        f"{int((w.abs().sum(0) == 0).sum())} zero columns (outputs) in {conv1d[0].name}"
                    )
                live = zeroed_channels_with_live_bn(model)
                result["measured"]["zeroed_channels_with_live_bn"] = live
                if live:
                    result["problems"].append(f"zeroed channels whose BN still shifts them (not removable): {live[:4]}")
            result["measured"]["target_zero_fraction"] = round(ours, 4)
            theirs = metrics.get(key)
            if theirs is not None and abs(theirs - ours) > 0.01:
                result["problems"].append(f"{key}={theirs:.4f} but the pruned weights hold {ours:.4f} zeros now")
            emptied = [t.name for t in targets if t.parameter.numel() > 1 and not bool(t.parameter.detach().any())]
            if emptied:
                result["problems"].append(f"{len(emptied)} layer(s) entirely zero: {', '.join(emptied[:6])}")
            # channels: a whole output channel zeroed in a weight whose BN/bias still emits a constant
            result["measured"]["all_zero_layers"] = emptied
        if isinstance(cb, QuantizationAwareTraining | GradualPruning | TensorDecomposition):
            result["measured"]["layer_kinds"] = {k: len(v) for k, v in layer_kinds(model).items()}
        if isinstance(cb, QuantizationAwareTraining) and result["measured"]["qat_layers"] == 0:
            result["problems"].append(
                "QAT ran but the final model has no QAT layer (swapped back by a later transform)"
            )

    report_path = os.path.join(out_dir, "compression_report.json")
    if os.path.exists(report_path):
        with open(report_path) as fh:
            summary = json.load(fh)["summary"]
        all_params = [p.detach() for _, p in unique_params(model)]
        result["report"] = {k: summary.get(k) for k in ("params", "nonzero_params", "sparsity")}
        if summary.get("params") != params_after:
            result["problems"].append(
                f"report params={summary.get('params')} but the model has {params_after} distinct parameters"
            )
        ours = zero_fraction(all_params)
        if summary.get("sparsity") is not None and abs(summary["sparsity"] - ours) > 0.005:
            result["problems"].append(
                f"report sparsity={summary['sparsity']:.4f}, measured {ours:.4f} over distinct params"
            )
    elif callbacks:
        result["problems"].append("no compression_report.json written")

    # 3. int8: convert_to_int8 + run, export_onnx + onnxruntime, both compared to the fake-quant model
    if any(isinstance(cb, QuantizationAwareTraining) for cb in callbacks):
        result["int8"] = check_int8(model, case, reference, out_dir)
        if result["int8"].get("problem"):
            result["problems"].append(result["int8"]["problem"])
    if result["problems"] and result["status"] == "works":
        result["status"] = "silently wrong"
    return result


@contextlib.contextmanager
def silenced_fds() -> Iterator[None]:
    """Mute file descriptors 1 and 2: a failed TorchScript ONNX export prints its whole graph from C++."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)


def check_int8(model: nn.Module, case: ZooCase, reference: torch.Tensor, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        int8 = convert_to_int8(model)
        out["int8_layers"] = sum(1 for m in int8.modules() if isinstance(m, Int8Layer))
        state = int8.state_dict()
        fp32 = {k: v for k, v in state.items() if v.is_floating_point() and v.numel() > 256}
        out["largest_fp32_tensors"] = sorted(fp32, key=lambda k: -fp32[k].numel())[:3]
        out["embedding_params_fp32"] = sum(m.weight.numel() for m in int8.modules() if isinstance(m, nn.Embedding))
        with torch.no_grad():
            y = call(int8, case.example_input)
        out["torch_max_abs_diff"] = float((y - reference).abs().max())
        out["torch_top1_agree"] = float((y.argmax(-1) == reference.argmax(-1)).float().mean())
    except Exception as err:
        out["convert"] = f"crash at {where(err)}: {short(err)}"
        out["problem"] = f"convert_to_int8/run failed: {short(err, 160)}"
    try:
        import onnxruntime as ort

        with silenced_fds():
            path = export_onnx(model, os.path.join(out_dir, "model_int8.onnx"), case.example_input)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        inputs = case.example_input if isinstance(case.example_input, tuple) else (case.example_input,)
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=False)}
        y = torch.from_numpy(sess.run(None, feeds)[0])
        out["onnx_max_abs_diff"] = float((y - reference).abs().max())
        out["onnx_top1_agree"] = float((y.argmax(-1) == reference.argmax(-1)).float().mean())
        if out["onnx_top1_agree"] < 0.9:
            out["problem"] = f"onnxruntime output disagrees with the QAT model (top-1 {out['onnx_top1_agree']:.2f})"
    except Exception as err:
        if "convert" not in out:  # export_onnx converts first: the same error again says nothing new
            out["onnx"] = f"crash at {where(err)}: {short(err)}"
        out.setdefault("problem", f"export_onnx/onnxruntime failed: {short(err, 160)}")
    return out


# ---------------------------------------------------------------------------------------------- main


def line(r: dict[str, Any]) -> str:
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] in ("refused", "crash"):
        at = f" (step {r['step']})" if "step" in r else ""
        return f"{r['status']}{at} at {r.get('where')}: {r['detail']}"
    bits = [f"val loss {r['val']['loss']:.3g} acc {r['val']['acc']:.2f}"]
    m = r.get("measured", {})
    if "target_zero_fraction" in m:
        bits.append(f"zeros {m['target_zero_fraction']:.2f} of {m['pruned_targets']} targets")
    if m.get("qat_layers"):
        bits.append(f"{m['qat_layers']} QAT layers")
    if "depthwise_zeroed_channels" in m:
        bits.append("depthwise zeroed " + " ".join(m["depthwise_zeroed_channels"]))
    if "layer_kinds" in m:
        bits.append("layers " + ",".join(f"{k}:{v}" for k, v in m["layer_kinds"].items()))
    if m.get("params_after") != m.get("params_before"):
        bits.append(f"params {m['params_before']}->{m['params_after']}")
    i8 = r.get("int8", {})
    if "torch_top1_agree" in i8:
        bits.append(f"int8 {i8['int8_layers']} layers top1 {i8['torch_top1_agree']:.2f}")
    if "onnx_top1_agree" in i8:
        bits.append(f"onnx top1 {i8['onnx_top1_agree']:.2f} maxdiff {i8['onnx_max_abs_diff']:.3g}")
    if "onnx" in i8:
        bits.append(f"ONNX {i8['onnx']}")
    if i8.get("embedding_params_fp32"):
        bits.append(f"{i8['embedding_params_fp32']} embedding params stay fp32 in the int8 copy")
    if "convert" in i8:
        bits.append(f"INT8 {i8['convert']}")
    text = r["status"] + ": " + "; ".join(bits)
    if r["problems"]:
        text += " | " + " | ".join(r["problems"])
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--techniques", nargs="*", default=list(TECHNIQUES))
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for model_name in args.models:
            for technique in args.techniques:
                r = run_case(model_name, technique, root)
                results.append(r)
                print(f"| {model_name} | {technique} | {line(r)} |", flush=True)
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
