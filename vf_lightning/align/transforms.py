"""Merge / unmerge matrices (identity, permutation, ZipIt, CCA) and applying them to model weights.

Conventions (method-spec §7.2, §9): per group, ``merge`` is ``C×2C`` and ``unmerge`` is ``2C×C``. Transforming
model X (``m_x``, ``u_x`` of :class:`GroupTransform`) maps every ``out`` axis (producer weight rows and biases,
norm weight / bias / running_mean / running_var) by ``m_x`` and every ``in`` axis (consumer weight columns) by
``u_x``. Like the reference, ``running_var ← m_x · running_var`` is transformed *linearly* (exact for
permutations; an approximation otherwise — re-estimate BN statistics after merging); negative results of a
non-permutation ``M`` are clamped to 0 so the model stays finite.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from vf_lightning.align.permute import check_spec_matches
from vf_lightning.align.results import GroupTransform
from vf_lightning.align.spec import PermAxis, PermutationSpec

Maps = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def mix_axis(t: torch.Tensor, ax: PermAxis, mat: torch.Tensor) -> torch.Tensor:
    """``t`` with unit axis ``ax`` replaced by ``mat @ units`` (blocks of ``inner`` entries move together)."""
    offset, length = ax.span(t.shape[ax.axis])
    if length != t.shape[ax.axis]:  # a chunk of the axis (e.g. the q rows of a fused qkv projection)
        out = t.clone()
        out.narrow(ax.axis, offset, length).copy_(mix_axis(t.narrow(ax.axis, offset, length), replace(ax, offset=0,
                                                                                                    length=0), mat))
        return out
    n = mat.shape[1]
    moved = t.movedim(ax.axis, 0)
    shape = moved.shape
    flat = moved.reshape(n, -1)
    out = mat.to(device=t.device, dtype=torch.float64) @ flat.to(torch.float64)
    return out.reshape((mat.shape[0],) + tuple(shape[1:])).movedim(0, ax.axis).to(t.dtype)


def transform_state_dict(state: Mapping[str, torch.Tensor], spec: PermutationSpec, maps: Maps) -> dict[str,
                                                                                                    torch.Tensor]:
    """Apply per-group ``(M, U)``: ``out`` axes ← ``M ·``, ``in`` axes ← ``· U`` (i.e. ``W ← W U``)."""
    out = dict(state)
    for g in spec.groups:
        if g.name not in maps:
            raise KeyError(f"no transform given for group {g.name!r}")
        m, u = maps[g.name]
        for ax in g.axes:
            out[ax.key] = mix_axis(out[ax.key], ax, m if ax.role == "out" else u.t())
            if ax.kind == "norm" and ax.key.endswith("running_var"):
                out[ax.key] = out[ax.key].clamp_min(0)  # a general M can make variances negative
    return out


def transform_model(model: nn.Module, spec: PermutationSpec, maps: Maps) -> nn.Module:
    """A copy of ``model`` with producer ``W ← M W, b ← M b``, norms ``v ← M v`` and consumer ``W ← W U``."""
    check_spec_matches(spec, model)
    new = copy.deepcopy(model)
    new.load_state_dict(transform_state_dict(model.state_dict(), spec, maps))
    return new


def model_maps(transforms: Mapping[str, GroupTransform], which: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{group: (M, U)}`` for model ``'a'`` or ``'b'``."""
    if which not in ("a", "b"):
        raise ValueError(f"which must be 'a' or 'b', got {which!r}")
    return {k: (t.m_a, t.u_a) if which == "a" else (t.m_b, t.u_b) for k, t in transforms.items()}


def merge_models(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 transforms: Mapping[str, GroupTransform]) -> nn.Module:
    """The averaged merged model ``½(T_A(θ_A) + T_B(θ_B))`` (non-float buffers taken from A)."""
    sa = transform_state_dict(model_a.state_dict(), spec, model_maps(transforms, "a"))
    sb = transform_state_dict(model_b.state_dict(), spec, model_maps(transforms, "b"))
    merged = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    new = copy.deepcopy(model_a)
    new.load_state_dict(merged)
    return new


