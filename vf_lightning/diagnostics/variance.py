"""Variance ratio per layer: mean over channels of std(merged or pruned) / std(target) (method-spec §6.3)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from vf_lightning.repair.goals import Goals, reference_stats


def variance_ratio_from_stats(stats: Goals, target: Goals, eps: float = 1e-12) -> dict[str, float]:
    """Per site, mean over channels of ``stats.std / target.std`` (channels with zero target std are skipped)."""
    out = {}
    for site in target.sites:
        if site not in stats.std:
            raise KeyError(f"no statistics of the model at site {site!r}; measure the same sites as the target")
        t, s = target.std[site], stats.std[site].to(target.std[site])
        keep = t > eps
        out[site] = float((s[keep] / t[keep]).mean()) if bool(keep.any()) else math.nan
    return out


def variance_ratio(
    model: nn.Module,
    target: Goals,
    loader: Iterable[object],
    sites: Sequence[str] | None = None,
    max_samples: int | None = None,
    known: Goals | None = None,
) -> dict[str, float]:
    """Variance ratio of ``model`` at ``target``'s sites (interpolated endpoint stds, or the dense model's).

    ``target`` usually comes from :func:`vf_lightning.repair.compute_goals` on the same data. ``known``: the
    model's statistics on that data when already measured (a normalization's
    :class:`~vf_lightning.repair.Measure`); used when they cover the sites, else one statistics pass measures them.
    """
    names = list(sites) if sites is not None else target.sites
    if known is not None and all(k in known.std for k in names):
        stats = known
    else:
        with torch.no_grad():
            stats = reference_stats([model], loader, names, max_samples)[0]
    sub = Goals({k: target.mean[k] for k in names}, {k: target.std[k] for k in names})
    return variance_ratio_from_stats(stats, sub)
