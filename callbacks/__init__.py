"""Lightning callbacks that merge, repair, prune and diagnose networks (``vf_lightning.callbacks``).

The same classes run while networks train (``vf fit``) and on finished checkpoints (``vf merge`` / ``vf prune``,
LightningCLI ``validate`` runs of a checkpoint-loading module). Each is configurable from YAML, e.g.
``class_path: vf_lightning.callbacks.MergeCallback``. They hold no merging logic of their own: they are thin
front-ends over :class:`vf_lightning.merge.session.MergeSession` and the library functions.
"""

from .base import DiagnosticCallback, MergingCallback, RunReport, isolated, run_report, session_data
from .merge import InterpolationCallback, MergeCallback, PFMCallback, VarianceCollapseCallback
from .prune import PruneCallback
from .report import ReportWriter
from .tasks import TaskMergeCallback
from .wandb_log import RunLogger

__all__ = [
    "DiagnosticCallback",
    "InterpolationCallback",
    "MergeCallback",
    "MergingCallback",
    "PFMCallback",
    "PruneCallback",
    "ReportWriter",
    "RunLogger",
    "RunReport",
    "TaskMergeCallback",
    "VarianceCollapseCallback",
    "isolated",
    "session_data",
    "run_report",
]
