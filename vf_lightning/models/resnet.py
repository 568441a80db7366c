"""CIFAR ResNet-6n+2 (method-spec §1.2-1.3): BatchNorm, channel LayerNorm, plain (no norm) or Fixup."""

from __future__ import annotations

import math

import torch
from torch import nn

from vf_lightning.models.config import ModelConfig, register_model
from vf_lightning.models.layers import make_norm


class Block(nn.Module):
    """Basic block ``relu2(norm2(conv2(relu1(norm1(conv1 x)))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, norm: str, conv_bias: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=conv_bias)
        self.norm1 = make_norm(norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=conv_bias)
        self.norm2 = make_norm(norm, c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), make_norm(norm, c_out))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class FixupBlock(nn.Module):
    """Fixup block: scalar biases before each conv and activation, scalar scale after ``conv2``."""

    def __init__(self, c_in: int, c_out: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.relu1 = nn.ReLU()
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = x + self.bias1a
        out = self.relu1(self.conv1(xa) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        identity = self.shortcut(xa) if len(self.shortcut) else x
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """Stem conv → three segments of ``blocks`` blocks (widths W, 2W, 4W) → global pool → ``fc``."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        width: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        w = max(1, round(16 * width))
        self.fixup = norm == "fixup"
        conv_bias = bias and norm == "none"
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=conv_bias)
        self.norm1 = make_norm(norm, w)
        if self.fixup:
            self.bias1 = nn.Parameter(torch.zeros(1))
        self.relu = nn.ReLU()
        segments = []
        c_in = w
        for s, c_out in enumerate((w, 2 * w, 4 * w)):
            blocks: list[nn.Module] = []
            for b in range(n):
                down = s > 0 and b == 0
                blocks.append(
                    FixupBlock(c_in, c_out, down) if self.fixup else Block(c_in, c_out, down, norm, conv_bias)
                )
                c_in = c_out
            segments.append(nn.Sequential(*blocks))
        self.segments = nn.Sequential(*segments)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if self.fixup:
            self.bias2 = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(c_in, num_classes, bias=bias or norm != "none")
        if self.fixup:
            self._fixup_init(3 * n)

    @torch.no_grad()
    def _fixup_init(self, num_blocks: int) -> None:
        for m in self.segments.modules():
            if isinstance(m, FixupBlock):
                c_out, _, kh, kw = m.conv1.weight.shape
                std = math.sqrt(2.0 / (c_out * kh * kw)) * num_blocks**-0.5
                nn.init.normal_(m.conv1.weight, 0.0, std)
                nn.init.zeros_(m.conv2.weight)
        nn.init.zeros_(self.fc.weight)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.relu(out + self.bias1) if self.fixup else self.relu(self.norm1(out))
        out = self.segments(out)
        out = torch.flatten(self.pool(out), 1)
        if self.fixup:
            out = out + self.bias2
        return self.fc(out)


def _resnet_builder(depth: int):  # type: ignore[no-untyped-def]
    def build(cfg: ModelConfig) -> nn.Module:
        if cfg.norm not in ("bn", "ln", "none", "fixup"):
            raise ValueError(f"model 'resnet{depth}' supports norm bn, ln, none or fixup, got {cfg.norm!r}")
        return CifarResNet(depth, cfg.num_classes, cfg.in_channels, cfg.norm, cfg.width, cfg.bias)

    return build


for _depth in (20, 32, 44, 56):
    register_model(f"resnet{_depth}")(_resnet_builder(_depth))
