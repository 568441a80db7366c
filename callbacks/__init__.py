"""Lightning callbacks that merge, repair, prune and diagnose networks while they train (``vf_lightning.callbacks``).

Each is configurable from YAML, e.g. ``class_path: vf_lightning.callbacks.MergeCallback``. They hold no merging
logic of their own: they call :mod:`vf_lightning.align`, :mod:`vf_lightning.merge`, :mod:`vf_lightning.repair`,
:mod:`vf_lightning.prune` and :mod:`vf_lightning.diagnostics` on copies of the networks, never changing training.
"""

from .base import CallbackData, DiagnosticCallback, evaluate_reduced, isolated
from .merge import InterpolationCallback, MergeCallback, PFMCallback, VarianceCollapseCallback
from .merging import MergedPair, merge_pair
from .prune import PruneCallback

__all__ = [
    "CallbackData",
    "DiagnosticCallback",
    "InterpolationCallback",
    "MergeCallback",
    "MergedPair",
    "PFMCallback",
    "PruneCallback",
    "VarianceCollapseCallback",
    "evaluate_reduced",
    "isolated",
    "merge_pair",
]
