"""Cost of the statistics pass of `vf merge` against the plain forward passes it needs, and a merge's phase times.

For each pair (default: a CIFAR-shaped VGG16-BN pair and a ResNet-20 pair, random weights, random 32×32 inputs:
the costs do not depend on training), this

1. times the merge session's reference-statistics pass (:func:`vf_lightning.repair.reference_stats` of A and B
   at every site the session reads: correction sites, variance-ratio sites, PFM's layers) against plain eval
   forward passes of A and B over the same calibration inputs, interleaved best of ``--repeats`` or more
   (until ``--min-seconds``, :mod:`timing`): the ratio
   ``stats_over_forward`` (target ≤ 1.3);
2. runs one merge variant (weight matching, none + ``--normalization``, the variance ratio of both, two more α)
   in a fresh :class:`~vf_lightning.merge.MergeSession` and prints its phase seconds (report.json ``timing``).

``--checkpoints A.pt B.pt`` measures a trained pair instead (e.g. ``outputs/fmnist_vgg_pair/net_{a,b}.pt`` of
``make demo``, on Fashion-MNIST). ``--json F`` writes every number and ``stats_over_forward`` (the largest
ratio) to ``F``.

    python benchmarks/merge.py [--archs vgg16 resnet20] [--calib 1024] [--repeats 5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
from timing import interleaved  # benchmarks/timing.py (this script's folder is on the path)
from torch import nn

from vf_lightning.merge import MergeSession
from vf_lightning.merge.session import SessionData
from vf_lightning.models import ModelConfig, build_model, fast_memory_format
from vf_lightning.repair import reference_stats
from vf_lightning.runtime import tune_allocator


@torch.no_grad()
def forward_all(models: Sequence[nn.Module], batches: Sequence[torch.Tensor], device: torch.device) -> None:
    """Plain eval forward passes of ``models`` over ``batches`` (what a statistics pass needs at the least)."""
    for x in batches:
        x = x.to(device, non_blocking=True)
        for m in models:
            m(x)


def stats_vs_forward(models: list[nn.Module], calib: list[torch.Tensor], sites: list[str], device: torch.device,
                     repeats: int, min_seconds: float = 0.0) -> dict[str, float]:  # fmt: skip
    """Best seconds of the reference-statistics pass and of the plain forward passes, interleaved (at least
    ``repeats`` of each, more until both ran ``min_seconds``; robust to a shared, noisy machine), after one
    warm-up of each."""
    for m in models:
        m.eval()
    forward_all(models, calib[:1], device)
    reference_stats(models, calib[:1], sites)
    fwds, passes = interleaved(lambda: forward_all(models, calib, device),
                               lambda: reference_stats(models, calib, sites), device, repeats, min_seconds)
    fwd, stats = min(fwds), min(passes)
    return {"stats_seconds": stats, "forward_seconds": fwd, "ratio": stats / fwd, "repeats": len(passes)}


def synthetic_pair(arch: str, calib: int, n_eval: int, batch: int, device: torch.device
                   ) -> tuple[list[nn.Module], SessionData]:  # fmt: skip
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, norm="bn")
    models = [fast_memory_format(build_model(cfg).to(device)).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(max(calib // batch, 1))]
    ev = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
          for _ in range(max(n_eval // batch, 1))]
    return models, SessionData(xs, ev, None, device)


def checkpoint_pair(paths: Sequence[str], calib: int, n_eval: int, batch: int, device: torch.device
                    ) -> tuple[list[nn.Module], SessionData]:  # fmt: skip
    from vf_lightning.callbacks import session_data

    from vf_lightning.checkpoint import load_networks
    from vf_lightning.data import FashionMNISTDataModule

    models, cfgs = load_networks(list(paths))
    dm = FashionMNISTDataModule(pad_to_32=cfgs[0].image_size == 32, num_workers=0, calib_samples=calib,
                                val_subset=n_eval)  # fmt: skip
    dm.setup("fit")
    return [m.to(device).eval() for m in models], session_data(dm, None, None, batch, device)


def bench_pair(name: str, models: list[nn.Module], data: SessionData, args: argparse.Namespace) -> dict[str, Any]:
    device = data.device
    s = MergeSession(models, data)
    t0 = time.perf_counter()
    rows = {}
    for norm in ("none", args.normalization):
        rows[norm] = s.evaluate_variant(args.matching, norm)
        s.variance_ratio(args.matching, norm)
    for alpha in (0.25, 0.75):
        s.evaluate_variant(args.matching, "none", alpha)
    phases = {**s.timer.seconds, "total": time.perf_counter() - t0}
    # the statistics pass the session made: A and the aligned B at every site it reads
    refs = s.merge(args.matching).endpoints
    sv = stats_vs_forward(list(refs), data.calib, s.stat_sites, device, args.repeats, args.min_seconds)
    n_calib = sum(len(b) for b in data.calib)
    print(f"{name}: {len(s.stat_sites)} statistics sites, {n_calib} calibration images, device {device}")
    print(f"  statistics pass {sv['stats_seconds']:.2f} s, plain forward passes of A and B "
          f"{sv['forward_seconds']:.2f} s → stats_over_forward {sv['ratio']:.2f}")
    print(f"  merge session ({args.matching} matching, none + {args.normalization}, variance ratios, 2 more α): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    return {"name": name, "sites": len(s.stat_sites), "calib_images": n_calib, **sv, "phases": phases,
            "acc": {k: v["acc"] for k, v in rows.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vgg16", "resnet20"], help="zoo architectures (random weights)")
    p.add_argument("--checkpoints", nargs=2, help="a trained pair instead (Fashion-MNIST data)")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--eval", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timings: best of at least this many, interleaved")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="statistics timings: repeat until forwards + passes ran this long")
    p.add_argument("--matching", default="weight")
    p.add_argument("--normalization", default="repair")
    p.add_argument("--json", help="write the measured numbers and stats_over_forward to this file")
    args = p.parse_args()
    tune_allocator()  # as the vf command does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    if args.checkpoints:
        pairs = [("checkpoints", *checkpoint_pair(args.checkpoints, args.calib, args.eval, args.batch, device))]
    else:
        pairs = [(a, *synthetic_pair(a, args.calib, args.eval, args.batch, device)) for a in args.archs]
    results = [bench_pair(name, models, data, args) for name, models, data in pairs]
    worst = max(r["ratio"] for r in results)
    print(f"stats_over_forward={worst:.2f} (largest of {', '.join(r['name'] for r in results)}; target ≤ 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "pairs": results, "stats_over_forward": worst}, f, indent=2)


if __name__ == "__main__":
    main()
