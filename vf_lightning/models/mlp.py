"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

import torch
from torch import nn

from vf_lightning.models.config import ModelConfig, register_model


class MLP(nn.Module):
    """``Flatten → [Linear → ReLU] × len(hidden) → Linear``; ``bias=False`` drops every bias."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, bias: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h, bias=bias), nn.ReLU()]
            prev = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(torch.flatten(x, 1)))


@register_model("mlp")
def _mlp(cfg: ModelConfig) -> nn.Module:
    if cfg.norm != "none":
        raise ValueError(f"model 'mlp' has no normalization layers; norm must be 'none', got {cfg.norm!r}")
    hidden = tuple(max(1, round(h * cfg.width)) for h in cfg.hidden)
    return MLP(cfg.in_channels * cfg.image_size**2, hidden, cfg.num_classes, cfg.bias)
