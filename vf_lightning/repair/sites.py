"""Which layers get corrected, and in which order their statistics can be estimated exactly.

A *statistics site* is either the output of a Conv/Linear layer (where REPAIR-style affine corrections
sit) or the input of a BatchNorm layer (whose running statistics RESET re-estimates). Exact sequential
estimation needs every site measured after all sites upstream of it were fixed. With the model's traced
graph (:class:`~vf_lightning.align.graph.ModelGraph`) we group sites into *levels* (no site of a level is
upstream of another one of the same level). :func:`~vf_lightning.repair.sequential_estimate` walks the levels
over cached values (:class:`~vf_lightning.align.graph.GraphWalk`: every node runs once after the corrections
upstream of it, one forward pass in all) when what it keeps fits ``VF_REPAIR_CACHE_MB``; otherwise it runs,
per level, the graph truncated right after its last site (``runners``): one partial forward pass per level,
roughly ``(levels + 1) / 2`` full passes. A BatchNorm fed directly by a corrected conv needs no pass of its
own: its input statistics follow from the conv's (``mean' = a·m + c``, ``var' = a²·v``). Models that cannot
be traced fall back to one full forward per site, in execution order (exact, slower). Which layers are
corrected by default is the traced graph's rule (:meth:`~vf_lightning.align.graph.ModelGraph.correction_sites`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vf_lightning.align.graph import AFFINE_TYPES, NORM_TYPES, ModelGraph
from vf_lightning.align.spec import UnsupportedOpError

__all__ = [
    "AFFINE_TYPES",
    "NORM_TYPES",
    "SiteKind",
    "SitePlan",
    "batchnorm_sites",
    "default_correction_sites",
    "has_batchnorm",
    "has_normalization",
    "plan_sites",
    "preactivation_sites",
]

SiteKind = Literal["output", "bn"]


def default_correction_sites(model: nn.Module, rule: str | Sequence[str] = "spec") -> list[str]:
    """Conv/Linear layers that REPAIR-style corrections act on, by :meth:`ModelGraph.correction_sites` ``rule``.

    The default ``spec`` rule follows method-spec §5.2: VGG / MLP every hidden layer; ResNet conv1 and conv2 of
    every block (not the stem, not the shortcut projections); never the output layer.
    """
    return ModelGraph.of(model).correction_sites(rule)


def batchnorm_sites(model: nn.Module) -> list[str]:
    """BatchNorm modules that keep running statistics (the ones RESET re-estimates)."""
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def has_normalization(model: nn.Module) -> bool:
    """True when the model contains BatchNorm, LayerNorm, GroupNorm or InstanceNorm layers."""
    return any(isinstance(m, NORM_TYPES) for m in model.modules())


def preactivation_sites(model: nn.Module, exclude: str | None = None) -> list[str]:
    """Where a layer's signal enters its activation, in forward order (:meth:`ModelGraph.variance_sites`): each
    non-output Conv/Linear (nor ``exclude``), or the affine norm layer that directly consumes its output.

    This is where variance collapse is measured: after a BatchNorm/LayerNorm, not before it.
    """
    return ModelGraph.of(model).variance_sites(() if exclude is None else (exclude,))


@dataclass
class SitePlan:
    """Sites grouped into levels in forward order; ``derived[bn] = conv`` marks BNs computed from a conv's stats."""

    kinds: dict[str, SiteKind]
    levels: list[list[str]]
    derived: dict[str, str] = field(default_factory=dict)
    runners: list[Callable[[torch.Tensor], object]] = field(default_factory=list)
    traced: bool = False


def _execution_order(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, _i, n=n: order.append(n) if n not in order else None)
        for n in names
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in order]
    if missing:
        raise RuntimeError(f"site(s) {missing} never ran in a forward pass of {type(model).__name__}")
    return order


def plan_sites(model: nn.Module, kinds: dict[str, SiteKind], example: torch.Tensor) -> SitePlan:
    """Group the sites into exactly-estimable levels (traced graph) or, if tracing fails, one site per level."""
    modules = dict(model.named_modules())
    missing = [n for n in kinds if n not in modules]
    if missing:
        raise KeyError(f"site(s) {missing} are not modules of {type(model).__name__}")
    try:
        graph: ModelGraph | None = ModelGraph.of(model)
    except UnsupportedOpError:  # untraceable model: exact but slower fallback below
        graph = None
    calls = {name: graph.calls(name) for name in kinds} if graph is not None else {}
    if graph is None or any(len(c) != 1 for c in calls.values()):  # a module called twice (or not a leaf) has
        order = _execution_order(model, list(kinds), example)  # no single node: fall back as well
        return SitePlan(kinds, [[n] for n in order], {}, [model] * len(order), traced=False)
    node_of = {name: c[0] for name, c in calls.items()}

    derived: dict[str, str] = {}
    for name in node_of:
        src = graph.sole_source(name) if kinds[name] == "bn" else None
        if src is not None and kinds.get(src) == "output":
            derived[name] = src
    site_nodes = {node: name for name, node in node_of.items()}
    nodes = graph.gm.graph.nodes
    upstream: dict[fx.Node, set[str]] = {}
    level: dict[str, int] = {}
    for node in nodes:
        ups: set[str] = set()
        for inp in node.all_input_nodes:
            ups |= upstream[inp]
            if inp in site_nodes:
                ups.add(site_nodes[inp])
        upstream[node] = ups
        if node in site_nodes:
            name = site_nodes[node]
            if name in derived:
                level[name] = level[derived[name]]
            else:
                level[name] = 1 + max((level[u] for u in ups), default=-1)
    n_levels = 1 + max((lv for n, lv in level.items() if n not in derived), default=-1)
    levels: list[list[str]] = [[] for _ in range(n_levels)]
    for node in nodes:
        if node in site_nodes and site_nodes[node] not in derived:
            levels[level[site_nodes[node]]].append(site_nodes[node])
    runners: list[Callable[[torch.Tensor], object]] = [graph.truncated([node_of[n] for n in lv]) for lv in levels]
    return SitePlan(kinds, levels, derived, runners, traced=True)
