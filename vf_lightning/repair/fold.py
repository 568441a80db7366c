"""Folding per-channel affine corrections into Conv/Linear weights.

A folded correction may give a bias-free conv a new ``bias`` Parameter, so checkpoints of repaired models
can carry ``*.bias`` keys that a freshly built model lacks; loaders call :func:`ensure_biases` (re-exported
here from :mod:`vf_lightning.statedict`) first.
"""

from __future__ import annotations

import torch
from torch import nn

from vf_lightning.repair.sites import AFFINE_TYPES
from vf_lightning.statedict import ensure_biases

__all__ = ["ensure_biases", "fold_affine"]


@torch.no_grad()
def fold_affine(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Make ``module``'s output ``scale ⊙ y + shift`` per output channel: ``W ← a⊙W``, ``b ← a⊙b + c``.

    ``module`` is a Conv/Linear layer or an affine norm layer (BatchNorm, LayerNorm / ChannelLayerNorm over
    channels, GroupNorm: ``γ ← a⊙γ``, ``β ← a⊙β + c``). A bias-free layer gets a zero-initialized bias
    Parameter when ``shift`` is non-zero.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    if not isinstance(module, AFFINE_TYPES + norm_types):
        raise TypeError(f"can only fold into Conv/Linear or affine norm layers, got {type(module).__name__}")
    w = module.weight
    if not isinstance(w, torch.Tensor) or (isinstance(module, norm_types) and w.dim() != 1):
        raise TypeError(f"{type(module).__name__} has no per-channel affine weight to fold a correction into; "
                        "correct the layer before it or build the norm with affine parameters")
    out_ch = w.shape[0]
    if scale.numel() != out_ch or (shift is not None and shift.numel() != out_ch):
        raise ValueError(f"{type(module).__name__} has {out_ch} output channels; correction has {scale.numel()}")
    a = scale.to(device=w.device, dtype=torch.float64)
    w.copy_((w.to(torch.float64) * a.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    needs_bias = shift is not None and bool((shift != 0).any())
    bias = module.bias
    if bias is None and needs_bias:
        bias = module.bias = nn.Parameter(torch.zeros(out_ch, device=w.device, dtype=w.dtype))
    if isinstance(bias, torch.Tensor):
        b = bias.to(torch.float64) * a
        if shift is not None:
            b = b + shift.to(device=w.device, dtype=torch.float64)
        bias.copy_(b.to(bias.dtype))
