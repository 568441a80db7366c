"""Bias calibration and zero bias (method-spec §5.3), for networks without normalization layers.

Depth ``h`` of a bias = number of ``*.weight`` entries seen so far walking the state dict in order (1 at
the first layer). Only entries whose last name component is ``bias`` are calibrated; every other key
(e.g. Fixup scalars) is linearly interpolated. Unlike the reference, buffers are never zeroed: networks
with normalization layers are refused instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from vf_lightning.repair.sites import AFFINE_TYPES, has_normalization
from vf_lightning.statedict import interpolate_state


def _refuse_normalized(model: nn.Module) -> None:
    if has_normalization(model):
        raise ValueError(
            f"bias calibration is only defined for networks without normalization layers, but "
            f"{type(model).__name__} has BatchNorm/LayerNorm; use reset (BatchNorm) or repair/rescale instead"
        )


def bias_depths(state_keys: Sequence[str]) -> dict[str, int]:
    """Depth ``h`` of every ``*.bias`` key: the number of ``*.weight`` keys up to it in state-dict order."""
    h, out = 0, {}
    for k in state_keys:
        leaf = k.rsplit(".", 1)[-1]
        if leaf == "weight":
            h += 1
        elif leaf == "bias":
            out[k] = h
    return out


@torch.no_grad()
def bias_calibrate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """``θ_α`` with weights interpolated linearly and each depth-``h`` bias ``(1−α)^h·b_A + α^h·b_B``."""
    _refuse_normalized(model_a)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    state = interpolate_state(sd_a, sd_b, alpha)
    for k, h in bias_depths(list(sd_a)).items():
        state[k] = ((1 - alpha) ** h * sd_a[k].double() + alpha**h * sd_b[k].double()).to(sd_a[k].dtype)
    out = copy.deepcopy(model_a)
    out.load_state_dict(state)
    return out


@torch.no_grad()
def bias_calibrate_merged(model: nn.Module, alpha: float = 0.5, inplace: bool = False) -> nn.Module:
    """Bias calibration of an already merged model: ``b ← ((1−α)^h + α^h)·b`` (``2^{1−h}·b`` at α=½)."""
    _refuse_normalized(model)
    out = model if inplace else copy.deepcopy(model)
    sd = out.state_dict()
    for k, h in bias_depths(list(sd)).items():
        sd[k].mul_((1 - alpha) ** h + alpha**h)
    return out


@torch.no_grad()
def zero_bias(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Zero every Conv/Linear bias (normalization layers and other parameters untouched)."""
    out = model if inplace else copy.deepcopy(model)
    for m in out.modules():
        bias = getattr(m, "bias", None)
        if isinstance(m, AFFINE_TYPES) and isinstance(bias, torch.Tensor):
            bias.zero_()
    return out
