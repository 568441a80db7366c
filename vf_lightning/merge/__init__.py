"""Merging: weight interpolation, model averaging, interpolation curves and barriers, Preserve-First Merging."""

from typing import Any

from vf_lightning.merge.interpolate import (
    average_models,
    average_states,
    barrier,
    interpolate_models,
    interpolate_state,
    interpolation_curve,
)

__all__ = [
    "average_models",
    "average_states",
    "barrier",
    "interpolate_models",
    "interpolate_state",
    "interpolation_curve",
]

# Preserve-First Merging builds on vf_lightning.repair, which itself imports merge.interpolate: load it lazily
# so that importing either package first works.
_PFM_EXPORTS = ("PFMError", "PFMModel", "PFM_NORMALIZATIONS", "PreserveFirstMerger", "build_pfm", "load_pfm",
                "max_preserved", "normalize_pfm", "pfm_sweep", "save_pfm")
__all__ += list(_PFM_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _PFM_EXPORTS:
        from vf_lightning.merge import pfm

        return getattr(pfm, name)
    raise AttributeError(f"module 'vf_lightning.merge' has no attribute {name!r}")
