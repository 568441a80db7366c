"""RESET, REPAIR, RESCALE and RESHIFT, estimated exactly and sequentially, folded into the weights.

Every statistic is an exact population mean / variance over the calibration inputs (float64, streamed,
DDP-reduced), measured in eval mode *after* all corrections and BatchNorm statistics upstream of it were
fixed. Sites are processed level by level (see :mod:`vf_lightning.repair.sites`): over the calibration
inputs cached on the model's device, each node computed once after the corrections upstream of it (one
forward pass in all), or, when those values would exceed ``VF_REPAIR_CACHE_MB`` (default 2048) or an in-place
op reads a value something else reads too, one truncated forward pass per level. With ``max_samples`` the
first ``max_samples`` inputs are cached on the CPU once, so every pass sees the same data even from a shuffled
or augmented loader; without it the loader must yield the same data each time it is iterated.

A :class:`Measure` passed along asks for the corrected model's output statistics at other sites (the variance
ratio's) on the same data: sites whose statistics the walk already fixed (a corrected layer's output ``a·y + c``,
a BatchNorm's output from its exact input statistics) cost nothing, others are read off the cached values; no
extra pass over the data is made for them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from vf_lightning.align.graph import AFFINE_TYPES, GraphWalk, ModelGraph
from vf_lightning.distributed import all_reduce_max
from vf_lightning.repair.fold import fold_affine
from vf_lightning.repair.goals import Goals, batchnorm_output
from vf_lightning.repair.sites import SiteKind, SitePlan, batchnorm_sites, plan_sites
from vf_lightning.stats import (
    Moments,
    Scratch,
    accumulate_moments,
    channel_layout,
    eval_mode,
    iter_inputs,
    model_device,
)

AffineMethod = Literal["repair", "rescale", "reshift"]
OutputHandler = Callable[[str, Moments], "tuple[torch.Tensor, torch.Tensor] | None"]
Stats = tuple[torch.Tensor, torch.Tensor]  # per-channel float64 (mean, population variance)


@dataclass
class Measure:
    """A request, passed to a sequential estimate (RESET, REPAIR, RESCALE, RESHIFT), for the output statistics of
    the model it returns at ``sites`` on its calibration data, e.g. for the variance ratio after a normalization.

    ``goals`` is filled from what the estimate's own pass already holds: a site it corrected, a BatchNorm whose
    running statistics it set (its output follows through the BatchNorm's affine map), or any other node of its
    cached walk. It stays ``None`` when some site would need another pass (a model too large to cache, or a
    normalization that makes no statistics pass): measure those separately.
    """

    sites: Sequence[str]
    goals: Goals | None = field(default=None, init=False)


def calibration_inputs(loader: Iterable[object], max_samples: int | None) -> Iterable[object]:
    """The first ``max_samples`` inputs of ``loader`` as a list of CPU tensors (the loader itself if ``None``)."""
    if max_samples is None:
        return loader
    data = [x.cpu() for x in iter_inputs(loader, "cpu", max_samples)]
    if not data:
        raise ValueError("the calibration loader yielded no inputs")
    return data


def _first_input(data: Iterable[object], device: torch.device) -> torch.Tensor:
    for x in iter_inputs(data, device):
        return x
    raise ValueError("the calibration loader yielded no inputs")


@torch.no_grad()
def sequential_estimate(
    model: nn.Module,
    kinds: dict[str, SiteKind],
    data: Iterable[object],
    on_output: OutputHandler,
    max_samples: int | None = None,
    measure: Measure | None = None,
) -> SitePlan:
    """Walk the sites level by level in eval mode: BN sites get exact running stats, output sites go to ``on_output``.

    ``on_output(name, moments)`` returns the per-channel ``(scale, shift)`` it folded into that layer (or
    ``None`` if it left it unchanged); a BN fed directly by that layer then gets ``a·m + c`` and ``a²·v``.
    ``measure`` gets the corrected model's statistics at its sites where this pass holds them (see
    :class:`Measure`).
    """
    device = model_device(model)
    fixed: dict[str, Stats] = {}  # each site's statistics once fixed: a layer's output, a BatchNorm's input
    with eval_mode(model):
        plan = plan_sites(model, kinds, _first_input(data, device))
        modules = dict(model.named_modules())
        walk = _cached_walk(model, plan, data, device, max_samples)
        if walk is not None:
            _walk_levels(walk, plan, kinds, modules, on_output, fixed)
        else:
            for level, runner in zip(plan.levels, plan.runners):
                outs = [n for n in level if kinds[n] == "output"]
                bns = [n for n in level if kinds[n] == "bn"]
                with accumulate_moments(model, outs) as out_m, accumulate_moments(model, bns, pre=True) as bn_m:
                    for x in iter_inputs(data, device, max_samples):
                        runner(x)
                _fix_level({**out_m, **bn_m}, kinds, plan, modules, on_output, fixed)
        if measure is not None:
            measure.goals = _measured(measure.sites, fixed, kinds, modules, walk)
    return plan


def _measured(sites: Sequence[str], fixed: dict[str, Stats], kinds: dict[str, SiteKind], modules: dict[str, nn.Module],
              walk: GraphWalk | None) -> Goals | None:  # fmt: skip
    """Output statistics at ``sites`` of the model the estimate fixed: a corrected site's from its fixed
    statistics, a re-estimated BatchNorm's through its affine map (exact, float64), the rest off the walk's cached
    values (reduced over ranks, the same sites on every rank); ``None`` if some site needs another pass."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std)
    rest = []
    for name in sites:
        if name in fixed:
            mean, var = fixed[name]
            std = var.clamp_min(0).sqrt()
            # a BatchNorm site's fixed statistics are its input's: its running statistics, its output follows
            stats[name] = (mean, std) if kinds.get(name) == "output" else batchnorm_output(modules[name], mean, std)
        else:
            rest.append(name)
    if rest:
        if walk is None or any(len(walk.graph.calls(n)) != 1 for n in rest):
            return None
        for name, mom in _walk_moments(walk, rest, [walk.graph.node_of(n) for n in rest]).items():
            mom.all_reduce()
            stats[name] = (mom.mean, mom.std)
    return Goals({n: stats[n][0] for n in sites}, {n: stats[n][1] for n in sites})


