"""torchvision ImageNet models: VGG16 with the dropout layers removed (method-spec §1.6) and ResNet-50."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from vf_lightning.models.config import ModelConfig, register_model


def _tv_vgg16(cfg: ModelConfig) -> nn.Module:
    if cfg.norm not in ("none", "bn"):
        raise ValueError(f"model 'tv_vgg16' supports norm none or bn, got {cfg.norm!r}")
    ctor = torchvision.models.vgg16_bn if cfg.norm == "bn" else torchvision.models.vgg16
    model = ctor(weights=None, num_classes=cfg.num_classes)
    fc = [m for m in model.classifier if isinstance(m, nn.Linear)]
    model.classifier = nn.Sequential(fc[0], nn.ReLU(inplace=True), fc[1], nn.ReLU(inplace=True), fc[2])
    if cfg.in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(cfg.in_channels, first.out_channels, 3, padding=1)
    return model


def _tv_resnet50(cfg: ModelConfig) -> nn.Module:
    if cfg.norm != "bn":
        raise ValueError(f"model 'tv_resnet50' only supports norm bn, got {cfg.norm!r}")
    model = torchvision.models.resnet50(weights=None, num_classes=cfg.num_classes)
    if cfg.in_channels != 3:
        model.conv1 = nn.Conv2d(cfg.in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


register_model("tv_vgg16")(_tv_vgg16)
register_model("tv_resnet50")(_tv_resnet50)


def remap_torchvision_vgg_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a stock torchvision VGG state dict (with dropout) onto ``tv_vgg16`` keys (classifier 3→2, 6→4)."""
    remap = {"classifier.3.": "classifier.2.", "classifier.6.": "classifier.4."}
    out = {}
    for k, v in state.items():
        for old, new in remap.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    return out
