"""The ``vf`` command: ``fit`` / ``validate`` / ``test`` / ``merge`` / ``prune``, all LightningCLI.

``vf merge`` and ``vf prune`` are LightningCLI ``validate`` runs of a checkpoint-loading module
(:class:`vf_lightning.lit.MergeModule`) with the callbacks of :mod:`vf_lightning.callbacks` doing the work, so
``--trainer.*`` (devices, strategy, num_nodes, precision, logger, callbacks), ``--data`` (class_path),
``--seed_everything``, ``--config`` and ``--print_config`` behave exactly as in ``vf fit``. The common call stays
short: ``--checkpoints``, ``--matching``, ``--normalization``, ``--preserve``, ``--alpha`` and ``--out_dir``
(``vf prune``: ``--checkpoint``, ``--pruner``, ``--sparsities``, ``--normalization``, ``--out_dir``) are
shortcuts that set the module's checkpoints and the matching options of every configured callback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from vf_lightning.callbacks import (
    DiagnosticCallback,
    InterpolationCallback,
    MergeCallback,
    PruneCallback,
    ReportWriter,
    RunLogger,
    VarianceCollapseCallback,
)
from vf_lightning.checkpoint import CheckpointError, read_checkpoint
from vf_lightning.data import DataFileError, DataNotFoundError, FashionMNISTDataModule, VisionDataModule
from vf_lightning.io import OutputError, atomic_write_bytes, check_writable
from vf_lightning.lit import CheckpointModule, MergeModule
from vf_lightning.merge.session import SessionError
from vf_lightning.progress import set_quiet
from vf_lightning.runtime import tune_allocator

USAGE = """usage: vf {fit,validate,test,merge,prune} [--config FILE.yaml] [options]

vf-lightning: train base models, then align, merge, repair and prune them without retraining.

commands:
  fit        train a model or a pair of models (LightningCLI; configs in configs/fit/)
  validate   evaluate a checkpoint on the validation data
  test       evaluate a checkpoint on the test data
  merge      align + merge + normalize 2..N trained networks, write report.json (LightningCLI; configs/merge/)
  prune      one-shot prune a trained network with post-pruning normalization (LightningCLI; configs/prune/)

`vf COMMAND --help` lists every option; every option also works from YAML; `--print_config` prints one.
`--quiet` (or VF_QUIET=1) drops vf's progress bars and progress lines.
"""

STARTUP_ERRORS = (CheckpointError, DataNotFoundError, SessionError, ValueError, TypeError)
CKPT_ALIASES = ("last", "best", "hpc", "registry")  # Lightning's ckpt_path names that are not files


# ----------------------------------------------------------------------------------------------------------------
# one run directory per run


# what a run writes into its own directory under these names (a rerun there would overwrite or mix with them)
RUN_ENTRIES = ("config.yaml", "checkpoints", "wandb", "csv", "lightning_logs", "net_a.pt", "net_b.pt")


def _entries(value: Any) -> list[Any]:
    """The ``class_path`` / ``init_args`` entries of a ``trainer.logger`` or ``trainer.callbacks`` value."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, Namespace) and "class_path" in v]


def _is_a(entry: Any, base: type) -> bool:
    cls = _class(str(entry.get("class_path", "")))
    return isinstance(cls, type) and issubclass(cls, base)


