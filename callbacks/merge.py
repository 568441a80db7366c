"""Callbacks that merge the two networks of a PairModule during training and log how the merge behaves.

- :class:`MergeCallback`: align, merge at α, normalize, evaluate → ``merge/<matching>/<normalization>/{acc,loss}``.
- :class:`InterpolationCallback`: the interpolation curve and its barrier (the reference's ``--lmc-freq``).
- :class:`PFMCallback`: Preserve-First Merging over numbers of preserved layers, with parameter / FLOP ratios.
- :class:`VarianceCollapseCallback`: per-layer variance ratios and vanishing-feature profiles of merge variants,
  before and after normalization, as W&B tables and line plots (and summary scalars for every logger).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from vf_lightning.align import align
from vf_lightning.diagnostics import variance_ratio, vf_ratio
from vf_lightning.merge import barrier, interpolate_models

from .base import (
    CallbackData,
    DiagnosticCallback,
    broadcast_alignment,
    broadcast_module,
    evaluate_reduced,
    frozen_copy,
    line_plot,
    lmc_fractions,
    table,
    vf_profile_reduced,
)
from .merging import (
    MergedPair,
    check_bias_calibration,
    check_matchings,
    check_normalizations,
    merge_pair,
)


def _pair(pl_module: L.LightningModule) -> tuple[nn.Module, nn.Module]:
    """Frozen copies of the two networks, identical on every rank (BatchNorm buffers are per-rank under DDP)."""
    dev = pl_module.device
    return (broadcast_module(frozen_copy(pl_module.net_a), dev),  # type: ignore[arg-type]
            broadcast_module(frozen_copy(pl_module.net_b), dev))  # type: ignore[arg-type]  # fmt: skip


class _MergingCallback(DiagnosticCallback):
    """Common options of the merging callbacks: matchings, normalizations, α, weight-matching sweeps."""

    permutation_only = False
    allowed_normalizations: tuple[str, ...] | None = None

    def __init__(
        self,
        matchings: list[str] | None = None,
        normalizations: list[str] | None = None,
        alpha: float = 0.5,
        max_sweeps: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.matchings = check_matchings(matchings or ["weight"], owner, self.permutation_only)
        self.normalizations = check_normalizations(
            normalizations if normalizations is not None else ["none", "repair"], owner, self.allowed_normalizations
        )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{owner}: alpha must lie in [0, 1], got {alpha}")
        if alpha != 0.5 and any(m in ("zip", "cca") for m in self.matchings):
            raise ValueError(f"{owner}: zip/cca merge with fixed weights (α = ½); got alpha={alpha}")
        if max_sweeps < 1:
            raise ValueError(f"{owner}: max_sweeps must be ≥ 1, got {max_sweeps}")
        self.alpha = alpha
        self.max_sweeps = max_sweeps

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        check_bias_calibration(self.normalizations, pl_module.net_a, type(self).__name__)  # type: ignore[arg-type]

    def merges(self, a: nn.Module, b: nn.Module, data: CallbackData, shared: dict[Any, Any]) -> list[MergedPair]:
        """One merge per matching (same permutations on every rank), shared with the other callbacks of this run."""
        example = data.example()
        out: list[MergedPair] = []
        for matching in self.matchings:
            key = ("pair", matching, self.alpha, self.seed, self.max_sweeps)
            if key not in shared:
                res = align(a, b, matching, loader=data.calib, example_input=example, seed=self.seed,
                            max_sweeps=self.max_sweeps)  # fmt: skip
                shared[key] = merge_pair(a, b, matching, data.calib, example, self.alpha, self.seed,
                                         stats_a=shared.get("stats_a"),
                                         alignment=broadcast_alignment(res, data.device))  # fmt: skip
                shared["stats_a"] = shared[key].stats_a
            out.append(shared[key])
        return out

    @staticmethod
    def normalized(pair: MergedPair, name: str, shared: dict[Any, Any]) -> nn.Module:
        """The merge after normalization ``name`` (computed once per run)."""
        key = ("norm", pair.matching, pair.alpha, id(pair), name)
        if key not in shared:
            shared[key] = pair.normalize(name)
        return shared[key]

    @classmethod
    def evaluated(cls, pair: MergedPair, name: str, data: CallbackData, shared: dict[Any, Any]) -> dict[str, float]:
        """Accuracy and loss of the normalized merge, reduced over ranks (computed once per run)."""
        key = ("eval", pair.matching, pair.alpha, id(pair), name)
        if key not in shared:
            shared[key] = evaluate_reduced(cls.normalized(pair, name, shared), data)
        return shared[key]


class MergeCallback(_MergingCallback):
    """Every ``every_n_epochs`` validation epochs: align the pair, merge at ``alpha``, normalize, evaluate.

    Logs ``merge/<matching>/<normalization>/acc`` and ``/loss`` (``none`` is always included) against ``epoch``.
    Options: matchings (identity | weight | activation | zip | cca), normalizations (none | reset | repair |
    rescale | reshift | bias_calibration | zero_bias), alpha, calib_samples, eval_samples, seed, max_sweeps.
    """

    prefix = "merge"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rows: list[list[Any]] = []

    def measure(self, a: nn.Module, b: nn.Module, data: CallbackData) -> dict[str, float]:
        """The merged accuracies and losses of every matching × normalization (reduced over ranks)."""
        out: dict[str, float] = {}
        shared = self.results()
        for pair in self.merges(a, b, data, shared):
            for name in self.normalizations:
                m = self.evaluated(pair, name, data, shared)
                out[f"merge/{pair.matching}/{name}/acc"] = m["acc"]
                out[f"merge/{pair.matching}/{name}/loss"] = m["loss"]
        return out

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        metrics = self.measure(*_pair(pl_module), data)
        self.log_scalars(trainer, metrics)
        for key, v in metrics.items():
            _, matching, norm, kind = key.split("/")
            if kind == "acc":
                self._rows.append([trainer.current_epoch, matching, norm, v, metrics[key[:-3] + "loss"]])
        self.log_wandb(trainer, lambda: {"merge_table": table(["epoch", "matching", "normalization", "acc", "loss"],
                                                              self._rows)})  # fmt: skip


class InterpolationCallback(_MergingCallback):
    """The interpolation curve θ_α = (1−α)θ_A + αθ_B' and its barriers at chosen points of training.

    ``lmc_freq`` gives record points as the reference does (fractions ``arange(0, 1, lmc_freq) ∪ {1}`` of
    ``max_epochs``; 0 = before training); otherwise every ``every_n_epochs``. ``alphas`` is a number of evenly
    spaced points or an explicit list. Logs ``lmc/e<epoch>/<matching>/<normalization>/{acc,loss}`` per α
    (against ``lmc/alpha``), ``barrier/<matching>/<normalization>/{acc,loss}`` (against ``epoch``), and on W&B
    one line plot per record point plus a table of every curve.
    """

    prefix = "lmc"
    permutation_only = True

    def __init__(
        self,
        alphas: int | list[float] = 5,
        lmc_freq: float | None = None,
        normalizations: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if lmc_freq is not None:
            kwargs["at_fractions"] = lmc_fractions(lmc_freq)
        super().__init__(normalizations=normalizations if normalizations is not None else ["none"], **kwargs)
        if isinstance(alphas, int):
            if alphas < 2:
                raise ValueError(f"InterpolationCallback: alphas (number of points) must be ≥ 2, got {alphas}")
            grid = [i / (alphas - 1) for i in range(alphas)]
        else:
            grid = sorted(float(a) for a in alphas)
            if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0:
                raise ValueError(f"InterpolationCallback: alphas must include 0 and 1, got {alphas}")
        self.alphas = grid
        self.lmc_freq = lmc_freq
        self._rows: list[list[Any]] = []

    def define_metrics(self, run: Any) -> None:
        run.define_metric("lmc/alpha")
        run.define_metric("lmc/*", step_metric="lmc/alpha")
        run.define_metric("barrier/*", step_metric="epoch")

    def measure(self, a: nn.Module, b: nn.Module, data: CallbackData) -> dict[str, dict[str, list[float]]]:
        """``{"<matching>/<normalization>": {"alphas", "acc", "loss"}}`` (endpoints as they are)."""
        curves: dict[str, dict[str, list[float]]] = {}
        shared = self.results()
        for i, model in enumerate((a, b)):
            if ("eval", "endpoint", i) not in shared:
                shared[("eval", "endpoint", i)] = evaluate_reduced(model, data)
        ends = [shared[("eval", "endpoint", 0)], shared[("eval", "endpoint", 1)]]
        for pair in self.merges(a, b, data, shared):
            assert pair.b_aligned is not None
            for name in self.normalizations:
                c: dict[str, list[float]] = {"alphas": list(self.alphas), "acc": [], "loss": []}
                for alpha in self.alphas:
                    if alpha in (0.0, 1.0):  # endpoints as they are (interpolate_models returns exact copies)
                        m = ends[int(alpha)]
                    elif alpha == pair.alpha:
                        m = self.evaluated(pair, name, data, shared)
                    else:
                        merged = interpolate_models(a, pair.b_aligned, alpha).eval()
                        m = evaluate_reduced(pair.normalize(name, merged, alpha), data)
                    c["acc"].append(m["acc"])
                    c["loss"].append(m["loss"])
                curves[f"{pair.matching}/{name}"] = c
        return curves

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        curves = self.measure(*_pair(pl_module), data)
        epoch = self.completed  # completed training epochs (0 = before training)
        tag = f"e{epoch}"
        barriers: dict[str, float] = {}
        for variant, c in curves.items():
            barriers[f"barrier/{variant}/acc"] = barrier(c["acc"], "acc")
            barriers[f"barrier/{variant}/loss"] = barrier(c["loss"], "loss")
        self.log_scalars(trainer, barriers)
        for i, alpha in enumerate(self.alphas):
            row = {f"lmc/{tag}/{v}/{k}": c[k][i] for v, c in curves.items() for k in ("acc", "loss")}
            self.log_scalars(trainer, row, **{"lmc/alpha": alpha})
        for variant, c in curves.items():
            self._rows += [[epoch, trainer.global_step, variant, al, acc, loss]
                           for al, acc, loss in zip(c["alphas"], c["acc"], c["loss"])]  # fmt: skip
        self.log_wandb(trainer, lambda: {
            f"lmc_curves/{tag}/acc": line_plot(self.alphas, {v: c["acc"] for v, c in curves.items()},
                                               f"interpolation accuracy, epoch {epoch}", "alpha"),
            f"lmc_curves/{tag}/loss": line_plot(self.alphas, {v: c["loss"] for v, c in curves.items()},
                                                f"interpolation loss, epoch {epoch}", "alpha"),
            "lmc_table": table(["epoch", "step", "variant", "alpha", "acc", "loss"], self._rows),
        })  # fmt: skip


class VarianceCollapseCallback(_MergingCallback):
    """Per-layer variance ratio std(merged)/std(goal) and vanishing-feature ratio of merge variants over training.

    Variants are ``<matching>/none`` (before) and ``<matching>/<normalization>`` (after). Every logger gets
    ``variance/<variant>/{mean,min,last}`` and ``vf/<variant>/{mean,last}`` against ``epoch``; W&B also gets
    ``variance_collapse/table`` (every epoch × variant × layer), per-epoch line plots over layers and a line
    plot of the mean ratio against epoch, so the dashboard shows how collapse evolves.
    """

    prefix = "variance"

    def __init__(self, normalizations: list[str] | None = None, vanishing_feature: bool = True,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(normalizations=normalizations if normalizations is not None else ["repair"], **kwargs)
        self.vanishing_feature = vanishing_feature
        self._rows: list[list[Any]] = []
        self._history: dict[str, list[float]] = {}
        self._epochs: list[int] = []

    def define_metrics(self, run: Any) -> None:
        run.define_metric("variance/*", step_metric="epoch")
        run.define_metric("vf/*", step_metric="epoch")

    def measure(self, a: nn.Module, b: nn.Module, data: CallbackData) -> dict[str, Any]:
        """``{"layers": [...], "variance": {variant: [...]}, "vf_layers": [...], "vf": {variant: [...]}}``."""
        vr: dict[str, list[float]] = {}
        vf: dict[str, list[float]] = {}
        layers: list[str] = []
        vf_layers: list[str] = []
        shared = self.results()
        refs = [vf_profile_reduced(m, data) for m in (a, b)] if self.vanishing_feature else None
        for pair in self.merges(a, b, data, shared):
            goal = pair.goals()
            for name in self.normalizations:
                fixed = self.normalized(pair, name, shared)
                ratios = variance_ratio(fixed, goal, data.calib)
                layers = list(ratios)
                vr[f"{pair.matching}/{name}"] = list(ratios.values())
                if refs is not None:
                    e = vf_ratio(vf_profile_reduced(fixed, data), refs)
                    vf_layers = list(e)
                    vf[f"{pair.matching}/{name}"] = list(e.values())
        return {"layers": layers, "variance": vr, "vf_layers": vf_layers, "vf": vf}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        res = self.measure(*_pair(pl_module), data)
        epoch = trainer.current_epoch
        scalars: dict[str, float] = {}
        for variant, v in res["variance"].items():
            finite = [x for x in v if x == x] or [float("nan")]
            scalars.update({f"variance/{variant}/mean": sum(finite) / len(finite),
                            f"variance/{variant}/min": min(finite), f"variance/{variant}/last": v[-1]})  # fmt: skip
            self._history.setdefault(variant, []).append(scalars[f"variance/{variant}/mean"])
        for variant, v in res["vf"].items():
            scalars.update({f"vf/{variant}/mean": sum(v) / len(v), f"vf/{variant}/last": v[-1]})
        self._epochs.append(epoch)
        self.log_scalars(trainer, scalars)
        for variant, v in res["variance"].items():
            e = res["vf"].get(variant)
            vf_by_layer = dict(zip(res["vf_layers"], e)) if e is not None else {}
            self._rows += [[epoch, variant, i, layer, ratio, vf_by_layer.get(layer)]
                           for i, (layer, ratio) in enumerate(zip(res["layers"], v))]  # fmt: skip

        def payload() -> dict[str, Any]:
            n_layers, n_vf = range(len(res["layers"])), range(len(res["vf_layers"]))
            out = {
                "variance_collapse/table": table(["epoch", "variant", "layer_index", "layer", "variance_ratio",
                                                  "vf_ratio"], self._rows),
                f"variance_collapse/layers/e{epoch}": line_plot(list(n_layers), res["variance"],
                                                                f"variance ratio per layer, epoch {epoch}", "layer"),
                "variance_collapse/evolution": line_plot(self._epochs, self._history,
                                                         "mean variance ratio over training", "epoch"),
            }  # fmt: skip
            if res["vf"]:
                out[f"variance_collapse/vf/e{epoch}"] = line_plot(list(n_vf), res["vf"],
                                                                  f"vanishing-feature ratio, epoch {epoch}", "layer")
            return out

        self.log_wandb(trainer, payload)


class PFMCallback(_MergingCallback):
    """Preserve-First Merging over numbers of preserved layers: accuracy against parameter and FLOP ratios.

    ``preserve`` lists numbers of preserved layers (0 = full merge, -1 = every layer: the ensemble). Runs at the
    end of fit by default (``every_n_epochs`` to run periodically). Logs
    ``pfm/<matching>/<normalization>/p<k>/{acc,loss,params_ratio,flops_ratio}``; on W&B a table and a line plot
    of accuracy against the FLOP ratio per normalization.
    """

    prefix = "pfm"

    def __init__(self, preserve: list[int] | None = None, normalizations: list[str] | None = None,
                 every_n_epochs: int | None = None, at_fit_end: bool = True, **kwargs: Any) -> None:  # fmt: skip
        from vf_lightning.merge.pfm import PFM_NORMALIZATIONS

        self.allowed_normalizations = tuple(PFM_NORMALIZATIONS)
        super().__init__(normalizations=normalizations if normalizations is not None else ["none", "repair"],
                         every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, **kwargs)  # fmt: skip
        self.preserve = list(preserve) if preserve is not None else [0, 2, 4, -1]
        if not self.preserve or any(k < -1 for k in self.preserve):
            raise ValueError(f"PFMCallback: preserve takes numbers of preserved layers ≥ 0 (or -1 for all), "
                             f"got {preserve}")  # fmt: skip
        self._rows: list[list[Any]] = []

    def measure(self, a: nn.Module, b: nn.Module, data: CallbackData) -> list[dict[str, Any]]:
        """Rows of ``pfm_sweep`` (``preserved_layers``, ``normalization``, ``acc``, ... ) with ``matching``."""
        from vf_lightning.merge.pfm import max_preserved, pfm_sweep

        example = data.example()
        top = max_preserved(a, example)
        depths = list(dict.fromkeys(top if k == -1 else k for k in self.preserve))
        bad = [k for k in depths if k > top]
        if bad:
            raise ValueError(f"PFMCallback: preserve {bad} exceeds this model's {top} preservable layers")
        rows: list[dict[str, Any]] = []
        for matching in self.matchings:
            res = align(a, b, matching, loader=data.calib, example_input=example, seed=self.seed,
                        max_sweeps=self.max_sweeps)  # fmt: skip
            res = broadcast_alignment(res, data.device)
            for r in pfm_sweep(a, b, res, depths, self.normalizations, data.calib,
                               lambda m: evaluate_reduced(m, data), example):  # fmt: skip
                rows.append({"matching": matching, **r})
        return rows

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        rows = self.measure(*_pair(pl_module), data)
        scalars = {}
        for r in rows:
            base = f"pfm/{r['matching']}/{r['normalization']}/p{r['preserved_layers']}"
            for k in ("acc", "loss", "params_ratio", "flops_ratio"):
                scalars[f"{base}/{k}"] = r[k]
            self._rows.append([trainer.current_epoch, r["matching"], r["normalization"], r["preserved_layers"],
                               r["acc"], r["loss"], r["params_ratio"], r["flops_ratio"]])  # fmt: skip
        self.log_scalars(trainer, scalars)
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in rows:
            xs, ys = series.setdefault(f"{r['matching']}/{r['normalization']}", ([], []))
            xs.append(r["flops_ratio"])
            ys.append(r["acc"])
        epoch = trainer.current_epoch

        def payload() -> dict[str, Any]:
            import wandb

            out: dict[str, Any] = {
                "pfm_table": table(["epoch", "matching", "normalization", "preserved_layers", "acc", "loss",
                                    "params_ratio", "flops_ratio"], self._rows),
            }  # fmt: skip
            if series:
                out[f"pfm_plot/e{epoch}"] = wandb.plot.line_series(
                    xs=[s[0] for s in series.values()], ys=[s[1] for s in series.values()], keys=list(series),
                    title=f"PFM accuracy vs FLOP ratio, epoch {epoch}", xname="flops_ratio",
                )
            return out

        self.log_wandb(trainer, payload)


__all__ = ["InterpolationCallback", "MergeCallback", "PFMCallback", "VarianceCollapseCallback"]
