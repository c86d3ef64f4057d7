"""FFN units by layout: a smaller Hugging Face Llama given the kept slices by hand is the reference."""

from __future__ import annotations

import torch

from lightning_compress.functional import shrink as S
from lightning_compress.functional.ffn import ffn_groups
from tests.functional.test_heads import IDS, llama


def test_llama_gated_mlp_units_match_a_llama_with_a_smaller_ffn() -> None:
    model = llama(4, 2)
    groups, kept = ffn_groups(model, IDS)
    assert kept == {} and [(g.name, g.size) for g in groups] == [("model.layers.0.mlp", 48)]
    keep = torch.arange(48) % 3 == 0  # units 0, 3, ..., 45
    mlp = model.model.layers[0].mlp
    small = llama(4, 2)
    small.config.intermediate_size = 16
    small.model.layers[0].mlp.__init__(small.config)  # the same Llama with a 16-unit FFN
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = "model.layers.0.mlp."
    state[p + "gate_proj.weight"] = mlp.gate_proj.weight[0::3].clone()
    state[p + "up_proj.weight"] = mlp.up_proj.weight[0::3].clone()
    state[p + "down_proj.weight"] = mlp.down_proj.weight[:, 0::3].clone()
    small.load_state_dict(state, strict=True)
    S.apply_masks_(model, groups, {"model.layers.0.mlp": keep})
    with torch.no_grad():
        reference = small(IDS).logits
        assert (model(IDS).logits - reference).abs().max() <= 1e-5
        S.shrink_(model, groups, {"model.layers.0.mlp": keep})
        assert (model(IDS).logits - reference).abs().max() <= 1e-5
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (16, 16)
