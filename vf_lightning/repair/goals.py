"""Reference ("goal") statistics for REPAIR-style corrections: per-site channel means and stds.

Statistics of reference models are computed once (one streamed pass for all references) and combined
per use: interpolated goals ``μ* = Σ wᵢ μᵢ, σ* = Σ wᵢ σᵢ`` (std, not variance, is interpolated), one
reference (weights ``[1]``), or averaged goals (``average=True``: a per-layer uniform value).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vf_lightning.align.graph import ModelGraph
from vf_lightning.align.spec import UnsupportedOpError
from vf_lightning.evaluate import evaluate
from vf_lightning.stats import Moments, accumulate_moments, eval_mode, stream_moments


@dataclass(frozen=True)
class Goals:
    """Per-site float64 channel means and stds (population statistics), keyed by module name."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @property
    def sites(self) -> list[str]:
        return list(self.mean)

    def averaged(self) -> Goals:
        """Data-independent uniform goals per layer: ``μ ← sign(μ)·mean|μ|``, ``σ ← mean σ`` (method-spec §5.2)."""
        mean = {k: torch.sign(v) * v.abs().mean() for k, v in self.mean.items()}
        std = {k: torch.full_like(v, float(v.mean())) for k, v in self.std.items()}
        return Goals(mean, std)

    def scaled(self, factor: float) -> Goals:
        """Both goal statistics multiplied by ``factor``."""
        return Goals({k: v * factor for k, v in self.mean.items()}, {k: v * factor for k, v in self.std.items()})

    def subset(self, sites: Sequence[str]) -> Goals:
        """The goals of ``sites`` only (e.g. split one statistics pass over several site lists)."""
        missing = [k for k in sites if k not in self.mean]
        if missing:
            raise KeyError(f"no statistics at site(s) {missing}")
        return Goals({k: self.mean[k] for k in sites}, {k: self.std[k] for k in sites})

    def to(self, device: torch.device | str) -> Goals:
        return Goals({k: v.to(device) for k, v in self.mean.items()}, {k: v.to(device) for k, v in self.std.items()})


def reference_stats(
    models: Sequence[nn.Module],
    loader: Iterable[object],
    sites: Sequence[str] | None = None,
    max_samples: int | None = None,
) -> list[Goals]:
    """Output statistics of ``sites`` (default: the traced graph's correction sites, method-spec §5.2) for each
    model, in one pass.

    Models run in eval mode (restored afterwards) on the first ``max_samples`` inputs of ``loader``.
    """
    if not models:
        raise ValueError("reference_stats needs at least one reference model")
    names = list(sites) if sites is not None else ModelGraph.of(models[0]).correction_sites()
    with eval_mode(*models):
        derived = affine_derived_sites(models[0], names)
        measured = [n for n in names if n not in derived]
        moments = stream_moments(models, [measured] * len(models), loader, max_samples=max_samples)
        return [_goals(model, names, derived, mom) for model, mom in zip(models, moments)]


def evaluated_stats(model: nn.Module, batches: Iterable[object], sites: Sequence[str],
                    device: torch.device | str | None = None) -> tuple[dict[str, float], Goals]:  # fmt: skip
    """``{"acc", "loss"}`` of ``model`` on the labelled ``batches`` and its output statistics at ``sites`` on the
    same inputs, from one pass (what :func:`~vf_lightning.evaluate.evaluate` and :func:`reference_stats` give
    with a pass each). Statistics are reduced across DDP ranks like :func:`reference_stats`'s; the metrics are
    this rank's."""
    names = list(sites)
    with eval_mode(model):
        derived = affine_derived_sites(model, names)
        measured = [n for n in names if n not in derived]
        with accumulate_moments(model, measured) as store:
            metrics = evaluate(model, batches, device)
        with torch.inference_mode():  # the moments were made in evaluate's inference mode
            for mom in store.values():
                mom.all_reduce()
        return metrics, _goals(model, names, derived, store)


