"""Speed of the alignment engine (not a test).

1. Weight matching of a CIFAR VGG16-BN pair and a torchvision ResNet-50 pair against a plain coordinate
   descent kept here as the baseline (every group solved every sweep, costs on CPU): total seconds, sweeps,
   the time ratio ``wm_over_baseline`` and whether both reach the same objective.
2. Activation-statistics pass over N samples ÷ plain no-grad forward passes of both models over the same N, for
   VGG16-BN and ResNet-20: ``stats_over_forward`` for activation matching (the A×B cross block),
   ``zip_cca_stats_over_forward`` for the full ``2C × 2C`` moments ZipIt and CCA read (best pass ÷ best forwards
   of the interleaved repeats — at least ``--repeats``, and more until each configuration has run ``--min-seconds``,
   so that a short pass (ResNet-20: ≈ 1 s a repeat) gets as many chances at a quiet moment of a shared machine
   as a long one; each row also gives the median of each pass's ratio to the forwards timed just before it,
   steadier on a noisy machine when comparing two versions).

Run: ``python benchmarks/matching.py [--samples 512] [--batch 128] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import torch
from timing import interleaved  # benchmarks/timing.py (this script's folder is on the path)

from vf_lightning.align import activation_statistics, build_permutation_spec, solve_lap, weight_matching
from vf_lightning.align.permute import expand_index, identity_perms, invert_perm, permute_state_dict
from vf_lightning.align.spec import PermAxis, PermutationSpec
from vf_lightning.models import ModelConfig, build_model, fast_memory_format
from vf_lightning.runtime import tune_allocator


def _mat(t: torch.Tensor, ax: PermAxis, size: int) -> torch.Tensor:
    return t.movedim(ax.axis, 0).reshape(size, -1)


def plain_weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                          state_b: Mapping[str, torch.Tensor], max_sweeps: int = 100, tol: float = 1e-12,
                          seed: int = 0) -> tuple[dict[str, torch.Tensor], float, int]:
    """The baseline: plain coordinate descent, every group solved in every sweep; (perms, objective, sweeps)."""
    gen = torch.Generator().manual_seed(seed)
    perms = {k: v.clone() for k, v in identity_perms(spec).items()}
    keys = sorted({ax.key for g in spec.groups for ax in g.axes})
    a = {k: state_a[k].detach().cpu().float() for k in keys}
    cur_b = permute_state_dict({k: state_b[k].detach().cpu().float() for k in keys}, spec, perms)
    a_mats = {(ax.key, ax.axis): _mat(a[ax.key], ax, g.size) for g in spec.groups for ax in g.axes}

    def objective() -> float:
        return float(sum(torch.dot(a[k].reshape(-1).double(), cur_b[k].reshape(-1).double()) for k in keys))

    obj, sweeps = objective(), 0
    for _ in range(max_sweeps):
        sweeps += 1
        progress = False
        for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[gi]
            cost_cur = torch.zeros(g.size, g.size, dtype=torch.float64)
            for ax in g.axes:
                cost_cur += (a_mats[(ax.key, ax.axis)] @ _mat(cur_b[ax.key], ax, g.size).t()).double()
            old = perms[g.name]
            cost = torch.empty_like(cost_cur)
            cost[:, old] = cost_cur
            new = solve_lap(cost)
            if float(cost[torch.arange(g.size), new].sum()) > float(cost_cur.diagonal().sum()) + tol:
                progress = True
                rel = invert_perm(old)[new]
                for ax in g.axes:
                    cur_b[ax.key] = cur_b[ax.key].index_select(ax.axis, expand_index(rel, ax.inner))
                perms[g.name] = new
        obj = objective()
        if not progress:
            break
    return perms, obj, sweeps


def bench_weight_matching(cfg: ModelConfig, size: int, device: torch.device, repeats: int = 2) -> dict[str, Any]:
    a, b = build_model(cfg).eval().to(device), build_model(cfg).eval().to(device)
    spec = build_permutation_spec(a, torch.randn(1, 3, size, size, device=device))
    sa, sb = a.state_dict(), b.state_dict()
    out: dict[str, Any] = {}
    bases, runs = interleaved(lambda: out.update(plain=plain_weight_matching(spec, sa, sb, seed=0)),
                              lambda: out.update(ours=weight_matching(spec, sa, sb, seed=0)), device, repeats)
    (perms, obj, sweeps), res = out["plain"], out["ours"]
    base, ours = min(bases), min(runs)
    rp = res.perms or {}
    same = obj == res.objective and all(torch.equal(perms[k], rp[k].cpu()) for k in perms)
    print(f"WM {cfg.arch:12s} groups={len(spec):3d} sweeps={res.sweeps:3d} (baseline {sweeps}) total={ours:7.2f}s "
          f"baseline={base:7.2f}s ratio={ours / base:.2f} objective_equal={obj == res.objective} "
          f"perms_equal={same}")
    return {"arch": cfg.arch, "seconds": ours, "baseline_seconds": base, "ratio": ours / base,
            "sweeps": res.sweeps, "baseline_sweeps": sweeps, "objective_equal": obj == res.objective,
            "perms_equal": same}


@torch.no_grad()
def bench_statistics(cfg: ModelConfig, samples: int, batch: int, full: bool, precision: str | None,
                     device: torch.device, repeats: int = 3, channels_last: bool = True,
                     min_seconds: float = 0.0) -> dict[str, Any]:
    a, b = build_model(cfg).eval().to(device), build_model(cfg).eval().to(device)
    if channels_last:  # the layout the merge session runs conv nets in
        fast_memory_format(a), fast_memory_format(b)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(batch, 3, 32, 32, generator=g).to(device), None) for _ in range(max(samples // batch, 1))]
    spec = build_permutation_spec(a, loader[0][0][:2])
    for x, _ in loader[:1]:  # warm-up
        a(x), b(x)
        activation_statistics(a, b, spec, [(x[:8], None)], full=full, precision=precision)

    fwds, passes = interleaved(lambda: [(a(x), b(x)) for x, _ in loader],
                               lambda: activation_statistics(a, b, spec, loader, full=full, precision=precision),
                               device, repeats, min_seconds)
    fwd, stats = min(fwds), min(passes)
    paired = sorted(s / f for s, f in zip(passes, fwds))
    paired_median = paired[len(paired) // 2]  # each pass against the forwards timed just before it
    kind = ("2C×2C" if full else "cross") + f", {precision or 'native'}" + (", channels_last" if channels_last else "")
    n = len(loader) * batch
    print(f"stats {cfg.arch:8s} ({kind}) N={n}: pass={stats:.2f}s forwards={fwd:.2f}s ratio={stats / fwd:.2f} "
          f"(median of paired ratios {paired_median:.2f}; {len(passes)} repeats; {n / stats:.0f} images/s)")
    return {"arch": cfg.arch, "kind": kind, "seconds": stats, "forward_seconds": fwd, "ratio": stats / fwd,
            "paired_median_ratio": paired_median, "repeats": len(passes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip-wm", action="store_true", help="only run the statistics benchmark")
    p.add_argument("--skip-stats", action="store_true", help="only run the weight-matching benchmark")
    p.add_argument("--precision", nargs="+", default=["native"], help="statistics precisions (native float32 float64)")
    p.add_argument("--repeats", type=int, default=5, help="statistics timings: best of at least this many")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="statistics timings: repeat until each configuration ran this long (forwards + passes)")
    p.add_argument("--wm-repeats", type=int, default=2, help="weight-matching timings: best of this many")
    p.add_argument("--contiguous", action="store_true", help="statistics models in NCHW, not channels_last")
    p.add_argument("--json", help="write the measured ratios to this file")
    args = p.parse_args()
    tune_allocator()  # as the vf command does
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    out: dict[str, Any] = {"device": str(device)}
    if not args.skip_wm:
        wm = [bench_weight_matching(ModelConfig(arch="vgg16", norm="bn"), 32, device, args.wm_repeats),
              bench_weight_matching(ModelConfig(arch="tv_resnet50", norm="bn", num_classes=1000), 64, device,
                                    args.wm_repeats)]
        out["weight_matching"] = wm
        out["wm_over_baseline"] = sum(r["seconds"] for r in wm) / sum(r["baseline_seconds"] for r in wm)
        out["objective_equal"] = all(r["objective_equal"] for r in wm)
        print(f"wm_over_baseline={out['wm_over_baseline']:.2f} objective_equal={out['objective_equal']}")
    if not args.skip_stats:
        rows = []
        for full in (False, True):
            for prec in args.precision:
                for arch in ("vgg16", "resnet20"):
                    rows.append(bench_statistics(ModelConfig(arch=arch, norm="bn"), args.samples, args.batch, full,
                                                 None if prec == "native" else prec, device, args.repeats,
                                                 not args.contiguous, args.min_seconds))
        out["statistics"] = rows
        # activation matching reads the cross block; ZipIt / CCA the full 2C×2C moments (reported apart)
        out["stats_over_forward"] = max(r["ratio"] for r in rows if r["kind"].startswith("cross"))
        out["zip_cca_stats_over_forward"] = max(r["ratio"] for r in rows if r["kind"].startswith("2C"))
        print(f"stats_over_forward={out['stats_over_forward']:.2f} (activation matching; target ≤ 1.3), "
              f"zip_cca_stats_over_forward={out['zip_cca_stats_over_forward']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
