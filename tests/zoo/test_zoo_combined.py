"""Pruning + QAT + distillation in one fit on every zoo model, in both callback orders.

What a user ships must be what the metrics say: the pruned zeros survive quantization-aware training and
int8 conversion (a zero weight has code 0), the converted model runs, the teacher stays the float model
it was given, and the report counts each parameter once.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from lightning_compress import GradualPruning, KnowledgeDistillation, QuantizationAwareTraining, convert_to_int8
from lightning_compress.functional.int8 import int8_layers
from lightning_compress.functional.qat import is_qat
from lightning_compress.inputs import run
from tests.helpers import trainer
from tests.zoo import NEEDS_TRANSFORMERS, ZOO
from tests.zoo.common import ZooCase

STEPS = 8
TIED = {"hf_gpt2": ["model.lm_head"]}  # tied to the token embedding: every callback refuses it alone


def build(name: str) -> ZooCase:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    return ZOO[name]()


def logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize(
    ("name", "reverse"), [(n, False) for n in ZOO] + [(n, True) for n in ("resnet_basic", "vit_tiny", "hf_bert")]
)
def test_prune_quantize_distill_together(name: str, reverse: bool, tmp_path: Any) -> None:
    case = build(name)
    teacher = copy.deepcopy(case.module).eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    exclude = TIED.get(name)
    pruning = GradualPruning(0.5, end_step=4, update_every_n_steps=2, exclude=exclude)
    qat = QuantizationAwareTraining(start_step=2, exclude=exclude)
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5)
    callbacks = [pruning, qat, kd][::-1] if reverse else [pruning, qat, kd]
    run_ = trainer(tmp_path, callbacks, max_epochs=-1, max_steps=STEPS, limit_val_batches=0)
    run_.fit(case.module, case.train_loader)

    params = dict(case.module.named_parameters())
    zeros = {n: params[n].detach() == 0 for n in pruning._masks}
    total = sum(z.numel() for z in zeros.values())
    assert sum(int(z.sum()) for z in zeros.values()) >= 0.5 * total - len(zeros)  # pruned, and still zero
    assert any(is_qat(m) for m in case.module.modules())
    # The teacher was neither trained nor quantized.
    assert not any(is_qat(m) for m in teacher.modules())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    # int8: every pruned weight of a converted layer is code 0.
    int8 = convert_to_int8(case.module)
    converted = int8_layers(int8)
    checked = 0
    for layer_name, layer in converted.items():
        key = f"{layer_name}.weight"
        if key in zeros:
            weight = layer.weight  # dequantized, in the original layout
            assert bool((weight.detach()[zeros[key]] == 0).all()), key
            checked += 1
    assert checked > 0
    int8.eval()
    with torch.no_grad():
        assert torch.isfinite(logits(run(int8, case.example_input))).all()
    # The report counts each parameter once (tied embeddings included).
    report = qat.last_report or kd.last_report or pruning.last_report
    assert report is not None
    assert report.summary["params"] == sum(p.numel() for p in case.module.parameters())
