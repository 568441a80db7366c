"""LightningModules: training the base models (classifier, pair, expert) and loading finished checkpoints."""

from vf_lightning.lit.merging import CheckpointModule, ExpertEntry, ExpertsModule, MergeModule
from vf_lightning.lit.modules import ClassifierModule, PairModule
from vf_lightning.lit.optim import OptimConfig, ScheduleConfig

__all__ = [
    "CheckpointModule",
    "ClassifierModule",
    "ExpertEntry",
    "ExpertsModule",
    "MergeModule",
    "OptimConfig",
    "PairModule",
    "ScheduleConfig",
]
