"""``ReportWriter``: at the end of a ``vf merge`` / ``vf prune`` validation, write what the other callbacks put in
the run's report — ``report.json`` (DESIGN §5), PNG plots and the chosen model checkpoints — on rank 0, log the
headline numbers and tables to the trainer's loggers, and print readable tables."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from vf_lightning.checkpoint import save_model_checkpoint
from vf_lightning.diagnostics import (
    plot_interpolation_curves,
    plot_multitask_accuracy,
    plot_prune_accuracy,
    plot_variance_ratios,
    plot_vf_profiles,
    report_title,
    write_report_html,
)
from vf_lightning.io import atomic_write_bytes, atomic_write_json, check_writable, clean_stale, publish_dir, staging_dir
from vf_lightning.merge.pfm import PFMModel, save_pfm

from .base import RunReport, run_report, session_timing
from .wandb_log import log_media, log_outputs, start_run, table, update_summary, wandb_run

CHECKPOINT_FILES = {"merged": "merged.pt", "merged_pfm": "merged_pfm.pt", "pruned": "pruned.pt"}
PLOT_FILES = ("lmc.png", "variance_ratio.png", "vf.png", "accuracy.png", "normalized_acc.png")


def owned_by_writer(name: str) -> bool:
    """Whether a top-level entry of ``out_dir`` belongs to the set ReportWriter writes (replaced as a whole);
    other entries (configs, logs, the user's files) are kept across runs."""
    return (name in ("report.json", "report.html", "config.yaml") or name in PLOT_FILES
            or name in CHECKPOINT_FILES.values())  # fmt: skip


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors as lists and non-finite floats as None (report.json is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)  # paths, enums, ... as text


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (floats with 4 digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def summary_text(report: Mapping[str, Any]) -> str:
    """Readable tables of the endpoints, the alignment checks, the result rows, barriers and variance ratios."""
    out: list[str] = []
    ends = report.get("endpoints", {})
    line = "  ".join(f"{k}: acc {v['acc']:.4f}" for k, v in ends.items())
    if "ensemble" in report:
        line += f"  ensemble: acc {report['ensemble']['acc']:.4f}"
    out.append(f"endpoints  {line}")
    for m, info in report.get("alignment", {}).items():
        diff, check = info.get("max_abs_logit_diff"), info.get("self_check")
        out.append(f"alignment  {m}: {info.get('seconds', 0.0):.2f}s, sweeps {info.get('sweeps')}, "
                   f"max|Δlogit| {'-' if diff is None else f'{diff:.2e}'}, "
                   f"self-check {'-' if check is None else f'{check:.2e}'}")  # fmt: skip
    rows = report.get("results", [])
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        order = ["network", "task", "method", "correction", "aligned", "matching", "pruner", "sparsity",
                 "achieved_sparsity", "normalization", "preserved_layers", "acc", "normalized_acc", "loss",
                 "params_ratio", "flops_ratio"]  # fmt: skip
        out.append("\n" + format_table(rows, [c for c in order if c in keys]))
    lmc = report.get("lmc", {})
    if lmc.get("barrier"):
        brows = [{"variant": k, "acc_barrier": v["acc"], "loss_barrier": v["loss"]} for k, v in lmc["barrier"].items()]
        out.append("\n" + format_table(brows, ["variant", "acc_barrier", "loss_barrier"]))
    vr = report.get("variance_ratio", {})
    if vr.get("curves"):
        vrows = []
        for k, v in vr["curves"].items():
            finite = [x for x in v if x is not None and x == x]
            vrows.append({"variant": k, "mean_ratio": sum(finite) / max(len(finite), 1),
                          "last_layer": v[-1] if v else None})  # fmt: skip
        out.append("\n" + format_table(vrows, ["variant", "mean_ratio", "last_layer"]))
    return "\n".join(out)


class ReportWriter(Callback):
    """Write report.json, plots and the chosen model(s) of a ``vf merge`` / ``vf prune`` run into ``out_dir``.

    The saved models are chosen on the held-out validation half, never on the test data the reported accuracies
    come from: ``merged.pt`` (best full merge), ``merged_pfm.pt`` (best PFM system), ``pruned.pt`` (best variant
    at the highest sparsity). Only rank 0 writes; every rank has computed the same report.

    The set is all-or-nothing: it is written into ``<out_dir>.tmp-<pid>`` and published with renames (see
    :func:`vf_lightning.io.publish_dir`); other files in ``out_dir`` are kept. ``out_dir`` is checked for
    writability at ``setup``, before any work.
    """

    def __init__(self, out_dir: str = "outputs/merge", save_model: bool = True, plots: bool = True,
                 summary: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.out_dir = out_dir
        self.save_model = save_model
        self.plots = plots
        self.summary = summary
        self.run_config: dict[str, Any] = {}  # set by the CLI: the resolved configuration of the run
        self.config_yaml: str | None = None  # set by the CLI: the same as LightningCLI YAML (config.yaml)
        self.report: dict[str, Any] | None = None  # the last report written

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "validate" or trainer.sanity_checking:
            return
        rep = run_report(trainer)
        rep.add_timing(session_timing(trainer))
        report = self.build(rep)
        self.report = report
        if trainer.is_global_zero:
            self.write(report, rep, pl_module)
            self.log_report(trainer, report)
            log_outputs(trainer, {kind: (report[f"{kind}_checkpoint"]["path"], report[f"{kind}_checkpoint"])
                                  for kind in CHECKPOINT_FILES if f"{kind}_checkpoint" in report})  # fmt: skip
            if self.summary:
                print("\n" + summary_text(report) + f"\n\nreport: {Path(self.out_dir) / 'report.json'}", flush=True)

    def build(self, rep: RunReport) -> dict[str, Any]:
        """The report.json content (DESIGN §5) from the run's report."""
        report: dict[str, Any] = {"config": self.run_config}
        report.update(rep.sections)
        report["results"] = list(rep.rows)
        for key in ("lmc", "variance_ratio"):
            report.setdefault(key, {"alphas": [], "curves": {}, "barrier": {}} if key == "lmc"
                              else {"layers": [], "curves": {}})  # fmt: skip
        report["timing"] = dict(rep.timing)
        return jsonable(report)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_writable(self.out_dir)  # before any work (the CLI checks earlier still)
        if trainer.is_global_zero:
            start_run(trainer, pl_module)

    def write(self, report: dict[str, Any], rep: RunReport, pl_module: L.LightningModule) -> None:
        """Write the set (plots, checkpoints, report.json) into a staging directory next to ``out_dir``, then
        publish it with renames: a failure or kill leaves the old set or the new one, never a mix."""
        out = Path(self.out_dir)
        if out.is_symlink():
            out = out.resolve()
        clean_stale(out, owned_by_writer)
        stage = staging_dir(out)
        stage.mkdir(parents=True)
        try:
            self._write_set(report, rep, pl_module, stage, Path(self.out_dir))
            publish_dir(stage, out, owned_by_writer)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def _write_set(self, report: dict[str, Any], rep: RunReport, pl_module: L.LightningModule, stage: Path,
                   out: Path) -> None:  # fmt: skip
        """Every file of the set into ``stage``; the paths recorded in the report are those under ``out``."""
        plots: dict[str, str] = {}

        def plot(key: str, name: str, draw: Callable[[Path], Any]) -> None:
            draw(stage / name)
            plots[key] = str(out / name)

        if self.plots:
            name = report_title(report)
            lmc = report["lmc"]
            if lmc["curves"]:
                plot("interpolation", "lmc.png",
                     lambda p: plot_interpolation_curves(lmc["alphas"], lmc["curves"], p, run_name=name))  # fmt: skip
            vr = report["variance_ratio"]
            if vr["curves"]:
                curves = vr["curves"]
                if any("sparsity" in r for r in report["results"]):  # pruning: the highest sparsity only
                    top = max(r["sparsity"] for r in report["results"])
                    curves = {k: v for k, v in curves.items() if f"/{top:g}/" in k}
                plot("variance_ratio", "variance_ratio.png",
                     lambda p: plot_variance_ratios(vr["layers"], curves, p, run_name=name))  # fmt: skip
            vf = report.get("vanishing_feature", {})
            if vf.get("curves"):
                plot("vanishing_feature", "vf.png",
                     lambda p: plot_vf_profiles(vf["curves"], p, layers=vf.get("layers"), run_name=name))  # fmt: skip
            prune_rows = [r for r in report["results"] if "sparsity" in r]
            if prune_rows:
                dense = {k: v["acc"] for k, v in report.get("endpoints", {}).items() if k.startswith("dense")}
                plot("accuracy", "accuracy.png",
                     lambda p: plot_prune_accuracy(prune_rows, p, dense=dense, run_name=name))  # fmt: skip
            task_rows = [r for r in report["results"] if "task" in r]  # multi-task rows (TaskMergeCallback)
            if task_rows:
                plot("multitask_accuracy", "normalized_acc.png",
                     lambda p: plot_multitask_accuracy(task_rows, p, run_name=name))  # fmt: skip
        report["plots"] = plots
        config = getattr(pl_module, "model_config", None)
        saves = []
        if self.save_model and config is not None:
            for kind, cand in rep.candidates.items():
                name = CHECKPOINT_FILES.get(kind, f"{kind}.pt")
                meta = {"variant": cand.variant, **jsonable(cand.meta)}
                saves.append((cand.model, stage / name, meta))
                report[f"{kind}_checkpoint"] = {"path": str(out / name), **meta}
        json.dumps(report, allow_nan=False)  # strict JSON, or fail before any checkpoint is written
        for model, path, meta in saves:
            if isinstance(model, PFMModel):
                save_pfm(model, path, config, meta=meta)  # type: ignore[arg-type]
            else:
                save_model_checkpoint(model, config, path, meta=meta)  # type: ignore[arg-type]
        if self.config_yaml is not None:
            atomic_write_bytes(self.config_yaml.encode("utf-8"), stage / "config.yaml")
        atomic_write_json(report, stage / "report.json")
        write_report_html(report, stage)

    def log_report(self, trainer: L.Trainer, report: Mapping[str, Any]) -> None:
        """Headline numbers (:func:`headline`) to every logger and into the W&B run summary; the results table
        and the plots to W&B."""
        values = headline(report)
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            for lg in trainer.loggers:
                if lg is not wandb_log_logger(trainer):
                    lg.log_metrics(scalars, step=0)
        update_summary(trainer, values)
        if wandb_run(trainer) is None:
            return
        import wandb

        rows = report.get("results", [])
        payload: dict[str, Any] = {}
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
            payload["results"] = table(cols, [[r.get(c) for c in cols] for r in rows])
        for k, p in report.get("plots", {}).items():
            if Path(p).is_file():
                payload[f"plots/{k}"] = wandb.Image(p)
        log_media(trainer, payload)


def wandb_log_logger(trainer: L.Trainer) -> Any:
    """The trainer's WandbLogger, if any (its run gets the headline numbers as summary, not as history)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The run's headline numbers: endpoints, ensemble, the best full merge at 1× parameters and the best PFM
    system with its parameter ratio (each chosen on the validation half, reported on the test half), the best
    pruned network, alignment self-checks and timings."""
    out: dict[str, Any] = {}
    for k, v in report.get("endpoints", {}).items():
        out[f"endpoints/{k}/acc"], out[f"endpoints/{k}/loss"] = v["acc"], v["loss"]
    if "ensemble" in report:
        out["ensemble/acc"], out["ensemble/loss"] = report["ensemble"]["acc"], report["ensemble"]["loss"]
    names = {"merged": "best/merge", "merged_pfm": "best/pfm", "pruned": "best/pruned"}
    for kind, prefix in names.items():
        ck = report.get(f"{kind}_checkpoint")
        if not ck:
            continue
        out[f"{prefix}/variant"] = ck.get("variant")
        for key in ("test_acc", "val_acc", "params_ratio", "flops_ratio", "preserved_layers", "alpha"):
            if ck.get(key) is not None:
                out[f"{prefix}/{'acc' if key == 'test_acc' else key}"] = ck[key]
        if kind == "merged":
            out[f"{prefix}/params_ratio"] = 1.0
    for m, info in report.get("alignment", {}).items():
        for key in ("self_check", "max_abs_logit_diff", "seconds"):
            if info.get(key) is not None:
                out[f"alignment/{m}/{key}"] = info[key]
    for phase, seconds in report.get("timing", {}).items():
        out[f"timing/{phase}"] = seconds
    return out
