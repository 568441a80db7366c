"""LightningModules: one classifier, or a pair of differently initialized networks trained side by side."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vf_lightning.checkpoint import save_model_checkpoint
from vf_lightning.io import check_writable
from vf_lightning.lit.base import BaseModule, as_config, build_seeded
from vf_lightning.lit.concurrent import concurrent_losses
from vf_lightning.lit.optim import OptimConfig, ScheduleConfig
from vf_lightning.models import ModelConfig


class _EvalMetrics(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.loss = MeanMetric()

    def update(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self.acc.update(logits, y)
        self.acc5.update(logits, y)
        self.loss.update(loss, weight=y.shape[0])


class ClassifierModule(BaseModule):
    """Train one network of the zoo with cross-entropy; logs ``train/loss``, ``val/acc``, ``val/acc5``, ``val/loss``.

    Args:
        net: the architecture (``ModelConfig``: arch, norm, width, ...).
        optim: optimizer settings; schedule: per-iteration learning-rate schedule.
        seed: initialization seed of the network (None: the global RNG).
        compile: wrap the network in ``torch.compile``; channels_last: None = on for conv nets.
    """

    def __init__(
        self,
        net: ModelConfig,
        optim: OptimConfig = OptimConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        seed: int | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(compile=compile, channels_last=channels_last)
        self.net_config: ModelConfig = as_config(net, ModelConfig)
        self.optim = as_config(optim, OptimConfig)
        self.schedule = as_config(schedule, ScheduleConfig)
        self.save_hyperparameters(
            self.cli_hparams(
                {
                    "net": self.net_config.to_dict(),
                    "optim": self.config_dict(self.optim),
                    "schedule": self.config_dict(self.schedule),
                    "seed": seed,
                    "compile": compile,
                    "channels_last": channels_last,
                }
            )
        )
        self.net = build_seeded(self.net_config, seed)
        self.val_metrics = _EvalMetrics(self.net_config.num_classes)

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_net("net", x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss, c1, _ = self.loss_and_stats(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", c1.float() / y.shape[0], on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.val_metrics.update(logits, y, loss)
        m = self.val_metrics
        self.log_dict({"val/acc": m.acc, "val/acc5": m.acc5, "val/loss": m.loss}, prog_bar=True)

    test_step = validation_step

    def export_network(self, path: str | Path) -> Path:
        """Write the network as a standalone model checkpoint (config + weights)."""
        return save_model_checkpoint(self.net, self.net_config, path, meta={"source": "ClassifierModule"})


class PairModule(BaseModule):
    """Train two differently initialized networks of one architecture side by side in one run.

    Each network has its own initialization seed and its own data order (the data module provides two
    training streams). One optimizer holds both parameter sets; the loss is ``loss_a + loss_b``, whose
    gradients are independent, so this equals two separate runs with the same recipe. Both networks live
    in one checkpoint (``net_a.*``, ``net_b.*``); ``export_dir`` writes each as a standalone checkpoint
    (``net_a.pt``, ``net_b.pt``) at the end of fit.

    ``concurrent``: train the two networks side by side in two worker threads, each with half of the intra-op
    threads (:mod:`vf_lightning.lit.concurrent`; faster for small networks on the CPU). None (default) = on when
    one process trains on the CPU in 32-bit precision with at least two intra-op threads, without ``compile`` and
    without dropout; True demands it (an error names what prevents it); False = one network after the other.
    Each network's arithmetic is then that of one thread: the result equals ``concurrent: false`` with
    ``torch.set_num_threads(1)`` bit for bit (not the two-thread sequential run, whose reductions split
    differently). A network whose forward draws random numbers outside ``nn.Dropout`` needs ``concurrent:
    false`` to stay reproducible.
    """

    def __init__(
        self,
        net: ModelConfig,
        optim: OptimConfig = OptimConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        seed_a: int = 1,
        seed_b: int = 2,
        export_dir: str | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
        concurrent: bool | None = None,
    ) -> None:
        super().__init__(compile=compile, channels_last=channels_last)
        if seed_a == seed_b:
            raise ValueError(f"PairModule needs two different seeds, got seed_a = seed_b = {seed_a}")
        self.net_config: ModelConfig = as_config(net, ModelConfig)
        self.optim = as_config(optim, OptimConfig)
        self.schedule = as_config(schedule, ScheduleConfig)
        self.export_dir = export_dir
        self.save_hyperparameters(
            self.cli_hparams(
                {
                    "net": self.net_config.to_dict(),
                    "optim": self.config_dict(self.optim),
                    "schedule": self.config_dict(self.schedule),
                    "seed_a": seed_a,
                    "seed_b": seed_b,
                    "export_dir": export_dir,
                    "compile": compile,
                    "channels_last": channels_last,
                    "concurrent": concurrent,
                }
            )
        )
        self.concurrent = concurrent
        self.concurrent_threads = 0  # intra-op threads per network while training concurrently (0: one by one)
        self.net_a = build_seeded(self.net_config, seed_a)
        self.net_b = build_seeded(self.net_config, seed_b)
        n = self.net_config.num_classes
        self.val_a = _EvalMetrics(n)
        self.val_b = _EvalMetrics(n)

    def networks(self) -> dict[str, nn.Module]:
        return {"a": self.net_a, "b": self.net_b}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_dir:
            check_writable(self.export_dir, "model.init_args.export_dir")  # now, not after the whole training run
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "pair_streams"):
            dm.pair_streams = True  # ask for two independent training orders
        super().setup(stage)
        if stage == "fit":
            self.concurrent_threads = self.concurrency()

    def concurrency(self) -> int:
        """Intra-op threads per network when this fit trains the pair concurrently, 0 when one after the other."""
        trainer = self.trainer
        threads = torch.get_num_threads()
        obstacles = []
        if trainer.world_size > 1:
            obstacles.append(f"{trainer.world_size} processes train it")
        if trainer.strategy.root_device.type != "cpu":
            obstacles.append(f"it trains on {trainer.strategy.root_device.type}")
        if str(trainer.precision) not in ("32-true", "32"):
            obstacles.append(f"precision is {trainer.precision} (worker threads do not inherit autocast)")
        if self.compile_nets:
            obstacles.append("compile is on")
        if threads < 2:
            obstacles.append("torch has one intra-op thread")
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in self.modules()):
            obstacles.append("the networks use dropout (two threads drawing from torch's one global generator would "
                             "make the run irreproducible)")  # fmt: skip
        if obstacles and self.concurrent:
            raise ValueError(f"PairModule: concurrent=True, but {'; '.join(obstacles)}; set concurrent to null "
                             "(automatic) or false")  # fmt: skip
        return 0 if obstacles or self.concurrent is False else threads // 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_net("a", x), self.forward_net("b", x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):
            (xa, ya), (xb, yb) = batch["a"], batch["b"]
        else:
            (xa, ya), (xb, yb) = batch, batch
        if self.concurrent_threads:
            (loss_a, loss_b), extras = concurrent_losses(
                [self.net_a, self.net_b],
                [partial(self._loss, "a", xa, ya), partial(self._loss, "b", xb, yb)],
                self.concurrent_threads,
            )
        else:
            (loss_a, extra_a), (loss_b, extra_b) = self._loss("a", xa, ya), self._loss("b", xb, yb)
            extras = [extra_a, extra_b]
        ca, cb = extras[0]["correct"], extras[1]["correct"]
        self.log_dict({"train/loss_a": loss_a, "train/loss_b": loss_b}, prog_bar=True)
        self.log_dict(
            {"train/acc_a": ca.float() / ya.shape[0], "train/acc_b": cb.float() / yb.shape[0]},
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # epoch-level: the mean over every rank's batches under DDP
        )
        return loss_a + loss_b

    def _loss(self, key: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, correct, _ = self.loss_and_stats(self.forward_net(key, x), y)
        return loss, {"correct": correct}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for key, metrics in (("a", self.val_a), ("b", self.val_b)):
            logits = self.forward_net(key, x)
            metrics.update(logits, y, nn.functional.cross_entropy(logits, y))
            self.log_dict(
                {f"val/acc_{key}": metrics.acc, f"val/acc5_{key}": metrics.acc5, f"val/loss_{key}": metrics.loss},
                prog_bar=True,
            )

    test_step = validation_step

    def export_networks(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``net_a.pt`` and ``net_b.pt`` (standalone model checkpoints) into ``out_dir``."""
        out = Path(out_dir)
        meta = {"source": "PairModule", "epoch": int(self.current_epoch) if self._trainer is not None else None}
        pa = save_model_checkpoint(
            self.net_a, self.net_config, out / "net_a.pt", meta={**meta, "seed": self.hparams["seed_a"]}
        )
        pb = save_model_checkpoint(
            self.net_b, self.net_config, out / "net_b.pt", meta={**meta, "seed": self.hparams["seed_b"]}
        )
        return pa, pb

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export_networks(self.export_dir)
