"""State-dict arithmetic (weighted averages, interpolation) and load-time bias recreation: the lowest merge layer.

Imports only torch, so alignment, repair and merging can all build on it without import cycles.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]

AFFINE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _check_same_keys(states: Sequence[StateDict]) -> None:
    """Fail naming the first state dict whose keys or shapes differ from ``states[0]``'s."""
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


def ensure_biases(model: nn.Module, state_dict: StateDict) -> list[str]:
    """Add zero bias Parameters to Conv/Linear layers without bias whose ``<name>.bias`` is in ``state_dict``.

    A folded correction may give a bias-free layer a bias, so checkpoints of repaired models can carry
    ``*.bias`` keys a freshly built model lacks: call this before ``load_state_dict``. Returns the layers changed.
    """
    added = []
    for name, m in model.named_modules():
        key = f"{name}.bias" if name else "bias"
        if isinstance(m, AFFINE_TYPES) and m.bias is None and key in state_dict:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], device=m.weight.device, dtype=m.weight.dtype))
            added.append(name)
    return added
