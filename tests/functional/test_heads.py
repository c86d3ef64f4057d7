"""Attention heads as coupled groups: slices by hand, Hugging Face's own smaller models as references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.functional import shrink as S
from lightning_compress.functional.heads import head_groups, sync_head_counts_

transformers = pytest.importorskip("transformers")


def llama(heads: int, kv_heads: int) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=48)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))


def test_gqa_unit_is_one_kv_head_with_its_query_heads_and_matches_a_smaller_llama() -> None:
    model = llama(4, 2)
    groups, kept = head_groups(model, IDS)
    assert kept == {} and [(g.name, g.size) for g in groups] == [("model.layers.0.self_attn", 2)]
    attn = model.model.layers[0].self_attn
    # Reference: Hugging Face's own Llama with 2 query / 1 key-value heads, given by hand the slices of
    # key/value head 1 and of its query heads 2 and 3 (rows 16..31 of q_proj, 8..15 of k/v, columns of o_proj).
    small = llama(2, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = "model.layers.0.self_attn."
    state[p + "q_proj.weight"] = attn.q_proj.weight[16:32].clone()
    state[p + "k_proj.weight"] = attn.k_proj.weight[8:16].clone()
    state[p + "v_proj.weight"] = attn.v_proj.weight[8:16].clone()
    state[p + "o_proj.weight"] = attn.o_proj.weight[:, 16:32].clone()
    small.load_state_dict(state, strict=True)
    keep = {"model.layers.0.self_attn": torch.tensor([False, True])}
    S.apply_masks_(model, groups, keep)
    with torch.no_grad():
        masked = model(IDS).logits
        reference = small(IDS).logits
        assert (masked - reference).abs().max() <= 1e-5  # masking exactly silences the removed unit
        S.shrink_(model, groups, keep)
        assert (model(IDS).logits - reference).abs().max() <= 1e-5
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16


def test_gpt2_packed_c_attn_slices_by_hand_and_rewritten_head_count() -> None:
    model = gpt2()
    groups, _ = head_groups(model, IDS)
    attn = model.transformer.h[0].attn
    masks = S.param_masks(model, groups, {"transformer.h.0.attn": torch.tensor([True, False])})
    # head 1 of 2 (head_dim 16) in c_attn's [in, 3 * 32] weight: columns 16..31 of q, k and v
    gone = [*range(16, 32), *range(48, 64), *range(80, 96)]
    expected = torch.ones(32, 96, dtype=torch.bool)
    expected[:, gone] = False
    assert torch.equal(masks["transformer.h.0.attn.c_attn.weight"], expected)
    assert torch.equal(masks["transformer.h.0.attn.c_attn.bias"], expected[0])
    expected_proj = torch.ones(32, 32, dtype=torch.bool)
    expected_proj[16:] = False  # c_proj reads the heads along its weight's dim 0 ([in, out])
    assert torch.equal(masks["transformer.h.0.attn.c_proj.weight"], expected_proj)
    # The reference zeroes those slices by hand; the shrunk model (cut from the unmasked weights) must agree.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        ref_attn = reference.transformer.h[0].attn
        ref_attn.c_attn.weight[:, gone] = 0
        ref_attn.c_attn.bias[gone] = 0
        ref_attn.c_proj.weight[16:] = 0
        expected_logits = reference(IDS).logits
        S.shrink_(model, groups, {"transformer.h.0.attn": torch.tensor([True, False])})
        assert (model(IDS).logits - expected_logits).abs().max() <= 1e-5
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (1, 16, 48, 16)
    # reload into a fresh full-size GPT-2 from the shapes alone (Conv1D resized, head count rewritten)
    fresh = gpt2()
    assert S.resize_to_state_dict_(fresh, model.state_dict()) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
    ]
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.transformer.h[0].attn.num_heads == 1
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    assert sync_head_counts_(fresh) == []  # idempotent


def test_bert_heads_and_what_stays_whole() -> None:
    from tests.zoo import ZOO

    bert = ZOO["hf_bert"]().module
    groups, kept = head_groups(bert, bert.example_input_array)
    assert [g.name for g in groups] == ["model.bert.encoder.layer.0.attention", "model.bert.encoder.layer.1.attention"]
    members = {(m.module, m.role): m for m in groups[0].members}
    q = members[("model.bert.encoder.layer.0.attention.self.query", "out")]
    o = members[("model.bert.encoder.layer.0.attention.output.dense", "in")]
    assert q.idxs == o.idxs == tuple(range(32)) and q.root_idxs == (0,) * 16 + (1,) * 16
    # excluded output projection: the attention stays whole, named
    selected = {n for n, m in bert.named_modules() if isinstance(m, nn.Linear) and "layer.1.attention.output" not in n}
    groups, kept = head_groups(bert, bert.example_input_array, selected=selected)
    assert [g.name for g in groups] == ["model.bert.encoder.layer.0.attention"]
    assert "not selected" in kept["model.bert.encoder.layer.1.attention"]


def test_multihead_attention_and_input_width_reshape_stay_whole_with_reasons() -> None:
    from tests.zoo import ZOO

    enc = ZOO["transformer_encoder"]().module
    groups, kept = head_groups(enc, enc.example_input_array)
    assert groups == [] and "nn.MultiheadAttention cannot hold fewer heads" in kept["encoder.layers.0.self_attn"]
    vit = ZOO["vit_tiny"]().module  # timm-style: reshape(b, n, c) back to the input width
    groups, kept = head_groups(vit, vit.example_input_array)
    assert groups == [] and "the forward fails once a head is removed" in kept["model.blocks.0.attn"]


class OutProjAttention(nn.Module):
    """BART/OPT-style names (``out_proj``, no ``o_proj``): a layout the head analysis does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(8, 8) for _ in range(4))
        self.head_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))


def test_unrecognised_attention_layout_is_named_not_skipped() -> None:
    model = nn.Sequential(OutProjAttention())
    groups, kept = head_groups(model, torch.randn(2, 3, 8))
    assert groups == [] and "['k_proj', 'q_proj', 'v_proj'] in a layout that is not recognised" in kept["0"]


def test_head_counts_leave_unknown_projections_alone() -> None:
    class Wrapped(nn.Module):  # a qkv that is not a Linear (e.g. a LoRA-style wrapper)
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Sequential(nn.Linear(8, 24)), nn.Linear(8, 8)
            self.num_heads, self.head_dim = 2, 4

    model = nn.Sequential(Wrapped())
    assert sync_head_counts_(model) == [] and model[0].num_heads == 2
