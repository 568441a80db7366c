"""Shared machinery of the diagnostic callbacks: cadence, isolation from training, bounded DDP-aware data, the
merge session of one validation, logging.

The same callbacks run during ``vf fit`` (at validation epochs of a PairModule / ClassifierModule) and in
``vf merge`` / ``vf prune`` (once, in the ``validate`` run of a module that loads finished checkpoints). A
diagnostic callback never changes the training: it works on frozen copies of the networks under ``no_grad``,
restores every RNG (torch CPU/CUDA, numpy, ``random``) and every module's train/eval mode, and uses a fixed,
bounded calibration subset (sharded per DDP rank, statistics all-reduced) and a bounded evaluation subset
(sharded, correct counts and loss sums all-reduced), so the logged numbers equal the single-process ones.

The callbacks of one validation share one :class:`~vf_lightning.merge.session.MergeSession` (alignments,
merges, statistics, normalized variants, evaluations) through :func:`merge_session`, and one
:class:`RunReport` (what ``ReportWriter`` writes) through :func:`run_report`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Subset

from vf_lightning.align import MATCHERS
from vf_lightning.distributed import broadcast_module, rank_world
from vf_lightning.merge.session import MergeSession, MultiMode, SessionData
from vf_lightning.models import fast_memory_format
from vf_lightning.progress import Steps, configured, info, steps
from vf_lightning.stats import iter_inputs

from .wandb_log import EPOCH_AXIS, PerTrainer, log_exported, log_media, log_row, start_run, wandb_run

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


def networks_of(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, nn.Module]:
    """The module's networks (``networks()``), identical on every rank and safe to use: frozen copies during
    fit (BatchNorm buffers are per-rank under DDP, so rank 0's are broadcast), the loaded networks otherwise."""
    nets: dict[str, nn.Module] = pl_module.networks()  # type: ignore[operator]
    if trainer.state.fn != "fit":
        return {k: fast_memory_format(v).eval() for k, v in nets.items()}
    return {k: fast_memory_format(broadcast_module(frozen_copy(v), pl_module.device)) for k, v in nets.items()}


def progress_settings(trainer: L.Trainer, prefix: str = "") -> AbstractContextManager[None]:
    """Progress output as Lightning's settings say: nothing on ranks other than 0, bars only with the trainer's
    progress bar enabled (``enable_progress_bar``); ``prefix`` goes before every line (e.g. ``[3 epochs]``)."""
    return configured(enabled=trainer.is_global_zero, bars=trainer.progress_bar_callback is not None, prefix=prefix)


# --------------------------------------------------------------------------------------------------------------
# bounded, sharded data


def session_data(dm: Any, calib_samples: int | None, eval_samples: int | None, batch_size: int,
                 device: torch.device, hold_out_selection: bool = False,
                 select_samples: int | None = 2000) -> SessionData:  # fmt: skip
    """This rank's share of the data module's calibration subset and of the first ``eval_samples`` validation
    samples (``None`` = all), each sharded over the ranks (rank r takes samples r, r+W, ...).

    With ``hold_out_selection`` (``vf merge`` / ``vf prune``) the evaluation samples are split by parity: odd
    positions are the reported evaluation data, even positions the validation data that chooses variants (the
    saved merged model, best PFM depth; at most ``select_samples`` of them) — selection never sees the data the
    report's accuracies come from.
    """
    if dm is None or not hasattr(dm, "calibration_dataloader"):
        raise RuntimeError("the diagnostic callbacks need a vf_lightning data module (with calibration_dataloader "
                           f"and val_set); got {type(dm).__name__}")  # fmt: skip
    calib = [x.cpu() for x in iter_inputs(dm.calibration_dataloader(calib_samples, batch_size, shard=True), "cpu")]
    rank, world = rank_world()
    if not calib:
        raise RuntimeError(f"calib_samples={calib_samples} leaves rank {rank} of {world} without calibration data; "
                           "use at least one sample per rank")  # fmt: skip
    if getattr(dm, "val_set", None) is None:
        dm.setup("validate")
    val_set = dm.val_set
    n = len(val_set) if eval_samples is None else min(eval_samples, len(val_set))

    def batches(index: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mine = index[rank::world]
        loader = DataLoader(Subset(val_set, mine), batch_size=batch_size, shuffle=False, num_workers=0)
        return [(b[0], b[1]) for b in loader]

    if not hold_out_selection:
        return SessionData(calib, batches(list(range(n))), None, device)
    if n < 2:
        raise RuntimeError(f"eval_samples={eval_samples} is too small to hold out validation data; use at least 2")
    select = list(range(0, n, 2))[:select_samples]
    return SessionData(calib, batches(list(range(1, n, 2))), batches(select), device)


# --------------------------------------------------------------------------------------------------------------
# what the callbacks of one validation share


@dataclass
class Candidate:
    """A model offered for saving, scored on validation data (higher is better)."""

    score: float
    model: nn.Module
    variant: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    """report.json under construction (DESIGN §5): sections set by the callbacks, result rows, model candidates."""

    sections: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def offer(self, kind: str, score: float, model: nn.Module, variant: str, **meta: Any) -> None:
        """Keep ``model`` as the ``kind`` checkpoint (``merged``, ``merged_pfm``, ``pruned``) if it scores best."""
        best = self.candidates.get(kind)
        if best is None or score > best.score:
            self.candidates[kind] = Candidate(score, model, variant, dict(meta))

    def add_timing(self, seconds: Mapping[str, float]) -> None:
        for k, v in seconds.items():
            self.timing[k] = self.timing.get(k, 0.0) + v


class _ValidationState:
    """Sessions, data and the report of one trainer; sessions are dropped when the validation changes."""

    def __init__(self) -> None:
        self.step: Hashable = None
        self.sessions: dict[Hashable, MergeSession] = {}
        self.data: dict[Hashable, SessionData] = {}
        self.report = RunReport()


_state = PerTrainer(_ValidationState)


def run_report(trainer: L.Trainer) -> RunReport:
    """The report the callbacks of this trainer build (written by ``ReportWriter`` in ``vf merge`` / ``vf prune``)."""
    return _state(trainer).report


def session_timing(trainer: L.Trainer) -> dict[str, float]:
    """Seconds per phase (statistics, matching, normalization, evaluation, ...) of this validation's sessions."""
    out: dict[str, float] = {}
    for s in _state(trainer).sessions.values():
        for k, v in s.timer.seconds.items():
            out[k] = out.get(k, 0.0) + v
    return out


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

    During ``fit``: runs :meth:`run` after validation every ``every_n_epochs`` epochs, or — when ``at_fractions``
    is set — once training has completed those fractions of ``max_epochs`` (0 = before the first step);
    ``at_fit_end`` also runs it once after the last epoch; sanity-check validation is skipped. During
    ``validate`` (``vf merge`` / ``vf prune``): runs once at the end of the validation epoch.

    ``calib_samples`` / ``eval_samples`` (None = the data module's whole calibration subset / validation set)
    and ``batch_size`` bound the data every statistics pass and evaluation uses.
    """

    min_networks = 2

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        at_fractions: list[float] | None = None,
        at_fit_end: bool = False,
        calib_samples: int | None = 512,
        eval_samples: int | None = 2000,
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"{owner}: every_n_epochs must be ≥ 1 (or null to disable), got {every_n_epochs}")
        if at_fractions is not None and any(not 0.0 <= f <= 1.0 for f in at_fractions):
            raise ValueError(f"{owner}: at_fractions must lie in [0, 1], got {at_fractions}")
        if calib_samples is not None and calib_samples < 1:
            raise ValueError(f"{owner}: calib_samples must be ≥ 1 (or null for the whole subset), got {calib_samples}")
        if eval_samples is not None and eval_samples < 1:
            raise ValueError(f"{owner}: eval_samples must be ≥ 1 (or null for the whole validation set), "
                             f"got {eval_samples}")  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be ≥ 1, got {batch_size}")
        self.every_n_epochs = every_n_epochs
        self.at_fractions = None if at_fractions is None else sorted(at_fractions)
        self.at_fit_end = at_fit_end
        self.calib_samples = calib_samples
        self.eval_samples = eval_samples
        self.batch_size = batch_size
        self.seed = seed
        self.seconds: list[float] = []  # wall time of every run (benchmarks/callbacks.py reads it)
        self.last: dict[str, float] = {}  # scalars of the last run
        self._done: set[Hashable] = set()
        self.completed = 0  # completed training epochs at the current run
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """The callback's options, added to the loggers' run config so a run can be reproduced."""
        plain = (bool, int, float, str, list, tuple, dict, type(None))
        skip = ("seconds", "completed", "last")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()
                if isinstance(v, plain) and not k.startswith("_") and k not in skip}  # fmt: skip

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Fail at start-up on a module the callback cannot diagnose (override to add checks)."""
        nets = getattr(pl_module, "networks", None)
        if not callable(nets):
            raise TypeError(f"{type(self).__name__} needs a module with networks(); got {type(pl_module).__name__}")
        if len(nets()) < self.min_networks:
            raise TypeError(f"{type(self).__name__} needs at least {self.min_networks} networks (a PairModule, or "
                            f"`vf merge` with several checkpoints); {type(pl_module).__name__} has "
                            f"{len(nets())}")  # fmt: skip

    # ------------------------------------------------------------------------------------------------ resume
    state_attrs: tuple[str, ...] = ()  # subclasses: their row / history attributes, kept across a resume

    @property
    def state_key(self) -> str:
        """One key per class and settings, so two callbacks of one class keep their own state in a checkpoint."""
        return self._generate_state_key(**self.settings())

    def state_dict(self) -> dict[str, Any]:
        """Done runs, timings, last scalars and the subclass's rows, saved with every Lightning checkpoint (plain
        values only: checkpoints load with ``weights_only``), so a resumed run neither redoes nor loses them."""
        done = [list(k) if isinstance(k, tuple) else k for k in self._done]
        state = {"done": done, "seconds": list(self.seconds), "last": dict(self.last)}
        return {**state, **{name: _plain(getattr(self, name)) for name in self.state_attrs}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (on ``vf fit --ckpt_path``)."""
        self._done = {tuple(k) if isinstance(k, list) else k for k in state_dict.get("done", [])}
        self.seconds = [float(v) for v in state_dict.get("seconds", [])]
        self.last = {str(k): float(v) for k, v in state_dict.get("last", {}).items()}
        for name in self.state_attrs:
            if name in state_dict:
                setattr(self, name, copy.deepcopy(state_dict[name]))

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the module, then (rank 0) start the W&B run before any work and record this callback's options."""
        self.check_module(pl_module)
        settings = {f"callbacks/{type(self).__name__}": self.settings()}
        if trainer.is_global_zero:
            start_run(trainer, pl_module)
            for lg in trainer.loggers:
                lg.log_hyperparams(settings)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # after the module's on_fit_end has exported the networks
            log_exported(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fractions is not None and 0 in fraction_epochs(self.at_fractions, _max_epochs(trainer)):
            self._run(trainer, pl_module, completed=0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate":
            self._run(trainer, pl_module, completed=trainer.current_epoch)
            return
        if trainer.state.fn != "fit":
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

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # during training, free this validation's merges before the next epoch
            _state(trainer).sessions = {}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, completed: int) -> None:
        key = (str(trainer.state.fn), completed)
        if key in self._done:
            return
        self._done.add(key)
        self.completed = completed
        self._trainer = trainer
        st = _state(trainer)
        step = (str(trainer.state.fn), trainer.global_step, completed)
        if st.step != step:  # a new validation: the previous one's sessions are dropped
            st.step, st.sessions = step, {}
        t0 = time.perf_counter()
        name = type(self).__name__
        fit = trainer.state.fn == "fit"
        tag = f"[{completed} epochs] " if fit else ""  # completed training epochs, as trained_epochs on W&B
        with progress_settings(trainer, tag.strip()):
            info("%s%s: running", tag, name)
            with isolated(pl_module):
                self.run(trainer, pl_module, self.data(trainer, pl_module))
            self.seconds.append(time.perf_counter() - t0)
            info("%s%s: done in %.1f s", tag, name, self.seconds[-1])
        if fit:
            log_row(trainer, {f"timing/{name}": self.seconds[-1], EPOCH_AXIS: completed}, EPOCH_AXIS)
        if trainer.state.fn == "validate":
            st.report.add_timing({f"callback/{name}": self.seconds[-1]})

    def data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SessionData:
        """The bounded, sharded data of this callback (built once per trainer, shared by equal settings)."""
        st = _state(trainer)
        hold_out = trainer.state.fn == "validate"
        key = (self.calib_samples, self.eval_samples, self.batch_size, hold_out)
        if key not in st.data:
            st.data[key] = session_data(trainer.datamodule, self.calib_samples, self.eval_samples,  # type: ignore[attr-defined]
                                        self.batch_size, pl_module.device, hold_out)  # fmt: skip
        d = st.data[key]
        d.device = pl_module.device
        return d

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        """Measure and log (subclasses); runs on every rank inside :func:`isolated`."""
        raise NotImplementedError

    def steps(self, total: int | None, unit: str = "variant") -> AbstractContextManager[Steps]:
        """A progress step of this callback's run (:func:`vf_lightning.progress.steps`): a bar over ``total``
        items while the validation waits, one log line per finished variant."""
        return steps(type(self).__name__, total, unit)

    def report(self, trainer: L.Trainer) -> RunReport:
        """The run's report (sections, rows, candidate models) that ``ReportWriter`` writes."""
        return run_report(trainer)

    # ------------------------------------------------------------------------------------------------ logging
    def log_scalars(self, trainer: L.Trainer, metrics: Mapping[str, float]) -> None:
        """This run's scalars as one step of every logger (rank 0) against ``trained_epochs`` (completed training
        epochs); also into ``trainer.callback_metrics`` so checkpointing / early stopping can monitor them."""
        values = {k: float(v) for k, v in metrics.items()}
        self.last.update(values)
        for k, v in values.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        log_row(trainer, {**values, EPOCH_AXIS: self.completed}, EPOCH_AXIS)

    def log_rows(self, trainer: L.Trainer, axis: str, rows: Sequence[Mapping[str, float]]) -> None:
        """Curves as one step per point of ``axis`` (α, layer, preserved layers, sparsity): each row holds the
        value of every variant at that point, and the point itself under ``axis``."""
        for row in rows:
            log_row(trainer, row, axis)

    def log_wandb(self, trainer: L.Trainer, make: Callable[[], Mapping[str, Any]]) -> None:
        """W&B-only objects (tables, charts) from ``make()`` as one step of the run (rank 0), if there is one."""
        if wandb_run(trainer) is not None:
            log_media(trainer, make())


class MergingCallback(DiagnosticCallback):
    """A diagnostic callback working on merges of the module's networks through the shared merge session.

    Options shared by the merging callbacks: ``matchings``; ``matching_options`` per matching (e.g.
    ``{zip: {a: 0.3, b: 0.125}, cca: {gamma: 0.1}, weight: {max_sweeps: 50}, activation: {precision: float32}}``);
    ``correction_sites`` (``spec`` = method-spec's rule, ``all``, or module names); ``multi_mode`` for N ≥ 3
    networks (reference | sequential | iterative).
    """

    def __init__(self, matchings: list[str] | None = None,
                 matching_options: dict[str, dict[str, Any]] | None = None,
                 correction_sites: str | list[str] = "spec", multi_mode: MultiMode = "reference",
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.matchings = list(matchings or ["weight"])
        self.matching_options = {k: dict(v) for k, v in (matching_options or {}).items()}
        for name, opts in self.matching_options.items():  # a misspelt or inapplicable option fails here, by name
            if name not in self.matchings:
                raise ValueError(f"{owner}: matching_options names {name!r}, which is not in matchings "
                                 f"{self.matchings}")  # fmt: skip
            MATCHERS.check_options(name, opts, f"{owner}.matching_options")
        self.correction_sites = correction_sites
        self.multi_mode = multi_mode

    def session(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> MergeSession:
        """The merge session of this validation for this callback's settings (shared with equal settings)."""
        st = _state(trainer)
        opts = tuple(sorted((k, tuple(sorted(v.items()))) for k, v in self.matching_options.items()))
        sites = self.correction_sites if isinstance(self.correction_sites, str) else tuple(self.correction_sites)
        key = (id(data), self.seed, opts, sites, self.multi_mode)
        if key not in st.sessions:
            nets = list(networks_of(trainer, pl_module).values())
            st.sessions[key] = MergeSession(nets, data, seed=self.seed, options=self.matching_options,
                                            correction_sites=self.correction_sites,
                                            multi_mode=self.multi_mode)  # fmt: skip
        return st.sessions[key]


def _plain(value: Any) -> Any:
    """``value`` with tensors / numpy scalars as Python numbers and tuples as lists (checkpoint-safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.generic)):
        return value.item()
    return value


def _max_epochs(trainer: L.Trainer) -> int:
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("at_fractions / lmc_freq need trainer.max_epochs to be set")
    return int(trainer.max_epochs)
