"""The public ``align`` entry and the registry of matching methods (identity | weight | activation | zip | cca).

A matcher is ``fn(model_a, model_b, spec, loader, *, <options>) -> AlignmentResult``; its options are typed
keyword-only parameters (``MATCHERS.options(name)``), and :func:`align` refuses any it does not declare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

import torch
from torch import nn

from vf_lightning.align.permute import check_compatible, check_spec_matches, identity_perms
from vf_lightning.align.results import AlignmentResult, GroupTransform
from vf_lightning.align.spec import PermutationSpec, build_permutation_spec
from vf_lightning.align.statistics import GroupStats, activation_statistics, cross_correlation
from vf_lightning.align.transforms import cca_transform, zipit_transform
from vf_lightning.align.weight_matching import head_sets, solve_assignments, weight_matching
from vf_lightning.registry import Registry
from vf_lightning.stats import Moments, batch_inputs, model_device


class Matcher(Protocol):
    """A matching method: ``fn(model_a, model_b, spec, loader, *, <typed options>) -> AlignmentResult``."""

    def __call__(self, model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 loader: Iterable[object] | None) -> AlignmentResult: ...


MATCHERS: Registry[Matcher] = Registry("matching method")


def register_matcher(name: str) -> Callable[[Matcher], Matcher]:
    """Register a matching method under ``name`` (usable from configs and :func:`align`)."""
    return MATCHERS.register(name)


def available_matchers() -> list[str]:
    """Names accepted by :func:`align`'s ``method``."""
    return MATCHERS.names()


def get_matcher(method: str) -> Matcher:
    """The registered matcher, or a ``ValueError`` listing the valid names."""
    return MATCHERS.get_or_fail(method)


def _need_loader(method: str, loader: Iterable[object] | None) -> Iterable[object]:
    if loader is None:
        raise ValueError(f"matching {method!r} needs a calibration loader (loader=...)")
    return loader


@register_matcher("identity")
def identity_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                      loader: Iterable[object] | None = None) -> AlignmentResult:
    """No alignment: identity permutations (plain weight averaging)."""
    return AlignmentResult(method="identity", spec=spec, perms=identity_perms(spec))


@register_matcher("weight")
def weight_matcher(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                   loader: Iterable[object] | None = None, *, max_sweeps: int = 100, tol: float = 1e-12,
                   seed: int = 0) -> AlignmentResult:
    """Git Re-Basin weight matching on the two state dicts (see :func:`weight_matching`)."""
    return weight_matching(spec, model_a.state_dict(), model_b.state_dict(), max_sweeps=max_sweeps, tol=tol,
                           seed=seed)


def perms_from_stats(stats: GroupStats, spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """One LAP per group on the A-vs-B correlation (``perm[i]`` = unit of B matched to unit ``i`` of A); the groups
    of an attention head set share one head assignment (:func:`solve_assignments`)."""
    perms: dict[str, torch.Tensor] = {}
    for unit in head_sets(spec):
        groups = [spec.groups[i] for i in unit]
        for g, p in zip(groups, solve_assignments(groups, [cross_correlation(stats[g.name]) for g in groups])):
            perms[g.name] = p
    return perms


@register_matcher("activation")
def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                        loader: Iterable[object] | None = None, *, max_samples: int | None = None,
                        stats: GroupStats | None = None, precision: Literal["native", "float64", "float32"] = "native",
                        ) -> AlignmentResult:
    """Activation matching: correlations of post-activation features from one pass, one LAP per group."""
    if stats is None:
        stats = activation_statistics(model_a, model_b, spec, _need_loader("activation", loader),
                                      max_samples=max_samples, precision=precision)
    perms = perms_from_stats(stats, spec)
    objective = float(sum(cross_correlation(stats[k])[torch.arange(p.numel()), p].sum() for k, p in perms.items()))
    return AlignmentResult(method="activation", spec=spec, perms=perms, objective=objective, sweeps=1)


