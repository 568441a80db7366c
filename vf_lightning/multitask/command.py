"""``vf merge`` in multi-task mode: merge experts' bodies, correct per task, write report.json, plots and W&B logs.

Usage: ``vf merge --config configs/merge/fmnist_nonlocal.yaml`` (YAML with ``mode: multitask``), or directly
``python -m vf_lightning.multitask.command --config FILE`` / ``--print_config``.
"""

from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from vf_lightning.data import DATAMODULES
from vf_lightning.io import atomic_write_bytes, atomic_write_json
from vf_lightning.loggers import resolve_offline
from vf_lightning.merge.experts import Expert
from vf_lightning.merge.multitask import TaskData, merge_experts
from vf_lightning.stats import iter_inputs


@dataclass
class ExpertEntry:
    """One expert checkpoint; ``task``, ``classes`` and ``foundation`` default to the checkpoint's metadata."""

    path: str
    task: str | None = None
    classes: list[int] | None = None
    foundation: str | None = None


@dataclass
class DataEntry:
    """Where each task's data comes from: the dataset restricted to the task's classes (relabelled 0..k-1).

    Calibration inputs are the first ``calib_samples`` of the data module's fixed calibration subset of the
    training split; the test split is divided into a validation half (even indices, λ choice) and a test
    half (odd indices, reported numbers).
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    pad_to_32: bool = False
    calib_samples: int = 1000
    batch_size: int = 512
    seed: int = 0


@dataclass
class MultitaskConfig:
    """Multi-task merge of experts (nonlocal-spec): methods × corrections × with/without alignment."""

    mode: Literal["multitask"] = "multitask"
    setting: str = "nonlocal"
    experts: list[ExpertEntry] = field(default_factory=list)
    foundations: dict[str, str] = field(default_factory=dict)
    reference: str = "a"
    data: DataEntry = field(default_factory=DataEntry)
    methods: list[str] = field(default_factory=lambda: ["task_arithmetic", "ties", "tall", "consensus"])
    corrections: list[Literal["none", "repair", "tact"]] = field(default_factory=lambda: ["none", "repair", "tact"])
    align: list[bool] = field(default_factory=lambda: [True, False])
    grids: dict[str, list[float]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    eps: float = 1e-5
    max_scale: float = 1e3
    device: str = "auto"
    out_dir: str = "outputs/multitask"
    wandb: bool = True
    wandb_project: str = "vf-lightning"
    seed: int = 0


def load_experts(cfg: MultitaskConfig, device: torch.device) -> tuple[list[Expert], dict[str, Expert]]:
    """Experts and foundations on ``device`` (task, classes and foundation from the checkpoints if not given)."""
    if not cfg.experts:
        raise ValueError("the multitask config lists no experts")
    if not cfg.foundations:
        raise ValueError("the multitask config lists no foundations; give at least the one the experts came from")
    experts = []
    for e in cfg.experts:
        ex = Expert.from_checkpoint(e.path, e.task, e.classes, e.foundation)
        if not ex.classes:
            raise ValueError(f"expert {e.path!r}: no `classes` in the config nor in its checkpoint; list the "
                             "original labels of its task")
        experts.append(replace(ex, foundation=ex.foundation or cfg.reference).to(device))
    foundations = {name: Expert.from_checkpoint(path, name, foundation=name).to(device)
                   for name, path in cfg.foundations.items()}
    return experts, foundations


def load_tasks(cfg: MultitaskConfig, experts: list[Expert]) -> list[TaskData]:
    """Calibration, validation and test data of every expert's task."""
    if cfg.data.dataset not in DATAMODULES:
        raise ValueError(f"unknown dataset {cfg.data.dataset!r}; choose one of {sorted(DATAMODULES)}")
    tasks = []
    for e in experts:
        dm = DATAMODULES[cfg.data.dataset](data_dir=cfg.data.data_dir, pad_to_32=cfg.data.pad_to_32,
                                           classes=e.classes, calib_samples=cfg.data.calib_samples,
                                           eval_batch_size=cfg.data.batch_size, num_workers=0, seed=cfg.data.seed)
        dm.setup("fit")
        calib = list(iter_inputs(dm.calibration_dataloader(cfg.data.calib_samples, shard=False), "cpu"))
        xs, ys = zip(*[(x, y) for x, y in dm.val_dataloader()])
        x, y = torch.cat(xs), torch.cat(ys)
        b = cfg.data.batch_size
        val = [(x[0::2][i : i + b], y[0::2][i : i + b]) for i in range(0, x[0::2].shape[0], b)]
        test = [(x[1::2][i : i + b], y[1::2][i : i + b]) for i in range(0, x[1::2].shape[0], b)]
        tasks.append(TaskData(e.name, calib, val, test))
    return tasks


