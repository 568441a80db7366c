"""Merge experts, correct per task (TACT) or shared (REPAIR), choose λ on validation data, evaluate on test data.

Library core of ``vf merge`` in multi-task mode: everything here works on in-memory experts and lists of
tensors, so the synthetic tests, the Fashion-MNIST demo and the CIFAR configs share one code path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vf_lightning.evaluate import evaluate
from vf_lightning.models import ModelConfig
from vf_lightning.multitask.correct import (
    SiteStats,
    concat_inputs,
    correction_sites,
    fit_corrections,
    repair_goals,
    stats_per_task,
    variance_ratios,
)
from vf_lightning.multitask.methods import DEFAULT_GRIDS, MergeOutput, StateDict, merge_bodies
from vf_lightning.multitask.network import Expert, MultiTaskModel, TaskView, task_network

Correction = Literal["none", "repair", "tact"]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TaskData:
    """One task's data: unlabeled calibration inputs, labelled validation (λ choice) and test batches."""

    name: str
    calib: list[torch.Tensor]
    val: Batches
    test: Batches


@dataclass
class Prepared:
    """Everything about the experts that every merge variant reuses (computed once)."""

    config: ModelConfig
    anchor: StateDict
    bodies: list[StateDict]
    heads: list[StateDict]
    configs: list[ModelConfig]
    sites: list[str]
    expert_val: list[float]
    expert_test: list[float]
    tact_goals: list[SiteStats]
    repair_goals: SiteStats
    test_stats: list[SiteStats]


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 512) -> Batches:
    """Split tensors into ``(x, y)`` batches."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def inputs_of(data: Batches) -> list[torch.Tensor]:
    return [x for x, _ in data]


def prepare(anchor: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
            sites: Sequence[str] | None = None) -> Prepared:
    """Split experts into bodies and heads, find the correction sites and compute every expert statistic once."""
    if len(experts) != len(tasks):
        raise ValueError(f"got {len(experts)} experts for {len(tasks)} tasks; give one expert per task")
    nets = [e.network() for e in experts]
    site_list = list(sites) if sites is not None else correction_sites(nets[0])
    splits = [e.split() for e in experts]
    mixed = concat_inputs([t.calib for t in tasks])
    return Prepared(
        config=experts[0].config,
        anchor=anchor,
        bodies=[b for b, _ in splits],
        heads=[h for _, h in splits],
        configs=[e.config for e in experts],
        sites=site_list,
        expert_val=[evaluate(n, t.val)["acc"] for n, t in zip(nets, tasks)],
        expert_test=[evaluate(n, t.test)["acc"] for n, t in zip(nets, tasks)],
        tact_goals=stats_per_task(nets, site_list, [t.calib for t in tasks]),
        repair_goals=repair_goals(nets, site_list, mixed),
        test_stats=stats_per_task(nets, site_list, [inputs_of(t.test) for t in tasks]),
    )


def corrected_model(prep: Prepared, merged: MergeOutput, tasks: Sequence[TaskData], correction: Correction,
                    eps: float = 1e-5, max_scale: float = 1e3) -> MultiTaskModel:
    """The multi-task model of ``merged`` with no correction, shared REPAIR or per-task TACT."""
    T = len(prep.heads)
    corrections: list[dict[str, Any]] | None = None
    if correction == "tact":
        corrections = []
        for t in range(T):
            net = task_network(prep.configs[t], merged.body(t), prep.heads[t])
            corrections.append(fit_corrections(net, prep.sites, prep.tact_goals[t], tasks[t].calib, eps, max_scale))
    elif correction == "repair":
        mixed = concat_inputs([t.calib for t in tasks])
        per_body = []
        for i, body in enumerate(merged.bodies):
            net = task_network(prep.configs[i], body, prep.heads[i])
            per_body.append(fit_corrections(net, prep.sites, prep.repair_goals, mixed, eps, max_scale))
        corrections = [per_body[0] if merged.shared else per_body[t] for t in range(T)]
    elif correction != "none":
        raise ValueError(f"unknown correction {correction!r}; choose none, repair or tact")
    return MultiTaskModel(prep.config, merged.bodies, prep.heads, prep.configs, corrections)


def task_accuracies(model: MultiTaskModel, tasks: Sequence[TaskData], split: Literal["val", "test"]) -> list[float]:
    """Accuracy of every task (merged body + that task's corrections and head) on its ``split``."""
    return [evaluate(TaskView(model, t), getattr(task, split))["acc"] for t, task in enumerate(tasks)]


@dataclass
class VariantResult:
    """The chosen λ of one (method, correction) variant and its per-task test numbers."""

    method: str
    correction: str
    lam: list[float]
    acc: list[float]
    normalized: list[float]
    variance_ratio: list[list[float]]
    val_curve: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_normalized(self) -> float:
        return sum(self.normalized) / len(self.normalized)


def run_variant(prep: Prepared, tasks: Sequence[TaskData], method: str, correction: Correction,
                grid: Sequence[float] | None = None, options: dict[str, Any] | None = None, eps: float = 1e-5,
                max_scale: float = 1e3) -> VariantResult:
    """Sweep λ over ``grid`` on validation data, keep the best (per task for ``tall``), report test numbers."""
    t0 = time.perf_counter()
    lams = list(grid if grid is not None else DEFAULT_GRIDS[method])
    T = len(tasks)
    val_norm: dict[float, list[float]] = {}
    models: dict[float, MultiTaskModel] = {}
    for lam in lams:
        merged = merge_bodies(method, prep.anchor, prep.bodies, lam=lam, **(options or {}))
        model = corrected_model(prep, merged, tasks, correction, eps, max_scale)
        val = task_accuracies(model, tasks, "val")
        val_norm[lam] = [a / max(e, 1e-12) for a, e in zip(val, prep.expert_val)]
        models[lam] = model
    if method == "tall":  # λ_t per task: task t's body and correction depend only on its own λ_t
        chosen = [max(lams, key=lambda lam, t=t: val_norm[lam][t]) for t in range(T)]  # type: ignore[misc]
    else:
        best = max(lams, key=lambda lam: sum(val_norm[lam]))
        chosen = [best] * T
    acc, vr = [], []
    for t, task in enumerate(tasks):
        model = models[chosen[t]]
        acc.append(evaluate(TaskView(model, t), task.test)["acc"])
        vr.append(variance_ratios(model.task_network(t), prep.sites, prep.test_stats[t], inputs_of(task.test)))
    norm = [a / max(e, 1e-12) for a, e in zip(acc, prep.expert_test)]
    curve = {str(lam): v for lam, v in val_norm.items()}
    return VariantResult(method, correction, chosen, acc, norm, vr, curve, time.perf_counter() - t0)


def result_rows(res: VariantResult, prep: Prepared, tasks: Sequence[TaskData], aligned: bool,
                setting: str = "") -> list[dict[str, Any]]:
    """``report.json`` rows: one per task with task, method, correction, aligned, acc, normalized_acc, ..."""
    return [
        {
            "setting": setting,
            "task": task.name,
            "method": res.method,
            "correction": res.correction,
            "aligned": aligned,
            "lam": res.lam[t],
            "acc": res.acc[t],
            "normalized_acc": res.normalized[t],
            "expert_acc": prep.expert_test[t],
            "variance_ratio": dict(zip(prep.sites, res.variance_ratio[t])),
            "seconds": res.seconds / len(tasks),
        }
        for t, task in enumerate(tasks)
    ]
