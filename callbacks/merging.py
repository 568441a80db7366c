"""Align + merge + normalize two networks with the library, as ``vf merge`` does (shared by the callbacks).

Permutation matchings (identity | weight | activation) interpolate A and the aligned B and take goal statistics
``combine_goals([stats_A, stats_B'], [1−α, α])`` with references ``[A, B']``; general linear maps (zip | cca)
merge through ``merge_models`` and take A's statistics as the single reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vf_lightning.align import AlignmentResult, align, available_matchers, merge_models
from vf_lightning.merge import interpolate_models
from vf_lightning.repair import NORMALIZATIONS, Goals, combine_goals, has_normalization, normalize, reference_stats

PERMUTATION_MATCHINGS = ("identity", "weight", "activation")


def check_matchings(matchings: Sequence[str], owner: str, permutation_only: bool = False) -> list[str]:
    """Validate matching names against the registry; fail naming the bad ones and the valid choices."""
    names = list(matchings)
    if not names:
        raise ValueError(f"{owner}: give at least one matching ({', '.join(available_matchers())})")
    unknown = [m for m in names if m not in available_matchers()]
    if unknown:
        raise ValueError(f"{owner}: unknown matching {unknown}; choose from {', '.join(available_matchers())}")
    if permutation_only:
        bad = [m for m in names if m not in PERMUTATION_MATCHINGS]
        if bad:
            raise ValueError(f"{owner}: matching {bad} gives general linear maps, not permutations, so there is no "
                             f"interpolation path; choose from {', '.join(PERMUTATION_MATCHINGS)}")  # fmt: skip
    return names


def check_normalizations(names: Sequence[str], owner: str, allowed: Sequence[str] | None = None,
                         allow_auto: bool = False) -> list[str]:  # fmt: skip
    """Validate normalization names (registry, or ``allowed``); ``none`` always comes first in the result."""
    pool = set(allowed if allowed is not None else NORMALIZATIONS)
    pool = pool | {"auto"} if allow_auto else pool - {"auto"}
    valid = sorted(pool)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"{owner}: unknown normalization {bad}; choose from {', '.join(valid)}")
    return ["none", *[n for n in dict.fromkeys(names) if n != "none"]]


def check_bias_calibration(normalizations: Sequence[str], model: nn.Module, owner: str) -> None:
    """``bias_calibration`` is defined for networks without normalization layers only."""
    if "bias_calibration" in normalizations and has_normalization(model):
        raise ValueError(f"{owner}: bias_calibration is defined for networks without normalization layers; this "
                         "network has BatchNorm/LayerNorm — use reset or repair/rescale instead")  # fmt: skip


@dataclass
class MergedPair:
    """A merged model at ``alpha`` with what its normalizations need (references, lazily computed goals)."""

    matching: str
    alpha: float
    alignment: AlignmentResult
    model_a: nn.Module
    model: nn.Module
    b_aligned: nn.Module | None
    calib: Sequence[torch.Tensor]
    stats_a: Goals | None = None
    _stats_b: Goals | None = field(default=None, repr=False)

    @property
    def refs(self) -> list[nn.Module]:
        return [self.model_a, self.b_aligned] if self.b_aligned is not None else []

    def endpoint_stats(self) -> tuple[Goals, Goals | None]:
        """Statistics of A and (permutation matchings) of the aligned B on the calibration data; cached."""
        if self.stats_a is None:
            self.stats_a = reference_stats([self.model_a], self.calib)[0]
        if self.b_aligned is not None and self._stats_b is None:
            self._stats_b = reference_stats([self.b_aligned], self.calib)[0]
        return self.stats_a, self._stats_b

    def goals(self, alpha: float | None = None) -> Goals:
        """Goal (target) statistics at ``alpha`` (default: the merge's): interpolated, or A's alone for zip/cca."""
        a = self.alpha if alpha is None else alpha
        stats_a, stats_b = self.endpoint_stats()
        return stats_a if stats_b is None else combine_goals([stats_a, stats_b], [1 - a, a])

    def normalize(self, name: str, model: nn.Module | None = None, alpha: float | None = None) -> nn.Module:
        """``model`` (default: the merge) after normalization ``name``; ``none`` returns it unchanged."""
        m = self.model if model is None else model
        if name == "none":
            return m
        a = self.alpha if alpha is None else alpha
        needs_goals = name in ("repair", "rescale", "reshift")
        refs = self.refs
        return normalize(m, name, self.calib, refs=refs, weights=[1 - a, a] if len(refs) == 2 else None,
                         goals=self.goals(a) if needs_goals else None, alpha=a)  # fmt: skip


def merge_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    matching: str,
    calib: Sequence[torch.Tensor],
    example_input: torch.Tensor,
    alpha: float = 0.5,
    seed: int = 0,
    max_sweeps: int = 100,
    stats_a: Goals | None = None,
    alignment: AlignmentResult | None = None,
) -> MergedPair:
    """Align B to A with ``matching`` (or reuse ``alignment``) and merge at ``alpha``; ``stats_a`` may be shared."""
    res = alignment or align(model_a, model_b, matching, loader=calib, example_input=example_input, seed=seed,
                             max_sweeps=max_sweeps)  # fmt: skip
    if res.is_permutation:
        b_al = res.aligned_b(model_b).eval()
        merged = interpolate_models(model_a, b_al, alpha).eval()
    else:
        if alpha != 0.5:
            raise ValueError(f"matching {matching!r} merges with fixed ZipIt/CCA weights (α = ½), got alpha={alpha}")
        b_al = None
        merged = merge_models(model_a, model_b, res.spec, res.transforms).to(example_input.device).eval()
    return MergedPair(matching, alpha, res, model_a, merged, b_al, calib, stats_a)
