"""``vf merge``: align two trained networks, merge them, repair the merged model, diagnose, report.

Inputs: a pair checkpoint of ``vf fit`` or two model checkpoints, a data module, matchings × normalizations ×
numbers of preserved layers (PFM), an α grid for the interpolation curve. Writes ``report.json`` (DESIGN §5),
the chosen merged model as a checkpoint, PNG plots, and logs to W&B / CSV.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vf_lightning.align import align, available_matchers, check_compatible, merge_models
from vf_lightning.checkpoint import load_networks, save_model_checkpoint
from vf_lightning.commands.common import (
    DataOptions,
    Ensemble,
    LoggerOptions,
    ResultLogger,
    Timer,
    cache_batches,
    first_inputs,
    format_table,
    is_rank_zero,
    max_abs_logit_diff,
    pick_device,
)
from vf_lightning.diagnostics import (
    plot_interpolation_curves,
    plot_variance_ratios,
    plot_vf_profiles,
    variance_ratio,
    vf_profile,
    vf_ratio,
)
from vf_lightning.evaluate import evaluate
from vf_lightning.io import atomic_write_json
from vf_lightning.merge import barrier, interpolate_models, interpolation_curve
from vf_lightning.repair import (
    NORMALIZATIONS,
    Goals,
    combine_goals,
    default_correction_sites,
    has_normalization,
    normalize,
    preactivation_sites,
    reference_stats,
)

PERMUTATION_MATCHINGS = ("identity", "weight", "activation")


@dataclass
class MergeConfig:
    """Options of ``vf merge`` (every one also settable from YAML).

    checkpoints: one pair checkpoint (``vf fit`` of a PairModule) or two model checkpoints (A first).
    matching: alignment methods to compare (identity | weight | activation | zip | cca).
    normalization: post-merge normalizations (none | reset | repair | rescale | reshift | bias_calibration |
        zero_bias); ``none`` is always evaluated too, as the "before" of the variance ratio.
    preserve: numbers of preserved layers for Preserve-First Merging (0 = full merge; ``-1`` = all layers).
    alpha: merging coefficient of the full merge; alphas: number of points of the interpolation curve.
    lmc_normalizations / pfm_normalizations: normalizations evaluated along the interpolation curve / for the
        PFM depths > 0 (default: all of them).
    vanishing_feature: also compute the vanishing-feature profile (on ``vf_samples`` test images).
    """

    checkpoints: list[str] = field(default_factory=list)
    data: DataOptions = field(default_factory=DataOptions)
    matching: list[str] = field(default_factory=lambda: ["identity", "weight"])
    normalization: list[str] = field(default_factory=lambda: ["none", "repair"])
    preserve: list[int] = field(default_factory=lambda: [0])
    alpha: float = 0.5
    alphas: int = 11
    lmc_normalizations: list[str] | None = None
    pfm_normalizations: list[str] | None = None
    ensemble: bool = True
    vanishing_feature: bool = True
    vf_samples: int | None = 1000
    max_sweeps: int = 100
    seed: int = 0
    device: str = "auto"
    out_dir: str = "outputs/merge"
    save_model: bool = True
    logger: LoggerOptions = field(default_factory=LoggerOptions)


def validate(cfg: MergeConfig) -> None:
    """Fail before any work on a bad option (unknown method, empty grids, wrong α)."""
    if not cfg.checkpoints or len(cfg.checkpoints) > 2:
        raise ValueError("checkpoints: give one pair checkpoint or two model checkpoints")
    unknown = [m for m in cfg.matching if m not in available_matchers()]
    if unknown or not cfg.matching:
        raise ValueError(f"unknown matching {unknown}; choose from {', '.join(available_matchers())}")
    names = [*cfg.normalization, *(cfg.lmc_normalizations or []), *(cfg.pfm_normalizations or [])]
    bad = [n for n in names if n not in NORMALIZATIONS or n == "auto"]
    if bad:
        raise ValueError(
            f"unknown normalization {bad}; choose from {', '.join(sorted(set(NORMALIZATIONS) - {'auto'}))}"
        )
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {cfg.alpha}")
    if cfg.alphas < 2:
        raise ValueError(f"alphas (number of interpolation points) must be ≥ 2, got {cfg.alphas}")
    if any(k < -1 for k in cfg.preserve):
        raise ValueError(f"preserve takes numbers of preserved layers ≥ 0 (or -1 for all), got {cfg.preserve}")


def _normalizations(cfg: MergeConfig) -> list[str]:
    return ["none", *[n for n in cfg.normalization if n != "none"]]


class MergeRun:
    """One ``vf merge`` run; phases are timed (statistics, matching, normalization, evaluation)."""

    def __init__(self, cfg: MergeConfig) -> None:
        validate(cfg)
        self.cfg = cfg
        self.timer = Timer()
        self.device = pick_device(cfg.device)
        models, cfgs = load_networks(cfg.checkpoints)
        self.model_config = cfgs[0]
        self.model_a, self.model_b = (m.to(self.device).eval() for m in models)
        check_compatible(self.model_a, self.model_b)  # before any data work
        if "bias_calibration" in _normalizations(cfg) and has_normalization(self.model_a):
            raise ValueError(
                "bias_calibration is defined for networks without normalization layers; this network has "
                "BatchNorm/LayerNorm — use reset (BatchNorm) or repair/rescale instead"
            )
        self.dm = cfg.data.build()
        self.calib = self.dm.calibration_dataloader(cfg.data.calib_samples)
        self.test = self.dm.val_dataloader()
        self.example = first_inputs(self.calib, 2, self.device)
        self.out = Path(cfg.out_dir)
        self.best_pfm: tuple[float, Any, str] = (-1.0, None, "")  # (acc, PFMModel | None, variant)
        # correction sites (conv/linear outputs) and variance-ratio sites (inputs of the activations)
        self.fix_sites = default_correction_sites(self.model_a)
        self.vr_sites = preactivation_sites(self.model_a)
        self.test = cache_batches(self.test)
        self.calib = cache_batches(self.calib)

    def stats(self, model: nn.Module) -> Goals:
        """Statistics of one reference model at every site any step needs, from one pass."""
        sites = list(dict.fromkeys([*self.fix_sites, *self.vr_sites]))
        return reference_stats([model], self.calib, sites)[0]

    # ----------------------------------------------------------------------------------------------
    def eval(self, model: nn.Module) -> dict[str, float]:
        with self.timer.phase("evaluation"):
            return evaluate(model, self.test, self.device)

    def norm(self, model: nn.Module, name: str, goals: Goals | None, refs: list[nn.Module], alpha: float) -> nn.Module:
        with self.timer.phase("normalization"):
            return normalize(
                model, name, self.calib, refs=refs, weights=[1 - alpha, alpha] if len(refs) == 2 else None,
                goals=goals, alpha=alpha,
            )  # fmt: skip

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        report: dict[str, Any] = {"config": _jsonable(asdict(cfg))}
        ea, eb = self.eval(self.model_a), self.eval(self.model_b)
        report["endpoints"] = {"a": ea, "b": eb}
        if cfg.ensemble:
            report["ensemble"] = self.eval(Ensemble([self.model_a, self.model_b]))
        with self.timer.phase("statistics"):
            stats_a = self.stats(self.model_a)
        alphas = [i / (cfg.alphas - 1) for i in range(cfg.alphas)]
        rows: list[dict[str, Any]] = []
        alignment: dict[str, Any] = {}
        lmc_curves: dict[str, dict[str, list[float]]] = {}
        barriers: dict[str, dict[str, float]] = {}
        vr_layers: list[str] = []
        vr_curves: dict[str, list[float]] = {}
        vf_curves: dict[str, list[float]] = {}
        best: tuple[float, nn.Module | None, str] = (-1.0, None, "")
        vf_refs = None
        if cfg.vanishing_feature:
            with self.timer.phase("diagnostics"):
                vf_refs = [vf_profile(m, self.test, cfg.vf_samples) for m in (self.model_a, self.model_b)]

        for matching in cfg.matching:
            with self.timer.phase("matching"):
                res = align(
                    self.model_a, self.model_b, matching, loader=self.calib, example_input=self.example,
                    seed=cfg.seed, max_sweeps=cfg.max_sweeps,
                )  # fmt: skip
            info = {**res.summary(), "max_abs_logit_diff": None}
            if res.is_permutation:
                b_al = res.aligned_b(self.model_b).to(self.device).eval()
                info["max_abs_logit_diff"] = max_abs_logit_diff(b_al, self.model_b, self.test)
                merged = interpolate_models(self.model_a, b_al, cfg.alpha)
                with self.timer.phase("statistics"):
                    stats_b = self.stats(b_al)
                goal = combine_goals([stats_a, stats_b], [1 - cfg.alpha, cfg.alpha])
                refs = [self.model_a, b_al]
            else:  # general linear maps: B' is not equivalent to B, so goals come from A alone (one reference)
                b_al = None
                merged = merge_models(self.model_a, self.model_b, res.spec, res.transforms).to(self.device).eval()
                goal = stats_a
                refs = []
                info["goal_statistics"] = "one_reference_a"
            alignment[matching] = info

            for name in _normalizations(cfg):
                t0 = time.perf_counter()
                fixed = self.norm(merged, name, goal.subset(self.fix_sites), refs, cfg.alpha)
                metrics = self.eval(fixed)
                rows.append(self._row(matching, name, 0, cfg.alpha, metrics, 1.0, 1.0, time.perf_counter() - t0))
                with self.timer.phase("diagnostics"):
                    vr = variance_ratio(fixed, goal.subset(self.vr_sites), self.calib)
                    vr_layers = list(vr)
                    vr_curves[f"{matching}/{name}"] = list(vr.values())
                    if vf_refs is not None:
                        prof = vf_profile(fixed, self.test, cfg.vf_samples)
                        vf_curves[f"{matching}/{name}"] = list(vf_ratio(prof, vf_refs).values())
                if metrics["acc"] > best[0]:
                    best = (metrics["acc"], fixed, f"{matching}/{name}")

            pfm_depths = [k for k in cfg.preserve if k != 0]
            if pfm_depths:
                rows += self._pfm_rows(matching, res, pfm_depths)

            if b_al is not None:
                for name in cfg.lmc_normalizations or _normalizations(cfg):
                    curve = self._lmc(b_al, name, stats_a, stats_b, alphas)
                    lmc_curves[f"{matching}/{name}"] = {"acc": curve["acc"], "loss": curve["loss"]}
                    barriers[f"{matching}/{name}"] = {
                        "acc": barrier(curve["acc"], "acc"), "loss": barrier(curve["loss"], "loss"),
                    }  # fmt: skip

        report["alignment"] = alignment
        report["results"] = rows
        report["lmc"] = {"alphas": alphas, "curves": lmc_curves, "barrier": barriers}
        report["variance_ratio"] = {"layers": vr_layers, "curves": vr_curves}
        if vf_curves:
            report["vanishing_feature"] = {"curves": vf_curves}
        report["timing"] = {**self.timer.seconds, "total": time.perf_counter() - t_start}
        if is_rank_zero():
            self._write(report, best)
        return report

    # ----------------------------------------------------------------------------------------------
    def _row(self, matching: str, norm: str, k: int, alpha: float, m: dict[str, float], pr: float, fr: float,
             seconds: float) -> dict[str, Any]:  # fmt: skip
        return {
            "matching": matching, "normalization": norm, "preserved_layers": k, "alpha": alpha,
            "acc": m["acc"], "loss": m["loss"], "params_ratio": pr, "flops_ratio": fr, "seconds": seconds,
        }  # fmt: skip

    def _lmc(self, b_al: nn.Module, name: str, stats_a: Goals, stats_b: Goals, alphas: list[float]) -> dict[str, Any]:
        def fix(model: nn.Module, alpha: float) -> nn.Module:
            goal = combine_goals([stats_a, stats_b], [1 - alpha, alpha]).subset(self.fix_sites)
            return self.norm(model, name, goal, [self.model_a, b_al], alpha)

        return interpolation_curve(self.model_a, b_al, alphas, self.eval, None if name == "none" else fix)

    def _pfm_rows(self, matching: str, res: Any, depths: list[int]) -> list[dict[str, Any]]:
        """Preserve-First Merging rows for ``depths`` (−1 = all layers), one goal pass per matching."""
        from vf_lightning.merge.pfm import PFMModel, max_preserved, pfm_sweep

        top = max_preserved(self.model_a, self.example)
        ks = sorted({top if k == -1 else k for k in depths})
        if ks and ks[-1] > top:
            raise ValueError(f"preserve: this network has at most {top} preservable layers, got {ks[-1]}")

        def keep(pfm: PFMModel, row: dict[str, Any]) -> None:
            if row["acc"] > self.best_pfm[0]:
                self.best_pfm = (row["acc"], pfm, f"{matching}/{row['normalization']}/k={row['preserved_layers']}")

        with self.timer.phase("pfm"):
            rows = pfm_sweep(
                self.model_a, self.model_b, res, ks, self.cfg.pfm_normalizations or _normalizations(self.cfg),
                self.calib, self.eval, self.example,
                one_ref=not res.is_permutation, on_variant=keep,
            )  # fmt: skip
        return [{"matching": matching, "alpha": 0.5, **r} for r in rows]

    def _write(self, report: dict[str, Any], best: tuple[float, nn.Module | None, str]) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        plots: dict[str, Path] = {}
        lmc = report["lmc"]
        if lmc["curves"]:
            plots["interpolation"] = plot_interpolation_curves(lmc["alphas"], lmc["curves"], self.out / "lmc.png")
        vr = report["variance_ratio"]
        if vr["curves"]:
            plots["variance_ratio"] = plot_variance_ratios(vr["layers"], vr["curves"], self.out / "variance_ratio.png")
        if "vanishing_feature" in report:
            plots["vanishing_feature"] = plot_vf_profiles(report["vanishing_feature"]["curves"], self.out / "vf.png")
        if cfg.save_model and best[1] is not None:
            path = save_model_checkpoint(
                best[1],
                self.model_config,
                self.out / "merged.pt",
                meta={"variant": best[2], "acc": best[0], "alpha": cfg.alpha},
            )
            report["merged_checkpoint"] = {"path": str(path), "variant": best[2]}
        if cfg.save_model and self.best_pfm[1] is not None:
            from vf_lightning.merge.pfm import save_pfm

            acc, pfm, variant = self.best_pfm
            path = save_pfm(pfm, self.out / "merged_pfm.pt", self.model_config, meta={"variant": variant, "acc": acc})
            report["pfm_checkpoint"] = {"path": str(path), "variant": variant}
        report["plots"] = {k: str(v) for k, v in plots.items()}
        atomic_write_json(report, self.out / "report.json")
        logger = ResultLogger(cfg.logger, self.out, report["config"], "merge")
        try:
            logger.log_rows("merge/results", report["results"])
            logger.log_scalars({f"endpoints/{k}/acc": v["acc"] for k, v in report["endpoints"].items()})
            # fixed keys for sweeps: the best merged variant of this run
            logger.log_scalars({"merged/acc": max(r["acc"] for r in report["results"]),
                                "merged/loss": min(r["loss"] for r in report["results"])})  # fmt: skip
            for variant, b in lmc["barrier"].items():
                logger.log_scalars({f"barrier/{variant}/acc": b["acc"], f"barrier/{variant}/loss": b["loss"]})
            if lmc["curves"]:
                logger.log_curve("lmc/acc", lmc["alphas"], {k: v["acc"] for k, v in lmc["curves"].items()}, "alpha")
            if vr["curves"]:
                logger.log_curve("variance_ratio", list(range(len(vr["layers"]))), vr["curves"], "layer")
            logger.log_images(plots)
        finally:
            logger.finish()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    return obj


def print_summary(report: dict[str, Any]) -> None:
    """Readable tables of the endpoints, the merged variants and the barriers."""
    ends = report["endpoints"]
    line = "  ".join(f"{k}: acc {v['acc']:.4f}" for k, v in ends.items())
    if "ensemble" in report:
        line += f"  ensemble: acc {report['ensemble']['acc']:.4f}"
    print(f"\nendpoints  {line}")
    for m, info in report["alignment"].items():
        diff = info.get("max_abs_logit_diff")
        print(f"alignment  {m}: {info['seconds']:.2f}s, sweeps {info.get('sweeps')}, "
              f"max|Δlogit| {'-' if diff is None else f'{diff:.2e}'}")  # fmt: skip
    cols = ["matching", "normalization", "preserved_layers", "acc", "loss", "params_ratio", "flops_ratio"]
    print("\n" + format_table(report["results"], cols))
    if report["lmc"]["barrier"]:
        brows = [{"variant": k, "acc_barrier": v["acc"], "loss_barrier": v["loss"]}
                 for k, v in report["lmc"]["barrier"].items()]  # fmt: skip
        print("\n" + format_table(brows, ["variant", "acc_barrier", "loss_barrier"]))
    vr = report["variance_ratio"]
    if vr["curves"]:
        vrows = [{"variant": k, "mean_ratio": sum(v) / len(v), "last_layer": v[-1]} for k, v in vr["curves"].items()]
        print("\n" + format_table(vrows, ["variant", "mean_ratio", "last_layer"]))


def run_merge(cfg: MergeConfig) -> dict[str, Any]:
    """Run ``vf merge`` with ``cfg``; returns the report (also written to ``out_dir/report.json``)."""
    return MergeRun(cfg).run()
