"""Vanishing-feature profile: input-induced feature magnitude per layer and its envelope (method-spec §6.2)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vf_lightning.stats import eval_mode, iter_inputs, model_device

VF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm, nn.LayerNorm)


def vf_layers(model: nn.Module) -> list[str]:
    """Every Conv, Linear, BatchNorm and LayerNorm module (``ChannelLayerNorm`` included), shortcuts too."""
    return [n for n, m in model.named_modules() if isinstance(m, VF_TYPES)]


@torch.no_grad()
def vf_profile(
    model: nn.Module,
    loader: Iterable[object],
    max_samples: int | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """``M^l = mean_x ‖f^l(x) − f^l(0)‖₂ / √dim`` per layer, in execution order, in eval mode.

    ``f^l(0)`` is the layer output for an all-zero input (zero in the loader's, i.e. normalized, space).
    """
    names = list(layers) if layers is not None else vf_layers(model)
    modules = dict(model.named_modules())
    device = model_device(model)
    zero_out: dict[str, torch.Tensor] = {}
    order: list[str] = []
    sums = dict.fromkeys(names, 0.0)
    state = {"zero": True}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            if state["zero"]:
                zero_out[name] = out.detach().clone()
                order.append(name)
                return
            d = (out - zero_out[name]).flatten(1).double()
            sums[name] += float((d.norm(dim=1) / math.sqrt(d.shape[1])).sum())

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    n = 0
    try:
        with eval_mode(model):
            for x in iter_inputs(loader, device, max_samples):
                if state["zero"]:
                    model(torch.zeros_like(x[:1]))
                    state["zero"] = False
                model(x)
                n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("vf_profile got an empty loader")
    return {name: sums[name] / n for name in order}


def vf_ratio(profile: Mapping[str, float], references: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``E^l = M^l(model) / mean_r M^l(r)`` against the endpoints (merging) or the dense model (pruning)."""
    if not references:
        raise ValueError("vf_ratio needs at least one reference profile")
    return {k: v / (sum(r[k] for r in references) / len(references)) for k, v in profile.items()}


def envelope(values: Sequence[float], alpha_s: float = 1.4) -> list[float]:
    """Smoothed upper bound: ``ε^{L−1} = E^{L−1}``, ``ε^l = max(E^l, ε^{l+1}·(1 + (α_s−1)/(L−l+1)))``."""
    e = [float(v) for v in values]
    L = len(e)
    if L == 0:
        return []
    out = [0.0] * L
    out[-1] = e[-1]
    for idx in range(L - 2, -1, -1):
        out[idx] = max(e[idx], out[idx + 1] * (1.0 + (alpha_s - 1.0) / (L - idx + 1)))
    return out


def depth_profile(values: Sequence[float], points: int = 20) -> tuple[list[float], list[float]]:
    """Re-index layers to % of depth and interpolate at ``100/points``%, ..., 100% (``np.interp``)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return [], []
    depth = np.linspace(0.0, 100.0, v.size) if v.size > 1 else np.array([100.0])
    grid = np.linspace(100.0 / points, 100.0, points)
    return grid.tolist(), np.interp(grid, depth, v).tolist()
