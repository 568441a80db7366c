"""Vision Transformer (Dosovitskiy et al.): conv patch embedding, class token or mean pooling, learned positional
embedding, pre-LayerNorm blocks of multi-head self-attention and a GELU MLP.

Attention comes in three spellings that compute the same function, so that the permutation tracer is exercised
on the ways users write it: ``qkv`` (one fused ``Linear(dim, 3·dim)``, reshape to heads, ``q @ kᵀ``, softmax,
``@ v``), ``sdpa`` (the same projections through ``F.scaled_dot_product_attention``) and ``mha``
(``nn.MultiheadAttention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vf_lightning.models.config import ModelConfig, register_model


class SelfAttention(nn.Module):
    """Multi-head self-attention from a fused ``qkv`` projection and an output projection ``proj``."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit: dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.sdpa = sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each batch × heads × tokens × head_dim
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MHASelfAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch first)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, hidden: int, attention: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn: nn.Module = MHASelfAttention(dim, heads) if attention == "mha" else SelfAttention(
            dim, heads, sdpa=attention == "sdpa")
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """``patch_embed`` (conv, stride = patch) → tokens (+ class token) + ``pos_embed`` → blocks → LayerNorm →
    class token or token mean → ``head``."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, pool: str = "cls",
                 attention: str = "qkv") -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"vit: image_size ({image_size}) must be divisible by patch ({patch})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"vit: pool must be 'cls' or 'mean', got {pool!r}")
        if attention not in ("qkv", "sdpa", "mha"):
            raise ValueError(f"vit: attention must be 'qkv', 'sdpa' or 'mha', got {attention!r}")
        self.pool = pool
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init()

    @torch.no_grad()
    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # batch × patches × dim
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


@register_model("vit")
def _vit(cfg: ModelConfig) -> nn.Module:
    if cfg.norm not in ("none", "ln"):
        raise ValueError(f"model 'vit' always uses LayerNorm; norm must be 'ln' (or 'none'), got {cfg.norm!r}")
    return ViT(cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.patch, max(1, round(cfg.dim * cfg.width)),
               cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.pool, cfg.attention)
