"""Initialization schemes of method-spec §1.4."""

from __future__ import annotations

import math

import torch
from torch import nn

from vf_lightning.models.layers import ChannelLayerNorm


@torch.no_grad()
def apply_init(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialize ``model`` in place: ``default`` (PyTorch), ``vgg_init`` or ``lecun_normal``."""
    if scheme == "default":
        return model
    if scheme not in ("vgg_init", "lecun_normal"):
        raise ValueError(f"unknown init scheme {scheme!r}; choose default, vgg_init or lecun_normal")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "vgg_init":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            std = 0.01 if scheme == "vgg_init" else 1.0 / math.sqrt(m.in_features)
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, ChannelLayerNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model
