"""Multi-task merging of experts: merge bodies per method × λ, correct (none | REPAIR | TACT), choose λ on
validation data, report test accuracies and variance ratios (nonlocal-spec §2-§4).

Plain functions over in-memory :class:`Expert` records and lists of tensors; no printing, files or logging
(only :mod:`vf_lightning.progress` hooks, silent outside a caller's progress step).
Corrections are the repair layer's :func:`~vf_lightning.repair.affine_correct` (exact, sequential, folded into
the site layers): TACT with per-task goals (expert t on task t's calibration data), shared REPAIR with the
mean over experts of their statistics on the union of all tasks' calibration data. Sites are the
pre-activations of the body (:func:`~vf_lightning.repair.preactivation_sites`), which is also where the
variance ratio (:func:`~vf_lightning.diagnostics.variance.variance_ratio`) is measured. Everything runs on
the experts' device. Entry point: :func:`merge_experts`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from vf_lightning.diagnostics.variance import variance_ratio_from_stats
from vf_lightning.evaluate import evaluate
from vf_lightning.merge.experts import (
    Expert,
    MultiTaskModel,
    StateDict,
    TaskView,
    align_through_foundations,
    check_align_options,
    relative_distance,
    task_network,
    unaligned_anchor,
)
from vf_lightning.merge.tasks import DEFAULT_GRIDS, TASK_MERGERS, MergeOutput, check_task_options, merge_bodies
from vf_lightning.models import ModelConfig
from vf_lightning.progress import advance, status
from vf_lightning.repair.correct import affine_correct
from vf_lightning.repair.goals import Goals, combine_goals, evaluated_stats, reference_stats
from vf_lightning.repair.sites import batchnorm_sites, preactivation_sites

Correction = Literal["none", "repair", "tact"]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TaskData:
    """One task's data: unlabeled calibration inputs, labelled validation (λ choice) and test batches."""

    name: str
    calib: list[torch.Tensor]
    val: Batches
    test: Batches


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 512) -> Batches:
    """Split tensors into ``(x, y)`` batches."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def inputs_of(data: Batches) -> list[torch.Tensor]:
    """The inputs of labelled batches."""
    return [x for x, _ in data]


@dataclass
class Prepared:
    """Everything about the experts that every merge variant reuses (computed once per anchor)."""

    anchor: StateDict
    bodies: list[StateDict]
    heads: list[StateDict]
    configs: list[ModelConfig]
    sites: list[str]
    expert_val: list[float]
    expert_test: list[float]
    tact_goals: list[Goals]
    repair_goals: Goals
    test_stats: list[Goals]

    @property
    def config(self) -> ModelConfig:
        return self.configs[0]


def prepare(anchor: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
            sites: Sequence[str] | None = None) -> Prepared:
    """Split experts into bodies and heads, find the correction sites and compute every expert statistic once."""
    if len(experts) != len(tasks):
        raise ValueError(f"got {len(experts)} experts for {len(tasks)} tasks; give one expert per task")
    nets = [e.network() for e in experts]
    site_list = list(sites) if sites is not None else preactivation_sites(nets[0])
    if not site_list:
        raise ValueError(f"{type(nets[0]).__name__} has no Conv/Linear layer before its head; nothing to correct")
    splits = [e.split() for e in experts]
    mixed = [x for t in tasks for x in t.calib]
    tested = [evaluated_stats(n, t.test, site_list) for n, t in zip(nets, tasks)]  # accuracy and statistics
    return Prepared(
        anchor=anchor,
        bodies=[b for b, _ in splits],
        heads=[h for _, h in splits],
        configs=[e.config for e in experts],
        sites=site_list,
        expert_val=[evaluate(n, t.val)["acc"] for n, t in zip(nets, tasks)],
        expert_test=[metrics["acc"] for metrics, _ in tested],
        tact_goals=[reference_stats([n], t.calib, site_list)[0] for n, t in zip(nets, tasks)],
        repair_goals=combine_goals(reference_stats(nets, mixed, site_list)),
        test_stats=[stats for _, stats in tested],
    )


# ----------------------------------------------------------------------------------------------- corrections
def corrected_entries(net: nn.Module, sites: Sequence[str]) -> StateDict:
    """The state entries a correction may change: the site layers' parameters and every BatchNorm's statistics."""
    owners = set(sites) | set(batchnorm_sites(net))
    return {k: v for k, v in net.state_dict().items() if k.rpartition(".")[0] in owners}


def correct_body(config: ModelConfig, body: StateDict, head: StateDict, goals: Goals, calib: Sequence[torch.Tensor],
                 sites: Sequence[str], eps: float = 1e-5, max_scale: float | None = 1e3) -> StateDict:
    """REPAIR ``body`` (with ``head``) towards ``goals`` on ``calib``; returns the entries it changed.

    TACT is this with task t's expert statistics on task t's data as ``goals``.
    """
    net = task_network(config, body, head)
    affine_correct(net, goals, calib, "repair", sites=sites, eps=eps, inplace=True, max_scale=max_scale)
    return corrected_entries(net, sites)


def corrected_model(prep: Prepared, merged: MergeOutput, tasks: Sequence[TaskData], correction: Correction,
                    eps: float = 1e-5, max_scale: float | None = 1e3) -> MultiTaskModel:
    """The multi-task model of ``merged`` with no correction, shared REPAIR or per-task TACT."""
    T = len(prep.heads)
    overrides: list[StateDict] | None = None
    if correction == "tact":
        overrides = [correct_body(prep.configs[t], merged.body(t), prep.heads[t], prep.tact_goals[t], tasks[t].calib,
                                  prep.sites, eps, max_scale) for t in range(T)]
    elif correction == "repair":
        mixed = [x for t in tasks for x in t.calib]
        per_body = [correct_body(prep.configs[i], body, prep.heads[i], prep.repair_goals, mixed, prep.sites, eps,
                                 max_scale) for i, body in enumerate(merged.bodies)]
        overrides = [per_body[0] if merged.shared else per_body[t] for t in range(T)]
    elif correction != "none":
        raise ValueError(f"unknown correction {correction!r}; choose none, repair or tact")
    return MultiTaskModel(prep.config, merged.bodies, prep.heads, prep.configs, overrides)


def task_accuracies(model: MultiTaskModel, tasks: Sequence[TaskData], split: Literal["val", "test"]) -> list[float]:
    """Accuracy of every task (merged body + that task's corrections and head) on its ``split``."""
    return [evaluate(TaskView(model, t), getattr(task, split))["acc"] for t, task in enumerate(tasks)]


def ratio_of_mean_variances(stats: Goals, target: Goals) -> dict[str, float]:
    """Per site, ``mean_c σ_M² / mean_c σ_target²`` (the multi-task paper's variance ratio)."""
    return {s: float((stats.std[s].to(target.std[s]) ** 2).mean() / (target.std[s] ** 2).mean().clamp_min(1e-30))
            for s in target.sites}


def task_test_numbers(model: MultiTaskModel, task: int, prep: Prepared, data: TaskData
                      ) -> tuple[float, dict[str, float], dict[str, float]]:
    """Task ``task``'s test accuracy, variance ratio (mean over channels of std ratios) and ratio of mean
    variances at the sites against expert ``task``'s statistics, from one pass over its test data."""
    metrics, stats = evaluated_stats(model.task_network(task), data.test, prep.sites)
    target = prep.test_stats[task]
    return metrics["acc"], variance_ratio_from_stats(stats, target), ratio_of_mean_variances(stats, target)


# ------------------------------------------------------------------------------------------------- variants
@dataclass
class VariantResult:
    """The chosen λ of one (method, correction) variant and its per-task test numbers."""

    method: str
    correction: str
    lam: list[float]
    acc: list[float]
    normalized: list[float]
    variance_ratio: list[dict[str, float]]
    variance_ratio_of_means: list[dict[str, float]]
    val_curve: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_normalized(self) -> float:
        return sum(self.normalized) / len(self.normalized)

    def curve(self, sites: Sequence[str], of_means: bool = False) -> list[float]:
        """Per site, the variance ratio averaged over tasks."""
        per_task = self.variance_ratio_of_means if of_means else self.variance_ratio
        return [sum(v[s] for v in per_task) / len(per_task) for s in sites]


def run_variant(prep: Prepared, tasks: Sequence[TaskData], method: str, correction: Correction,
                grid: Sequence[float] | None = None, options: Mapping[str, Any] | None = None, eps: float = 1e-5,
                max_scale: float | None = 1e3) -> VariantResult:
    """Sweep λ over ``grid`` on validation data, keep the best (per task for ``tall``), report test numbers."""
    t0 = time.perf_counter()
    lams = list(grid if grid is not None else DEFAULT_GRIDS[method])
    if not lams:
        raise ValueError(f"the λ grid of {method!r} is empty")
    val_norm: dict[float, list[float]] = {}
    models: dict[float, MultiTaskModel] = {}
    for lam in lams:
        merged = merge_bodies(method, prep.anchor, prep.bodies, lam, options)
        models[lam] = corrected_model(prep, merged, tasks, correction, eps, max_scale)
        val = task_accuracies(models[lam], tasks, "val")
        val_norm[lam] = [a / max(e, 1e-12) for a, e in zip(val, prep.expert_val)]
    if method == "tall":  # λ_t per task: task t's body and correction depend only on its own λ_t
        chosen = [max(lams, key=lambda lam, t=t: val_norm[lam][t]) for t in range(len(tasks))]  # type: ignore[misc]
    else:
        best = max(lams, key=lambda lam: sum(val_norm[lam]))
        chosen = [best] * len(tasks)
    acc, vr, vrm = [], [], []
    for t, task in enumerate(tasks):
        accuracy, ratios, of_means = task_test_numbers(models[chosen[t]], t, prep, task)
        acc.append(accuracy)
        vr.append(ratios)
        vrm.append(of_means)
    norm = [a / max(e, 1e-12) for a, e in zip(acc, prep.expert_test)]
    curve = {str(lam): v for lam, v in val_norm.items()}
    return VariantResult(method, correction, chosen, acc, norm, vr, vrm, curve, time.perf_counter() - t0)


def result_rows(res: VariantResult, prep: Prepared, tasks: Sequence[TaskData], aligned: bool) -> list[dict[str, Any]]:
    """Report rows, one per task: task, method, correction, aligned, lam, acc, normalized_acc, expert_acc, ..."""
    return [
        {
            "task": task.name,
            "method": res.method,
            "correction": res.correction,
            "aligned": aligned,
            "lam": res.lam[t],
            "acc": res.acc[t],
            "normalized_acc": res.normalized[t],
            "expert_acc": prep.expert_test[t],
            "variance_ratio": res.variance_ratio[t],
            "variance_ratio_of_means": res.variance_ratio_of_means[t],
            "seconds": res.seconds / len(tasks),
        }
        for t, task in enumerate(tasks)
    ]


def variant_key(method: str, correction: str, aligned: bool) -> str:
    """``"<method>/<correction>/<aligned|unaligned>"``: the key of a variant's variance-ratio curve."""
    return f"{method}/{correction}/{'aligned' if aligned else 'unaligned'}"


# ------------------------------------------------------------------------------------------------- entry point
@dataclass
class MultiTaskResult:
    """What :func:`merge_experts` measured (accuracies are fractions; the rows and curves go into report.json).

    ``rows``: one per (aligned, method, correction, task), see :func:`result_rows`. ``experts``: per task
    ``{"task", "foundation", "classes", "acc", "val_acc", "distance"}`` (test / validation accuracy of the expert,
    relative distance of its body from its foundation's, :func:`~vf_lightning.merge.experts.relative_distance`).
    ``variance_ratio`` / ``variance_ratio_of_means``: ``{"layers": sites, "curves": {variant_key: per-layer
    mean over tasks}}``. ``summary``: per variant ``{"method", "correction", "aligned", "lam", "mean_acc",
    "mean_normalized_acc", "seconds"}``. ``alignment``: ``{"matching", "seconds", "groups", "reference"}``
    (``{"matching": "none"}`` when nothing was aligned). ``timing``: seconds per phase.
    """

    rows: list[dict[str, Any]]
    experts: list[dict[str, Any]]
    variance_ratio: dict[str, Any]
    variance_ratio_of_means: dict[str, Any]
    summary: list[dict[str, Any]]
    alignment: dict[str, Any]
    timing: dict[str, float]


def _check_request(experts: Sequence[Expert], foundations: Mapping[str, Expert], tasks: Sequence[TaskData],
                   methods: Sequence[str], corrections: Sequence[str], grids: Mapping[str, Sequence[float]],
                   options: Mapping[str, Mapping[str, Any]], align_options: Mapping[str, Any] | None,
                   reference: str) -> list[str]:
    """Validate everything before any work; returns the foundations the experts use."""
    if not experts:
        raise ValueError("merge_experts got no experts")
    if len(experts) != len(tasks):
        raise ValueError(f"got {len(experts)} experts for {len(tasks)} tasks; give one task's data per expert")
    for m in [*methods, *grids, *options]:
        TASK_MERGERS.get_or_fail(m)
    for m, opts in options.items():
        check_task_options(m, opts, f"options[{m!r}]")
    bad = [c for c in corrections if c not in get_args(Correction)]
    if bad:
        raise ValueError(f"unknown correction(s) {bad}; choose from {', '.join(get_args(Correction))}")
    check_align_options(align_options)
    used = sorted({e.foundation or reference for e in experts})
    missing = [f for f in used if f not in foundations]
    if missing:
        raise ValueError(f"experts name foundation(s) {missing} that are not among the foundations "
                         f"{sorted(foundations)}")
    return used


def merge_experts(
    experts: Sequence[Expert],
    foundations: Mapping[str, Expert],
    tasks: Sequence[TaskData],
    methods: Sequence[str] = ("task_arithmetic", "ties", "tall", "consensus"),
    corrections: Sequence[Correction] = ("none", "repair", "tact"),
    aligned: Sequence[bool] = (True, False),
    grids: Mapping[str, Sequence[float]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    align_options: Mapping[str, Any] | None = None,
    eps: float = 1e-5,
    max_scale: float | None = 1e3,
    reference: str = "a",
    sites: Sequence[str] | None = None,
) -> MultiTaskResult:
    """Merge the experts' bodies with every method × λ, correct them, choose λ on validation data, report test data.

    ``experts[i]`` is evaluated on ``tasks[i]``; ``foundations`` maps names (``Expert.foundation``, empty means
    ``reference``) to foundation networks. ``aligned``: with and/or without weight matching through the
    foundations (skipped when all experts share one foundation: the local setting). ``grids`` and ``options``
    are per method (``options`` are the methods' keyword-only options; a misspelt one fails before any work).
    ``max_scale`` caps the correction's scale on dead channels. Runs on the experts' device.
    """
    grids, options = dict(grids or {}), dict(options or {})
    used = _check_request(experts, foundations, tasks, methods, corrections, grids, options, align_options,
                          reference)
    if any(aligned) and len(used) > 2:
        raise ValueError(f"alignment supports two foundations (reference {reference!r} + one); experts use {used}")
    if any(aligned) and len(used) == 2 and reference not in used:
        raise ValueError(f"reference foundation {reference!r} is none of the experts' foundations {used}")
    experts = [e if e.foundation else Expert(e.name, e.config, e.state, reference, e.classes) for e in experts]
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    curves_of_means: dict[str, list[float]] = {}
    alignment: dict[str, Any] = {"matching": "none"}
    timing = {"align": 0.0, "prepare": 0.0, "variants": 0.0}
    prep: Prepared | None = None
    for align in dict.fromkeys(aligned):
        if align and len(used) < 2:
            continue  # local setting: one foundation, nothing to align
        t0 = time.perf_counter()
        if align:
            other = next(f for f in used if f != reference)
            example = tasks[0].calib[0][:4]
            al = align_through_foundations(foundations[reference], foundations[other], experts, example, align_options)
            anchor, variant_experts = al.anchor, al.experts
            alignment = {"matching": "weight", "seconds": al.seconds, "groups": al.groups, "reference": reference}
        else:
            anchor, variant_experts = unaligned_anchor([foundations[f] for f in used]), list(experts)
        timing["align"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        prep = prepare(anchor, variant_experts, tasks, sites)
        timing["prepare"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for method in methods:
            for corr in corrections:
                status(f"{method}/{corr}/{'aligned' if align else 'unaligned'}")
                res = run_variant(prep, tasks, method, corr, grids.get(method), options.get(method), eps, max_scale)
                rows += result_rows(res, prep, tasks, align)
                key = variant_key(method, corr, align)
                curves[key] = res.curve(prep.sites)
                curves_of_means[key] = res.curve(prep.sites, of_means=True)
                summary.append({"method": method, "correction": corr, "aligned": align, "lam": res.lam,
                                "mean_acc": sum(res.acc) / len(res.acc), "mean_normalized_acc": res.mean_normalized,
                                "seconds": res.seconds})
                advance(key, normalized_acc=res.mean_normalized)  # the caller's progress step, if any
        timing["variants"] += time.perf_counter() - t0
    if prep is None:
        raise ValueError("merge_experts ran no variant: `aligned` lists only True but the experts share one "
                         "foundation; add False (the local setting needs no alignment)")
    expert_rows = [{"task": e.name, "foundation": e.foundation, "classes": list(e.classes), "acc": acc, "val_acc": val,
                    "distance": relative_distance(foundations[e.foundation].split()[0], e.split()[0])}
                   for e, acc, val in zip(experts, prep.expert_test, prep.expert_val)]
    return MultiTaskResult(rows, expert_rows, {"layers": list(prep.sites), "curves": curves},
                           {"layers": list(prep.sites), "curves": curves_of_means}, summary, alignment, timing)
