"""Merging: weight interpolation, model averaging, interpolation curves and barriers."""

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
