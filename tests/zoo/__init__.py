"""A zoo of tiny, random-init models in the style of real ones, for tests that parametrize over architectures.

``ZOO[name]()`` builds a fresh :class:`ZooCase` (seeded): a LightningModule, train/val loaders of tiny
generated data and an example input. Every plain fit of ``case.max_steps`` steps takes seconds on one
thread. The ``hf_*`` cases need ``transformers`` (see :data:`NEEDS_TRANSFORMERS`).
"""

from __future__ import annotations

from collections.abc import Callable

from tests.zoo.common import ZooCase, ZooModule, evaluate
from tests.zoo.hf import hf_bert, hf_gpt2, hf_llama
from tests.zoo.mobilenet import mobilenet_v3
from tests.zoo.resnet import resnet_basic, resnet_bottleneck
from tests.zoo.transformer import transformer_encoder, transformer_seq2seq
from tests.zoo.vit import vit_tiny

ZOO: dict[str, Callable[[], ZooCase]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v3": mobilenet_v3,
    "vit_tiny": vit_tiny,
    "transformer_encoder": transformer_encoder,
    "transformer_seq2seq": transformer_seq2seq,
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "hf_llama": hf_llama,
}

# Cases whose builders import transformers (lazily, so the rest of the zoo works without it).
NEEDS_TRANSFORMERS: frozenset[str] = frozenset(name for name in ZOO if name.startswith("hf_"))

__all__ = ["NEEDS_TRANSFORMERS", "ZOO", "ZooCase", "ZooModule", "evaluate"]
