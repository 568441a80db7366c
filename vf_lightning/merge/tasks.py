"""Task merging of expert bodies: task arithmetic, TIES, TALL masks and consensus (nonlocal-spec §2).

Every method is a pure function ``fn(anchor, experts, lam, *, options...) -> MergeOutput`` over state dicts
of *bodies* (heads are never merged): an anchor ``θ_0`` and one body per expert ``θ_t``, all with the same
keys. Only floating-point tensors are merged; other entries (e.g. BatchNorm counters) are copied from the
anchor. ``lam`` is the swept scale (λ, or λ_t for TALL); the keyword-only parameters are the method's
typed options. Methods are registered in :data:`TASK_MERGERS`; :func:`merge_bodies` runs one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vf_lightning.registry import Registry

StateDict = dict[str, torch.Tensor]
Scope = Literal["global", "tensor"]
TiesMerge = Literal["mean", "sum"]
TiesVariant = Literal["official", "tact"]
MtlVector = Literal["task_arithmetic", "ties"]


@dataclass(frozen=True)
class MergeOutput:
    """Merged bodies: one shared body (TA, TIES, consensus) or one body per task (TALL)."""

    bodies: list[StateDict]

    @property
    def shared(self) -> bool:
        return len(self.bodies) == 1

    def body(self, task: int) -> StateDict:
        """The body used for ``task``."""
        return self.bodies[0] if self.shared else self.bodies[task]


TaskMerger = Callable[..., MergeOutput]
TASK_MERGERS: Registry[TaskMerger] = Registry("task merging method")

# λ grids searched on validation data by default (nonlocal-spec §2); ``tall`` searches λ_t per task.
DEFAULT_GRIDS: dict[str, list[float]] = {
    "task_arithmetic": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
    "ties": [0.4, 0.6, 0.8, 1.0, 1.2, 1.5],
    "tall": [0.2, 0.3, 0.4, 0.5, 0.6],
    "consensus": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
}


def merge_keys(anchor: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Keys of floating-point tensors, checked to be present with equal shapes in the anchor and every expert."""
    if not experts:
        raise ValueError("merging needs at least one expert body")
    keys = [k for k, v in anchor.items() if torch.is_floating_point(v)]
    for i, e in enumerate(experts):
        if set(e) != set(anchor):
            diff = sorted(set(e) ^ set(anchor))[:4]
            raise KeyError(f"expert {i} and the anchor have different body keys (e.g. {diff}); strip the heads first")
        for k in keys:
            if e[k].shape != anchor[k].shape:
                raise ValueError(f"expert {i}: {k!r} has shape {tuple(e[k].shape)}, anchor {tuple(anchor[k].shape)}")
    return keys


def task_vectors(anchor: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]) -> list[StateDict]:
    """``τ_t = θ_t − θ_0`` over the floating-point keys."""
    keys = merge_keys(anchor, experts)
    return [{k: e[k] - anchor[k] for k in keys} for e in experts]


def add_vector(anchor: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """``θ_0 + scale·τ``; keys missing from ``τ`` (non-float buffers) are copied from the anchor."""
    return {k: (v + scale * vector[k].to(v.dtype)) if k in vector else v.clone() for k, v in anchor.items()}


def sum_vectors(vectors: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Elementwise sum ``Σ_t τ_t``."""
    return {k: torch.stack([v[k] for v in vectors]).sum(0) for k in vectors[0]}


# --------------------------------------------------------------------------------------------------------------
# Task arithmetic


@TASK_MERGERS.register("task_arithmetic")
def task_arithmetic(
    anchor: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], lam: float = 0.3
) -> MergeOutput:
    """Task arithmetic: ``θ_0 + λ Σ_t τ_t`` (λ = 1/T is plain averaging)."""
    return MergeOutput([add_vector(anchor, sum_vectors(task_vectors(anchor, experts)), lam)])


# --------------------------------------------------------------------------------------------------------------
# TIES


def _flatten(vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> torch.Tensor:
    return torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])


def _unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> StateDict:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[i : i + n].reshape(like[k].shape)
        i += n
    return out


def trim_top_k(tau: torch.Tensor, k: float) -> torch.Tensor:
    """Zero all but the ``k`` fraction of largest-magnitude entries of each row (ties at the threshold are kept)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"TIES keep fraction k must be in (0, 1], got {k}")
    d = tau.shape[-1]
    keep = max(1, int(round(d * k)))
    if keep >= d:
        return tau.clone()
    thresh = tau.abs().topk(keep, dim=-1).values[..., -1:]
    return tau * (tau.abs() >= thresh)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """``γ = sgn(Σ_t τ̂_t)`` per entry; exact zeros get the majority of the elected signs (official rule)."""
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority if majority != 0 else torch.ones_like(majority), sign)


def disjoint_merge(
    trimmed: torch.Tensor, sign: torch.Tensor, merge: TiesMerge = "mean", variant: TiesVariant = "official"
) -> torch.Tensor:
    """Average (or sum) of the kept entries that agree with the elected sign.

    ``official``: the mean divides by the number of non-zero agreeing entries. ``tact``: trimmed zeros count
    as agreeing (the tact-merge code), so the divisor is ``T − #disagreeing kept entries``.
    """
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    total = selected.sum(0)
    if merge == "sum":
        return total
    if variant == "official":
        count = (selected != 0).sum(0)
    elif variant == "tact":
        count = (trimmed * sign >= 0).sum(0)
    else:
        raise ValueError(f"unknown TIES variant {variant!r}; choose official or tact")
    return total / count.clamp_min(1).to(total.dtype)


