"""The W&B side of the callbacks: a run started before any work with the resolved configuration, rows that hold
one point of every variant with an explicit step axis per key, the run summary, and model artifacts that link
``vf fit`` → ``vf merge`` → ``vf prune``.

Axes (``define_metric`` per key, so Lightning's ``* → trainer/global_step`` default never applies to them):
``trained_epochs`` (completed training epochs, 0 = before training; every per-validation scalar), ``lmc/alpha``
(interpolation curves), ``layer`` / ``vf_layer`` (per-layer curves of ``vf merge`` / ``vf prune``),
``pfm/preserved_layers`` (PFM, with ``pfm/params_ratio`` in the same rows), ``prune/sparsity`` (pruning).

Model artifacts are named by content, ``vf-model-<sha256[:16]>`` with the file as ``model<suffix>``: the run that
writes a network logs it, a later run that reads the same file declares the identical artifact as its input
(``use_artifact``; offline, the same record with ``use_after_commit``, which ``wandb sync`` turns into the use),
so W&B's lineage graph shows which fit produced the inputs of a merge, and which merge those of a prune.

Everything here runs on rank 0 and does nothing without a ``WandbLogger``; other loggers get the same rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

EPOCH_AXIS = "trained_epochs"  # completed training epochs (0 = before training)
ALPHA_AXIS = "lmc/alpha"
LAYER_AXIS = "layer"  # index into the variance-ratio sites (config: variance_sites.layers)
VF_LAYER_AXIS = "vf_layer"  # index into the vanishing-feature layers
PFM_AXIS = "pfm/preserved_layers"
SPARSITY_AXIS = "prune/sparsity"
ARTIFACT_TYPE = "model"


@dataclass
class _RunState:
    started: bool = False
    start_time: float = field(default_factory=time.time)
    defined: set[str] = field(default_factory=set)
    exported: bool = False


S = TypeVar("S")


class PerTrainer(Generic[S]):
    """State kept per trainer (dropped with it): ``store(trainer)`` makes it with ``factory`` on first use."""

    def __init__(self, factory: Callable[[], S]) -> None:
        self.factory = factory
        self._by_trainer: weakref.WeakKeyDictionary[L.Trainer, S] = weakref.WeakKeyDictionary()

    def __call__(self, trainer: L.Trainer) -> S:
        if trainer not in self._by_trainer:
            self._by_trainer[trainer] = self.factory()
        return self._by_trainer[trainer]


_run_state = PerTrainer(_RunState)


def wandb_run(trainer: L.Trainer) -> Any:
    """The W&B run of the trainer's WandbLogger (rank 0; created now if it was not), or None without one."""
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


# --------------------------------------------------------------------------------------------------------------
# rows and axes


def define_axis(trainer: L.Trainer, run: Any, keys: Iterable[str], axis: str) -> None:
    """``define_metric(key, step_metric=axis)`` for every key not defined yet in this run (and the axis itself)."""
    st = _run_state(trainer)
    if axis not in st.defined:
        run.define_metric(axis)
        st.defined.add(axis)
    for k in keys:
        if k not in st.defined and k != axis:
            run.define_metric(k, step_metric=axis)
            st.defined.add(k)


def log_row(trainer: L.Trainer, row: Mapping[str, float], axis: str) -> None:
    """One step of every logger from rank 0: ``row`` holds the values of all variants at one point of ``axis``
    (its value is in the row). W&B gets it as one ``run.log`` step with every key on ``axis``."""
    if not trainer.is_global_zero:
        return
    if axis not in row:
        raise ValueError(f"a row logged against {axis!r} must contain it; got {sorted(row)}")
    values = {k: float(v) for k, v in row.items()}
    for lg in trainer.loggers:
        if not isinstance(lg, WandbLogger):
            lg.log_metrics(values, step=trainer.global_step)
    run = wandb_run(trainer)
    if run is not None:
        define_axis(trainer, run, values, axis)
        run.log(values)


def log_media(trainer: L.Trainer, payload: Mapping[str, Any]) -> None:
    """Tables, charts and images to the W&B run (rank 0), as one step."""
    run = wandb_run(trainer)
    if run is not None and payload:
        run.log(dict(payload))


