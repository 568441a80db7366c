"""Shared pieces of ``vf merge`` / ``vf prune``: typed data options, devices, timing, reporting, logging."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vf_lightning.data import DATAMODULES, VisionDataModule
from vf_lightning.stats import batch_inputs


@dataclass
class DataOptions:
    """Which data the command evaluates and calibrates on.

    ``name`` is a registered data module (fashion_mnist, mnist, cifar10, cifar100, digits, imagenet);
    ``calib_samples`` is the size of the fixed, augmentation-free calibration subset of the training set used
    by every statistics pass; ``eval_samples`` limits the test set (None = all of it).
    """

    name: str = "fashion_mnist"
    data_dir: str | None = None
    pad_to_32: bool = True
    batch_size: int = 500
    calib_samples: int = 2048
    eval_samples: int | None = None
    classes: list[int] | None = None
    num_workers: int = 0

    def build(self) -> VisionDataModule:
        if self.name not in DATAMODULES:
            raise ValueError(f"unknown data module {self.name!r}; choose one of {', '.join(sorted(DATAMODULES))}")
        dm = DATAMODULES[self.name](
            data_dir=self.data_dir,
            batch_size=self.batch_size,
            eval_batch_size=self.batch_size,
            num_workers=self.num_workers,
            augment=False,
            pad_to_32=self.pad_to_32,
            val_subset=self.eval_samples,
            calib_samples=self.calib_samples,
            classes=self.classes,
        )
        dm.setup("fit")
        return dm


@dataclass
class LoggerOptions:
    """Where results go besides report.json: ``wandb`` (offline unless W&B is set up), ``csv`` or ``none``."""

    kind: Literal["wandb", "csv", "none"] = "wandb"
    project: str = "vf-lightning"
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def pick_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_batches(loader: DataLoader[Any], max_bytes: int = 2**30) -> Any:
    """The loader's batches as a list (read and normalized once, reused by every pass) when they fit in
    ``max_bytes``; otherwise the loader itself (e.g. ImageNet)."""
    first = batch_inputs(next(iter(loader)))
    size = len(loader.dataset) * first[0].numel() * first.element_size()  # type: ignore[arg-type]
    return list(loader) if size <= max_bytes else loader


def first_inputs(loader: DataLoader[Any], n: int, device: torch.device) -> torch.Tensor:
    """The first ``n`` inputs of a loader (example input for tracing and FLOP counting)."""
    return batch_inputs(next(iter(loader)))[:n].to(device)


class Timer:
    """Accumulates wall time per phase (statistics, matching, evaluation, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class Ensemble(nn.Module):
    """Average of the members' logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


@torch.no_grad()
def max_abs_logit_diff(m1: nn.Module, m2: nn.Module, loader: DataLoader[Any], max_samples: int = 1024) -> float:
    """Largest |Δlogit| between two models (eval mode) over the first ``max_samples`` evaluation inputs."""
    from vf_lightning.stats import iter_inputs, model_device

    m1.eval()
    m2.eval()
    worst = 0.0
    for x in iter_inputs(loader, model_device(m1), max_samples):
        worst = max(worst, float((m1(x) - m2(x)).abs().max()))
    return worst


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (floats with 4 digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


class ResultLogger:
    """Logs scalars, tables and images of a command run to W&B (offline by default) or CSV; rank 0 only."""

    def __init__(self, opts: LoggerOptions, out_dir: Path, config: Mapping[str, Any], job: str) -> None:
        self.kind = opts.kind
        self.run: Any = None
        self.csv_rows: list[dict[str, Any]] = []
        self.out_dir = out_dir
        if self.kind == "wandb":
            import wandb

            from vf_lightning.loggers import resolve_offline

            self.run = wandb.init(
                project=opts.project,
                name=opts.name,
                job_type=job,
                tags=opts.tags,
                config=dict(config),
                dir=str(out_dir),
                mode="offline" if resolve_offline(None) else "online",
                reinit="finish_previous",
            )

    def log_rows(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self.run is not None:
            import wandb

            columns: list[str | int] = list(rows[0].keys())
            self.run.log({key: wandb.Table(columns=columns, data=[[r.get(str(c)) for c in columns] for r in rows])})
        self.csv_rows.extend({"table": key, **r} for r in rows)

    def log_scalars(self, values: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.log(dict(values))
        self.csv_rows.append({"table": "scalars", **values})

    def log_curve(self, key: str, xs: Sequence[float], curves: Mapping[str, Sequence[float]], xname: str) -> None:
        """One W&B line plot with a line per curve (``wandb.plot.line_series``)."""
        if self.run is not None and curves:
            import wandb

            self.run.log(
                {
                    key: wandb.plot.line_series(
                        xs=list(xs), ys=[list(v) for v in curves.values()], keys=list(curves), title=key, xname=xname
                    )
                }
            )

    def log_images(self, paths: Mapping[str, Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(p)) for k, p in paths.items() if Path(p).is_file()})

    def finish(self) -> None:
        if self.kind == "csv" and self.csv_rows:
            import csv
            import io

            from vf_lightning.io import atomic_write_bytes

            columns: list[str] = []
            for r in self.csv_rows:
                columns += [c for c in r if c not in columns]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=columns)
            w.writeheader()
            w.writerows(self.csv_rows)
            atomic_write_bytes(buf.getvalue().encode(), self.out_dir / "results.csv")
        if self.run is not None:
            self.run.finish()


def is_rank_zero() -> bool:
    """True outside DDP or on global rank 0 (only rank 0 writes files and logs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
