"""QAT end to end on every zoo model: fit -> int8 -> ONNX, each matching the fake-quantized model.

A model either goes all the way (the converted model runs in eval and train mode and matches the
fake-quantized one; the ONNX file runs in onnxruntime and agrees with it) or is refused in ``setup``,
before any step, with a message that names the layer and the way out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lightning_compress import QuantizationAwareTraining, convert_to_int8, export_onnx
from lightning_compress.functional.int8 import int8_layers
from lightning_compress.functional.qat import qat_modules
from lightning_compress.inputs import as_call, run
from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO
from tests.zoo.common import ZooCase

STEPS = 6
# Layers QAT swaps per model with the default configuration (GPT-2: with its tied head excluded).
# Counted by hand from the zoo definitions: MultiheadAttention out_proj layers stay fp32.
EXPECTED_QAT_LAYERS = {
    "resnet_basic": 12,
    "resnet_bottleneck": 10,
    "mobilenet_v3": 24,
    "vit_tiny": 10,
    "transformer_encoder": 5,  # 2 x (linear1, linear2) + head; 2 out_proj fp32
    "transformer_seq2seq": 5,  # 2 x (linear1, linear2) + generator; 3 out_proj fp32
    "hf_gpt2": 8,  # 2 x (c_attn, c_proj, mlp.c_fc, mlp.c_proj), all Conv1D
    "hf_bert": 14,
    "hf_llama": 15,  # 2 x (q, k, v, o, gate, up, down) + lm_head
}


def build(name: str) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    return ZOO[name]()


def batch_inputs(case: ZooCase) -> tuple[torch.Tensor, ...]:
    *inputs, _ = next(iter(case.val_loader))
    return tuple(inputs)


def fit(case: ZooCase, tmp_path: Any, **kwargs: Any) -> QuantizationAwareTraining:
    qat = QuantizationAwareTraining(**kwargs)
    # MobileNetV3: its BatchNorm running statistics lag the weights for ~20 steps (see the zoo case), so
    # after 6 steps the eval-mode activations lie outside the ranges observed in training, and its
    # near-constant logits (spread ~0.03) make relative errors meaningless. Its own step count, then.
    steps = case.max_steps if case.name == "mobilenet_v3" else STEPS
    trainer(tmp_path, [qat], max_epochs=-1, max_steps=steps, limit_val_batches=0).fit(case.module, case.train_loader)
    return qat


@pytest.mark.parametrize("name", list(ZOO))
def test_qat_fit_convert_export(name: str, tmp_path: Any) -> None:
    case = build(name)
    if name == "hf_gpt2":
        with pytest.raises(ValueError, match=r"model\.lm_head\.weight is tied to model\.transformer\.wte\.weight"):
            fit(case, tmp_path)
        assert not list(qat_modules(case.module))  # refused in setup: nothing swapped
        qat = fit(case, tmp_path, exclude=case.head)
    elif name.startswith("transformer_"):
        with pytest.warns(UserWarning, match=r"keeps \[.*out_proj.*\] in fp32: nn.MultiheadAttention reads"):
            qat = fit(case, tmp_path)
    else:
        qat = fit(case, tmp_path)
    model = case.module.eval()
    assert len(list(qat_modules(model))) == EXPECTED_QAT_LAYERS[name]
    section = qat.last_report.sections["quantization"]
    assert len(section["layers"]) == EXPECTED_QAT_LAYERS[name]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert {row["layer"] for row in section["fp32_layers"]} >= set(embeddings)

    inputs = batch_inputs(case)
    int8 = convert_to_int8(model)
    assert len(int8_layers(int8)) == EXPECTED_QAT_LAYERS[name]
    with torch.no_grad():
        fake = run(model, inputs)
        converted = run(int8, inputs)
        # Same arithmetic (codes * scale is exactly what fake-quantization computes): float noise only.
        torch.testing.assert_close(converted, fake, atol=1e-4, rtol=1e-4)
        int8.train()  # the training-mode path (no fused kernels) runs too
        assert torch.isfinite(run(int8, inputs)).all()
        int8.eval()

    ort = pytest.importorskip("onnxruntime")
    example = case.example_input
    if name == "hf_llama":
        with pytest.raises(RuntimeError, match="enable_gqa.*HINT: .*attn_implementation='eager'"):
            export_onnx(model, str(tmp_path / "refused.onnx"), example, exporter="legacy")
        model.model.config._attn_implementation = "eager"  # what the HINT says
    path = export_onnx(model, str(tmp_path / "model.onnx"), example)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(as_call(example).args)
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    expected = converted.numpy()
    agreement = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    assert agreement >= 0.95, agreement
    assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()