def update_summary(trainer: L.Trainer, values: Mapping[str, Any]) -> None:
    """Headline values into the W&B run summary (rank 0)."""
    run = wandb_run(trainer)
    if run is not None and values:
        run.summary.update(dict(values))


def update_config(trainer: L.Trainer, values: Mapping[str, Any]) -> None:
    """Entries of the W&B run config (rank 0), e.g. which layers a callback follows."""
    run = wandb_run(trainer)
    if run is not None and values:
        run.config.update(_jsonable(dict(values)), allow_val_change=True)


# --------------------------------------------------------------------------------------------------------------
# the run's configuration


def trainer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer's effective settings (devices, strategy, precision, limits, cadence, callbacks, loggers)."""
    return {
        "stage": str(getattr(trainer.state.fn, "value", trainer.state.fn)),
        "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
        "accelerator": type(trainer.accelerator).__name__, "strategy": type(trainer.strategy).__name__,
        "num_devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
        "precision": str(trainer.precision), "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val, "limit_train_batches": trainer.limit_train_batches,
        "limit_val_batches": trainer.limit_val_batches, "val_check_interval": trainer.val_check_interval,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "default_root_dir": str(trainer.default_root_dir),
        "callbacks": [type(c).__name__ for c in trainer.callbacks],  # type: ignore[attr-defined]
        "loggers": [type(lg).__name__ for lg in trainer.loggers],
    }  # fmt: skip


def cli_config(trainer: L.Trainer) -> tuple[dict[str, Any], str] | None:
    """The resolved LightningCLI configuration of this run as a dict and as YAML: from Lightning's
    ``SaveConfigCallback`` (``vf fit``) or the ``config_yaml`` the CLI hands the ``ReportWriter`` (``vf merge`` /
    ``vf prune``); None outside the CLI."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, SaveConfigCallback):
            text = cb.parser.dump(cb.config, skip_none=False)
            return yaml.safe_load(text), text
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        text = getattr(cb, "config_yaml", None)
        if isinstance(text, str):
            return yaml.safe_load(text), text
    return None


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else None


def start_run(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Create the W&B run now (before any work) and put the resolved configuration (also saved as
    ``vf_config.yaml`` in the run's files), the trainer settings, the seed and the command line into its config;
    in ``vf merge`` / ``vf prune`` declare the input checkpoints as used artifacts. Once per trainer."""
    st = _run_state(trainer)
    if st.started or not trainer.is_global_zero:
        return
    st.started = True
    st.start_time = time.time()
    run = wandb_run(trainer)
    if run is None:
        return
    info: dict[str, Any] = {"trainer": trainer_settings(trainer), "seed": _seed(), "command": " ".join(sys.argv)}
    resolved = cli_config(trainer)
    if resolved is not None:
        info["resolved_config"] = resolved[0]
        path = Path(run.dir) / "vf_config.yaml"
        path.write_text(resolved[1])
        run.save(str(path), base_path=run.dir, policy="now")
    inputs = input_checkpoints(pl_module)
    if inputs:
        info["inputs"] = [use_model(run, p, role) for role, p in inputs.items()]
    run.config.update(info, allow_val_change=True)


# --------------------------------------------------------------------------------------------------------------
# model artifacts


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_name(path: str | Path) -> str:
    """The content-addressed artifact name of a model file: ``vf-model-<sha256[:16]>``."""
    return f"vf-model-{file_sha256(path)[:16]}"


