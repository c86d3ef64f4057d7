"""Low-bit QAT on the zoo's Hugging Face models: group-wise 4-bit GPT-2 / Llama, BERT's word embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lightning_compress import QuantizationAwareTraining, convert_to_int8, export_onnx
from lightning_compress.functional.int8 import Int8Embedding, int8_layers
from lightning_compress.functional.qat import qat_modules
from lightning_compress.inputs import as_call, run
from tests.helpers import trainer
from tests.zoo import ZOO

STEPS = 4


def fit(name: str, tmp_path: Any, **kwargs: Any) -> tuple[Any, QuantizationAwareTraining]:
    pytest.importorskip("transformers")
    case = ZOO[name]()
    qat = QuantizationAwareTraining(**kwargs)
    trainer(tmp_path, [qat], max_epochs=-1, max_steps=STEPS, limit_val_batches=0).fit(case.module, case.train_loader)
    return case, qat


def compare(case: Any) -> None:
    module = case.module.eval()
    call = as_call(case.example_input)
    int8 = convert_to_int8(module)
    with torch.no_grad():
        expected, got = run(module, call), run(int8, call)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_group_wise_4bit_on_hf_models(name: str, tmp_path: Any) -> None:
    # hidden 32 / intermediate 64: groups of 16 divide every layer's input
    exclude = ["model.lm_head"] if name == "hf_gpt2" else None  # GPT-2's head is tied to wte
    case, qat = fit(name, tmp_path, weight_bits=4, activation_bits=None, group_size=16, exclude=exclude)
    layers = dict(qat_modules(case.module))
    assert layers and all(m.group_size == 16 and m.weight_scale.dim() == 2 for m in layers.values())
    if name == "hf_gpt2":  # Conv1D: weight [in, out], scales [out, in / 16]
        c_fc = layers["model.transformer.h.0.mlp.c_fc"]
        assert tuple(c_fc.weight.shape) == (32, 64) and tuple(c_fc.weight_scale.shape) == (64, 2)
    compare(case)
    assert all(m.group_size == 16 for m in int8_layers(convert_to_int8(case.module)).values())


def test_group_wise_gpt2_runs_in_onnxruntime(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    case, _ = fit("hf_gpt2", tmp_path, weight_bits=4, activation_bits=None, group_size=16, exclude=["model.lm_head"])
    int8 = convert_to_int8(case.module.eval())
    path = export_onnx(int8, str(tmp_path / "gpt2.onnx"), case.example_input)
    assert [n.op_type for n in onnx.load(path).graph.node].count("MatMulNBits") == 8  # every Conv1D
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": case.example_input.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, int8(case.example_input).numpy(), atol=1e-5, rtol=1e-4)


def test_bert_word_embeddings_quantized(tmp_path: Any) -> None:
    case, qat = fit(
        "hf_bert", tmp_path, weight_bits=4, activation_bits=None, types=["Embedding"], include=["*word_embeddings"]
    )
    names = [n for n, _ in qat_modules(case.module)]
    assert names == ["model.bert.embeddings.word_embeddings"]
    compare(case)
    int8 = convert_to_int8(case.module)
    emb = int8.model.bert.embeddings.word_embeddings
    assert isinstance(emb, Int8Embedding) and tuple(emb.weight_scale.shape) == (64,)


def test_gpt2_tied_embedding_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"wte\.weight is tied to model\.lm_head\.weight"):
        fit("hf_gpt2", tmp_path, types=["Embedding"], include=["*wte"])


def test_gpt2_4bit_with_per_token_int8_inputs_exports_and_runs(tmp_path: Any) -> None:
    """torchao's int8-dynamic-activation / int4-weight scheme on GPT-2, trained and exported in one fit."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    case, qat = fit(
        "hf_gpt2",
        tmp_path,
        weight_bits=4,
        group_size=16,
        activation_granularity="token",
        exclude=["model.lm_head"],
        export_dir=str(out),
    )
    assert all(m.activation_granularity == "token" for _, m in qat_modules(case.module))
    compare(case)  # the int8 PyTorch model computes what the fake-quantized one trained with
    nodes = [n for n in onnx.load(str(out / "model_int8.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 8 and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    session = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    x = case.example_input
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = torch.load(out / "model_int8.pt", weights_only=False)(x)
    expected = expected.logits if hasattr(expected, "logits") else expected
    # onnxruntime quantizes inputs per block of 16 (finer than per token): close, not bit-equal.
    assert np.abs(got - expected.numpy()).max() < 0.05 * np.abs(expected.numpy()).max()
    assert qat.report_section(None, case.module)["activation_granularity"] == "token"  # type: ignore[arg-type]