CACHE_BYTES = int(float(os.environ.get("VF_REPAIR_CACHE_MB", "2048")) * 2**20)


def _cached_walk(model: nn.Module, plan: SitePlan, data: Iterable[object], device: torch.device,
                 max_samples: int | None) -> GraphWalk | None:  # fmt: skip
    """A :class:`GraphWalk` over the calibration inputs when the graph allows it and what it keeps stays within
    :data:`CACHE_BYTES` (``VF_REPAIR_CACHE_MB``; estimated by walking two samples first), else ``None``."""
    if not plan.traced or len(plan.levels) < 2 or CACHE_BYTES <= 0:
        return None
    graph = ModelGraph.of(model)
    fits = GraphWalk.supported(graph)
    inputs: list[torch.Tensor] = []
    if fits:
        head = _first_input(data, device)[:2]
        probe = GraphWalk(graph, [head])
        per_sample = 0.0
        for level in plan.levels:
            probe.compute(probe.envs[0], _level_nodes(graph, level, plan.kinds))
            per_sample = max(per_sample, probe.live_bytes() / head.shape[0])
            probe.release()
        kept = 0.0
        for x in iter_inputs(data, device, max_samples):
            kept += x.shape[0] * per_sample + x.numel() * x.element_size()
            if kept > CACHE_BYTES:
                fits, inputs = False, []
                break
            inputs.append(x)
    # every rank takes the same path (their statistics are all-reduced level by level)
    if all_reduce_max(0.0 if fits and inputs else 1.0, device) > 0:
        return None
    return GraphWalk(graph, inputs)