def run(cfg: MultitaskConfig, command: str = "") -> dict[str, Any]:
    """Run every (alignment, method, correction) variant and write ``report.json`` and plots into ``out_dir``."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    experts, foundations = load_experts(cfg, device)
    tasks = load_tasks(cfg, experts)
    res = merge_experts(experts, foundations, tasks, cfg.methods, cfg.corrections, cfg.align, cfg.grids, cfg.options,
                        {"seed": cfg.seed}, cfg.eps, cfg.max_scale, cfg.reference)
    for s in res.summary:
        print(f"[multitask] aligned={s['aligned']} {s['method']:>15s} + {s['correction']:<6s} mean normalized acc "
              f"{s['mean_normalized_acc']:.3f} (λ {s['lam']})", flush=True)
    report = {
        "mode": "multitask",
        "setting": cfg.setting,
        "command": command,
        "config": asdict(cfg),
        "experts": res.experts,
        "alignment": res.alignment,
        "sites": res.variance_ratio["layers"],
        "results": [{"setting": cfg.setting, **row} for row in res.rows],
        "summary": res.summary,
        "variance_ratio": res.variance_ratio,
        "variance_ratio_of_means": res.variance_ratio_of_means,
        "timing": res.timing,
    }
    out = Path(cfg.out_dir)
    atomic_write_json(report, out / "report.json")
    write_plots(report, out)
    if cfg.wandb:
        log_wandb(report, cfg)
    return report


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """``normalized_acc.png`` (mean normalized accuracy per variant) and ``variance_ratio.png`` (per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    summ = report["summary"]
    if not summ:
        return paths
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(summ)), 4))
    labels = [f"{s['method']}+{s['correction']}{' (al.)' if s['aligned'] else ''}" for s in summ]
    colors = {"none": "tab:gray", "repair": "tab:orange", "tact": "tab:green"}
    ax.bar(range(len(summ)), [s["mean_normalized_acc"] for s in summ], color=[colors.get(s["correction"], "b")
                                                                               for s in summ])
    ax.set_xticks(range(len(summ)), labels, rotation=75, fontsize=7)
    ax.set_ylabel("mean normalized accuracy")
    ax.set_title(f"multi-task merge ({report['setting']})")
    fig.tight_layout()
    for name, f in (("normalized_acc.png", fig),):
        buf = io.BytesIO()
        f.savefig(buf, format="png", dpi=120)
        paths.append(atomic_write_bytes(buf.getvalue(), out / name))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, curve in report["variance_ratio"]["curves"].items():
        style = {"none": ":", "repair": "--", "tact": "-"}[key.split("/")[1]]
        ax.plot(range(1, len(curve) + 1), curve, style, label=key)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("layer (correction site)")
    ax.set_ylabel("variance ratio merged / expert")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    paths.append(atomic_write_bytes(buf.getvalue(), out / "variance_ratio.png"))
    plt.close(fig)
    return paths


def log_wandb(report: dict[str, Any], cfg: MultitaskConfig) -> None:
    """Log the summary and per-layer variance ratios as W&B tables (offline unless W&B is configured)."""
    try:
        import wandb
    except ImportError:
        print("[multitask] wandb is not installed; skipping W&B logging", file=sys.stderr)
        return
    mode = os.environ.get("WANDB_MODE") or ("offline" if resolve_offline(None) else "online")
    run = wandb.init(project=cfg.wandb_project, name=f"multitask-{cfg.setting}", dir=cfg.out_dir, mode=mode,  # type: ignore[arg-type]
                     config=report["config"], reinit=True)
    try:
        cols: list[str | int] = ["method", "correction", "aligned", "mean_acc", "mean_normalized_acc"]
        table = [[s[c] for c in cols] for s in report["summary"]]
        run.log({"multitask/summary": wandb.Table(columns=cols, data=table)})
        curves = report["variance_ratio"]["curves"]
        vr = wandb.Table(columns=["variant", "layer", "variance_ratio"],
                         data=[[k, i, v] for k, c in curves.items() for i, v in enumerate(c)])
        run.log({"multitask/variance_ratio": vr})
        for name in ("normalized_acc.png", "variance_ratio.png"):
            p = Path(cfg.out_dir) / name
            if p.is_file():
                run.log({f"multitask/{name[:-4]}": wandb.Image(str(p))})
    finally:
        run.finish()


def parse(args: list[str]) -> MultitaskConfig:
    """Parse ``--config FILE`` / options into a :class:`MultitaskConfig` (``--print_config`` prints and exits)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="vf merge (mode: multitask)", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(MultitaskConfig, as_positional=False, fail_untyped=True)
    ns = parser.parse_args(args)
    init = parser.instantiate_classes(ns)
    kwargs = {k: v for k, v in vars(init).items() if k in MultitaskConfig.__dataclass_fields__}
    kwargs["experts"] = [e if isinstance(e, ExpertEntry) else ExpertEntry(**vars(e) if hasattr(e, "__dict__") else e)
                         for e in kwargs.get("experts", [])]
    if not isinstance(kwargs.get("data"), DataEntry):
        d = kwargs.get("data")
        kwargs["data"] = DataEntry(**(vars(d) if hasattr(d, "__dict__") else (d or {})))
    return replace(MultitaskConfig(), **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point used by ``vf merge`` when the YAML has ``mode: multitask``."""
    argv = list(sys.argv[1:] if args is None else args)
    cfg = parse(argv)
    t0 = time.perf_counter()
    report = run(cfg, command="vf merge " + " ".join(argv))
    print(f"[multitask] wrote {Path(cfg.out_dir) / 'report.json'} ({len(report['results'])} rows, "
          f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
