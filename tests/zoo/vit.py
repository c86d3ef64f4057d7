"""A timm-style Vision Transformer at toy size (timm naming: ``patch_embed.proj``, ``blocks.i.attn.qkv``, ``head``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo.common import ZooCase, ZooModule, loaders, quadrant_images


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv, flattened to tokens ``[N, L, D]``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """One ``qkv`` Linear to 3*dim, fused scaled-dot-product attention, ``proj`` (as timm's Attention)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, class token, learned position embedding, ``blocks``, ``norm``, ``head`` on the class token."""

    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 4,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        num_classes: int = 4,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class ViTClassifier(ZooModule):
    """The network as ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = VisionTransformer()
        self.example_input_array = torch.zeros(2, 3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def vit_tiny() -> ZooCase:
    """ViT: 16 patches of 4x4 + class token, dim 32, depth 2, 2 heads, on 3x16x16 images."""
    torch.manual_seed(0)
    train, val = loaders(quadrant_images(512), quadrant_images(128, seed=1))
    return ZooCase("vit_tiny", ViTClassifier(), train, val, torch.randn(2, 3, 16, 16), head=["model.head"])
