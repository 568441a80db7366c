"""The merge session: the one orchestration of align → merge at α → goals in the merged basis → normalized
variants → diagnostics, shared by every caller (the callbacks of ``vf fit``, ``vf merge`` and ``vf prune``).

Everything is computed once per session and cached: the traced graph and permutation spec, one alignment per
matching, one statistics pass per reference model (all sites at once), merged models, normalized variants,
evaluations and variance ratios. Goal statistics always live in the merged basis:

- permutation matchings (identity | weight | activation): interpolated statistics of A and the aligned B'
  (function-equivalent to B), weights ``[1−α, α]``; N ≥ 3 models: the uniform average over the aligned models;
- ZipIt: both *transformed* endpoints ``A' = T_A(A)`` and ``B' = T_B(B)`` at ``½`` — the merge's channel ``j`` is
  cluster ``j``, not A's channel ``j``, so untransformed statistics would be wrong;
- CCA: the transformed A' alone (the one-reference protocol, method-spec §5.3.5).

Under DDP every rank holds its share of the data: statistics are all-reduced, alignments and models broadcast
from rank 0, and evaluation counts summed, so every rank sees the single-process numbers.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from vf_lightning.align import (
    AlignmentResult,
    ModelGraph,
    PermutationSpec,
    align,
    align_many,
    check_permutation_invariance,
    get_matcher,
    model_maps,
    transform_model,
)
from vf_lightning.diagnostics.variance import variance_ratio as measure_variance_ratio
from vf_lightning.distributed import all_reduce_max, broadcast_module, evaluate_reduced
from vf_lightning.merge.interpolate import average_models, interpolate_models
from vf_lightning.models import fast_memory_format
from vf_lightning.progress import status
from vf_lightning.repair import (
    NORMALIZATIONS,
    FoldPlans,
    Goals,
    Measure,
    combine_goals,
    inference_copy,
    normalize,
    reference_stats,
)
from vf_lightning.stats import iter_inputs

PERMUTATION_MATCHINGS = ("identity", "weight", "activation")
GENERAL_MATCHINGS = ("zip", "cca")
NO_GOALS = ("none", "reset", "zero_bias", "bias_calibration")  # normalizations that never read goal statistics
GoalProtocol = Literal["interpolated", "both_transformed", "one_reference"]
MultiMode = Literal["reference", "sequential", "iterative"]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class SessionError(ValueError):
    """A merge session was asked for something its models or options do not allow."""


@dataclass
class SessionData:
    """This rank's share of the data: calibration inputs, evaluation batches and (optionally) validation batches
    used only to choose between variants (``select``), all on the CPU; ``device`` is where the models run."""

    calib: list[torch.Tensor]
    eval: Batches
    select: Batches | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` calibration inputs on the device (tracing, FLOP counting)."""
        if not self.calib:
            raise SessionError("the session has no calibration inputs")
        return self.calib[0][:n].to(self.device)


@dataclass
class Merge:
    """A merged model and what its normalizations need: the endpoints in the merged basis and their weights."""

    matching: str
    alpha: float | None
    model: nn.Module
    endpoints: list[nn.Module]
    weights: list[float]
    protocol: GoalProtocol
    alignment: AlignmentResult | None = None

    @property
    def equivalent(self) -> bool:
        """Endpoints are function-equivalent to the original networks (permutation matchings)."""
        return self.protocol == "interpolated"


class Timer:
    """Wall time per phase (statistics, matching, normalization, evaluation, ...); each phase is announced to the
    running progress step (:func:`vf_lightning.progress.status`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[float] = []  # per open phase: the seconds of the phases nested in it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; a phase opened inside another (matching inside merging) is counted once, as its own."""
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
        if sync:
            torch.cuda.synchronize()
        status(name)
        t0 = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            nested = self._open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + dt - nested
            if self._open:
                self._open[-1] += dt


