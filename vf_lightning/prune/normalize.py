"""Prune, then re-normalize against the dense model's statistics (method-spec §8)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from vf_lightning.progress import status
from vf_lightning.prune.pruners import prune_model, sparsity_report
from vf_lightning.repair.correct import Measure
from vf_lightning.repair.goals import Goals
from vf_lightning.repair.registry import auto_normalization, normalize


@dataclass
class PruneResult:
    """The pruned model, its normalized version, the normalization actually used and the sparsity report."""

    pruned: nn.Module
    normalized: nn.Module
    normalization: str
    report: dict[str, object] = field(default_factory=dict)


def normalize_pruned(
    pruned: nn.Module,
    dense: nn.Module,
    loader: Iterable[object],
    normalization: str = "auto",
    max_samples: int | None = 4096,
    goals: Goals | None = None,
    sites: Sequence[str] | None = None,
    eps: float = 1e-5,
    measure: Measure | None = None,
) -> tuple[nn.Module, str]:
    """Normalize a pruned model with the dense model as the single reference; ``auto`` = reset | repair | rescale.

    Pass ``goals`` (e.g. ``compute_goals([dense], loader, max_samples=...)``) to reuse them across sparsities;
    ``measure`` asks for the result's statistics (:func:`vf_lightning.repair.normalize`).
    """
    name = auto_normalization(pruned) if normalization == "auto" else normalization
    status(f"normalization ({name})")
    out = normalize(pruned, name, loader, refs=[dense], weights=[1.0], max_samples=max_samples, sites=sites,
                    goals=goals, eps=eps, measure=measure)
    return out, name


def prune_and_normalize(
    dense: nn.Module,
    sparsity: float,
    loader: Iterable[object],
    pruner: str = "global_magnitude",
    normalization: str = "auto",
    max_samples: int | None = 4096,
    goals: Goals | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    fisher_samples: int | None = None,
    eps: float = 1e-5,
) -> PruneResult:
    """One-shot prune ``dense`` to ``sparsity`` and re-normalize it on ``max_samples`` calibration inputs."""
    pruned = prune_model(dense, pruner, sparsity, loader, include, exclude, fisher_samples=fisher_samples)
    normalized, name = normalize_pruned(pruned, dense, loader, normalization, max_samples, goals, eps=eps)
    report = sparsity_report(pruned, include, exclude)
    report.update({"pruner": pruner, "sparsity": sparsity})
    return PruneResult(pruned, normalized, name, report)
