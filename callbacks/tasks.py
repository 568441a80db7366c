"""``TaskMergeCallback``: the multi-task merge of task experts (nonlocal-spec) in a ``vf merge`` validation.

The module is an :class:`~vf_lightning.lit.ExpertsModule` (foundations + experts loaded from checkpoints). Each
expert's task gets its data from a copy of the run's data module restricted to the expert's classes; the
callback runs :func:`~vf_lightning.merge.multitask.merge_experts` (TA / TIES / TALL / consensus × none / REPAIR /
TACT, with and without alignment through the foundations), logs the headline numbers and fills the run's report.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vf_lightning.lit import ExpertsModule
from vf_lightning.merge.experts import Expert, check_align_options
from vf_lightning.merge.multitask import Batches, MultiTaskResult, TaskData, merge_experts, variant_key
from vf_lightning.merge.session import SessionData
from vf_lightning.merge.tasks import TASK_MERGERS, check_task_options
from vf_lightning.stats import iter_inputs

from .base import DiagnosticCallback
from .wandb_log import line_plot

Correction = Literal["none", "repair", "tact"]
METHODS: list[str] = ["task_arithmetic", "ties", "tall", "consensus"]
CORRECTIONS: list[Correction] = ["none", "repair", "tact"]


def _batches(ds: Dataset[Any], index: list[int], batch_size: int) -> Batches:
    loader = DataLoader(Subset(ds, index), batch_size=batch_size, shuffle=False, num_workers=0)
    return [(b[0], b[1]) for b in loader]


def task_datamodule(dm: Any, expert: Expert) -> Any:
    """The data module of ``expert``'s task: the suite's own module when ``dm`` is a task suite (it has
    ``task_datamodule(name, classes)``, e.g. :class:`~vf_lightning.data.TaskSuiteDataModule`), else a copy of
    ``dm`` restricted to the expert's classes (relabelled 0..k-1)."""
    if hasattr(dm, "task_datamodule"):
        return dm.task_datamodule(expert.name, list(expert.classes))
    hparams = getattr(dm, "hparams", None)
    if hparams is None or "classes" not in hparams or not hasattr(dm, "calibration_dataloader"):
        raise TypeError("TaskMergeCallback needs a vf_lightning data module (with `classes`, hparams and "
                        f"calibration_dataloader) or a task suite; got {type(dm).__name__}")  # fmt: skip
    init = {k: v for k, v in dict(hparams).items() if not k.startswith("_")}  # LightningCLI adds _class_path
    return type(dm)(**{**init, "classes": list(expert.classes)})


def task_data(dm: Any, expert: Expert, calib_samples: int | None, eval_samples: int | None,
              batch_size: int) -> TaskData:  # fmt: skip
    """Expert ``expert``'s task data from its data module (:func:`task_datamodule`).

    Calibration: the first ``calib_samples`` of the module's calibration subset. When the module has its own
    test split (``test_set``, as the task suite's modules do), its validation split chooses λ and its test split
    gives the reported numbers (the first ``eval_samples`` of each, None = all). Otherwise its evaluation split
    is divided by parity, as in ``session_data(hold_out_selection=True)``: even positions are the validation
    data, odd positions the test data.
    """
    sub = task_datamodule(dm, expert)
    sub.setup("fit")
    loader = sub.calibration_dataloader(calib_samples, batch_size, shard=False)
    calib = [x.cpu() for x in iter_inputs(loader, "cpu")]
    val_set, test_set = sub.val_set, getattr(sub, "test_set", None)

    def first(ds: Any) -> list[int]:
        return list(range(len(ds) if eval_samples is None else min(eval_samples, len(ds))))

    if test_set is not None:
        val_idx, test_idx = first(val_set), first(test_set)
    else:
        test_set = val_set
        val_idx, test_idx = first(val_set)[0::2], first(val_set)[1::2]
    if not calib or len(val_idx) < 1 or len(test_idx) < 1:
        raise RuntimeError(f"task {expert.name!r} (classes {expert.classes}) has {len(calib)} calibration batches, "
                           f"{len(val_idx)} validation and {len(test_idx)} test samples; it needs calibration data "
                           "and at least one validation and one test sample")  # fmt: skip
    return TaskData(expert.name, calib, _batches(val_set, val_idx, batch_size),
                    _batches(test_set, test_idx, batch_size))  # fmt: skip