def ties_vector(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    k: float = 0.2,
    scope: Scope = "global",
    merge: TiesMerge = "mean",
    variant: TiesVariant = "official",
) -> StateDict:
    """The TIES multi-task vector ``τ_M`` (trim → elect sign → disjoint merge), before scaling by λ.

    ``scope="global"`` trims over the whole flattened body of each task (official), ``"tensor"`` per tensor.
    """
    keys = list(vectors[0])
    if scope == "global":
        flat = _flatten(vectors, keys)
        trimmed = trim_top_k(flat, k)
        return _unflatten(disjoint_merge(trimmed, elect_sign(trimmed), merge, variant), vectors[0], keys)
    if scope != "tensor":
        raise ValueError(f"unknown TIES scope {scope!r}; choose global or tensor")
    out: StateDict = {}
    for key in keys:
        stacked = torch.stack([v[key].reshape(-1) for v in vectors])
        trimmed = trim_top_k(stacked, k)
        out[key] = disjoint_merge(trimmed, elect_sign(trimmed), merge, variant).reshape(vectors[0][key].shape)
    return out


@TASK_MERGERS.register("ties")
def ties(
    anchor: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    *,
    k: float = 0.2,
    scope: Scope = "global",
    merge: TiesMerge = "mean",
    variant: TiesVariant = "official",
) -> MergeOutput:
    """TIES-merging: ``θ_0 + λ τ_M`` (defaults: official semantics, keep 20 %, global top-k, dis-mean)."""
    tau = ties_vector(task_vectors(anchor, experts), k, scope, merge, variant)
    return MergeOutput([add_vector(anchor, tau, lam)])


# --------------------------------------------------------------------------------------------------------------
# TALL masks and consensus


def multitask_vector(
    vectors: Sequence[Mapping[str, torch.Tensor]], mtl: MtlVector = "task_arithmetic", k: float = 0.2,
    scope: Scope = "global",
) -> StateDict:
    """``τ_MTL``: the plain sum of task vectors, or the TIES dis-sum vector (keep ``k``)."""
    if mtl == "task_arithmetic":
        return sum_vectors(vectors)
    if mtl == "ties":
        return ties_vector(vectors, k=k, scope=scope, merge="sum")
    raise ValueError(f"unknown multi-task vector {mtl!r}; choose task_arithmetic or ties")


def tall_masks(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    mtl: Mapping[str, torch.Tensor],
    lambdas: float | Sequence[float] = 0.4,
    strict: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per-task masks ``m_t = 1[|τ_t| ≥ λ_t |τ_MTL − τ_t|]`` (``strict``: ``>`` as in the reference code)."""
    lams = [float(lambdas)] * len(vectors) if isinstance(lambdas, (int, float)) else [float(x) for x in lambdas]
    if len(lams) != len(vectors):
        raise ValueError(f"TALL got {len(lams)} λ_t values for {len(vectors)} tasks")
    cmp = torch.gt if strict else torch.ge
    return [{key: cmp(v[key].abs(), lam * (mtl[key] - v[key]).abs()) for key in v} for v, lam in zip(vectors, lams)]


@TASK_MERGERS.register("tall")
def tall(
    anchor: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    lam: float | Sequence[float] = 0.4,
    *,
    mtl: MtlVector = "task_arithmetic",
    k: float = 0.2,
    scope: Scope = "global",
    strict: bool = False,
) -> MergeOutput:
    """TALL masks: one body per task, ``θ̃_t = θ_0 + m_t ⊙ τ_MTL`` (``lam`` is λ_t, one value or one per task)."""
    vectors = task_vectors(anchor, experts)
    tau = multitask_vector(vectors, mtl, k, scope)
    masks = tall_masks(vectors, tau, lam, strict)
    return MergeOutput([add_vector(anchor, {key: m[key] * tau[key] for key in tau}) for m in masks])


@TASK_MERGERS.register("consensus")
def consensus(
    anchor: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 0.5,
    *,
    min_tasks: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
    mtl: MtlVector = "task_arithmetic",
    k: float = 0.2,
    scope: Scope = "global",
) -> MergeOutput:
    """Consensus merging: ``θ_0 + λ (c ⊙ τ_MTL)`` keeping entries used by at least ``min_tasks`` TALL masks."""
    vectors = task_vectors(anchor, experts)
    tau = multitask_vector(vectors, mtl, k, scope)
    masks = tall_masks(vectors, tau, tall_lambda)
    keep = {key: torch.stack([m[key] for m in masks]).sum(0) >= min_tasks for key in tau}
    return MergeOutput([add_vector(anchor, {key: keep[key] * tau[key] for key in tau}, lam)])


# --------------------------------------------------------------------------------------------------------------
# Running a method by name


def check_task_options(method: str, options: Mapping[str, Any] | None, owner: str = "task merging") -> None:
    """Fail naming the first option that ``method`` does not accept (or a mistyped value), before any work."""
    TASK_MERGERS.check_options(method, dict(options or {}), owner)


def merge_bodies(
    method: str,
    anchor: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    lam: float | Sequence[float],
    options: Mapping[str, Any] | None = None,
) -> MergeOutput:
    """Run the registered ``method`` (task_arithmetic | ties | tall | consensus) at ``lam`` with ``options``."""
    fn = TASK_MERGERS.get_or_fail(method)
    check_task_options(method, options, f"merge_bodies({method!r})")
    return fn(anchor, experts, lam, **dict(options or {}))