# ----------------------------------------------------------------------------------------------------------------
# matching functions on a 2C × 2C covariance


def zipit_transform(cov: torch.Tensor, a: float = 0.3, b: float = 0.125) -> GroupTransform:
    """ZipIt! greedy matching on the joint correlation (method-spec §7.2).

    Repeatedly merges the most correlated pair of clusters (−∞ diagonal), the merged cluster's similarities being
    the element-wise minimum times ``a``; each model may do at most ``int((C//2)·b)`` same-model merges (merges of
    two clusters that both contain that model's features). Stops at ``C`` clusters.
    """
    n2 = cov.shape[0]
    c = n2 // 2
    std = cov.diagonal().clamp_min(0).sqrt()
    sim = (cov / torch.outer(std, std).clamp_min(1e-7)).to(torch.float64).clone()
    sim = torch.nan_to_num(sim, nan=0.0)
    neg = float("-inf")
    sim.fill_diagonal_(neg)
    has = torch.zeros(2, n2, dtype=torch.bool)
    has[0, :c] = True
    has[1, c:] = True
    budget = [int((c // 2) * b)] * 2
    members: list[list[int]] = [[i] for i in range(n2)]
    alive = torch.ones(n2, dtype=torch.bool)
    for m in range(2):
        if budget[m] <= 0:
            sim[has[m][:, None] & has[m][None, :]] = neg
    clusters = n2
    while clusters > c:
        idx = int(sim.argmax())
        r, k = divmod(idx, n2)
        if sim[r, k] == neg:
            raise RuntimeError("ZipIt ran out of admissible merges; increase the budget b")
        r, k = min(r, k), max(r, k)
        for m in range(2):
            if has[m, r] and has[m, k]:
                budget[m] -= 1
        members[r] += members[k]
        has[:, r] |= has[:, k]
        merged = torch.minimum(sim[r], sim[k]) * a
        sim[r, :] = merged
        sim[:, r] = merged
        sim[k, :] = neg
        sim[:, k] = neg
        sim[r, r] = neg
        alive[k] = False
        for m in range(2):
            if budget[m] <= 0:
                block = has[m][:, None] & has[m][None, :]
                sim[block] = neg
        clusters -= 1
    keep = alive.nonzero().flatten().tolist()
    unmerge = torch.zeros(n2, c, dtype=torch.float64)
    for col, r in enumerate(keep):
        unmerge[members[r], col] = 1.0
    merge = (unmerge / unmerge.sum(0, keepdim=True)).t().contiguous()
    return GroupTransform(merge, unmerge)


def _sym_pow(s: torch.Tensor, p: float, eps: float = 1e-12) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((s + s.t()) / 2)
    return (vecs * vals.clamp_min(eps).pow(p)) @ vecs.t()


def cca_transform(cov: torch.Tensor, gamma: float = 0.1) -> GroupTransform:
    """Regularised CCA (method-spec §9): B is mapped into A's basis by ``T_B``, unmerged by ``T_B⁻¹``; A by ``I``."""
    c = cov.shape[0] // 2
    cov = cov.to(torch.float64)
    eye = torch.eye(c, dtype=torch.float64, device=cov.device)
    sxx = cov[:c, :c] + gamma * eye
    syy = cov[c:, c:] + gamma * eye
    sxy = cov[:c, c:]
    sxx_h, sxx_ih = _sym_pow(sxx, 0.5), _sym_pow(sxx, -0.5)
    syy_h, syy_ih = _sym_pow(syy, 0.5), _sym_pow(syy, -0.5)
    u, _, vh = torch.linalg.svd(sxx_ih @ sxy @ syy_ih)
    t_b = sxx_h @ u @ vh @ syy_ih
    t_b_inv = syy_h @ vh.t() @ u.t() @ sxx_ih
    merge = torch.cat([eye, t_b], 1) / 2
    unmerge = torch.cat([eye, t_b_inv], 0)
    return GroupTransform(merge.cpu(), unmerge.cpu())
