"""Time one full `vf merge` variant, split into phases, and the cost of its statistics passes.

Runs weight matching + REPAIR (and the interpolation curve) on the Fashion-MNIST VGG pair of `make demo`
(trains nothing: run `make demo` or `vf fit --config configs/fit/fmnist_vgg_pair.yaml` first), then prints
the seconds per phase (statistics, matching, normalization, evaluation, diagnostics) and the ratio of the
reference-statistics time to the plain no-grad forward passes over the same calibration data.

    python benchmarks/merge.py [--checkpoints A.pt B.pt] [--calib 2048] [--normalization repair]
"""

from __future__ import annotations

import argparse
import time

import torch

from vf_lightning.commands.common import DataOptions, LoggerOptions
from vf_lightning.commands.merge import MergeConfig, MergeRun


@torch.no_grad()
def plain_forward_seconds(models: list[torch.nn.Module], batches: list[object], repeats: int = 3) -> float:
    """Best-of-``repeats`` time of plain eval-mode forward passes of ``models`` over ``batches``."""
    best = float("inf")
    for m in models:
        m.eval()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            x = b[0] if isinstance(b, (list, tuple)) else b
            for m in models:
                m(x)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = "outputs/fmnist_vgg_pair"
    p.add_argument("--checkpoints", nargs=2, default=[f"{demo}/net_a.pt", f"{demo}/net_b.pt"])
    p.add_argument("--calib", type=int, default=2048)
    p.add_argument("--eval", type=int, default=5000)
    p.add_argument("--matching", default="weight")
    p.add_argument("--normalization", default="repair")
    args = p.parse_args()
    cfg = MergeConfig(
        checkpoints=args.checkpoints,
        data=DataOptions(calib_samples=args.calib, eval_samples=args.eval),
        matching=[args.matching],
        normalization=["none", args.normalization],
        alphas=5,
        lmc_normalizations=["none"],
        vanishing_feature=False,
        save_model=False,
        out_dir="outputs/bench_merge",
        logger=LoggerOptions(kind="none"),
    )
    run = MergeRun(cfg)
    report = run.run()
    t = report["timing"]
    # statistics pass: stats of A and of aligned B (one pass each) over the calibration data
    b_al = run.model_b  # same architecture and cost as the aligned B
    fwd = plain_forward_seconds([run.model_a, b_al], run.calib)
    n_calib = sum(len(b[0]) for b in run.calib)
    print(f"vf merge variant: {args.matching} matching, none + {args.normalization}, 5-point curve, "
          f"{n_calib} calibration / {args.eval} test images, device {run.device}")
    for phase in ("statistics", "matching", "normalization", "evaluation", "diagnostics", "total"):
        print(f"  {phase:<14}{t.get(phase, 0.0):8.2f} s")
    print(f"  plain forward passes of A and B over the calibration data: {fwd:.2f} s")
    print(f"  ratio statistics / plain forward passes it needs: {t['statistics'] / fwd:.2f}")
    row = next(r for r in report["results"] if r["normalization"] == args.normalization)
    print(f"  merged accuracy: none {report['results'][0]['acc']:.4f} → {args.normalization} {row['acc']:.4f}")


if __name__ == "__main__":
    main()
