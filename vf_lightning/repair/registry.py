"""Post-merge / post-prune normalizations registered by name, and the uniform :func:`normalize` entry.

A normalization is ``fn(model, ctx) -> nn.Module`` with a :class:`NormContext` carrying the calibration
data, reference models or precomputed goals, their weights and the correction sites.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from vf_lightning.align.graph import ModelGraph
from vf_lightning.registry import Registry
from vf_lightning.repair.bias import bias_calibrate, bias_calibrate_merged, zero_bias
from vf_lightning.repair.correct import Measure, affine_correct, calibration_inputs, reset_bn_stats
from vf_lightning.repair.goals import Goals, compute_goals
from vf_lightning.repair.sites import has_batchnorm, has_normalization


@dataclass
class NormContext:
    """Inputs shared by every normalization; ``data`` is already cut to ``max_samples`` and cached."""

    data: Iterable[object] | None
    refs: Sequence[nn.Module] = ()
    weights: Sequence[float] | None = None
    goals: Goals | None = None
    sites: Sequence[str] | None = None
    max_samples: int | None = None
    average: bool = False
    alpha: float = 0.5
    eps: float = 1e-5
    bn_sites: Sequence[str] | None = None  # the BatchNorms RESET re-estimates (None = all; PFM: the merged part)
    measure: Measure | None = None  # output statistics wanted after the normalization (a statistics pass fills it)

    def need_data(self, name: str) -> Iterable[object]:
        if self.data is None:
            raise ValueError(f"normalization {name!r} needs a calibration loader")
        return self.data

    def resolve_goals(self, model: nn.Module, name: str) -> Goals:
        """``goals`` if given, else computed from ``refs`` (one pass) on the calibration data, by default at the
        traced graph's correction sites (method-spec §5.2)."""
        if self.goals is not None:
            return self.goals.averaged() if self.average else self.goals
        if not self.refs:
            raise ValueError(f"normalization {name!r} needs reference models (refs=[...]) or precomputed goals")
        sites = list(self.sites) if self.sites is not None else ModelGraph.of(model).correction_sites()
        return compute_goals(self.refs, self.need_data(name), self.weights, sites, self.max_samples, self.average)


Normalization = Callable[[nn.Module, NormContext], nn.Module]
NORMALIZATIONS: Registry[Normalization] = Registry("normalization")


WEIGHT_ONLY: set[str] = set()  # normalizations that act on the merged weights alone (no data, no statistics)


def register_normalization(name: str, weights_only: bool = False) -> Callable[[Normalization], Normalization]:
    """Register a normalization ``fn(model, ctx) -> nn.Module`` under ``name``.

    A statistics normalization honours ``ctx.sites`` / ``ctx.bn_sites`` (so it also works on the merged part of
    a Preserve-First Merging system) and may fill ``ctx.measure`` from its pass; a ``weights_only`` one is
    applied to the plain merged model instead.
    """
    if weights_only:
        WEIGHT_ONLY.add(name)
    return NORMALIZATIONS.register(name)


def get_normalization(name: str) -> Normalization:
    """The normalization registered as ``name``; unknown names fail listing the valid ones."""
    return NORMALIZATIONS.get_or_fail(name)


def auto_normalization(model: nn.Module) -> str:
    """Pruning default: ``reset`` for BatchNorm nets, ``repair`` for LayerNorm nets, ``rescale`` without norms."""
    if has_batchnorm(model):
        return "reset"
    if has_normalization(model):
        return "repair"
    return "rescale"


@register_normalization("none")
def _none(model: nn.Module, ctx: NormContext) -> nn.Module:
    return copy.deepcopy(model)


@register_normalization("reset")
def _reset(model: nn.Module, ctx: NormContext) -> nn.Module:
    return reset_bn_stats(model, ctx.need_data("reset"), max_samples=ctx.max_samples, bn_sites=ctx.bn_sites,
                          measure=ctx.measure)  # fmt: skip


def _affine(method: str) -> Normalization:
    def run(model: nn.Module, ctx: NormContext) -> nn.Module:
        goals = ctx.resolve_goals(model, method)
        return affine_correct(model, goals, ctx.need_data(method), method, ctx.sites, ctx.max_samples,  # type: ignore[arg-type]
                              ctx.eps, bn_sites=ctx.bn_sites, measure=ctx.measure)

    return run


for _m in ("repair", "rescale", "reshift"):
    register_normalization(_m)(_affine(_m))


@register_normalization("bias_calibration", weights_only=True)
def _bias_calibration(model: nn.Module, ctx: NormContext) -> nn.Module:
    """Two references ``[A, B']`` with weights ``[1−α, α]``: endpoint form; no references: merged-model form."""
    if len(ctx.refs) == 2:
        alpha = float(ctx.weights[1]) if ctx.weights is not None else ctx.alpha
        return bias_calibrate(ctx.refs[0], ctx.refs[1], alpha)
    if ctx.refs:
        raise ValueError(f"bias_calibration takes two endpoint models or none, got {len(ctx.refs)}")
    return bias_calibrate_merged(model, ctx.alpha)


@register_normalization("zero_bias", weights_only=True)
def _zero_bias(model: nn.Module, ctx: NormContext) -> nn.Module:
    return zero_bias(model)


def normalize(
    model: nn.Module,
    name: str,
    loader: Iterable[object] | None = None,
    refs: Sequence[nn.Module] = (),
    weights: Sequence[float] | None = None,
    max_samples: int | None = None,
    sites: Sequence[str] | None = None,
    goals: Goals | None = None,
    average: bool = False,
    alpha: float = 0.5,
    eps: float = 1e-5,
    bn_sites: Sequence[str] | None = None,
    measure: Measure | None = None,
) -> nn.Module:
    """Apply normalization ``name`` (or ``auto``) to a merged or pruned model; returns a new plain model.

    ``refs``/``weights`` give the goal statistics (``[A, B']`` with ``[1−α, α]`` for a merge, ``[dense]`` for
    pruning); pass ``goals`` to reuse precomputed ones. ``average`` selects averaged goals; ``alpha`` is the
    merge coefficient for ``bias_calibration`` without references; ``eps`` is REPAIR/RESCALE's ``√(v+ε)``;
    ``bn_sites`` limits which BatchNorms RESET re-estimates. ``measure`` asks for the result's output statistics
    at its sites on the calibration data, filled (``measure.goals``) where the normalization's own pass holds them
    (:class:`~vf_lightning.repair.correct.Measure`), else left ``None``.
    """
    if name == "auto":
        name = auto_normalization(model)
    fn = get_normalization(name)
    data = calibration_inputs(loader, max_samples) if loader is not None else None
    ctx = NormContext(data, refs, weights, goals, sites, max_samples, average, alpha, eps, bn_sites, measure)
    return fn(model, ctx)
