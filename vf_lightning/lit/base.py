"""Shared pieces of the LightningModules: model building under a seed, metrics, speed options."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from vf_lightning.lit.optim import OptimConfig, ScheduleConfig, build_scheduler
from vf_lightning.models import ModelConfig, build_model


def as_config(value: Any, cls: type) -> Any:
    """Accept a config dataclass or its dict form (as stored in checkpoints)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def build_seeded(cfg: ModelConfig, seed: int | None) -> nn.Module:
    """Build ``cfg`` with its own RNG stream (different seeds → differently initialized networks)."""
    if seed is None:
        return build_model(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Number of samples whose label is among the top-``k`` logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()


class BaseModule(L.LightningModule):
    """Optimizer/schedule wiring and speed options shared by the classifier and pair modules."""

    optim: OptimConfig
    schedule: ScheduleConfig

    def __init__(self, compile: bool = False, channels_last: bool | None = None) -> None:
        super().__init__()
        self.compile_nets = compile
        self.channels_last_opt = channels_last
        self._compiled: dict[str, Any] = {}

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def use_channels_last(self) -> bool:
        """``channels_last`` option; None = on for networks with 2-d convolutions (faster on GPU and on CPU)."""
        if self.channels_last_opt is not None:
            return self.channels_last_opt
        return any(isinstance(m, nn.Conv2d) for net in self.networks().values() for m in net.modules())

    def setup(self, stage: str) -> None:
        if self.use_channels_last:
            for net in self.networks().values():
                net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.compile_nets:
            self._compiled = {k: torch.compile(v) for k, v in self.networks().items()}

    def forward_net(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.use_channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = self._compiled.get(key) or self.networks()[key]
        return fn(x)

    def configure_optimizers(self) -> Any:
        params = [p for net in self.networks().values() for p in net.parameters() if p.requires_grad]
        opt = self.optim.build(params)
        if self.schedule.kind == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches) if self.schedule.total_iters is None else 0
        sched = build_scheduler(opt, self.schedule, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @staticmethod
    def loss_and_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits, y)
        return loss, topk_correct(logits, y, 1), topk_correct(logits, y, 5)

    @staticmethod
    def config_dict(cfg: Any) -> dict[str, Any]:
        return cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)

    def cli_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """``hparams`` in the form LightningCLI re-parses from a checkpoint (``--ckpt_path FILE``): the init
        arguments with the module's ``_class_path``, as the CLI itself saves them (``load_from_checkpoint``
        drops the key)."""
        cls = type(self)
        return {"_class_path": f"{cls.__module__}.{cls.__qualname__}", **hparams}
