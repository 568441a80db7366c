"""Time one `vf merge` variant (the merge session the callbacks share), split into phases, and its statistics cost.

Runs weight matching + REPAIR (and the interpolation curve) on the Fashion-MNIST VGG pair of `make demo`
(trains nothing: run `make demo` or `vf fit --config configs/fit/fmnist_vgg_pair.yaml` first), then prints
the seconds per phase (statistics, matching, normalization, evaluation, diagnostics) and the ratio of the
reference-statistics time to the plain no-grad forward passes over the same calibration data.

    python benchmarks/merge.py [--checkpoints A.pt B.pt] [--calib 2048] [--normalization repair] [--json F]

``--json F`` writes the phase seconds and ``stats_over_forward`` to ``F``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from vf_lightning.callbacks import session_data

from vf_lightning.checkpoint import load_networks
from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.merge import MergeSession


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
    p.add_argument("--json", help="write the phase seconds and stats_over_forward to this file")
    args = p.parse_args()
    models, _ = load_networks(args.checkpoints)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [m.to(device).eval() for m in models]
    dm = FashionMNISTDataModule(pad_to_32=True, num_workers=0, calib_samples=args.calib, val_subset=args.eval)
    dm.setup("fit")
    data = session_data(dm, None, None, 500, device)
    t0 = time.perf_counter()
    s = MergeSession(models, data)
    rows = {}
    for name in ("none", args.normalization):
        rows[name] = s.evaluate_variant(args.matching, name)
        s.variance_ratio(args.matching, name)
    for alpha in (0.25, 0.75):
        s.evaluate_variant(args.matching, "none", alpha)
    t = {**s.timer.seconds, "total": time.perf_counter() - t0}
    # statistics pass: stats of A and of aligned B (one pass each) over the calibration data
    fwd = plain_forward_seconds(models, data.calib)
    n_calib = sum(len(b) for b in data.calib)
    print(f"merge session: {args.matching} matching, none + {args.normalization}, 5-point curve, "
          f"{n_calib} calibration / {args.eval} test images, device {device}")
    for phase in ("statistics", "matching", "merging", "normalization", "evaluation", "diagnostics", "total"):
        print(f"  {phase:<14}{t.get(phase, 0.0):8.2f} s")
    print(f"  plain forward passes of A and B over the calibration data: {fwd:.2f} s")
    print(f"  ratio statistics / plain forward passes it needs: {t['statistics'] / fwd:.2f}")
    print(f"  merged accuracy: none {rows['none']['acc']:.4f} → {args.normalization} "
          f"{rows[args.normalization]['acc']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "seconds": t, "forward_seconds": fwd,
                       "stats_over_forward": t["statistics"] / fwd,
                       "acc": {k: v["acc"] for k, v in rows.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
