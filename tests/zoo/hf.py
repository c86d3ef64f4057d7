"""Hugging Face ``transformers`` models built from tiny configs (random init, nothing downloaded).

GPT-2 uses ``transformers.pytorch_utils.Conv1D`` (weight stored ``[in, out]``) and ties ``lm_head.weight``
to ``transformer.wte.weight``; BERT is the usual sequence classifier; Llama is the modern decoder
(RMSNorm, rotary positions, gated MLP, grouped-query attention).
"""

from __future__ import annotations

import torch

from tests.zoo.common import ZooCase, ZooModule, arithmetic_sequences, loaders, majority_tokens

VOCAB = 64
LENGTH = 16


class CausalLM(ZooModule):
    """Any ``*ForCausalLM`` as ``self.model``; ``forward(input_ids)`` returns the logits ``[N, L, V]``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.zeros(2, LENGTH, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


class SequenceClassifier(ZooModule):
    """A ``*ForSequenceClassification`` as ``self.model``; ``forward(input_ids)`` returns ``[N, C]`` logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.zeros(2, LENGTH, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _lm_case(name: str, model: torch.nn.Module, head: list[str]) -> ZooCase:
    train, val = loaders(arithmetic_sequences(512, VOCAB, LENGTH), arithmetic_sequences(128, VOCAB, LENGTH, seed=1))
    example = arithmetic_sequences(2, VOCAB, LENGTH, seed=2).tensors[0]
    return ZooCase(name, CausalLM(model), train, val, example, head=head, max_steps=30)


def hf_gpt2() -> ZooCase:
    """GPT2LMHeadModel: 2 layers, n_embd 32, 2 heads, vocab 64; ``lm_head`` tied to ``wte``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie the zoo exists to exercise
    return _lm_case("hf_gpt2", model, head=["model.lm_head"])


def hf_llama() -> ZooCase:
    """LlamaForCausalLM: 2 layers, hidden 32, 4 query / 2 key-value heads, vocab 64 (untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return _lm_case("hf_llama", LlamaForCausalLM(config), head=["model.lm_head"])


def hf_bert() -> ZooCase:
    """BertForSequenceClassification: 2 layers, hidden 32, 2 heads, vocab 64, 2 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    train, val = loaders(majority_tokens(512, VOCAB, LENGTH), majority_tokens(128, VOCAB, LENGTH, seed=1))
    example = majority_tokens(2, VOCAB, LENGTH, seed=2).tensors[0]
    return ZooCase(
        "hf_bert",
        SequenceClassifier(BertForSequenceClassification(config)),
        train,
        val,
        example,
        head=["model.classifier"],
    )


class TinyBert(ZooModule):
    """BERT classifier built from plain hyperparameters (so ``load_shrunk`` can rebuild it): 2 layers, 4 heads of 8."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.save_hyperparameters()
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=heads,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            num_labels=2,
        )
        self.model = BertForSequenceClassification(config)
        self.example_input_array = torch.zeros(2, LENGTH, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits
