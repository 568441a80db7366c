"""LightningModules that train the base models."""

from vf_lightning.lit.modules import ClassifierModule, PairModule
from vf_lightning.lit.optim import OptimConfig, ScheduleConfig

__all__ = ["ClassifierModule", "OptimConfig", "PairModule", "ScheduleConfig"]
