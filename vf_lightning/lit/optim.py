"""Optimizers and per-iteration learning-rate schedules of the reference recipes (method-spec §1.8)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum (reference) or AdamW."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr (learning rate) must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"optim.momentum and optim.weight_decay must be ≥ 0, got {self.momentum} and "
                             f"{self.weight_decay}")  # fmt: skip

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
            )
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule stepped every iteration.

    kind: ``constant``; ``milestones`` (lr·γ^{#milestones ≤ it}); ``warmup_milestones`` (linear warm-up from
    ``warmup_start``·lr over ``warmup_iters``, then the same drops at the same absolute iterations);
    ``warmup_cosine`` (warm-up, then cosine to 0 at ``total_iters``; None = the trainer's total steps).
    """

    kind: Literal["constant", "milestones", "warmup_milestones", "warmup_cosine"] = "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_start: float = 1e-5
    total_iters: int | None = None


class LRFactor:
    """Multiplicative LR factor as a function of the iteration (for ``LambdaLR``).

    Holds only plain values: ``LambdaLR.state_dict`` stores this object's ``__dict__`` in checkpoints,
    which must stay loadable with ``weights_only=True``.
    """

    def __init__(self, cfg: ScheduleConfig, total_iters: int) -> None:
        self.kind = cfg.kind
        self.milestones = [int(m) for m in cfg.milestones]
        self.gamma = float(cfg.gamma)
        self.warmup = int(cfg.warmup_iters) if cfg.kind in ("warmup_milestones", "warmup_cosine") else 0
        self.warmup_start = float(cfg.warmup_start)
        self.total = int(total_iters)

    def __call__(self, it: int) -> float:
        warm = self.warmup
        if it < warm:
            return self.warmup_start + (1.0 - self.warmup_start) * it / warm
        if self.kind in ("milestones", "warmup_milestones"):
            return self.gamma ** sum(1 for m in self.milestones if m <= it)
        if self.kind == "warmup_cosine":
            decay = max(1, self.total - warm)
            t = min(it - warm, decay)
            return 0.5 * (1.0 + math.cos(math.pi * t / decay))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_iters: int) -> LambdaLR:
    """A per-iteration ``LambdaLR`` implementing ``cfg`` (``total_iters`` used when ``cfg.total_iters`` is None)."""
    return LambdaLR(optimizer, LRFactor(cfg, cfg.total_iters or total_iters))