class Ensemble(nn.Module):
    """Average of the members' logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def evaluate_model(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device | str, plans: FoldPlans | None = None) -> dict[str, float]:  # fmt: skip
    """``{"acc", "loss"}`` of ``model`` over this rank's batches, reduced over ranks, computed on its
    :func:`~vf_lightning.repair.inference_copy` (BatchNorms folded into the layers before them; ``plans``: the
    caller's :class:`~vf_lightning.repair.FoldPlans`, so that variants of one network are traced once)."""
    return evaluate_reduced(inference_copy(model, plans), batches, device)


def check_matchings(matchings: Sequence[str], owner: str, permutation_only: bool = False) -> list[str]:
    """Validate matching names against the registry, naming the bad ones and the valid choices."""
    names = list(dict.fromkeys(matchings))
    if not names:
        raise SessionError(f"{owner}: give at least one matching")
    for m in names:
        try:
            get_matcher(m)
        except ValueError as e:
            raise SessionError(f"{owner}: {e}") from None
    if permutation_only:
        bad = [m for m in names if m in GENERAL_MATCHINGS]
        if bad:
            raise SessionError(f"{owner}: matching {bad} gives general linear maps, not permutations, so there is no "
                               f"interpolation path; choose from {', '.join(PERMUTATION_MATCHINGS)}")  # fmt: skip
    return names


def check_normalizations(names: Sequence[str], owner: str, allowed: Sequence[str] | None = None,
                         allow_auto: bool = False) -> list[str]:  # fmt: skip
    """Validate normalization names (registry, or ``allowed``); ``none`` always comes first in the result."""
    pool = set(allowed if allowed is not None else NORMALIZATIONS)
    pool = pool | {"auto"} if allow_auto else pool - {"auto"}
    bad = [n for n in names if n not in pool]
    if bad:
        raise SessionError(f"{owner}: unknown normalization {bad}; choose from {', '.join(sorted(pool))}")
    return ["none", *[n for n in dict.fromkeys(names) if n != "none"]]


class MergeSession:
    """Merges of 2..N networks and everything derived from them, computed once and shared by its callers.

    Args:
        models: the networks (A first; A is the reference basis), identical on every rank; put in eval mode and,
            with 2-d convolutions, in ``channels_last`` (in place).
        data: this rank's calibration / evaluation / selection data.
        seed: seed of the matchers and of the self-check permutation.
        options: per-matching options (``{"zip": {"a": 0.3}, "weight": {"max_sweeps": 50}}``).
        correction_sites: the correction-site rule of :meth:`ModelGraph.correction_sites` (``spec``, ``all``) or
            explicit module names.
        multi_mode: how N ≥ 3 models are brought into one basis (reference | sequential | iterative).
    """

    def __init__(self, models: Sequence[nn.Module], data: SessionData, seed: int = 0,
                 options: Mapping[str, Mapping[str, Any]] | None = None, correction_sites: str | Sequence[str] = "spec",
                 multi_mode: MultiMode = "reference") -> None:  # fmt: skip
        if len(models) < 2:
            raise SessionError(f"a merge session needs at least two networks, got {len(models)}")
        self.models = [fast_memory_format(m).eval() for m in models]
        self.data = data
        self.seed = seed
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self.multi_mode = multi_mode
        self.timer = Timer()
        self.graph = ModelGraph.of(self.models[0])
        self.fix_sites = self.graph.correction_sites(correction_sites)
        self.vr_sites = self.graph.variance_sites()
        non_output = [p for p in self.graph.producers if p not in self.graph.output_layers]
        # every site any step reads (REPAIR, variance ratio, PFM's merged part): one pass per reference model
        self.stat_sites = list(dict.fromkeys([*self.fix_sites, *self.vr_sites, *non_output]))
        self._spec: PermutationSpec | None = None
        self._stats: dict[Hashable, Goals] = {}
        self._align: dict[str, AlignmentResult] = {}
        self._merges: dict[tuple[str, float | None], Merge] = {}
        self._normalized: dict[tuple[str, float | None, str], nn.Module] = {}
        self._evals: dict[Hashable, dict[str, float]] = {}
        self._ratios: dict[Hashable, dict[str, float]] = {}
        self._measured: dict[Hashable, Goals] = {}  # a normalized variant's statistics at vr_sites, from its own pass
        self._checks: dict[str, dict[str, Any]] = {}
        self.fold_plans = FoldPlans()  # every merge and variant has A's modules: one trace for all evaluations
        self.cache: dict[Hashable, Any] = {}  # for callers' own derived results (e.g. PFM mergers)

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def is_pair(self) -> bool:
        return len(self.models) == 2

    @property
    def spec(self) -> PermutationSpec:
        """The permutation spec of the architecture (traced once)."""
        if self._spec is None:
            self._spec = self.graph.spec(self.data.example())
        return self._spec

    # ------------------------------------------------------------------------------------------------ alignment
    def alignment(self, matching: str) -> AlignmentResult:
        """B aligned to A with ``matching`` (pairs), identical on every rank; computed once."""
        if not self.is_pair:
            raise SessionError(f"alignment of a pair was asked for, but the session holds {len(self.models)} "
                               "networks; use merge() for N-model matching")  # fmt: skip
        if matching not in self._align:
            a, b = self.models
            with self.timer.phase("matching"):
                res = align(a, b, matching, loader=self.data.calib, spec=self.spec, seed=self.seed,
                            **self.options.get(matching, {}))  # fmt: skip
            self._align[matching] = res.broadcast(self.data.device)
        return self._align[matching]

    def alignment_report(self, matching: str) -> dict[str, Any]:
        """``{"matching", "seconds", "max_abs_logit_diff", "self_check", "groups", ...}`` (report.json ``alignment``).

        ``max_abs_logit_diff`` compares each aligned network with the original on the evaluation inputs (None for
        zip / cca, whose transformed models are not equivalent); ``self_check`` is the largest logit change of A
        under a random permutation of every group (≤ 1e-4 when the traced spec is right).
        """
        if matching not in self._checks:
            m = self.merge(matching)
            info: dict[str, Any] = {"matching": matching, "groups": len(self.spec)}
            if m.alignment is not None:
                info.update({k: v for k, v in m.alignment.summary().items() if k != "groups"})
            info.setdefault("seconds", 0.0)  # the pair's alignment summary has it; N-model matching is not timed
            info["max_abs_logit_diff"] = None
            if m.equivalent:
                diffs = [self._logit_diff(e, orig) for e, orig in zip(m.endpoints[1:], self.models[1:])]
                info["max_abs_logit_diff"] = max(diffs)
            info["self_check"] = self.self_check()
            info["goal_statistics"] = m.protocol
            self._checks[matching] = info
        return self._checks[matching]

    def self_check(self) -> float:
        """max |Δlogit| of A under a random permutation of every group (the spec self-check)."""
        if "self_check" not in self.cache:
            with torch.no_grad():
                self.cache["self_check"] = check_permutation_invariance(self.models[0], self.spec,
                                                                        self.data.example(16), self.seed)
        return float(self.cache["self_check"])

    @torch.no_grad()
    def _logit_diff(self, m1: nn.Module, m2: nn.Module, max_samples: int = 1024) -> float:
        worst = 0.0
        m1.eval()
        m2.eval()
        inputs = [x for x, _ in self.data.eval]
        for x in iter_inputs(inputs, self.data.device, max_samples):
            worst = max(worst, float((m1(x) - m2(x)).abs().max()))
        return all_reduce_max(worst, self.data.device)

    # ------------------------------------------------------------------------------------------------ merging
    def merge(self, matching: str, alpha: float | None = 0.5) -> Merge:
        """The merged model of ``matching`` at ``alpha`` (pairs; ``None`` for N ≥ 3: the uniform average)."""
        alpha = None if not self.is_pair else (0.5 if alpha is None else float(alpha))
        key = (matching, alpha)
        if key not in self._merges:
            with self.timer.phase("merging"):
                self._merges[key] = self._build(matching, alpha)
        return self._merges[key]

    def _build(self, matching: str, alpha: float | None) -> Merge:
        if not self.is_pair:
            return self._merge_many(matching)
        assert alpha is not None
        if not 0.0 <= alpha <= 1.0:
            raise SessionError(f"alpha must lie in [0, 1], got {alpha}")
        a, b = self.models
        res = self.alignment(matching)
        dev = self.data.device
        if res.is_permutation:
            b_al = res.aligned_b(b).to(dev).eval()
            model = interpolate_models(a, b_al, alpha).eval()
            return Merge(matching, alpha, model, [a, b_al], [1 - alpha, alpha], "interpolated", res)
        if alpha != 0.5:
            raise SessionError(f"matching {matching!r} merges with fixed ZipIt/CCA weights (α = ½), got alpha={alpha}")
        a_t = transform_model(a, res.spec, model_maps(res.transforms, "a")).to(dev).eval()
        b_t = transform_model(b, res.spec, model_maps(res.transforms, "b")).to(dev).eval()
        model = average_models([a_t, b_t]).eval()
        if matching == "cca":  # one-reference protocol: B' is not equivalent to B after a general linear map
            return Merge(matching, alpha, model, [a_t], [1.0], "one_reference", res)
        return Merge(matching, alpha, model, [a_t, b_t], [0.5, 0.5], "both_transformed", res)

    def _merge_many(self, matching: str) -> Merge:
        if matching in GENERAL_MATCHINGS:
            raise SessionError(f"N-model merging needs a permutation matching ({', '.join(PERMUTATION_MATCHINGS)}); "
                               f"{matching!r} gives pairwise linear maps")  # fmt: skip
        with self.timer.phase("matching"):
            res = align_many(self.models, mode=self.multi_mode, method=matching, example_input=self.data.example(),
                             loader=self.data.calib, seed=self.seed, **self.options.get(matching, {}))  # fmt: skip
        aligned = [broadcast_module(m.to(self.data.device).eval(), self.data.device) for m in res.models]
        n = len(aligned)
        model = average_models(aligned).eval()
        return Merge(matching, None, model, aligned, [1.0 / n] * n, "interpolated", None)

    # ------------------------------------------------------------------------------------------------ statistics
    def endpoint_stats(self, merge: Merge) -> list[Goals]:
        """Statistics of every endpoint of ``merge`` at every site (one pass per model, cached)."""
        keys = [self._model_key(merge, i) for i in range(len(merge.endpoints))]
        todo = [(k, m) for k, m in zip(keys, merge.endpoints) if k not in self._stats]
        if todo:
            with self.timer.phase("statistics"):
                stats = reference_stats([m for _, m in todo], self.data.calib, self.stat_sites)
            self._stats.update({k: s for (k, _), s in zip(todo, stats)})
        return [self._stats[k] for k in keys]

    def _model_key(self, merge: Merge, i: int) -> Hashable:
        if merge.equivalent and i == 0:
            return ("network", 0)  # A itself: shared by every permutation matching
        if merge.protocol == "interpolated":
            return ("aligned", merge.matching, i)
        return ("transformed", merge.matching, i)

    def goals(self, merge: Merge, sites: Sequence[str] | None = None) -> Goals:
        """Goal statistics of ``merge`` in its merged basis (see the module docstring), at ``sites``."""
        g = combine_goals(self.endpoint_stats(merge), merge.weights)
        return g.subset(list(sites) if sites is not None else self.fix_sites)

    # ------------------------------------------------------------------------------------------------ variants
    def normalized(self, matching: str, normalization: str, alpha: float | None = 0.5) -> nn.Module:
        """The merge after ``normalization`` (a registered name; ``none`` = the merge itself); computed once."""
        m = self.merge(matching, alpha)
        key = (matching, m.alpha, normalization)
        if key not in self._normalized:
            wanted = Measure(self.vr_sites)  # the variance ratio then needs no pass of its own
            self._normalized[key] = self.normalize_model(m, m.model, normalization, wanted)
            if wanted.goals is not None:
                self._measured[key] = wanted.goals
        return self._normalized[key]

    def normalize_model(self, merge: Merge, model: nn.Module, normalization: str,
                        measure: Measure | None = None) -> nn.Module:  # fmt: skip
        """``model`` (the merge, or a variant of it) after ``normalization`` with ``merge``'s goals and references;
        ``measure``: its statistics from the normalization's own pass (:class:`~vf_lightning.repair.Measure`)."""
        if normalization == "none":
            return model
        alpha = 0.5 if merge.alpha is None else merge.alpha
        refs = merge.endpoints if merge.equivalent and len(merge.endpoints) == 2 else []
        goals = None if normalization in NO_GOALS else self.goals(merge)
        with self.timer.phase("normalization"):
            return normalize(model, normalization, self.data.calib, refs=refs,
                             weights=merge.weights if refs else None, goals=goals, sites=self.fix_sites,
                             alpha=alpha, measure=measure).eval()  # fmt: skip

    # ------------------------------------------------------------------------------------------------ measuring
    def evaluate(self, key: Hashable, model: nn.Module, split: Literal["eval", "select"] = "eval") -> dict[str, float]:
        """``{"acc", "loss"}`` of ``model`` on the evaluation (or selection) data, reduced over ranks; cached by key."""
        full = (key, split)
        if full not in self._evals:
            batches = self.data.eval if split == "eval" else self.data.select
            if batches is None:
                raise SessionError("this session has no selection data (SessionData.select)")
            with self.timer.phase("evaluation"):
                self._evals[full] = evaluate_model(model, batches, self.data.device, self.fold_plans)
        return self._evals[full]

    def evaluate_variant(self, matching: str, normalization: str, alpha: float | None = 0.5,
                         split: Literal["eval", "select"] = "eval") -> dict[str, float]:  # fmt: skip
        """Accuracy and loss of a normalized merge (cached)."""
        m = self.merge(matching, alpha)
        return self.evaluate(("variant", matching, m.alpha, normalization), self.normalized(matching, normalization,
                                                                                             alpha), split)

    def endpoint_metrics(self, split: Literal["eval", "select"] = "eval") -> list[dict[str, float]]:
        """Accuracy and loss of every network."""
        return [self.evaluate(("network", i), m, split) for i, m in enumerate(self.models)]

    def ensemble_metrics(self) -> dict[str, float]:
        """Accuracy and loss of the ensemble (mean logits) of every network."""
        return self.evaluate(("ensemble",), Ensemble(self.models).eval())  # eval: evaluate restores this mode

    def variance_ratio(self, matching: str, normalization: str, alpha: float | None = 0.5) -> dict[str, float]:
        """Per variance-ratio site (inputs of the activations), the mean over channels of std(merged)/std(goal)."""
        m = self.merge(matching, alpha)
        key = (matching, m.alpha, normalization)
        if key not in self._ratios:
            model = self.normalized(matching, normalization, alpha)
            target = self.goals(m, self.vr_sites)
            with self.timer.phase("diagnostics"):
                self._ratios[key] = measure_variance_ratio(model, target, self.data.calib,
                                                           known=self._measured.get(key))  # fmt: skip
        return self._ratios[key]