def _level_nodes(graph: ModelGraph, level: Sequence[str], kinds: dict[str, SiteKind]) -> list[fx.Node]:
    """The nodes whose values a level's statistics read: output sites' own nodes, BN sites' inputs."""
    out = []
    for name in level:
        node = graph.node_of(name)
        out.append(node if kinds[name] == "output" else node.args[0])  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _walk_moments(walk: GraphWalk, names: Sequence[str], nodes: Sequence[fx.Node]) -> dict[str, Moments]:
    """Per-channel moments (this rank's) of each of ``nodes``' values over the walk's batches, keyed by ``names``."""
    moms: dict[str, Moments] = {}
    scratch = Scratch()
    for env in walk.envs:
        for name, v in zip(names, walk.compute(env, nodes)):
            if name not in moms:
                moms[name] = Moments(v.shape[channel_layout(v)[0]], device=v.device)
            moms[name].add(v, scratch=scratch)
    return moms


def _walk_levels(walk: GraphWalk, plan: SitePlan, kinds: dict[str, SiteKind], modules: dict[str, nn.Module],
                 on_output: OutputHandler, fixed: dict[str, Stats]) -> None:  # fmt: skip
    """The level loop of :func:`sequential_estimate` on cached values: each node runs once after the corrections
    upstream of it (a corrected Conv/Linear output is rescaled in place, ``a·y + c``, rather than recomputed)."""
    graph = walk.graph
    for level in plan.levels:
        level = [n for n in level if kinds[n] == "output"] + [n for n in level if kinds[n] == "bn"]  # reduce order
        moms = _walk_moments(walk, level, _level_nodes(graph, level, kinds))
        stale = []
        for name, (a, c) in _fix_level(moms, kinds, plan, modules, on_output, fixed).items():
            node = graph.node_of(name)
            if isinstance(modules[name], AFFINE_TYPES):
                for env in walk.envs:
                    _rescale(env[node], a, c)
            else:  # a norm layer took the correction into its weights: recompute it
                stale.append(node)
        walk.invalidate(stale)
        walk.release()


def _fix_level(moms: dict[str, Moments], kinds: dict[str, SiteKind], plan: SitePlan, modules: dict[str, nn.Module],
               on_output: OutputHandler, fixed: dict[str, Stats]) -> dict[str, Stats]:  # fmt: skip
    """One measured level: all-reduce its moments (in their order, the same on every rank), give BN sites their
    running statistics and output sites to ``on_output``, and a BN derived from an output site ``a·m + c`` and
    ``a²·v``. Records what each site's statistics are now in ``fixed`` (an output site's corrected output, a BN's
    input) and returns the ``(a, c)`` (per channel) folded into each output site that ``on_output`` changed."""
    for mom in moms.values():
        mom.all_reduce()
    folded = {}
    for name, mom in moms.items():
        if kinds[name] == "bn":
            _set_bn_stats(modules[name], mom.mean, mom.var)
            fixed[name] = (mom.mean, mom.var)
            continue
        ac = on_output(name, mom)
        a, c = ac if ac is not None else (torch.ones_like(mom.mean), torch.zeros_like(mom.mean))
        fixed[name] = (a * mom.mean + c, a * a * mom.var)
        for bn, src in plan.derived.items():
            if src == name:
                _set_bn_stats(modules[bn], *fixed[name])
                fixed[bn] = fixed[name]
        if ac is not None:
            folded[name] = (a, c)
    return folded


