"""PyTorch's own ``nn.TransformerEncoder`` / ``nn.Transformer``: MultiheadAttention, ``out_proj``,
``in_proj_weight`` read directly, and the eval fast path that reads ``linear1.weight`` etc."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.zoo.common import ZooCase, ZooModule, loaders, majority_tokens, shifted_copy

VOCAB = 32
LENGTH = 16


class EncoderClassifier(ZooModule):
    """Token embedding + learned positions, ``nn.TransformerEncoder`` (batch_first), mean pool, ``head``."""

    def __init__(self, d_model: int = 32, nhead: int = 2, layers: int = 2, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(1, LENGTH, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=64, dropout=0.0, batch_first=True)
        # enable_nested_tensor=False only silences a warning about padding masks (there are none here)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)
        self.example_input_array = torch.zeros(2, LENGTH, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(tokens) + self.pos[:, : tokens.shape[1]])
        return self.head(x.mean(1))


class Seq2Seq(ZooModule):
    """``nn.Transformer`` encoder-decoder with a causal target mask; ``forward(src, tgt_in)`` takes two inputs."""

    def __init__(self, d_model: int = 32, nhead: int = 2) -> None:
        super().__init__()
        self.d_model = d_model
        self.src_embed = nn.Embedding(VOCAB, d_model)
        self.tgt_embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(1, 64, d_model) * 0.02)
        self.transformer = nn.Transformer(
            d_model,
            nhead,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=64,
            dropout=0.0,
            batch_first=True,
        )
        self.generator = nn.Linear(d_model, VOCAB)
        self.example_input_array = (torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(self.d_model)
        s = self.src_embed(src) * scale + self.pos[:, : src.shape[1]]
        t = self.tgt_embed(tgt) * scale + self.pos[:, : tgt.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.generator(self.transformer(s, t, tgt_mask=mask, tgt_is_causal=True))


def transformer_encoder() -> ZooCase:
    """2-layer ``nn.TransformerEncoder`` classifying whether most tokens lie in the upper vocabulary half."""
    torch.manual_seed(0)
    train, val = loaders(majority_tokens(512, VOCAB, LENGTH), majority_tokens(128, VOCAB, LENGTH, seed=1))
    example = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    return ZooCase("transformer_encoder", EncoderClassifier(), train, val, example, head=["head"])


def transformer_seq2seq() -> ZooCase:
    """1+1-layer ``nn.Transformer`` learning target = source + 1 with teacher forcing."""
    torch.manual_seed(0)
    train, val = loaders(shifted_copy(512, VOCAB), shifted_copy(128, VOCAB, seed=1))
    src, tgt_in, _ = shifted_copy(2, VOCAB, seed=2).tensors
    return ZooCase("transformer_seq2seq", Seq2Seq(), train, val, (src, tgt_in), head=["generator"], max_steps=30)
