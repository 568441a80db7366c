"""``vf prune``: one-shot prune a trained network at several sparsities, with and without post-pruning
normalization against the dense model's statistics; write ``report.json``, plots and logs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vf_lightning.checkpoint import load_networks, save_model_checkpoint
from vf_lightning.commands.common import (
    DataOptions,
    LoggerOptions,
    ResultLogger,
    Timer,
    cache_batches,
    format_table,
    is_rank_zero,
    pick_device,
)
from vf_lightning.diagnostics import count_params, plot_layer_curves, plot_variance_ratios, variance_ratio
from vf_lightning.evaluate import evaluate
from vf_lightning.io import atomic_write_json
from vf_lightning.prune import PRUNERS, normalize_pruned, prune_model, sparsity_report
from vf_lightning.repair import auto_normalization, default_correction_sites, preactivation_sites, reference_stats


@dataclass
class PruneConfig:
    """Options of ``vf prune``.

    checkpoint: a model checkpoint, or a pair checkpoint with ``network`` choosing a or b.
    pruner: global_magnitude | layerwise_magnitude | diag_fisher; sparsities: fractions of weights removed.
    normalization: post-pruning normalizations (auto | none | reset | repair | rescale); ``none`` is always
        evaluated (the un-normalized pruned model). ``auto`` = RESET for BatchNorm nets, REPAIR for LayerNorm
        nets, RESCALE without normalization.
    calib_samples: calibration images for the statistics of the normalization (data.calib_samples is the pool).
    include / exclude: module names to prune (default: every Conv2d and Linear).
    """

    checkpoint: str = ""
    network: Literal["a", "b"] = "a"
    data: DataOptions = field(default_factory=DataOptions)
    pruner: list[str] = field(default_factory=lambda: ["global_magnitude"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    normalization: list[str] = field(default_factory=lambda: ["none", "auto"])
    calib_samples: int | None = None
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    fisher_samples: int = 512
    device: str = "auto"
    out_dir: str = "outputs/prune"
    save_model: bool = True
    logger: LoggerOptions = field(default_factory=LoggerOptions)


def validate(cfg: PruneConfig) -> None:
    """Fail before any work on an unknown pruner / normalization or a sparsity outside [0, 1)."""
    if not cfg.checkpoint:
        raise ValueError("checkpoint: give the trained model (or pair) checkpoint to prune")
    bad = [p for p in cfg.pruner if p not in PRUNERS]
    if bad or not cfg.pruner:
        raise ValueError(f"unknown pruner {bad}; choose from {', '.join(sorted(PRUNERS))}")
    allowed = {"auto", "none", "reset", "repair", "rescale", "reshift"}
    badn = [n for n in cfg.normalization if n not in allowed]
    if badn:
        raise ValueError(f"unknown post-pruning normalization {badn}; choose from {', '.join(sorted(allowed))}")
    if not cfg.sparsities or any(not 0.0 <= s < 1.0 for s in cfg.sparsities):
        raise ValueError(f"sparsities must lie in [0, 1), got {cfg.sparsities}")


class PruneRun:
    """One ``vf prune`` run: dense statistics once, then prune + normalize per pruner × sparsity."""

    def __init__(self, cfg: PruneConfig) -> None:
        validate(cfg)
        self.cfg = cfg
        self.timer = Timer()
        self.device = pick_device(cfg.device)
        models, cfgs = load_networks([cfg.checkpoint])
        self.model_config = cfgs[0]
        idx = 0 if cfg.network == "a" or len(models) == 1 else 1
        self.dense = models[idx].to(self.device).eval()
        self.dm = cfg.data.build()
        n_cal = cfg.calib_samples or cfg.data.calib_samples
        self.calib = cache_batches(self.dm.calibration_dataloader(n_cal))
        self.test = cache_batches(self.dm.val_dataloader())
        self.out = Path(cfg.out_dir)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        report: dict[str, Any] = {"config": asdict(cfg)}
        with self.timer.phase("evaluation"):
            report["endpoints"] = {"dense": evaluate(self.dense, self.test, self.device)}
        fix_sites = default_correction_sites(self.dense)
        vr_sites = preactivation_sites(self.dense)
        with self.timer.phase("statistics"):  # one pass, reused for every pruner and sparsity
            stats = reference_stats([self.dense], self.calib, list(dict.fromkeys([*fix_sites, *vr_sites])))[0]
        goals, vr_goals = stats.subset(fix_sites), stats.subset(vr_sites)
        auto = auto_normalization(self.dense)
        n_dense = count_params(self.dense)
        names = ["none", *[n for n in cfg.normalization if n != "none"]]
        rows: list[dict[str, Any]] = []
        vr_curves: dict[str, list[float]] = {}
        vr_layers: list[str] = []
        best: tuple[float, nn.Module | None, str] = (-1.0, None, "")
        for pruner in cfg.pruner:
            for s in cfg.sparsities:
                t0 = time.perf_counter()
                with self.timer.phase("pruning"):
                    pruned = prune_model(self.dense, pruner, s, self.calib, cfg.include, cfg.exclude,
                                         cfg.fisher_samples)  # fmt: skip
                achieved = sparsity_report(pruned, cfg.include, cfg.exclude)
                t_prune = time.perf_counter() - t0
                for name in names:
                    t1 = time.perf_counter()
                    resolved = auto if name == "auto" else name
                    with self.timer.phase("normalization"):
                        model = pruned if name == "none" else normalize_pruned(
                            pruned, self.dense, self.calib, resolved, None, goals=goals)[0]  # fmt: skip
                    with self.timer.phase("evaluation"):
                        m = evaluate(model, self.test, self.device)
                    rows.append({
                        "pruner": pruner, "sparsity": s, "achieved_sparsity": achieved["global"],
                        "normalization": name if name != "auto" else f"auto:{auto}", "acc": m["acc"],
                        "loss": m["loss"], "params_ratio": count_params(model, nonzero=True) / n_dense,
                        "flops_ratio": 1.0, "seconds": t_prune + time.perf_counter() - t1,
                    })  # fmt: skip
                    with self.timer.phase("diagnostics"):
                        vr = variance_ratio(model, vr_goals, self.calib)
                    vr_layers = list(vr)
                    vr_curves[f"{pruner}/{s}/{rows[-1]['normalization']}"] = list(vr.values())
                    if s == max(cfg.sparsities) and m["acc"] > best[0]:
                        best = (m["acc"], model, f"{pruner}/{s}/{rows[-1]['normalization']}")
        report["results"] = rows
        report["variance_ratio"] = {"layers": vr_layers, "curves": vr_curves}
        report["timing"] = {**self.timer.seconds, "total": time.perf_counter() - t_start}
        if is_rank_zero():
            self._write(report, best)
        return report

    def _write(self, report: dict[str, Any], best: tuple[float, nn.Module | None, str]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        plots: dict[str, Path] = {}
        curves: dict[str, list[float]] = {}
        for r in report["results"]:
            curves.setdefault(f"{r['pruner']}/{r['normalization']}", []).append(r["acc"])
        sparsities = self.cfg.sparsities
        plots["accuracy"] = plot_layer_curves(
            curves, self.out / "accuracy.png", "test accuracy", "Accuracy vs sparsity", [str(s) for s in sparsities]
        )
        vr = report["variance_ratio"]
        top = max(sparsities)
        at_top = {k: v for k, v in vr["curves"].items() if f"/{top}/" in k}
        if at_top:
            plots["variance_ratio"] = plot_variance_ratios(vr["layers"], at_top, self.out / "variance_ratio.png")
        if self.cfg.save_model and best[1] is not None:
            path = save_model_checkpoint(best[1], self.model_config, self.out / "pruned.pt",
                                         meta={"variant": best[2], "acc": best[0]})  # fmt: skip
            report["pruned_checkpoint"] = {"path": str(path), "variant": best[2]}
        report["plots"] = {k: str(v) for k, v in plots.items()}
        atomic_write_json(report, self.out / "report.json")
        logger = ResultLogger(self.cfg.logger, self.out, report["config"], "prune")
        try:
            logger.log_rows("prune/results", report["results"])
            logger.log_scalars({"dense/acc": report["endpoints"]["dense"]["acc"]})
            if at_top:
                logger.log_curve("prune/variance_ratio", list(range(len(vr["layers"]))), at_top, "layer")
            logger.log_images(plots)
        finally:
            logger.finish()


def print_prune_summary(report: dict[str, Any]) -> None:
    """Readable table: accuracy per pruner × sparsity × normalization, against the dense model."""
    print(f"\ndense model: acc {report['endpoints']['dense']['acc']:.4f}")
    cols = ["pruner", "sparsity", "achieved_sparsity", "normalization", "acc", "loss"]
    print(format_table(report["results"], cols))
