"""Merging: weight interpolation, model averaging, interpolation curves and barriers, Preserve-First Merging."""

from vf_lightning.merge.interpolate import (
    average_models,
    average_states,
    barrier,
    interpolate_models,
    interpolate_state,
    interpolation_curve,
)
from vf_lightning.merge.pfm import (
    PFM_NORMALIZATIONS,
    PFMError,
    PFMModel,
    PreserveFirstMerger,
    build_pfm,
    load_pfm,
    max_preserved,
    normalize_pfm,
    pfm_sweep,
    save_pfm,
)

__all__ = [
    "PFM_NORMALIZATIONS",
    "PFMError",
    "PFMModel",
    "PreserveFirstMerger",
    "average_models",
    "average_states",
    "barrier",
    "build_pfm",
    "interpolate_models",
    "interpolate_state",
    "interpolation_curve",
    "load_pfm",
    "max_preserved",
    "normalize_pfm",
    "pfm_sweep",
    "save_pfm",
]