def model_artifact(path: str | Path, metadata: Mapping[str, Any]) -> Any:
    """The artifact of one model file (named by content, the file as ``model<suffix>``, not copied)."""
    import wandb

    p = Path(path)
    art = wandb.Artifact(artifact_name(p), type=ARTIFACT_TYPE, metadata=_jsonable(dict(metadata)))
    art.add_file(str(p), name=f"model{p.suffix}", policy="immutable")
    return art


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def use_model(run: Any, path: str | Path, role: str) -> dict[str, Any]:
    """Declare the model file ``path`` an input of ``run``; returns what the run's config records about it."""
    art = model_artifact(path, {"role": role, "path": str(path)})
    entry = {"role": role, "path": str(path), "artifact": art.name, "digest": art.digest}
    try:
        if run.offline:  # use_artifact needs the server: record the use for `wandb sync`
            run._log_artifact(art, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(art)
    except Exception as e:  # noqa: BLE001 - lineage must never stop a run
        rank_zero_warn(f"W&B: could not declare {path} as an input artifact ({e}); its name and digest are in the "
                       "run config (inputs)")  # fmt: skip
    return entry


def log_model(run: Any, path: str | Path, role: str, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Log the model file ``path`` as an output artifact of ``run``; returns its name and digest."""
    art = model_artifact(path, {"role": role, "path": str(path), "run": run.name, **(metadata or {})})
    run.log_artifact(art, aliases=["latest"])
    return {"role": role, "path": str(path), "artifact": art.name, "digest": art.digest}


def input_checkpoints(pl_module: L.LightningModule) -> dict[str, str]:
    """The checkpoint files a ``vf merge`` / ``vf prune`` module loaded, by role (``a``, ``b``, ``foundation_a``,
    ``<task>``)."""
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    out: dict[str, str] = {}
    for i, p in enumerate(hp.get("checkpoints") or []):
        out[f"input_{i}"] = str(p)
    for name, p in (hp.get("foundations") or {}).items():
        out[f"foundation_{name}"] = str(p)
    for i, e in enumerate(hp.get("experts") or []):
        out[f"expert_{e.get('task') or i}"] = str(e["path"])
    return {k: p for k, p in out.items() if Path(p).is_file()}


def exported_files(pl_module: L.LightningModule, since: float) -> dict[str, Path]:
    """Standalone networks the module wrote at the end of fit (``export_dir/net_<name>.pt``, ``export_path``),
    written after ``since``."""
    found: dict[str, Path] = {}
    export_dir = getattr(pl_module, "export_dir", None)
    nets = getattr(pl_module, "networks", None)
    if export_dir and callable(nets):
        for name in nets():
            found[f"net_{name}"] = Path(export_dir) / f"net_{name}.pt"
    export_path = getattr(pl_module, "export_path", None)
    if export_path:
        found["expert"] = Path(export_path)
    return {k: p for k, p in found.items() if p.is_file() and p.stat().st_mtime >= since - 1.0}


def log_exported(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """After fit (module hooks have exported the networks): one artifact per exported network. Once per trainer."""
    st = _run_state(trainer)
    if st.exported or not trainer.is_global_zero:
        return
    st.exported = True
    run = wandb_run(trainer)
    if run is None:
        return
    files = exported_files(pl_module, st.start_time)
    meta = {"trained_epochs": trainer.current_epoch, "global_step": trainer.global_step, "seed": _seed()}
    if files:
        run.config.update({"exported": [log_model(run, p, role, meta) for role, p in files.items()]},
                          allow_val_change=True)  # fmt: skip


def log_outputs(trainer: L.Trainer, files: Mapping[str, tuple[str | Path, Mapping[str, Any]]]) -> None:
    """The checkpoints a ``vf merge`` / ``vf prune`` run wrote (kind → (path, metadata)) as output artifacts."""
    run = wandb_run(trainer)
    if run is None:
        return
    logged = [log_model(run, p, kind, meta) for kind, (p, meta) in files.items() if Path(p).is_file()]
    if logged:
        run.config.update({"outputs": logged}, allow_val_change=True)


def safe_key(text: str) -> str:
    """``text`` usable as one W&B key segment."""
    return re.sub(r"[^A-Za-z0-9_.=:-]+", "_", text)


class RunLogger(Callback):
    """Starts the W&B run at setup with the resolved configuration, trainer settings and seed, declares the input
    checkpoints of ``vf merge`` / ``vf prune`` as used artifacts, and logs the networks exported at the end of
    ``vf fit`` as artifacts. The ``vf`` commands add it to every run; the diagnostic callbacks and ``ReportWriter``
    do the same through :func:`start_run`, so it is only needed in plain-Python trainers without them."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        start_run(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            log_exported(trainer, pl_module)