def _rescale(v: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> None:
    """``v ← a·v + c`` per channel, in place (what the layer with the correction folded in outputs)."""
    cd, _ = channel_layout(v)
    shape = [1] * v.dim()
    shape[cd] = -1
    v.mul_(a.to(v).view(shape)).add_(c.to(v).view(shape))


def _set_bn_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    rm, rv = bn.running_mean, bn.running_var  # type: ignore[union-attr]
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    rm.copy_(mean.to(device=rm.device, dtype=rm.dtype))
    rv.copy_(var.to(device=rv.device, dtype=rv.dtype))


def reset_bn_stats(
    model: nn.Module, loader: Iterable[object], max_samples: int | None = None, inplace: bool = False,
    bn_sites: Sequence[str] | None = None, measure: Measure | None = None,
) -> nn.Module:
    """RESET: every BatchNorm's (or only ``bn_sites``') running mean/var set to the exact population statistics
    of its eval-mode input.

    Layer by layer (upstream BNs already reset and in eval mode); no-op for models without BatchNorm.
    ``measure``: see :class:`Measure`.
    """
    out = model if inplace else copy.deepcopy(model)
    names = batchnorm_sites(out) if bn_sites is None else list(bn_sites)
    if not names:
        return out
    sequential_estimate(out, dict.fromkeys(names, "bn"), calibration_inputs(loader, max_samples), lambda n, m: None,
                        measure=measure)  # fmt: skip
    return out


def affine_coefficients(
    method: AffineMethod, mean: torch.Tensor, var: torch.Tensor, goal_mean: torch.Tensor, goal_std: torch.Tensor,
    eps: float = 1e-5, max_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, c)`` with corrected output ``a·x + c`` for REPAIR, RESCALE (c=0) or RESHIFT (a=1).

    ``a = σ*/sqrt(var + ε)``, capped at ``max_scale`` so that dead channels (var ≈ 0) do not explode.
    """
    goal_mean = goal_mean.to(mean)
    goal_std = goal_std.to(mean)
    if method == "reshift":
        return torch.ones_like(mean), goal_mean - mean
    a = goal_std / (var + eps).sqrt()
    if max_scale is not None:
        a = a.clamp(max=max_scale)
    if method == "rescale":
        return a, torch.zeros_like(mean)
    if method == "repair":
        return a, goal_mean - a * mean
    raise ValueError(f"unknown affine correction {method!r}; choose repair, rescale or reshift")


def affine_correct(
    model: nn.Module,
    goals: Goals,
    loader: Iterable[object],
    method: AffineMethod = "repair",
    sites: Sequence[str] | None = None,
    max_samples: int | None = None,
    eps: float = 1e-5,
    reset_bn: bool = True,
    bn_sites: Sequence[str] | None = None,
    inplace: bool = False,
    max_scale: float | None = None,
    measure: Measure | None = None,
) -> nn.Module:
    """REPAIR / RESCALE / RESHIFT the outputs of ``sites`` (default: ``goals.sites``) towards ``goals``, folded in.

    Corrections are estimated sequentially in forward order, each on the model already corrected upstream.
    Sites may be Conv/Linear layers or affine norm layers (their weight/bias absorb the correction). With
    ``reset_bn`` every other BatchNorm is also RESET in the same walk (as the reference's RESET pass does);
    otherwise stale running statistics would undo the correction. ``max_scale`` caps the scale ``a`` (dead
    channels). ``measure``: see :class:`Measure`. Returns a plain model of the same class.
    """
    out = model if inplace else copy.deepcopy(model)
    names = list(sites) if sites is not None else goals.sites
    missing = [n for n in names if n not in goals.mean]
    if missing:
        raise KeyError(f"no goal statistics for site(s) {missing}; compute goals with the same site list")
    modules = dict(out.named_modules())
    kinds: dict[str, SiteKind] = dict.fromkeys(names, "output")
    if reset_bn:  # a BatchNorm that is itself a site keeps its stats: its corrected output is exact anyway
        resets = batchnorm_sites(out) if bn_sites is None else list(bn_sites)
        kinds.update({n: "bn" for n in resets if n not in kinds})

    def on_output(name: str, mom: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        a, c = affine_coefficients(method, mom.mean, mom.var, goals.mean[name], goals.std[name], eps, max_scale)
        fold_affine(modules[name], a, c)
        return a, c

    sequential_estimate(out, kinds, calibration_inputs(loader, max_samples), on_output, measure=measure)
    return out
