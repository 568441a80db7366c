"""Weight interpolation, N-model averaging, the interpolation curve and the loss/accuracy barrier (method-spec §4)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


def _check_same_keys(states: Sequence[StateDict]) -> None:
    keys = list(states[0].keys())
    for i, sd in enumerate(states[1:], start=1):
        if list(sd.keys()) != keys:
            missing = sorted(set(keys) - set(sd))
            extra = sorted(set(sd) - set(keys))
            raise KeyError(
                f"state dict {i} does not match state dict 0 (missing {missing[:5]}, extra {extra[:5]}); "
                "interpolate models of the same architecture (call ensure_biases on loaded models first)"
            )
        for k in keys:
            if sd[k].shape != states[0][k].shape:
                raise ValueError(f"state dict {i}: {k!r} has shape {tuple(sd[k].shape)}, expected "
                                 f"{tuple(states[0][k].shape)}")


def average_states(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``Σ_i w_i θ_i`` for every floating-point key (BN buffers included); integer buffers come from ``states[0]``."""
    if not states:
        raise ValueError("average_states needs at least one state dict")
    w = [1.0 / len(states)] * len(states) if weights is None else [float(v) for v in weights]
    if len(w) != len(states):
        raise ValueError(f"got {len(w)} weights for {len(states)} state dicts")
    _check_same_keys(states)
    out: dict[str, torch.Tensor] = {}
    for k, v0 in states[0].items():
        if not torch.is_floating_point(v0):
            out[k] = v0.clone()
            continue
        acc = torch.zeros_like(v0, dtype=torch.float64 if v0.dtype == torch.float64 else torch.float32)
        for wi, sd in zip(w, states):
            acc += wi * sd[k].to(device=acc.device, dtype=acc.dtype)
        out[k] = acc.to(v0.dtype)
    return out


def interpolate_state(sd_a: StateDict, sd_b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """``(1−α)·θ_A + α·θ_B`` on every float key; α=0/1 return exact copies of A/B, integer buffers come from A."""
    if alpha == 0.0 or alpha == 1.0:
        _check_same_keys([sd_a, sd_b])
        src = sd_a if alpha == 0.0 else sd_b
        return {k: (src[k] if torch.is_floating_point(sd_a[k]) else sd_a[k]).clone() for k in sd_a}
    return average_states([sd_a, sd_b], [1.0 - alpha, alpha])


def average_models(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """A new module of ``models[0]``'s class holding the (weighted, default uniform) average of all models."""
    if not models:
        raise ValueError("average_models needs at least one model")
    out = copy.deepcopy(models[0])
    out.load_state_dict(average_states([m.state_dict() for m in models], weights))
    return out


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
