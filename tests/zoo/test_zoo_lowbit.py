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
