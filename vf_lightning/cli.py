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

import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.cli import LightningCLI

from vf_lightning.callbacks import (
    DiagnosticCallback,
    InterpolationCallback,
    MergeCallback,
    PruneCallback,
    ReportWriter,
    VarianceCollapseCallback,
)
from vf_lightning.checkpoint import CheckpointError
from vf_lightning.data import DataNotFoundError, FashionMNISTDataModule, VisionDataModule
from vf_lightning.io import OutputError, check_writable
from vf_lightning.lit import CheckpointModule, MergeModule
from vf_lightning.merge.session import SessionError
from vf_lightning.progress import set_quiet

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


class VFLightningCLI(LightningCLI):
    """LightningCLI with vf-lightning defaults (config saved with every run, overwriting allowed)."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--run_name", type=str, default=None, help="name of the run (informational)")

    def before_instantiate_classes(self) -> None:
        """Refuse, before anything is built, a ``--ckpt_path`` file that does not exist and negative epochs."""
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        parser = self._parser(self.subcommand)
        ckpt = cfg.get("ckpt_path")
        if ckpt and ckpt not in CKPT_ALIASES and "://" not in str(ckpt) and not Path(ckpt).is_file():
            what = "is a directory" if Path(ckpt).is_dir() else "does not exist"
            parser.error(f"ckpt_path {str(ckpt)!r} {what}: give a checkpoint file of `vf fit` (e.g. "
                         "<default_root_dir>/checkpoints/last.ckpt) or `last` for the newest one")  # fmt: skip
        for key in ("max_epochs", "min_epochs"):
            value = cfg.get(f"trainer.{key}")
            if value is not None and value < -1:
                parser.error(f"trainer.{key} must be ≥ 0 (or -1 for no limit), got {value}")

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a bad value becomes a one-line usage error, not a traceback."""
        try:
            super().instantiate_classes()
        except STARTUP_ERRORS as e:
            parser = self._parser(self.subcommand)
            parser.error(f"invalid configuration: {cause_line(str(e))}")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``fit`` / ``validate`` / ``test``; a dataset or checkpoint that cannot be read, or an output that cannot
        be written (``export_dir``, checked at the start of fit), is one error line."""
        try:
            super()._run_subcommand(subcommand)
        except (DataNotFoundError, CheckpointError, OutputError) as e:
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


def _default(cls: type, **init_args: Any) -> dict[str, Any]:
    """A ``class_path`` / ``init_args`` default for a list of callbacks (editable by the shortcut flags)."""
    return {"class_path": f"vf_lightning.callbacks.{cls.__name__}", "init_args": init_args}


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
        if writer is not None:
            writer.run_config = self.config.clone().as_dict()
        try:
            self.trainer.validate(self.model, datamodule=self.datamodule)
        except (SessionError, CheckpointError, DataNotFoundError) as e:
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
            save_config_kwargs={"overwrite": True},
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
            "data": lazy_instance(FashionMNISTDataModule, pad_to_32=True, num_workers=0, calib_samples=2048),
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
        parser.set_defaults({"model": lazy_instance(MergeModule, checkpoints=[])})


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
        parser.set_defaults({"model": lazy_instance(MergeModule, checkpoints=[])})


def fit_cli(args: Sequence[str] | None) -> None:
    """Run the LightningCLI for ``fit``/``validate``/``test``/``predict`` (``args=None``: from ``sys.argv``)."""
    VFLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``vf`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
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