class TaskMergeCallback(DiagnosticCallback):
    """Merge the experts of an :class:`~vf_lightning.lit.ExpertsModule` into one multi-task model and report it.

    Every (aligned, method, correction) variant chooses λ on each task's validation half and is reported on its
    test half (accuracy and accuracy normalized by the expert's). Logs
    ``multitask/<method>/<correction>/<aligned|unaligned>/{normalized_acc,acc}`` and, in ``vf merge``, fills
    the report: per-task rows (``task``, ``method``, ``correction``, ``aligned``, ``acc``, ``normalized_acc``,
    ...), ``experts``, ``variance_ratio`` (mean over channels of std ratios, the one definition),
    ``variance_ratio_of_means``, ``alignment``, ``multitask_summary`` and timing.

    Under DDP every rank runs the same computation on the same (unsharded) data; statistics all-reduced over
    identical shards are unchanged, and only rank 0 logs and writes (``ReportWriter``).

    Args:
        methods: task merging methods (task_arithmetic | ties | tall | consensus).
        corrections: none | repair (one shared correction) | tact (per task).
        aligned: with (True) and/or without (False) weight matching through the foundations.
        grids: λ grid per method (default: the library's grids).
        options: keyword options per method, e.g. ``{ties: {k: 0.2}, consensus: {min_tasks: 2}}``.
        align_options: weight matching options (max_sweeps, tol, seed; seed defaults to ``seed``).
        eps / max_scale: the correction's variance floor and cap on its scale (dead channels).
        setting: a label put into every row (e.g. ``nonlocal`` / ``local``).
        calib_samples / eval_samples / batch_size / seed: per task calibration and evaluation sizes, batch size,
            seed (see :class:`DiagnosticCallback`).
    """

    min_networks = 1

    def __init__(
        self,
        methods: list[str] | None = None,
        corrections: list[Correction] | None = None,
        aligned: list[bool] | None = None,
        grids: dict[str, list[float]] | None = None,
        options: dict[str, dict[str, Any]] | None = None,
        align_options: dict[str, Any] | None = None,
        eps: float = 1e-5,
        max_scale: float | None = 1e3,
        setting: str | None = None,
        calib_samples: int | None = 1000,
        eval_samples: int | None = None,
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__(calib_samples=calib_samples, eval_samples=eval_samples, batch_size=batch_size, seed=seed)
        self.methods = list(methods if methods is not None else METHODS)
        self.corrections: list[Correction] = list(corrections if corrections is not None else CORRECTIONS)
        self.aligned = list(aligned if aligned is not None else [True, False])
        self.grids = {k: [float(x) for x in v] for k, v in (grids or {}).items()}
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self.align_options = dict(align_options or {})
        self.eps = eps
        self.max_scale = max_scale
        self.setting = setting
        self._check()

    def _check(self) -> None:
        """Fail on a misspelt method, option or correction at construction, before any work."""
        if not self.methods or not self.corrections or not self.aligned:
            raise ValueError("TaskMergeCallback: methods, corrections and aligned must each list at least one value")
        for m in [*self.methods, *self.grids, *self.options]:
            TASK_MERGERS.get_or_fail(m)
        for m, opts in self.options.items():
            check_task_options(m, opts, f"TaskMergeCallback options[{m!r}]")
        bad = [c for c in self.corrections if c not in CORRECTIONS]
        if bad:
            raise ValueError(f"TaskMergeCallback: unknown correction(s) {bad}; choose none, repair or tact")
        check_align_options(self.align_options)

    def check_module(self, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, ExpertsModule):
            raise TypeError(f"TaskMergeCallback needs model.class_path vf_lightning.lit.ExpertsModule (foundations "
                            f"+ experts); got {type(pl_module).__name__}")  # fmt: skip
        super().check_module(pl_module)

    def data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SessionData:
        """Nothing shared: each task builds its own data from the data module in :meth:`run`."""
        return SessionData([], [], None, pl_module.device)

    def tasks(self, trainer: L.Trainer, experts: list[Expert]) -> list[TaskData]:
        """One :class:`TaskData` per expert from the trainer's data module."""
        dm = trainer.datamodule  # type: ignore[attr-defined]
        return [task_data(dm, e, self.calib_samples, self.eval_samples, self.batch_size) for e in experts]

    def merge(self, trainer: L.Trainer, pl_module: ExpertsModule) -> MultiTaskResult:
        """:func:`merge_experts` over the module's experts and foundations, on the module's device."""
        experts, foundations = pl_module.experts_and_foundations()
        device = pl_module.device
        experts = [e.to(device) for e in experts]
        foundations = {k: f.to(device) for k, f in foundations.items()}
        torch.manual_seed(self.seed)
        align_options = {"seed": self.seed, **self.align_options}
        return merge_experts(experts, foundations, self.tasks(trainer, experts), self.methods, self.corrections,
                             self.aligned, self.grids, self.options, align_options, self.eps, self.max_scale,
                             pl_module.reference)  # fmt: skip

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        assert isinstance(pl_module, ExpertsModule)
        with self.steps(len(self.methods) * len(self.corrections) * len(set(self.aligned))):
            res = self.merge(trainer, pl_module)
        scalars: dict[str, float] = {}
        for s in res.summary:
            key = variant_key(s["method"], s["correction"], s["aligned"])
            scalars[f"multitask/{key}/normalized_acc"] = s["mean_normalized_acc"]
            scalars[f"multitask/{key}/acc"] = s["mean_acc"]
        self.log_scalars(trainer, scalars)
        vr = res.variance_ratio

        def payload() -> dict[str, Any]:
            return {"multitask/variance_ratio": line_plot(list(range(len(vr["layers"]))), vr["curves"],
                                                          "multi-task variance ratio per layer", "layer")}

        if vr["curves"]:
            self.log_wandb(trainer, payload)
        if trainer.state.fn == "validate":
            rep = self.report(trainer)
            extra = {"setting": self.setting} if self.setting is not None else {}
            rep.rows.extend({**extra, **row} for row in res.rows)
            rep.sections["experts"] = res.experts
            rep.sections["variance_ratio"] = res.variance_ratio
            rep.sections["variance_ratio_of_means"] = res.variance_ratio_of_means
            rep.sections["alignment"] = {res.alignment["matching"]: res.alignment}
            rep.sections["multitask_summary"] = res.summary
            rep.add_timing({f"multitask_{k}": v for k, v in res.timing.items()})
