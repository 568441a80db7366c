"""Per-task TACT and shared REPAIR corrections of a merged body, and per-layer variance ratios (nonlocal-spec §4).

A correction site is the pre-activation of a hidden layer: the output of each body Conv/Linear, or of the
normalization layer that directly consumes it. For each site, in forward order, the merged network's
exact channel mean/std is measured *with all upstream corrections already folded in*, and the affine
``a = σ* / sqrt(σ_M² + ε)`` (capped at ``max_scale`` for dead channels), ``b = μ* − a μ_M`` is folded into
the site layer. TACT uses goals ``(μ*, σ*)`` = expert t on task t's data; shared REPAIR uses the mean over
experts of their statistics on the union of all tasks' data, with one correction for every task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from vf_lightning.multitask.network import fold_into, head_name
from vf_lightning.repair.goals import Goals, combine_goals, reference_stats
from vf_lightning.repair.sites import preactivation_sites
from vf_lightning.stats import iter_inputs

SiteStats = Goals  # per-site channel means and population stds, keyed by module name


def correction_sites(model: nn.Module) -> list[str]:
    """Pre-activation sites of the body in forward order: each Conv/Linear but the head, or the norm right after it."""
    sites = preactivation_sites(model, exclude=head_name(model))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear layer before its head; nothing to correct")
    return sites


def cache_inputs(loader: Iterable[object], max_samples: int | None = None) -> list[torch.Tensor]:
    """The inputs of ``loader`` (first ``max_samples``) as CPU tensors, so that every pass sees the same data."""
    data = [x.cpu() for x in iter_inputs(loader, "cpu", max_samples)]
    if not data:
        raise ValueError("the calibration loader yielded no inputs; give each task some calibration data")
    return data


def site_stats(model: nn.Module, sites: Sequence[str], data: Iterable[object]) -> SiteStats:
    """Exact channel mean/std of every site of ``model`` (eval mode) over ``data``, in one pass."""
    return reference_stats([model], data, list(sites))[0]


def average_stats(stats: Sequence[SiteStats]) -> SiteStats:
    """Goals of shared REPAIR: ``μ* = mean_t μ_t`` and ``σ* = mean_t σ_t`` (the mean of stds, for any N)."""
    if not stats:
        raise ValueError("average_stats needs the statistics of at least one expert")
    return combine_goals(stats)


@torch.no_grad()
def fold_module(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``y ↦ a⊙y + b`` into ``module``'s own parameters (adding a bias Parameter where needed)."""
    params = {f"m.{k}": v.detach() for k, v in module.named_parameters(recurse=False)}
    fold_into(module, params, "m", scale, shift)
    module.weight.copy_(params["m.weight"])  # type: ignore[operator]
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(params["m.bias"].clone())
    else:
        module.bias.copy_(params["m.bias"])  # type: ignore[operator,union-attr]


def affine_to_goal(
    mean: torch.Tensor, std: torch.Tensor, goal_mean: torch.Tensor, goal_std: torch.Tensor, eps: float = 1e-5,
    max_scale: float = 1e3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = min(σ*/sqrt(σ² + ε), max_scale)``, ``b = μ* − a μ``: maps ``(μ, σ)`` to ``(μ*, σ*)`` per channel."""
    a = (goal_std.to(std) / (std * std + eps).sqrt()).clamp(max=max_scale)
    return a, goal_mean.to(mean) - a * mean


@torch.no_grad()
def fit_corrections(
    model: nn.Module,
    sites: Sequence[str],
    goals: SiteStats,
    data: Sequence[torch.Tensor],
    eps: float = 1e-5,
    max_scale: float = 1e3,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sequentially fold affines into ``model`` (in place) so each site hits ``goals`` on ``data``; returns them.

    Site ``s`` is measured with the corrections of every earlier site in place (one pass per site).
    """
    missing = [s for s in sites if s not in goals.mean]
    if missing:
        raise KeyError(f"no goal statistics for site(s) {missing}; compute them with the same site list")
    modules = dict(model.named_modules())
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for s in sites:
        st = site_stats(model, [s], data)
        a, b = affine_to_goal(st.mean[s], st.std[s], goals.mean[s], goals.std[s], eps, max_scale)
        fold_module(modules[s], a, b)
        out[s] = (a, b)
    return out


@torch.no_grad()
def variance_ratios(model: nn.Module, sites: Sequence[str], target: SiteStats, data: Iterable[object]) -> list[float]:
    """Per site, ``mean_c σ_M² / mean_c σ_target²`` of ``model`` on ``data`` (1 = no variance collapse)."""
    st = site_stats(model, sites, data)
    return [float((st.std[s] ** 2).mean() / (target.std[s] ** 2).mean().clamp_min(1e-30)) for s in sites]


def concat_inputs(per_task: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The union of several tasks' calibration inputs (the mixed data of shared REPAIR)."""
    return [x for data in per_task for x in data]


def stats_per_task(
    experts: Sequence[nn.Module], sites: Sequence[str], data: Sequence[Sequence[torch.Tensor]]
) -> list[SiteStats]:
    """``stats[t]`` = expert t's site statistics on task t's data."""
    return [site_stats(m, sites, d) for m, d in zip(experts, data)]


def repair_goals(experts: Sequence[nn.Module], sites: Sequence[str], mixed: Sequence[torch.Tensor]) -> SiteStats:
    """Shared REPAIR goals: every expert's site statistics on the mixed data, averaged over experts."""
    return average_stats([site_stats(m, sites, mixed) for m in experts])


def correction_map(corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[float]]:
    """Summary of a correction set for reports: mean scale and mean |shift| per site."""
    return {s: [float(a.mean()), float(b.abs().mean())] for s, (a, b) in corrections.items()}
