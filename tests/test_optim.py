"""Per-iteration learning-rate schedules of the reference recipes (method-spec §1.8)."""

from __future__ import annotations

import pytest
import torch

from vf_lightning.lit.optim import LRFactor, OptimConfig, ScheduleConfig, build_scheduler

ITERS = [0, 390, 391, 31999, 32000, 48000]


def test_milestones_schedule_drops_tenfold_at_each_milestone() -> None:
    f = LRFactor(ScheduleConfig(kind="milestones", milestones=[32000, 48000]), 62560)
    assert [f(i) for i in ITERS] == pytest.approx([1, 1, 1, 1, 0.1, 0.01])


def test_warmup_then_milestones_at_the_same_absolute_iterations() -> None:
    f = LRFactor(ScheduleConfig(kind="warmup_milestones", milestones=[32000, 48000], warmup_iters=391), 62560)
    vals = [f(i) for i in ITERS]
    assert vals[0] == pytest.approx(1e-5)
    assert vals[1] == pytest.approx(1e-5 + (1 - 1e-5) * 390 / 391)
    assert vals[2:] == pytest.approx([1, 1, 0.1, 0.01])


def test_warmup_cosine_reaches_zero_at_the_end() -> None:
    f = LRFactor(ScheduleConfig(kind="warmup_cosine", warmup_iters=391), 62560)
    assert f(0) == pytest.approx(1e-5)
    assert f(391) == pytest.approx(1.0)
    assert f(391 + (62560 - 391) // 2) == pytest.approx(0.5, abs=1e-4)
    assert f(62560) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_sets_the_optimizer_lr_per_step() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = OptimConfig(lr=0.1).build([p])
    sched = build_scheduler(opt, ScheduleConfig(kind="milestones", milestones=[2]), 10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_adamw_and_bad_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    assert isinstance(OptimConfig(name="adamw", lr=1e-3).build([p]), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0).build([p])