def _goals(model: nn.Module, names: Sequence[str], derived: dict[str, str], moments: dict[str, Moments]) -> Goals:
    """Goals at ``names`` from the moments of the measured sites; a site ``derived`` maps to the measured site
    whose eval-mode BatchNorm it is gets its statistics through the BatchNorm's affine map (exactly, float64)."""
    mean = {n: moments[n].mean for n in moments}
    std = {n: moments[n].std for n in moments}
    modules = dict(model.named_modules())
    for bn, src in derived.items():
        mean[bn], std[bn] = batchnorm_output(modules[bn], mean[src], std[src])
    return Goals({n: mean[n] for n in names}, {n: std[n] for n in names})


def batchnorm_output(bn: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of an eval-mode BatchNorm's output, from its input's: ``y = s·x + t``, float64."""
    scale, shift = batchnorm_affine(bn)
    return scale * mean.to(scale) + shift, scale.abs() * std.to(scale)


def batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of an eval-mode BatchNorm with running statistics, ``y = s·x + t`` per channel, in float64."""
    rm, rv = bn.running_mean, bn.running_var
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    s = 1 / (rv.to(torch.float64) + float(bn.eps)).sqrt()  # type: ignore[arg-type]
    w, b = bn.weight, bn.bias
    if isinstance(w, torch.Tensor):
        s = s * w.detach().to(torch.float64)
    t = -s * rm.to(torch.float64)
    if isinstance(b, torch.Tensor):
        t = t + b.detach().to(torch.float64)
    return s, t


def affine_derived_sites(model: nn.Module, sites: Sequence[str]) -> dict[str, str]:
    """Sites whose output statistics follow from another site's: ``{bn: source}`` for every eval-mode BatchNorm
    with running statistics (a fixed per-channel affine map) that reads exactly the output of site ``source``.

    One statistics pass then records ``source`` only; an untraceable model derives nothing.
    """
    names = set(sites)
    modules = dict(model.named_modules())
    bns = [n for n in sites if isinstance(modules.get(n), _BatchNorm) and not modules[n].training
           and modules[n].track_running_stats and modules[n].running_mean is not None]
    if not bns:
        return {}
    try:
        graph = ModelGraph.of(model)
    except UnsupportedOpError:
        return {}
    pairs = {bn: graph.sole_source(bn) for bn in bns}
    return {bn: src for bn, src in pairs.items() if src is not None and src in names and src not in pairs}


def combine_goals(stats: Sequence[Goals], weights: Sequence[float] | None = None) -> Goals:
    """Weighted goals ``Σ wᵢ μᵢ`` and ``Σ wᵢ σᵢ`` (default uniform weights; ``[1−α, α]`` for a merge at α)."""
    if not stats:
        raise ValueError("combine_goals needs at least one set of reference statistics")
    w = [1.0 / len(stats)] * len(stats) if weights is None else [float(v) for v in weights]
    if len(w) != len(stats):
        raise ValueError(f"got {len(w)} weights for {len(stats)} reference statistics")
    sites = stats[0].sites
    for s in stats[1:]:
        if s.sites != sites:
            raise KeyError("reference statistics cover different sites; compute them with the same site list")
    mean = {k: sum(wi * s.mean[k] for wi, s in zip(w, stats)) for k in sites}
    std = {k: sum(wi * s.std[k] for wi, s in zip(w, stats)) for k in sites}
    return Goals(mean, std)  # type: ignore[arg-type]


def compute_goals(
    refs: Sequence[nn.Module],
    loader: Iterable[object],
    weights: Sequence[float] | None = None,
    sites: Sequence[str] | None = None,
    max_samples: int | None = None,
    average: bool = False,
) -> Goals:
    """Goals from reference models in one pass: interpolated (``weights``), one reference, or ``average``d."""
    goals = combine_goals(reference_stats(refs, loader, sites, max_samples), weights)
    return goals.averaged() if average else goals
