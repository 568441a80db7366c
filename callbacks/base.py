"""Shared machinery of the diagnostic callbacks: cadence, isolation from training, bounded DDP-aware data, logging.

A diagnostic callback never changes the training: it works on deep copies of the networks under ``no_grad``,
restores every RNG (torch CPU/CUDA, numpy, ``random``) and every module's train/eval mode, and uses a fixed,
bounded calibration subset (sharded per DDP rank, statistics all-reduced) and a bounded evaluation subset
(sharded, correct counts and loss sums all-reduced), so the logged numbers equal the single-process ones.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from vf_lightning.align import AlignmentResult, GroupTransform
from vf_lightning.diagnostics import vf_profile
from vf_lightning.evaluate import evaluate
from vf_lightning.stats import iter_inputs


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------------------------------------------
# isolation from the training run


@dataclass
class RNGState:
    """Snapshot of every random number generator the training may draw from."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@contextmanager
def isolated(pl_module: nn.Module) -> Iterator[None]:
    """Run diagnostics without side effects on training: RNGs and train/eval modes restored, no autograd."""
    rng = RNGState.capture()
    modes = [(m, m.training) for m in pl_module.modules()]
    try:
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        rng.restore()


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of a training network in eval mode, without gradients (the original is never touched)."""
    out = copy.deepcopy(net)
    for p in out.parameters():
        p.grad = None
        p.requires_grad_(False)
    return out.eval()


# --------------------------------------------------------------------------------------------------------------
# bounded, sharded data and DDP-reduced measurements


@dataclass
class CallbackData:
    """This rank's share of the calibration inputs (augmentation-free) and of the evaluation batches, on CPU."""

    calib: list[torch.Tensor]
    eval: list[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device

    @property
    def eval_inputs(self) -> list[torch.Tensor]:
        return [x for x, _ in self.eval]

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` calibration inputs on the device (to trace permutation specs, count FLOPs)."""
        return self.calib[0][:n].to(self.device)

    @classmethod
    def from_datamodule(cls, dm: Any, calib_samples: int, eval_samples: int | None, batch_size: int,
                        device: torch.device) -> CallbackData:  # fmt: skip
        """Take the fixed calibration subset (``calibration_dataloader``) and the first ``eval_samples`` of the
        validation set, each sharded over DDP ranks (rank r takes samples r, r+W, ...)."""
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise RuntimeError(
                "the diagnostic callbacks need a vf_lightning data module (with calibration_dataloader and "
                f"val_set); got {type(dm).__name__}"
            )
        calib = [x.cpu() for x in iter_inputs(dm.calibration_dataloader(calib_samples, batch_size, shard=True), "cpu")]
        if getattr(dm, "val_set", None) is None:
            dm.setup("validate")
        val_set = dm.val_set
        n = len(val_set) if eval_samples is None else min(eval_samples, len(val_set))
        rank, world = _rank_world()
        loader = DataLoader(Subset(val_set, list(range(rank, n, world))), batch_size=batch_size, shuffle=False,
                            num_workers=0)  # fmt: skip
        batches = [(b[0], b[1]) for b in loader]
        if not calib:
            raise RuntimeError(f"calib_samples={calib_samples} leaves rank {rank} of {world} without calibration data; "
                               "use at least one sample per rank")  # fmt: skip
        return cls(calib, batches, device)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a vector of floats over DDP ranks (float64; identity outside a process group)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def evaluate_reduced(model: nn.Module, data: CallbackData) -> dict[str, float]:
    """``{"acc", "loss"}`` of ``model`` on the evaluation subset: correct counts and loss sums summed over ranks."""
    n = sum(int(y.shape[0]) for _, y in data.eval)
    correct, loss_sum = 0.0, 0.0
    if n:
        r = evaluate(model, data.eval, data.device)
        correct, loss_sum = float(round(r["acc"] * n)), r["loss"] * n
    c, s, total = all_reduce_sum([correct, loss_sum, n], data.device)
    if total == 0:
        raise RuntimeError("the evaluation subset is empty (eval_samples=0 or an empty validation set)")
    return {"acc": c / total, "loss": s / total}


def vf_profile_reduced(model: nn.Module, data: CallbackData) -> dict[str, float]:
    """Vanishing-feature profile (``vf_profile``) on the calibration inputs, averaged over all ranks' samples."""
    inputs = data.calib
    n = sum(int(x.shape[0]) for x in inputs)
    prof = vf_profile(model, inputs) if n else {}
    if not _distributed():
        return prof
    # every rank runs the same architecture, so rank 0's layer order is everyone's (an empty rank sends zeros)
    names = [k for k in prof] if prof else _layer_names_from(model, data)
    sums = all_reduce_sum([prof.get(k, 0.0) * n for k in names] + [n], data.device)
    return {k: v / sums[-1] for k, v in zip(names, sums[:-1])}


def _layer_names_from(model: nn.Module, data: CallbackData) -> list[str]:
    return list(vf_profile(model, [data.example(1)]))


def broadcast_alignment(res: AlignmentResult, device: torch.device) -> AlignmentResult:
    """Rank 0's permutations / transforms on every rank (they already agree when statistics are reduced; this
    makes it exact, whatever the floating-point order of the reductions)."""
    if not _distributed():
        return res

    def bcast(t: torch.Tensor) -> torch.Tensor:
        x = t.to(device).contiguous()
        dist.broadcast(x, 0)
        return x.to(t.device)

    perms = {k: bcast(p) for k, p in res.perms.items()} if res.perms is not None else None
    tr = None
    if res.transforms_ is not None:
        tr = {k: GroupTransform(bcast(g.merge), bcast(g.unmerge)) for k, g in res.transforms_.items()}
    return AlignmentResult(method=res.method, spec=res.spec, perms=perms, transforms_=tr, objective=res.objective,
                           sweeps=res.sweeps, seconds=res.seconds, history=res.history)  # fmt: skip


def broadcast_module(model: nn.Module, device: torch.device) -> nn.Module:
    """Rank 0's parameters and buffers on every rank (in place; identity outside a process group)."""
    if _distributed():
        for t in [*model.parameters(), *model.buffers()]:
            x = t.data.to(device).contiguous()
            dist.broadcast(x, 0)
            t.data.copy_(x.to(t.device))
    return model


# --------------------------------------------------------------------------------------------------------------
# the base callback


def fraction_epochs(fractions: Sequence[float], max_epochs: int) -> set[int]:
    """Numbers of completed training epochs at which to record, for fractions of training in [0, 1]."""
    return {int(math.floor(f * max_epochs + 1e-9)) for f in fractions}


def lmc_fractions(freq: float) -> list[float]:
    """The reference's record points ``arange(0, 1, freq) ∪ {1}`` (``--lmc-freq``)."""
    if not 0.0 < freq <= 1.0:
        raise ValueError(f"lmc_freq must lie in (0, 1], got {freq}")
    return sorted({round(float(f), 10) for f in np.arange(0.0, 1.0, freq)} | {1.0})


class DiagnosticCallback(Callback):
    """Base of the merge / interpolation / PFM / variance / prune callbacks.

    Runs :meth:`run` after validation every ``every_n_epochs`` epochs, or — when ``at_fractions`` is set —
    once training has completed those fractions of ``max_epochs`` (0 = before the first step); ``at_fit_end``
    also runs it once after the last epoch. Sanity-check validation is skipped.
    """

    prefix = "diag"
    pair_only = True

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        at_fractions: list[float] | None = None,
        at_fit_end: bool = False,
        calib_samples: int = 512,
        eval_samples: int | None = 2000,
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1 (or null to disable), got {every_n_epochs}")
        if at_fractions is not None and any(not 0.0 <= f <= 1.0 for f in at_fractions):
            raise ValueError(f"at_fractions must lie in [0, 1], got {at_fractions}")
        if calib_samples < 1:
            raise ValueError(f"calib_samples must be ≥ 1, got {calib_samples}")
        if eval_samples is not None and eval_samples < 1:
            raise ValueError(f"eval_samples must be ≥ 1 (or null for the whole validation set), got {eval_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.every_n_epochs = every_n_epochs
        self.at_fractions = None if at_fractions is None else sorted(at_fractions)
        self.at_fit_end = at_fit_end
        self.calib_samples = calib_samples
        self.eval_samples = eval_samples
        self.batch_size = batch_size
        self.seed = seed
        self.data: CallbackData | None = None
        self.seconds: list[float] = []  # wall time of every run (benchmarks/callbacks.py reads it)
        self.last: dict[str, float] = {}  # scalars of the last run
        self._done_epochs: set[int] = set()
        self.completed = 0  # completed training epochs at the current run
        self.shared: dict[Any, Any] | None = None  # results shared between callbacks during one run

    # ------------------------------------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """The callback's options, added to the loggers' run config so a run can be reproduced."""
        plain = (bool, int, float, str, list, tuple, type(None))
        skip = ("seconds", "completed", "shared")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()
                if isinstance(v, plain) and not k.startswith("_") and k not in skip}  # fmt: skip

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Fail at start-up on a module the callback cannot diagnose (override to add checks)."""
        if self.pair_only and not (hasattr(pl_module, "net_a") and hasattr(pl_module, "net_b")):
            raise TypeError(f"{type(self).__name__} needs a PairModule (net_a, net_b); got {type(pl_module).__name__}")

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)
        if stage != "fit":
            return
        settings = {f"callbacks/{type(self).__name__}": self.settings()}
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_hyperparams(settings)
            run = wandb_run(trainer)
            if run is not None:
                run.define_metric("epoch")
                self.define_metrics(run)

    def define_metrics(self, run: Any) -> None:
        """Declare the W&B step axes of this callback's keys (default: ``<prefix>/*`` against ``epoch``)."""
        run.define_metric(f"{self.prefix}/*", step_metric="epoch")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fractions is not None and 0 in fraction_epochs(self.at_fractions, _max_epochs(trainer)):
            self._run(trainer, pl_module, completed=0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        completed = trainer.current_epoch + 1
        if self.at_fractions is not None:
            due = completed in fraction_epochs(self.at_fractions, _max_epochs(trainer))
        else:
            due = self.every_n_epochs is not None and completed % self.every_n_epochs == 0
        if due:
            self._run(trainer, pl_module, completed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end:
            self._run(trainer, pl_module, completed=trainer.current_epoch)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, completed: int) -> None:
        if completed in self._done_epochs:
            return
        self._done_epochs.add(completed)
        self.completed = completed
        self.shared = shared_results(trainer, (completed, self.calib_samples, self.eval_samples, self.batch_size))
        t0 = time.perf_counter()
        try:
            with isolated(pl_module):
                if self.data is None:  # built once per fit, shared by callbacks asking for the same subsets
                    cache = trainer.__dict__.setdefault("_vf_callback_data", {})
                    key = (self.calib_samples, self.eval_samples, self.batch_size)
                    if key not in cache:
                        cache[key] = CallbackData.from_datamodule(trainer.datamodule, *key, pl_module.device)  # type: ignore[attr-defined]
                    self.data = cache[key]
                self.data.device = pl_module.device
                self.run(trainer, pl_module, self.data)
        finally:
            self.shared = None
        self.seconds.append(time.perf_counter() - t0)

    def results(self) -> dict[Any, Any]:
        """Results shared with the other callbacks of this validation (same step and data); fresh outside a run."""
        return self.shared if self.shared is not None else {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        """Measure and log (subclasses); runs on every rank inside :func:`isolated`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ logging
    def log_scalars(self, trainer: L.Trainer, metrics: Mapping[str, float], **axes: float) -> None:
        """Scalars to every logger (W&B, CSV, ...) from rank 0, with ``epoch`` (and any extra axes) attached;
        also into ``trainer.callback_metrics`` so checkpointing / early stopping can monitor them."""
        values = {k: float(v) for k, v in metrics.items()}
        if not axes:
            self.last.update(values)
            for k, v in values.items():
                trainer.callback_metrics[k] = torch.tensor(v)
        row = {**values, "epoch": float(trainer.current_epoch), **{k: float(v) for k, v in axes.items()}}
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(row, step=trainer.global_step)

    def log_wandb(self, trainer: L.Trainer, make: Callable[[], Mapping[str, Any]]) -> None:
        """W&B-only objects (tables, plots) from ``make()`` to the WandbLogger's run, from rank 0, if there is one."""
        run = wandb_run(trainer)
        if run is not None:
            payload = make()
            if payload:
                run.log({**payload, "epoch": trainer.current_epoch})


def shared_results(trainer: L.Trainer, key: tuple[Any, ...]) -> dict[Any, Any]:
    """A dict the callbacks of one validation share (merges, normalized models, evaluations) so that work done by
    one (e.g. the weight-matched, RESET merge) is not repeated by the next; dropped at the next step."""
    step = trainer.global_step
    store = trainer.__dict__.setdefault("_vf_callback_results", {})
    for k in [k for k in store if k[0] != step]:
        del store[k]
    return store.setdefault((step, *key), {})


def _max_epochs(trainer: L.Trainer) -> int:
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("at_fractions / lmc_freq need trainer.max_epochs to be set")
    return int(trainer.max_epochs)


def wandb_run(trainer: L.Trainer) -> Any:
    """The W&B run of the trainer's WandbLogger (rank 0), or None without one."""
    if not trainer.is_global_zero:
        return None
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def line_plot(xs: Sequence[float], curves: Mapping[str, Sequence[float]], title: str, xname: str) -> Any:
    """A W&B line plot with one line per curve (``wandb.plot.line_series``)."""
    import wandb

    return wandb.plot.line_series(xs=list(xs), ys=[list(v) for v in curves.values()], keys=list(curves),
                                  title=title, xname=xname)  # fmt: skip


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A ``wandb.Table``."""
    import wandb

    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])
