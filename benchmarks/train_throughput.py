"""Throughput of PairModule training vs. a hand-written PyTorch loop (same model, data, optimizer).

Prints images/s of both and the ratio Lightning / plain loop (aim ≥ 0.95). Runs on CPU here and on
a GPU when one is available (bf16 autocast + channels_last there, in both loops). On the CPU, PairModule trains
the two networks concurrently (one worker thread each, ``concurrent: null``); the benchmark also times it with
``concurrent: false`` (one network after the other, like the plain loop) and prints the speed-up.

    python benchmarks/train_throughput.py [--samples 6144] [--repeats 2] [--arch vgg11 --width 0.25]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F

from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.lit.base import build_seeded
from vf_lightning.models import ModelConfig


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def make_data(args: argparse.Namespace) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        num_workers=args.workers, train_subset=args.samples, batch_size=args.batch_size, pad_to_32=True
    )
    dm.setup("fit")
    dm.pair_streams = True
    return dm


def lightning_epoch(args: argparse.Namespace, cfg: ModelConfig, device: str, concurrent: bool | None = None) -> float:
    dm = make_data(args)
    module = PairModule(cfg, OptimConfig(lr=0.05), concurrent=concurrent)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
        precision="bf16-mixed" if device == "gpu" else "32-true", num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    return timer.seconds


def plain_epoch(args: argparse.Namespace, cfg: ModelConfig, device: str) -> float:
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dm = make_data(args)
    loaders = dm.train_dataloader()
    net_a, net_b = build_seeded(cfg, 1).to(dev), build_seeded(cfg, 2).to(dev)
    cl = dev.type == "cuda"
    if cl:
        net_a, net_b = net_a.to(memory_format=torch.channels_last), net_b.to(memory_format=torch.channels_last)
    opt = OptimConfig(lr=0.05).build(list(net_a.parameters()) + list(net_b.parameters()))
    net_a.train()
    net_b.train()
    if cl:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for (xa, ya), (xb, yb) in zip(loaders["a"], loaders["b"]):
        xa, ya, xb, yb = (t.to(dev, non_blocking=True) for t in (xa, ya, xb, yb))
        if cl:
            xa, xb = xa.contiguous(memory_format=torch.channels_last), xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cl):
            loss = F.cross_entropy(net_a(xa), ya) + F.cross_entropy(net_b(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cl:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=6144)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=0.25)
    args = p.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(arch=args.arch, norm="bn", width=args.width, in_channels=1)
    images = 2 * (args.samples // args.batch_size) * args.batch_size  # two networks, drop_last
    plain, light, seq = [], [], []
    for _ in range(args.repeats):  # interleaved, best of N
        plain.append(plain_epoch(args, cfg, device))
        light.append(lightning_epoch(args, cfg, device))
        if device == "cpu":
            seq.append(lightning_epoch(args, cfg, device, concurrent=False))
    tp, tl = min(plain), min(light)
    print(f"device: {device}  model: {args.arch} x{args.width} BN pair  images/epoch: {images}")
    print(f"plain loop : {tp:7.2f} s  {images / tp:9.0f} images/s")
    print(f"Lightning  : {tl:7.2f} s  {images / tl:9.0f} images/s")
    if seq:
        ts = min(seq)
        print(f"Lightning, concurrent: false : {ts:7.2f} s  {images / ts:9.0f} images/s")
        print(f"throughput ratio concurrent / one network after the other: {ts / tl:.3f}")
        print(f"throughput ratio Lightning (concurrent: false) / plain loop: {tp / ts:.3f}")
    print(f"throughput ratio Lightning / plain loop: {tp / tl:.3f}")


if __name__ == "__main__":
    main()
