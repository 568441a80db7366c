"""Which layers get corrected, and in which order their statistics can be estimated exactly.

A *statistics site* is either the output of a Conv/Linear layer (where REPAIR-style affine corrections
sit) or the input of a BatchNorm layer (whose running statistics RESET re-estimates). Exact sequential
estimation needs every site measured after all sites upstream of it were fixed. With a ``torch.fx``
trace we group sites into *levels* (no site of a level is upstream of another one of the same level)
and run, per level, a graph truncated right after its last site: the cost is one partial forward pass
per level, i.e. roughly ``(levels + 1) / 2`` full passes for layers of similar cost. A BatchNorm fed
directly by a corrected conv needs no pass of its own: its input statistics follow from the conv's
(``mean' = a·m + c``, ``var' = a²·v``). Models that cannot be traced fall back to one full forward per
site, in execution order (exact, slower).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

SiteKind = Literal["output", "bn"]


def default_correction_sites(model: nn.Module) -> list[str]:
    """Every Conv/Linear module except the final output layer (the last one registered)."""
    names = [n for n, m in model.named_modules() if isinstance(m, AFFINE_TYPES)]
    return names[:-1]


def batchnorm_sites(model: nn.Module) -> list[str]:
    """BatchNorm modules that keep running statistics (the ones RESET re-estimates)."""
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def has_normalization(model: nn.Module) -> bool:
    """True when the model contains BatchNorm, LayerNorm, GroupNorm or InstanceNorm layers."""
    return any(isinstance(m, NORM_TYPES) for m in model.modules())


class _LeafTracer(fx.Tracer):
    """Keeps conv/linear/norm layers (including subclasses such as ``ChannelLayerNorm``) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, AFFINE_TYPES + NORM_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def preactivation_sites(model: nn.Module, exclude: str | None = None) -> list[str]:
    """Where a layer's signal enters its activation, in forward order: each Conv/Linear output but the output
    layer (``exclude``; default the last one registered), or the affine norm layer that directly consumes it.

    This is where variance collapse is measured: after a BatchNorm/LayerNorm, not before it.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, AFFINE_TYPES)]
    head = names[-1] if exclude is None and names else exclude
    modules = dict(model.named_modules())
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # tracing failures come in many types
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to find its pre-activation sites "
                         f"({e}); pass the site names explicitly") from e
    sites: list[str] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], AFFINE_TYPES) or node.target == head:
            continue
        users = list(node.users)
        site = str(node.target)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], NORM_TYPES):
            if getattr(modules[users[0].target], "weight", None) is not None:
                site = str(users[0].target)
        if site not in sites:
            sites.append(site)
    return sites


@dataclass
class SitePlan:
    """Sites grouped into levels in forward order; ``derived[bn] = conv`` marks BNs computed from a conv's stats."""

    kinds: dict[str, SiteKind]
    levels: list[list[str]]
    derived: dict[str, str] = field(default_factory=dict)
    runners: list[Callable[[torch.Tensor], object]] = field(default_factory=list)
    traced: bool = False


def _truncate(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> fx.GraphModule:
    """A graph module that runs ``gm`` only until every node in ``nodes`` is computed, returning them."""
    wanted = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        wanted.discard(node)
        if not wanted:
            break
    graph.output(tuple(env[n] for n in nodes))
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


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
    """Group the sites into exactly-estimable levels (fx trace) or, if tracing fails, one site per level."""
    modules = dict(model.named_modules())
    missing = [n for n in kinds if n not in modules]
    if missing:
        raise KeyError(f"site(s) {missing} are not modules of {type(model).__name__}")
    try:
        graph = _LeafTracer().trace(model)
        gm = fx.GraphModule(model, graph)
    except Exception:  # untraceable model: exact but slower fallback below
        gm = None
    if gm is not None:
        node_of: dict[str, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in kinds:
                if node.target in node_of:
                    gm = None  # a module called twice has no single site; fall back
                    break
                node_of[str(node.target)] = node
        if gm is not None and len(node_of) != len(kinds):
            gm = None
    if gm is None:
        order = _execution_order(model, list(kinds), example)
        return SitePlan(kinds, [[n] for n in order], {}, [model] * len(order), traced=False)

    derived: dict[str, str] = {}
    for name, node in node_of.items():
        src = node.args[0] if node.args else None
        if kinds[name] == "bn" and isinstance(src, fx.Node) and src.op == "call_module":
            if kinds.get(str(src.target)) == "output" and len(src.users) == 1:
                derived[name] = str(src.target)
    site_nodes = {node: name for name, node in node_of.items()}
    upstream: dict[fx.Node, set[str]] = {}
    level: dict[str, int] = {}
    for node in gm.graph.nodes:
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
    for node in gm.graph.nodes:
        if node in site_nodes and site_nodes[node] not in derived:
            levels[level[site_nodes[node]]].append(site_nodes[node])
    runners: list[Callable[[torch.Tensor], object]] = [_truncate(gm, [node_of[n] for n in lv]) for lv in levels]
    return SitePlan(kinds, levels, derived, runners, traced=True)
