"""Cost of the diagnostic callbacks at a fit config's cadence: callback time / epoch time (target ≤ 10 %).

Trains the config's model and data (default: the Fashion-MNIST VGG pair of ``make demo``) with the
``vf_lightning.callbacks`` entries of its ``trainer.callbacks`` list and prints, per epoch, the training +
validation time, the time of each callback and the ratio. Not a test: it prints numbers.

    python benchmarks/callbacks.py [--config configs/fit/fmnist_vgg_pair.yaml] [--epochs 1] [--train-subset N]
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from vf_lightning.callbacks import DiagnosticCallback


def _instantiate(spec: dict[str, Any]) -> Any:
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


class EpochTimer(L.Callback):
    """Wall time of each training epoch including its validation (callbacks' own time is subtracted later)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self.start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fit/fmnist_vgg_pair.yaml")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=None, help="train on N samples (default: the full set)")
    ap.add_argument("--accelerator", default="auto")
    args = ap.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    L.seed_everything(cfg.get("seed_everything", 0))
    model_spec = cfg["model"]
    data_spec = cfg["data"]
    data_spec.setdefault("init_args", {})["num_workers"] = 0
    if args.train_subset:
        data_spec["init_args"]["train_subset"] = args.train_subset
    model_spec.get("init_args", {}).pop("export_dir", None)
    module, dm = _instantiate(model_spec), _instantiate(data_spec)
    diag = [_instantiate(c) for c in cfg["trainer"].get("callbacks", []) if "vf_lightning.callbacks" in c["class_path"]]
    if not diag:
        raise SystemExit(f"{args.config} turns on no vf_lightning.callbacks")
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer, *diag], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, dm)

    print(f"\n{args.config}: {args.epochs} epoch(s), device {module.device}, threads {torch.get_num_threads()}")
    for e, total in enumerate(timer.epochs):
        per_cb = {type(c).__name__: (c.seconds[e] if e < len(c.seconds) else 0.0) for c in diag}
        cb_time = sum(per_cb.values())
        epoch_time = total - cb_time
        parts = "  ".join(f"{k} {v:.2f}s" for k, v in per_cb.items())
        print(f"epoch {e}: train+val {epoch_time:.1f}s  callbacks {cb_time:.2f}s ({parts})  "
              f"ratio {cb_time / epoch_time:.3f}")  # fmt: skip
    if len(timer.epochs) > 1:  # the first run also builds the cached calibration / evaluation subsets
        steady = [sum(c.seconds[e] for c in diag if e < len(c.seconds)) for e in range(1, len(timer.epochs))]
        epochs = [t - s for t, s in zip(timer.epochs[1:], steady)]
        print(f"steady state (epochs ≥ 1): ratio {sum(steady) / sum(epochs):.3f}")
    assert all(isinstance(c, DiagnosticCallback) for c in diag)


if __name__ == "__main__":
    main()
