"""CIFAR-style VGG (method-spec §1.1): 3×3 convs, no pooling after the last stage, one linear head."""

from __future__ import annotations

import torch
from torch import nn

from vf_lightning.models.config import ModelConfig, register_model
from vf_lightning.models.layers import Conv2d, MaxPool2d, make_norm

VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """``features`` (conv [norm] ReLU, max-pools) → global average pool → ``classifier`` Linear.

    For 32×32 inputs the last map is 2×2, so the adaptive pool equals the reference ``AvgPool2d(2)``.
    """

    def __init__(
        self,
        layout: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "none",
        bias: bool = True,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in layout:
            if item == "M":
                layers.append(MaxPool2d(2, 2))
                continue
            c_out = max(1, round(int(item) * width))
            layers.append(Conv2d(c_in, c_out, 3, padding=1, bias=bias))
            if norm != "none":
                layers.append(make_norm(norm, c_out))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _vgg_builder(name: str):  # type: ignore[no-untyped-def]
    def build(cfg: ModelConfig) -> nn.Module:
        if cfg.norm not in ("none", "bn", "ln"):
            raise ValueError(f"model {name!r} supports norm none, bn or ln, got {cfg.norm!r}")
        return VGG(VGG_LAYOUTS[name], cfg.num_classes, cfg.in_channels, cfg.norm, cfg.bias, cfg.width)

    return build


for _name in VGG_LAYOUTS:
    register_model(_name)(_vgg_builder(_name))