def _full_stats(method: str, model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                loader: Iterable[object] | None, max_samples: int | None, stats: GroupStats | None) -> GroupStats:
    heads = [g.name for g in spec.groups if g.heads > 1]
    if heads:
        raise ValueError(f"matching {method!r} does not handle attention-head groups ({', '.join(heads[:3])}"
                         f"{', …' if len(heads) > 3 else ''}); use matching 'weight' or 'activation' for Transformers")
    if stats is None:
        return activation_statistics(model_a, model_b, spec, _need_loader(method, loader), full=True,
                                     max_samples=max_samples)
    if not all(isinstance(s, Moments) for s in stats.values()):
        raise ValueError(f"matching {method!r} needs full 2C×2C statistics: activation_statistics(..., full=True)")
    return stats


@register_matcher("zip")
def zip_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 loader: Iterable[object] | None = None, *, a: float = 0.3, b: float = 0.125,
                 max_samples: int | None = None, stats: GroupStats | None = None) -> AlignmentResult:
    """ZipIt! merge / unmerge matrices per group from the joint correlation (a=0.3, b=0.125)."""
    stats = _full_stats("zip", model_a, model_b, spec, loader, max_samples, stats)
    tr = {name: zipit_transform(st.cov(), a=a, b=b) for name, st in stats.items()}  # type: ignore[union-attr]
    return AlignmentResult(method="zip", spec=spec, transforms_=tr)


@register_matcher("cca")
def cca_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 loader: Iterable[object] | None = None, *, gamma: float = 0.1, max_samples: int | None = None,
                 stats: GroupStats | None = None) -> AlignmentResult:
    """Regularised CCA merge / unmerge matrices per group (γ = 0.1)."""
    stats = _full_stats("cca", model_a, model_b, spec, loader, max_samples, stats)
    tr: dict[str, GroupTransform] = {name: cca_transform(st.cov(), gamma=gamma)  # type: ignore[union-attr]
                                     for name, st in stats.items()}
    return AlignmentResult(method="cca", spec=spec, transforms_=tr)


def example_from_loader(loader: Iterable[object], device: torch.device, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of ``loader`` (used to trace the model when no example input is given)."""
    for batch in loader:
        return batch_inputs(batch)[:n].to(device)
    raise ValueError("the loader is empty; cannot take an example input from it")


def matcher_options(method: str, options: Mapping[str, Any], owner: str = "align", seed: int | None = None,
                    max_sweeps: int | None = None) -> dict[str, Any]:
    """``options`` checked against ``method``'s declared ones, plus ``seed`` / ``max_sweeps`` where it declares them.

    ``seed`` and ``max_sweeps`` are the run-wide settings every front-end passes whatever the method; ``None``
    leaves the method's default.
    """
    MATCHERS.check_options(method, options, owner)
    accepted = MATCHERS.options(method)
    shared = {"seed": seed, "max_sweeps": max_sweeps}
    return {**{k: v for k, v in shared.items() if v is not None and k in accepted}, **options}


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    method: str,
    loader: Iterable[object] | None = None,
    example_input: torch.Tensor | None = None,
    spec: PermutationSpec | None = None,
    *,
    seed: int | None = None,
    max_sweeps: int | None = None,
    **options: Any,
) -> AlignmentResult:
    """Align ``model_b`` to ``model_a`` with a registered ``method`` (identity | weight | activation | zip | cca).

    ``options`` are the method's own (``MATCHERS.options(method)``); one it does not declare fails before any
    work. ``seed`` and ``max_sweeps`` are run-wide: passed on only to methods that declare them (weight matching),
    ``None`` keeps the method's default. The spec is traced from ``model_a`` on ``example_input`` (or the loader's
    first batch) unless given. Models of different architectures or widths are refused before any work.
    """
    matcher = get_matcher(method)
    kwargs = matcher_options(method, options, "align", seed, max_sweeps)
    check_compatible(model_a, model_b)
    t0 = time.perf_counter()
    if spec is None:
        if example_input is None:
            if loader is None:
                raise ValueError("align needs example_input (or a loader) to trace the permutation spec")
            example_input = example_from_loader(loader, model_device(model_a))
        spec = build_permutation_spec(model_a, example_input)
    else:
        check_spec_matches(spec, model_a)
    result = matcher(model_a, model_b, spec, loader, **kwargs)
    return AlignmentResult(method=result.method, spec=result.spec, perms=result.perms,
                           transforms_=result.transforms_, objective=result.objective, sweeps=result.sweeps,
                           seconds=time.perf_counter() - t0, history=result.history)
