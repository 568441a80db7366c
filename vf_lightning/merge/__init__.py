"""Merging: interpolation and barriers, Preserve-First Merging, multi-task merging (TA / TIES / TALL / consensus
with REPAIR / TACT), and the merge session that orchestrates align → merge → repair → diagnose for every caller."""

from vf_lightning.merge.experts import Expert, MultiTaskModel, TaskView
from vf_lightning.merge.interpolate import (
    average_models,
    average_states,
    barrier,
    interpolate_models,
    interpolate_state,
)
from vf_lightning.merge.multitask import MultiTaskResult, TaskData, merge_experts
from vf_lightning.merge.pfm import (
    PFMError,
    PFMGroup,
    PFMModel,
    PFMSource,
    PreserveFirstMerger,
    build_pfm,
    evaluate_variants,
    load_pfm,
    max_preserved,
    pfm_sweep,
    save_pfm,
)
from vf_lightning.merge.session import Ensemble, Merge, MergeSession, SessionData, SessionError
from vf_lightning.merge.tasks import DEFAULT_GRIDS, TASK_MERGERS, MergeOutput, merge_bodies

__all__ = [
    "DEFAULT_GRIDS",
    "TASK_MERGERS",
    "Ensemble",
    "Expert",
    "Merge",
    "MergeOutput",
    "MergeSession",
    "MultiTaskModel",
    "MultiTaskResult",
    "PFMError",
    "PFMGroup",
    "PFMSource",
    "PFMModel",
    "PreserveFirstMerger",
    "SessionData",
    "SessionError",
    "TaskData",
    "TaskView",
    "average_models",
    "average_states",
    "barrier",
    "build_pfm",
    "evaluate_variants",
    "interpolate_models",
    "interpolate_state",
    "load_pfm",
    "max_preserved",
    "merge_bodies",
    "merge_experts",
    "pfm_sweep",
    "save_pfm",
]
