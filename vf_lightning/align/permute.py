"""Applying permutations to state dicts and models, the invariance self-check, and compatibility checks."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vf_lightning.align.spec import PermAxis, PermutationSpec
from vf_lightning.stats import eval_mode

Perms = dict[str, torch.Tensor]


def expand_index(perm: torch.Tensor, inner: int) -> torch.Tensor:
    """Index vector permuting blocks of ``inner`` consecutive entries by ``perm``."""
    if inner == 1:
        return perm
    return (perm[:, None] * inner + torch.arange(inner, device=perm.device)[None, :]).reshape(-1)


def permute_axis(t: torch.Tensor, ax: PermAxis, perm: torch.Tensor) -> torch.Tensor:
    """``t`` re-indexed along ``ax.axis`` so that unit ``i`` becomes old unit ``perm[i]`` (only the axis's span)."""
    idx = expand_index(perm.to(t.device), ax.inner)
    n = t.shape[ax.axis]
    offset, length = ax.span(n)
    if length != n:
        full = torch.arange(n, device=t.device)
        full[offset:offset + length] = idx + offset
        idx = full
    return t.index_select(ax.axis, idx)


def identity_perms(spec: PermutationSpec) -> Perms:
    """The identity permutation of every group."""
    return {g.name: torch.arange(g.size) for g in spec.groups}


def head_perm(head_order: torch.Tensor, within: Sequence[torch.Tensor]) -> torch.Tensor:
    """The unit permutation of a head-split group: unit ``(h, i)`` ← ``(head_order[h], within[h][i])``."""
    d = within[0].numel()
    return torch.cat([int(head_order[h]) * d + within[h] for h in range(head_order.numel())])


def random_perms(spec: PermutationSpec, seed: int = 0) -> Perms:
    """A random permutation of every group (block-structured for attention heads), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    heads: dict[str, torch.Tensor] = {}
    out: Perms = {}
    for g in spec.groups:
        if g.heads > 1:
            order = heads.setdefault(g.head_set, torch.randperm(g.heads, generator=gen))
            out[g.name] = head_perm(order, [torch.randperm(g.head_dim, generator=gen) for _ in range(g.heads)])
        else:
            out[g.name] = torch.randperm(g.size, generator=gen)
    return out


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def permute_state_dict(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms) -> dict[str,
                                                                                                     torch.Tensor]:
    """A new state dict with every permuted axis re-indexed by ``perms`` (other entries shared, not copied)."""
    missing = [g.name for g in spec.groups if g.name not in perms]
    if missing:
        raise KeyError(f"no permutation given for group(s) {missing}")
    out = dict(state)
    for g in spec.groups:
        p = perms[g.name]
        if p.numel() != g.size:
            raise ValueError(f"permutation for group {g.name!r} has {p.numel()} entries, the group has {g.size}")
        for ax in g.axes:
            out[ax.key] = permute_axis(out[ax.key], ax, p)
    return out


def apply_permutation(model: nn.Module, spec: PermutationSpec, perms: Perms) -> nn.Module:
    """A copy of ``model`` (same class) whose units are permuted by ``perms``; functionally identical."""
    check_spec_matches(spec, model)
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
    return new


def check_compatible(model_a: nn.Module, model_b: nn.Module) -> None:
    """Refuse two models whose state dicts differ, naming the first mismatching entry (keys, then shapes)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for i, (ka, kb) in enumerate(zip(sa, sb)):
        if ka != kb:
            raise ValueError(f"models differ in architecture: state-dict entry {i} is {ka!r} in model A but {kb!r} "
                             "in model B; align models of the same architecture")
        if sa[ka].shape != sb[kb].shape:
            raise ValueError(f"models differ at parameter {ka!r}: shape {tuple(sa[ka].shape)} in model A vs "
                             f"{tuple(sb[kb].shape)} in model B; align models of the same architecture and width")
    if len(sa) != len(sb):
        longer, which = (sa, "A") if len(sa) > len(sb) else (sb, "B")
        extra = list(longer)[min(len(sa), len(sb))]
        raise ValueError(f"models differ in architecture: parameter {extra!r} exists only in model {which}")


def check_spec_matches(spec: PermutationSpec, model: nn.Module) -> None:
    """Refuse to use ``spec`` on a model whose state-dict layout differs from the one it was traced on."""
    if not spec.shapes:
        return
    state = model.state_dict()
    for key, shape in spec.shapes:
        if key not in state:
            raise ValueError(f"permutation spec was traced on a model with parameter {key!r}, which "
                             f"{type(model).__name__} lacks; rebuild the spec for this model")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"permutation spec expects {key!r} of shape {shape}, the model has "
                             f"{tuple(state[key].shape)}; rebuild the spec for this model")


@torch.no_grad()
def check_permutation_invariance(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor,
                                 seed: int = 0) -> float:
    """Permute every group at random and return max |Δlogit| between the original and the permuted model (eval)."""
    with eval_mode(model):
        permuted = apply_permutation(model, spec, random_perms(spec, seed)).eval()
        ref = model(example_input)
        out = permuted(example_input)
    return float((ref - out).abs().max())
