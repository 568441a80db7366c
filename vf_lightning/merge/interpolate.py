"""Model interpolation, the interpolation curve and the loss/accuracy barrier (method-spec §4).

The state-dict arithmetic lives in :mod:`vf_lightning.statedict`; its names are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

from torch import nn

from vf_lightning.statedict import _check_same_keys as _check_same_keys  # re-exported for old callers
from vf_lightning.statedict import average_models, average_states, interpolate_state

__all__ = [
    "average_models",
    "average_states",
    "barrier",
    "interpolate_models",
    "interpolate_state",
]


def interpolate_models(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new module ``θ_α = (1−α)·θ_A + α·θ_B`` (B should already be aligned to A)."""
    out = copy.deepcopy(model_a)
    out.load_state_dict(interpolate_state(model_a.state_dict(), model_b.state_dict(), alpha))
    return out


def barrier(values: Sequence[float], kind: Literal["acc", "loss"] = "acc") -> float:
    """Barrier of a curve: ``mean(endpoints) − min`` for accuracy, ``max − mean(endpoints)`` for loss."""
    if len(values) < 2:
        raise ValueError(f"a barrier needs at least the two endpoints, got {len(values)} value(s)")
    vals = [float(v) for v in values]
    ends = 0.5 * (vals[0] + vals[-1])
    if kind == "acc":
        return ends - min(vals)
    if kind == "loss":
        return max(vals) - ends
    raise ValueError(f"barrier kind must be 'acc' or 'loss', got {kind!r}")
