"""Speed of the alignment engine on CPU (not a test).

1. Weight matching of a CIFAR VGG16 pair and a torchvision ResNet-50 pair: seconds per sweep, sweeps, total.
2. Activation-statistics pass over N samples ÷ plain no-grad forward passes of both models over the same N.

Run: ``python benchmarks/matching.py [--samples 512] [--batch 128]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from vf_lightning.align import activation_statistics, build_permutation_spec, weight_matching
from vf_lightning.models import ModelConfig, build_model


def bench_weight_matching(cfg: ModelConfig, size: int) -> None:
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    spec = build_permutation_spec(a, torch.randn(1, 3, size, size))
    res = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    print(f"WM {cfg.arch:12s} groups={len(spec):3d} sweeps={res.sweeps:3d} total={res.seconds:7.2f}s "
          f"per_sweep={res.seconds / res.sweeps:6.3f}s")


@torch.no_grad()
def bench_statistics(cfg: ModelConfig, samples: int, batch: int, full: bool, precision: str) -> None:
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(batch, 3, 32, 32, generator=g), None) for _ in range(samples // batch)]
    spec = build_permutation_spec(a, loader[0][0][:2])
    for x, _ in loader[:1]:  # warm-up
        a(x), b(x)
    t0 = time.perf_counter()
    for x, _ in loader:
        a(x)
        b(x)
    fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    activation_statistics(a, b, spec, loader, full=full, precision=precision)
    stats = time.perf_counter() - t0
    kind = ("2C×2C" if full else "cross") + f", {precision}"
    print(f"stats {cfg.arch:8s} ({kind}) N={samples}: pass={stats:.2f}s forwards={fwd:.2f}s ratio={stats / fwd:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip-wm", action="store_true", help="only run the statistics benchmark")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_wm:
        bench_weight_matching(ModelConfig(arch="vgg16", norm="bn"), 32)
        bench_weight_matching(ModelConfig(arch="tv_resnet50", norm="bn", num_classes=1000), 64)
    for full, precision in ((False, "float64"), (False, "float32"), (True, "float64")):
        for arch in ("vgg16", "resnet20"):
            bench_statistics(ModelConfig(arch=arch, norm="bn"), args.samples, args.batch, full, precision)


if __name__ == "__main__":
    main()
