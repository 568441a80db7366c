"""Train a pair for one epoch with DDP on two CPU processes (gloo) with the merge and variance callbacks.

Each rank writes the scalars its callbacks logged (``rank<r>.json``); rank 0 also saves the final weights
(``pair.pt``) so the test can recompute the same numbers in a single process.
Usage: python tests/scripts/ddp_callbacks.py OUT_DIR   (Lightning re-launches this script for rank 1)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from vf_lightning.callbacks import InterpolationCallback, MergeCallback, VarianceCollapseCallback

from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.models import ModelConfig

NET = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1, num_classes=10)
OPTS = {"calib_samples": 128, "eval_samples": 256, "batch_size": 64}


def data() -> FashionMNISTDataModule:
    return FashionMNISTDataModule(num_workers=0, train_subset=512, val_subset=256, batch_size=64, pad_to_32=True,
                                  calib_samples=128, augment=False)  # fmt: skip


def callbacks() -> list[L.Callback]:
    return [
        MergeCallback(matchings=["weight", "activation"], normalizations=["none", "reset"], **OPTS),
        InterpolationCallback(matchings=["weight"], normalizations=["none"], alphas=3, **OPTS),
        VarianceCollapseCallback(matchings=["weight"], normalizations=["reset"], **OPTS),
    ]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = PairModule(NET, OptimConfig(lr=0.05))
    cbs = callbacks()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out), callbacks=cbs)  # fmt: skip
    trainer.fit(module, data())
    scalars: dict[str, float] = {}
    for cb in cbs:
        scalars.update(cb.last)  # type: ignore[attr-defined]
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.world_size, "scalars": scalars}))
    if rank == 0:
        torch.save({"a": module.net_a.state_dict(), "b": module.net_b.state_dict()}, out / "pair.pt")


if __name__ == "__main__":
    main()
