"""Train a pair with DDP on two CPU processes (gloo); each rank writes a hash of its final weights.

Usage: python tests/scripts/ddp_pair.py OUT_DIR   (Lightning re-launches this script for rank 1)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning as L
import torch

from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.models import ModelConfig


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = FashionMNISTDataModule(num_workers=0, train_subset=1024, val_subset=256, batch_size=64)
    net = ModelConfig(arch="mlp", in_channels=1, image_size=28, hidden=(32,))
    module = PairModule(net, OptimConfig(lr=0.05))
    before = weights_digest(module)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(module, dm)
    rank = trainer.global_rank
    acc = float(trainer.callback_metrics["val/acc_a"]), float(trainer.callback_metrics["val/acc_b"])
    train_acc = float(trainer.callback_metrics["train/acc_a"])  # epoch-level, logged with sync_dist
    (out / f"rank{rank}.txt").write_text(f"{before} {weights_digest(module)} {acc[0]} {acc[1]} {trainer.world_size} "
                                         f"{train_acc}\n")


if __name__ == "__main__":
    main()
