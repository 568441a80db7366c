"""Typed model configuration and the registry that turns it into a network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from vf_lightning.models.init import apply_init
from vf_lightning.registry import Registry

Norm = Literal["none", "bn", "ln", "fixup"]
Init = Literal["default", "vgg_init", "lecun_normal"]
Pool = Literal["cls", "mean"]
Attention = Literal["qkv", "sdpa", "mha"]

Builder = Callable[["ModelConfig"], nn.Module]
_REGISTRY: Registry[Builder] = Registry("model")


def register_model(*names: str) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(cfg) -> nn.Module`` under one or more architecture names."""

    def deco(fn: Builder) -> Builder:
        for name in names:
            _REGISTRY.register(name)(fn)
        return fn

    return deco


def available_models() -> list[str]:
    """Names accepted by ``ModelConfig.arch``."""
    return _REGISTRY.names()


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network of the zoo; stored in every checkpoint.

    ``arch`` names a registered architecture (see ``available_models()``); the other fields apply
    where they make sense (``hidden`` only to ``mlp``, ``norm`` choices depend on the family).
    """

    arch: str = "vgg16"
    num_classes: int = 10
    in_channels: int = 3
    norm: Norm = "none"
    bias: bool = True
    width: float = 1.0
    hidden: tuple[int, ...] = field(default=(512, 512))
    image_size: int = 32
    init: Init = "default"
    # Vision Transformer (``vit``): patch size, token width, blocks, heads, MLP hidden = mlp_ratio·dim, pooling
    # (class token or mean over tokens) and how attention is written (fused qkv Linear + matmul, the same with
    # F.scaled_dot_product_attention, or nn.MultiheadAttention)
    patch: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    pool: Pool = "cls"
    attention: Attention = "qkv"

    def __post_init__(self) -> None:
        if self.arch not in _REGISTRY:
            raise ValueError(
                f"unknown model arch {self.arch!r}; registered models are: {', '.join(available_models())}"
            )
        if self.num_classes < 1 or self.in_channels < 1 or self.image_size < 1:
            raise ValueError(f"model {self.arch!r}: num_classes, in_channels and image_size must be positive")
        if self.width <= 0:
            raise ValueError(f"model {self.arch!r}: width multiplier must be > 0, got {self.width}")
        if min(self.patch, self.dim, self.depth, self.heads) < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"model {self.arch!r}: patch, dim, depth, heads and mlp_ratio must be positive")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def build_model(cfg: ModelConfig | dict[str, Any]) -> nn.Module:
    """Build the network described by ``cfg`` (a ``ModelConfig`` or its dict form)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    model = _REGISTRY[cfg.arch](cfg)
    apply_init(model, cfg.init)
    return model