def _launching_process() -> bool:
    """Whether this is the process a user started (global rank 0): not a DDP child (``LOCAL_RANK`` > 0, set by
    Lightning's launcher), nor another rank of ``srun`` / ``torchrun`` / MPI."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
    return all(os.environ.get(k, "0") in ("", "0") for k in keys)


@dataclass
class RunDir:
    """Where one run writes: every output the CLI derives follows ``path``; ``owned`` lists what a rerun would
    overwrite or mix with (the saved config, checkpoints, derived log folders, exported networks)."""

    path: Path
    name: str
    owned: list[Path] = field(default_factory=list)

    def previous(self) -> list[Path]:
        """The entries of ``owned`` an earlier run left (folders only when not empty)."""
        found = []
        for p in self.owned:
            if p.is_dir() and not p.is_symlink():
                if any(p.iterdir()):
                    found.append(p)
            elif p.exists() or p.is_symlink():
                found.append(p)
        return found

    def remove_previous(self) -> None:
        for p in self.previous():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def shown(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.path)) + ("/" if p.is_dir() else "")
        except ValueError:
            return str(p)


def resolve_run_dir(cfg: Namespace, run_dir: str | None, default_name: str) -> RunDir:
    """Fill the outputs a recipe leaves unset from one run directory and name, in place in ``cfg`` (a
    subcommand's config), and list what the run owns there.

    ``run_dir`` (``trainer.default_root_dir`` for ``vf fit``, the ReportWriter's ``out_dir`` for ``vf merge`` /
    ``vf prune``) defaults to ``outputs/<run name>``; the run name is ``--run_name``, else the run directory's
    last component, else ``default_name``. Then: loggers whose ``save_dir`` is unset write into the run
    directory, W&B runs are named after the run (``--run_name`` renames a logger's explicit name too),
    ``ModelCheckpoint``'s unset ``dirpath`` is ``<run>/checkpoints`` and an unset ``export_dir`` of the model is
    the run directory. Paths a recipe spells out are kept as they are.
    """
    given_name = cfg.get("run_name")
    name = given_name or (Path(run_dir).name if run_dir else default_name) or "run"
    path = Path(run_dir) if run_dir else Path("outputs") / name
    cfg["run_name"] = name
    cfg["trainer.default_root_dir"] = str(path)
    run = RunDir(path, name, [path / n for n in RUN_ENTRIES] + sorted(path.glob("config-*.yaml")))
    trainer = cfg.get("trainer") or Namespace()
    for lg in _entries(trainer.get("logger")):
        args = lg.get("init_args") or Namespace()
        lg["init_args"] = args
        if "save_dir" in args and args.get("save_dir") is None:
            args["save_dir"] = str(path)
            if args.get("name") and "Wandb" not in str(lg.class_path):
                run.owned.append(path / str(args["name"]))
        if "Wandb" in str(lg.class_path) and (given_name or args.get("name") is None):
            args["name"] = name
    for cb in _entries(trainer.get("callbacks")):
        if _is_a(cb, ModelCheckpoint):
            args = cb.get("init_args") or Namespace()
            cb["init_args"] = args
            if args.get("dirpath") is None:
                args["dirpath"] = str(path / "checkpoints")
            else:
                run.owned.extend(sorted(Path(args["dirpath"]).glob("*.ckpt")))
    model_args = cfg.get("model.init_args") if isinstance(cfg.get("model"), Namespace) else None
    if isinstance(model_args, Namespace):
        if "export_dir" in model_args:
            if model_args.get("export_dir") is None:
                model_args["export_dir"] = str(path)
            run.owned.extend(Path(model_args["export_dir"]) / f for f in ("net_a.pt", "net_b.pt"))
        if model_args.get("export_path"):
            run.owned.append(Path(model_args["export_path"]))
    run.owned = list(dict.fromkeys(run.owned))
    return run


class RunConfig(SaveConfigCallback):
    """Save the resolved configuration into the run directory (``trainer.default_root_dir``): ``config.yaml`` for
    the command's own stage, ``config-<stage>.yaml`` for the others (``vf validate`` / ``vf test`` of a run)."""

    def __init__(self, parser: Any, config: Namespace, main_stage: str = "fit", **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.main_stage = main_stage

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = "config.yaml" if stage == self.main_stage else f"config-{stage}.yaml"
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_bytes(text.encode("utf-8"), Path(trainer.default_root_dir) / name)


class VFLightningCLI(LightningCLI):
    """LightningCLI with vf-lightning defaults: one run directory per run (see :func:`resolve_run_dir`), the
    resolved config saved into it, and one-line errors for bad configuration."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--run_name", type=str, default=None,
                            help="name of the run: W&B run name and, unless trainer.default_root_dir is given, its "
                                 "directory outputs/<run_name> (default: the directory's name, else the first "
                                 "config file's name)")  # fmt: skip
        parser.add_argument("--overwrite", action="store_true",
                            help="vf fit: replace a previous run in the run directory (its config, checkpoints, "
                                 "logs and exported networks); without it such a rerun is refused")  # fmt: skip
        parser.add_lightning_class_args(RunLogger, "run_logger")  # W&B: config, seed, artifacts in every run

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` file that does not exist or cannot be read (one line naming it) before
        LightningCLI reads its hyperparameters."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in CKPT_ALIASES and "://" not in str(ckpt):
            parser = self._parser(sub)
            if not Path(ckpt).is_file():
                what = "is a directory" if Path(ckpt).is_dir() else "does not exist"
                parser.error(f"ckpt_path {str(ckpt)!r} {what}: give a checkpoint file of `vf fit` (e.g. "
                             "<run directory>/checkpoints/last.ckpt) or `last` for the newest one")  # fmt: skip
            try:
                read_checkpoint(ckpt)
            except CheckpointError as e:
                parser.error(f"ckpt_path: {e}")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Refuse negative epochs before anything is built; set up the run directory (and refuse a fresh ``fit``
        into one that holds an earlier run)."""
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        parser = self._parser(self.subcommand)
        ckpt = cfg.get("ckpt_path")
        for key in ("max_epochs", "min_epochs"):
            value = cfg.get(f"trainer.{key}")
            if value is not None and value < -1:
                parser.error(f"trainer.{key} must be ≥ 0 (or -1 for no limit), got {value}")
        configs = cfg.get("config") or []
        stem = Path(str(configs[0])).stem if configs else "run"
        run = resolve_run_dir(cfg, cfg.get("trainer.default_root_dir"), stem)
        self._drop_monitors_without_logger(cfg)
        if self.subcommand == "fit" and not ckpt:
            self._claim(run, cfg, parser)

    @staticmethod
    def _drop_monitors_without_logger(cfg: Namespace) -> None:
        """``--trainer.logger false``: drop the ``LearningRateMonitor`` callbacks (they refuse to run without a
        logger, and have nothing to write to)."""
        if cfg.get("trainer.logger") not in (False, []):
            return
        callbacks = cfg.get("trainer.callbacks")
        if isinstance(callbacks, list):
            cfg["trainer.callbacks"] = [cb for cb in callbacks if not _is_a(cb, LearningRateMonitor)]

    @staticmethod
    def _claim(run: RunDir, cfg: Namespace, parser: Any) -> None:
        """A fresh ``vf fit`` needs a run directory without an earlier run: refuse one, or with ``--overwrite``
        remove the earlier run's files first (other files in the directory are kept)."""
        previous = run.previous()
        if not previous:
            return
        if not cfg.get("overwrite"):
            shown = ", ".join(run.shown(p) for p in previous[:4]) + (", …" if len(previous) > 4 else "")
            last = next((p for p in previous if p.suffix == ".ckpt"), None)
            last = last or next((p / "last.ckpt" for p in previous if (p / "last.ckpt").is_file()), None)
            resume = f"resume it with --ckpt_path {last}, " if last else ""
            parser.error(f"run directory {str(run.path)!r} already holds a run ({shown}): {resume}give this run its "
                         "own directory (--run_name NAME or --trainer.default_root_dir DIR), or replace the earlier "
                         "run with --overwrite")  # fmt: skip
        if _launching_process():  # one process removes; the other ranks of a DDP run only check
            run.remove_previous()

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a bad value becomes a one-line usage error, not a traceback."""
        try:
            super().instantiate_classes()
        except STARTUP_ERRORS as e:
            parser = self._parser(self.subcommand)
            parser.error(f"invalid configuration: {cause_line(str(e))}")
        self._checkpoints_follow_the_run()

    def _checkpoints_follow_the_run(self) -> None:
        """The ``ModelCheckpoint`` Lightning adds by itself (no explicit one configured) writes into
        ``<run>/checkpoints`` too, not under a logger's folder."""
        trainer = getattr(self, "trainer", None)
        for cb in getattr(trainer, "checkpoint_callbacks", []):
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")  # type: ignore[union-attr]

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``fit`` / ``validate`` / ``test``; a dataset or checkpoint that cannot be read, or an output that cannot
        be written (``export_dir``, checked at the start of fit), is one error line."""
        try:
            super()._run_subcommand(subcommand)
        except (DataNotFoundError, DataFileError, CheckpointError, OutputError) as e:
            message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"vf {subcommand}: error: {message}", file=sys.stderr)
            raise SystemExit(2) from e


# ----------------------------------------------------------------------------------------------------------------
# vf merge / vf prune

Shortcut = tuple[str, Any, str]  # (flag, type, help)


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes an argument ``name`` (anywhere along its ``__init__`` chain)."""
    return any("__init__" in vars(c) and name in inspect.signature(c.__init__).parameters  # type: ignore[misc]
               for c in cls.__mro__)  # fmt: skip


def _default(cls: type, package: str = "vf_lightning.callbacks", /, **init_args: Any) -> dict[str, Any]:
    """A ``class_path`` / ``init_args`` default (a callback of a list, the data or the model; editable by the
    shortcut flags). A plain dict, not ``jsonargparse.lazy_instance``: that inspects the whole call stack with
    source context (≈ 40 ms per call under pytest)."""
    return {"class_path": f"{package}.{cls.__name__}", "init_args": init_args}


def _class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def cause_line(message: str) -> str:
    """The first line of the real cause in a jsonargparse error (``Errors:\n  - <cause>`` of a Union), else the
    message's first line."""
    lines = message.splitlines()
    if "Errors:" in lines:
        for line in lines[lines.index("Errors:") + 1 :]:
            if not line.startswith("  - "):
                break
            if not line.startswith("  - Expected a <class 'NoneType'>"):
                return line[4:]
    return lines[0] if lines else message


def _option_names(class_path: str) -> list[str]:
    """The options a class takes (its ``__init__`` arguments along the MRO, and ``arg.field`` for dataclass ones)."""
    cls = _class(class_path)
    names: list[str] = []
    for c in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(c):
            continue
        try:
            params = inspect.signature(c.__init__).parameters  # type: ignore[misc]
            hints = typing.get_type_hints(c.__init__)  # type: ignore[misc]
        except (TypeError, ValueError, NameError):
            continue
        for name, param in params.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            names.append(name)
            hint = hints.get(name)
            if dataclasses.is_dataclass(hint):
                names.extend(f"{name}.{f.name}" for f in dataclasses.fields(hint))
    return list(dict.fromkeys(names))


def one_line_error(message: str) -> str:
    """jsonargparse's multi-line message for a nested key (``Parser key "data": … Errors: - Problem with given
    class_path …: Option 'x' is not accepted``) as one line naming the full key, with the closest option."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    top = re.match(r'Parser key "([^"]+)":', lines[0])
    key = top.group(1) if top else ""
    cls, cause = "", []
    for i, line in enumerate(lines):
        m = re.match(r"\s*- Problem with given class_path '([^']+)':\s*$", line)
        if m:
            cls, indent = m.group(1), len(line) - len(line.lstrip())
            for nxt in lines[i + 1 :]:
                if len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                cause.append(nxt.strip())
            break
    if not cls or not cause:
        noise = ("Subtypes:", "Given value", "- Expected a <class 'NoneType'>", "Errors:")
        out = ""
        for line in (line.strip() for line in lines if not line.strip().startswith(noise)):
            out += line if not out else (" " if out.endswith(":") else "; ") + line
        return out
    text = re.sub(r"<class '([\w.]+)'>", r"\1", " ".join(cause))
    short = cls.rpartition(".")[2]
    prefix = f"{key}.init_args." if key else ""
    bad = re.search(r"Option '([^']+)' is not accepted", text) or re.search(r"unrecognized arguments: --([\w.]+)", text)
    if bad:
        option = bad.group(1)
        close = difflib.get_close_matches(option, _option_names(cls), n=1, cutoff=0.6)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        return f"{prefix}{option} is not an option of {short}{hint}; `--help` lists the options"
    nested = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
    if nested:
        return f"{prefix}{nested.group(1)} ({short}): {nested.group(2)}"
    return f"{key} ({short}): {text}"


class VFArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one ``error:`` line (see :func:`one_line_error`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(one_line_error(message), ex)


def _fix_hint(expects: tuple[int, int, int], gives: tuple[int, int, int], datamodule: Any) -> str:
    """What to change so that data of shape ``gives`` (channels, size, classes) fits a model expecting ``expects``."""
    hints = []
    if expects[0] != gives[0]:
        hints.append(f"use a data module of {expects[0]}-channel images (1: FashionMNISTDataModule / MNISTDataModule, "
                     f"3: CIFAR10DataModule / CIFAR100DataModule) or checkpoints of a {gives[0]}-channel model")
    if expects[1] != gives[1]:
        pad = getattr(datamodule, "pad_to_32", None)
        if pad is False and expects[1] == 32:
            hints.append("set data.init_args.pad_to_32: true")
        elif pad is True and expects[1] != 32:
            hints.append(f"set data.init_args.pad_to_32: false (or use a data module of {expects[1]}×{expects[1]} "
                         "images)")
        else:
            hints.append(f"use a data module of {expects[1]}×{expects[1]} images")
    if expects[2] != gives[2]:
        hints.append(f"set data.init_args.classes to the model's {expects[2]} classes, or use checkpoints with a "
                     f"{gives[2]}-way head")
    return "; ".join(hints)


def check_data_fits(module: Any, datamodule: Any) -> None:
    """Run one calibration batch of ``datamodule`` through the module's first network; a mismatch of channels,
    image size or (for :class:`MergeModule`) class count raises a one-line ``ValueError`` saying what to change."""
    nets = module.networks() if isinstance(module, CheckpointModule) else {}
    cfg = getattr(module, "model_config", None)
    if not nets or cfg is None or not hasattr(datamodule, "calibration_dataloader"):
        return
    name, net = next(iter(nets.items()))
    x, _ = next(iter(datamodule.calibration_dataloader(num_samples=2, batch_size=2, shard=False)))
    classes = int(getattr(datamodule, "out_classes", cfg.num_classes))
    check_classes = isinstance(module, MergeModule)  # task experts have heads of their own tasks' size
    size = int(x.shape[-1]) if x.shape[-1] == x.shape[-2] else -1
    expects = (cfg.in_channels, cfg.image_size, cfg.num_classes if check_classes else classes)
    gives = (int(x.shape[1]), size, classes)
    if expects == gives:
        training = net.training
        net.eval()  # no BatchNorm statistics are updated by the check
        try:
            with torch.no_grad():
                out = net(x.to(next(net.parameters()).device))
        except RuntimeError as e:
            raise ValueError(f"network {name!r} cannot process a batch of the data module (shape {tuple(x.shape)}): "
                             f"{str(e).splitlines()[0]}") from e  # fmt: skip
        finally:
            net.train(training)
        if not check_classes or out.shape[-1] == classes:
            return
        expects = (cfg.in_channels, cfg.image_size, int(out.shape[-1]))

    def text(v: tuple[int, int, int], model: bool) -> str:
        hw = f"{v[1]}×{v[1]}" if v[1] > 0 else "×".join(str(d) for d in x.shape[-2:])
        ch = f"{v[0]} input channel{'s' if v[0] != 1 else ''}" if model else f"{v[0]} channel{'s' if v[0] != 1 else ''}"
        return f"{ch} / {hw}{' images' if model else ''} / {v[2]} classes"

    raise ValueError(f"model expects {text(expects, True)} but the data module gives {text(gives, False)}: "
                     f"{_fix_hint(expects, gives, datamodule)}")


class CheckpointCLI(VFLightningCLI):
    """LightningCLI of ``vf merge`` / ``vf prune``: a checkpoint-loading module, a data module, the callbacks, one
    ``validate`` run. Shortcut flags are copied into the module / callbacks that accept them."""

    command = "merge"
    shortcuts: tuple[Shortcut, ...] = ()
    module_shortcuts: dict[str, str] = {}  # flag -> model.init_args key
    callback_keys: dict[str, str] = {}  # flag -> callback init arg

    def __init__(self, args: Sequence[str] | None) -> None:
        argv = sys.argv
        if args is None:  # from the console: parse `vf merge ARGS` as ARGS (the DDP launcher re-runs sys.argv)
            sys.argv = [argv[0], *argv[2:]]
        try:
            self._build(args)
        finally:
            sys.argv = argv
        callbacks = list(self.trainer.callbacks)  # type: ignore[attr-defined]
        try:  # before any work: the outputs can be written, every callback accepts the module, the data fits it
            for cb in callbacks:
                if isinstance(cb, ReportWriter):
                    check_writable(cb.out_dir, "out_dir")
            for cb in callbacks:
                if isinstance(cb, DiagnosticCallback):
                    cb.check_module(self.model)
            check_data_fits(self.model, self.datamodule)
        except (ValueError, TypeError, DataNotFoundError) as e:
            print(f"vf {self.command}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
        writer = next((c for c in callbacks if isinstance(c, ReportWriter)), None)
        if writer is not None:  # the resolved config goes into the published set (report.json, config.yaml)
            writer.run_config = self.config.clone().as_dict()
            writer.config_yaml = self.parser.dump(self.config, skip_none=False)
        try:
            self.trainer.validate(self.model, datamodule=self.datamodule)
        except (SessionError, CheckpointError, DataNotFoundError, DataFileError) as e:
            print(f"vf {self.command}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from e

    def _build(self, args: Sequence[str] | None) -> None:
        super().__init__(
            CheckpointModule,
            VisionDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=None if args is None else list(args),
            save_config_callback=None,  # the ReportWriter publishes config.yaml with its set
            parser_class=VFArgumentParser,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": f"vf {self.command}", "description": self.description()},
            trainer_defaults={"logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                              "limit_val_batches": 1, "enable_model_summary": False, "max_epochs": 1,
                              "enable_progress_bar": True,  # vf progress bars while the callbacks work
                              "default_root_dir": f"outputs/{self.command}"},  # fmt: skip
        )

    def instantiate_classes(self) -> None:
        """As :class:`VFLightningCLI`, but the error is the one line of the cause (not jsonargparse's Union dump)."""
        try:
            LightningCLI.instantiate_classes(self)
        except STARTUP_ERRORS as e:
            self._parser(self.subcommand).error(f"invalid configuration: {cause_line(str(e))}")

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip()

    def default_callbacks(self) -> list[Any]:
        raise NotImplementedError

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        super().add_arguments_to_parser(parser)
        for flag, typ, help_ in self.shortcuts:
            parser.add_argument(f"--{flag}", type=typ, default=None, help=help_)
        parser.set_defaults({
            "trainer.callbacks": self.default_callbacks(),
            "data": _default(FashionMNISTDataModule, "vf_lightning.data", pad_to_32=True, num_workers=0,
                             calib_samples=2048),
        })  # fmt: skip

    def before_instantiate_classes(self) -> None:
        """Copy the shortcut flags into the module and into every callback that takes them."""
        cfg: Namespace = self.config
        for flag, key in self.module_shortcuts.items():
            value = cfg.get(flag)
            if value is not None:
                cfg["model.init_args." + key] = [value] if flag == "checkpoint" else value
        callbacks = cfg.get("trainer.callbacks") or []
        for flag, key in self.callback_keys.items():
            value = cfg.get(flag)
            if value is None:
                continue
            if isinstance(value, list) and not value:
                self.parser.error(f"--{flag} is an empty list: give at least one value (or leave it out for the "
                                  "config's own)")  # fmt: skip
            used = False
            for cb in callbacks:
                cls = _class(str(cb.get("class_path", "")))
                if cls is None or not _accepts(cls, key):
                    continue
                v = value
                if key == "matchings" and getattr(cls, "permutation_only", False):
                    v = [m for m in value if m not in ("zip", "cca")]
                    if not v:
                        continue
                cb["init_args"][key] = v
                used = True
            if not used:
                self.parser.error(f"--{flag} has no effect: no configured callback takes {key!r} (trainer.callbacks)")
        # the run directory is the ReportWriter's out_dir: the loggers, the trainer and config.yaml follow it
        out_dirs = {str(cb["init_args"].get("out_dir")) for cb in _entries(callbacks) if _is_a(cb, ReportWriter)}
        run_dir = out_dirs.pop() if len(out_dirs) == 1 else cfg.get("trainer.default_root_dir")
        resolve_run_dir(cfg, run_dir, self.command)


class MergeCLI(CheckpointCLI):
    """Align, merge, normalize and diagnose 2..N trained networks; write report.json, plots and merged.pt."""

    command = "merge"
    shortcuts = (
        ("checkpoints", list[str] | None, "pair checkpoint of `vf fit`, or 2..N model checkpoints (A first)"),
        ("matching", list[str] | None, "matchings for every callback: identity | weight | activation | zip | cca"),
        ("normalization", list[str] | None, "normalizations: none | reset | repair | rescale | reshift | "
                                            "bias_calibration | zero_bias"),
        ("preserve", list[int] | None, "numbers of preserved layers for PFM (0 = full merge, -1 = all)"),
        ("alpha", float | None, "merging coefficient of the full merge"),
        ("out_dir", str | None, "where report.json, plots and merged.pt go"),
    )
    module_shortcuts = {"checkpoints": "checkpoints"}
    callback_keys = {"matching": "matchings", "normalization": "normalizations", "preserve": "preserve",
                     "alpha": "alpha", "out_dir": "out_dir"}  # fmt: skip

    def default_callbacks(self) -> list[Any]:
        common = {"calib_samples": None, "eval_samples": None}
        return [
            _default(MergeCallback, matchings=["identity", "weight"], normalizations=["none", "repair"],
                     ensemble=True, **common),
            _default(InterpolationCallback, matchings=["identity", "weight"], normalizations=["none"], alphas=11,
                     **common),
            _default(VarianceCollapseCallback, matchings=["identity", "weight"], normalizations=["none", "repair"],
                     **common),
            _default(ReportWriter, out_dir="outputs/merge"),
        ]  # fmt: skip

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"model": _default(MergeModule, "vf_lightning.lit", checkpoints=[])})


class PruneCLI(CheckpointCLI):
    """One-shot prune a trained network at several sparsities, then re-normalize it; write report.json and plots."""

    command = "prune"
    shortcuts = (
        ("checkpoint", str | None, "model checkpoint, or pair checkpoint (PruneCallback.networks picks a or b)"),
        ("pruner", list[str] | None, "global_magnitude | layerwise_magnitude | diag_fisher"),
        ("sparsities", list[float] | None, "fractions of weights removed, in [0, 1)"),
        ("normalization", list[str] | None, "post-pruning normalizations: auto | none | reset | repair | rescale"),
        ("out_dir", str | None, "where report.json, plots and pruned.pt go"),
    )
    module_shortcuts = {"checkpoint": "checkpoints"}
    callback_keys = {"pruner": "pruner", "sparsities": "sparsities", "normalization": "normalizations",
                     "out_dir": "out_dir"}  # fmt: skip

    def default_callbacks(self) -> list[Any]:
        return [
            _default(PruneCallback, sparsities=[0.5, 0.8, 0.9, 0.95], normalizations=["none", "auto"],
                     calib_samples=None, eval_samples=None),
            _default(ReportWriter, out_dir="outputs/prune"),
        ]

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"model": _default(MergeModule, "vf_lightning.lit", checkpoints=[])})


def fit_cli(args: Sequence[str] | None) -> None:
    """Run the LightningCLI for ``fit``/``validate``/``test``/``predict`` (``args=None``: from ``sys.argv``)."""
    VFLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfig,
        parser_class=VFArgumentParser,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The ``vf`` command (``argv``: default this process's arguments); the console script is
    :mod:`vf_lightning.__main__`."""
    args = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()
    if "--quiet" in args:  # no vf progress bars or progress lines (as VF_QUIET=1); Lightning's own bar stays
        set_quiet()
        args = [a for a in args if a != "--quiet"]
        if argv is None:
            sys.argv = [sys.argv[0], *args]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = args[0], args[1:]
    if cmd in ("fit", "validate", "test", "predict"):
        fit_cli(None if argv is None else args)
    elif cmd == "merge":
        MergeCLI(None if argv is None else rest)
    elif cmd == "prune":
        PruneCLI(None if argv is None else rest)
    else:
        print(f"vf: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
