"""Model interpolation, the interpolation curve and the loss/accuracy barrier (method-spec §4).

The state-dict arithmetic lives in :mod:`vf_lightning.statedict`; its names are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
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
    "interpolation_curve",
]


def interpolate_models(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new module ``θ_α = (1−α)·θ_A + α·θ_B`` (B should already be aligned to A)."""
    out = copy.deepcopy(model_a)
    out.load_state_dict(interpolate_state(model_a.state_dict(), model_b.state_dict(), alpha))
    return out


def interpolation_curve(
    model_a: nn.Module,
    model_b_aligned: nn.Module,
    alphas: Sequence[float],
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    normalize_fn: Callable[[nn.Module, float], nn.Module] | None = None,
) -> dict[str, list[float]]:
    """Evaluate ``θ_α`` for each α; ``{"alphas": [...], <metric>: [...]}`` for every metric ``evaluate_fn`` returns.

    Endpoints (α=0 and α=1) are evaluated as they are; interior points are passed through
    ``normalize_fn(model, alpha)`` first when given (e.g. REPAIR with goals interpolated at the same α).
    """
    curve: dict[str, list[float]] = {"alphas": [float(a) for a in alphas]}
    for alpha in curve["alphas"]:
        model = interpolate_models(model_a, model_b_aligned, alpha)
        if normalize_fn is not None and 0.0 < alpha < 1.0:
            model = normalize_fn(model, alpha)
        for key, value in evaluate_fn(model).items():
            curve.setdefault(key, []).append(float(value))
    return curve


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
