"""Callbacks that merge the module's networks and measure how the merge behaves (``vf fit`` and ``vf merge``).

- :class:`MergeCallback`: align, merge at α, normalize, evaluate → ``merge/<matching>/<normalization>/{acc,loss}``;
  in ``vf merge`` also the endpoints, the ensemble, the alignment self-checks and the ``results`` rows.
- :class:`InterpolationCallback`: the interpolation curve and its barrier (the reference's ``--lmc-freq``).
- :class:`PFMCallback`: Preserve-First Merging over numbers of preserved layers, with parameter / FLOP ratios.
- :class:`VarianceCollapseCallback`: per-layer variance ratios and vanishing-feature profiles of merge variants,
  before and after normalization, as W&B tables and line plots (and summary scalars for every logger).

Each is a thin front-end over the shared :class:`~vf_lightning.merge.session.MergeSession`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from vf_lightning.diagnostics import vf_profile, vf_ratio
from vf_lightning.distributed import all_reduce_sum, is_distributed
from vf_lightning.merge import barrier
from vf_lightning.merge.pfm import PFMModel, PFMSource, evaluate_variants, max_preserved, pfm_sweep
from vf_lightning.merge.session import (
    GENERAL_MATCHINGS,
    NO_GOALS,
    MergeSession,
    SessionData,
    check_matchings,
    check_normalizations,
)
from vf_lightning.progress import Steps
from vf_lightning.repair import has_normalization

from .base import MergingCallback, RunReport, lmc_fractions
from .wandb_log import (
    ALPHA_AXIS,
    EPOCH_AXIS,
    LAYER_AXIS,
    PFM_AXIS,
    VF_LAYER_AXIS,
    line_plot,
    table,
    update_config,
)


def chosen_layers(layers: list[str]) -> dict[str, int]:
    """Positions of the layers followed over training: first, middle and last variance-ratio site."""
    if not layers:
        return {}
    return {"first": 0, "middle": (len(layers) - 1) // 2, "last": len(layers) - 1}


def vf_profile_reduced(model: nn.Module, data: SessionData) -> dict[str, float]:
    """Vanishing-feature profile (``vf_profile``) on the calibration inputs, averaged over all ranks' samples."""
    n = sum(int(x.shape[0]) for x in data.calib)
    prof = vf_profile(model, data.calib)
    if not is_distributed():
        return prof
    names = list(prof)  # every rank runs the same architecture, so the layer order agrees
    sums = all_reduce_sum([prof[k] * n for k in names] + [n], data.device)
    return {k: v / sums[-1] for k, v in zip(names, sums[:-1])}


class _Merging(MergingCallback):
    """Common options of the merging callbacks: matchings, normalizations, α."""

    permutation_only = False
    allowed_normalizations: tuple[str, ...] | None = None

    def __init__(self, matchings: list[str] | None = None, normalizations: list[str] | None = None,
                 alpha: float = 0.5, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(matchings=matchings, **kwargs)
        owner = type(self).__name__
        self.matchings = check_matchings(self.matchings, owner, self.permutation_only)
        self.normalizations = check_normalizations(
            normalizations if normalizations is not None else ["none", "repair"], owner, self.allowed_normalizations
        )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{owner}: alpha must lie in [0, 1], got {alpha}")
        if alpha != 0.5 and any(m in GENERAL_MATCHINGS for m in self.matchings):
            raise ValueError(f"{owner}: zip/cca merge with fixed weights (α = ½); got alpha={alpha}")
        self.alpha = alpha

    def pair_session(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData,
                     what: str) -> MergeSession | None:  # fmt: skip
        """The session, or None (with a warning) when it holds more than two networks: ``what`` needs a pair."""
        s = self.session(trainer, pl_module, data)
        if s.is_pair:
            return s
        rank_zero_warn(f"{type(self).__name__}: {what} defined for two networks; skipped for {len(s.models)}")
        return None

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        net = next(iter(pl_module.networks().values()))  # type: ignore[operator]
        if "bias_calibration" in self.normalizations and has_normalization(net):
            raise ValueError(f"{type(self).__name__}: bias_calibration is defined for networks without normalization "
                             "layers; this network has BatchNorm/LayerNorm — use reset or repair/rescale instead")


class MergeCallback(_Merging):
    """Align the networks, merge at ``alpha``, normalize, evaluate.

    Logs ``merge/<matching>/<normalization>/acc`` and ``/loss`` (``none`` is always included) as one step against
    ``trained_epochs``. With ``ensemble`` also ``merge/ensemble/{acc,loss}``. In ``vf merge`` it adds the
    report's ``endpoints``, ``ensemble``, ``alignment`` (logit difference of the aligned networks and the
    random-permutation self-check) and ``results`` rows, and offers every variant for ``merged.pt``, scored on
    the held-out validation half.
    """

    state_attrs = ("_rows",)

    def __init__(self, ensemble: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ensemble = ensemble
        self._rows: list[list[Any]] = []

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        s = self.session(trainer, pl_module, data)
        alpha = self.alpha if s.is_pair else None
        metrics: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        with self.steps(len(self.matchings) * len(self.normalizations) + int(self.ensemble)) as bar:
            self._measure(trainer, s, alpha, metrics, rows, bar)
        self.log_scalars(trainer, metrics)
        self.log_wandb(trainer, lambda: {"merge_table": table([EPOCH_AXIS, "matching", "normalization", "acc",
                                                               "loss"], self._rows)})  # fmt: skip
        if trainer.state.fn == "validate":
            self._report(trainer, s, rows)

    def _measure(self, trainer: L.Trainer, s: MergeSession, alpha: float | None, metrics: dict[str, float],
                 rows: list[dict[str, Any]], bar: Steps) -> None:  # fmt: skip
        for matching in self.matchings:
            for name in self.normalizations:
                t0 = time.perf_counter()
                m = s.evaluate_variant(matching, name, alpha)
                bar.advance(f"{matching}/{name}", acc=m["acc"], loss=m["loss"])
                metrics[f"merge/{matching}/{name}/acc"], metrics[f"merge/{matching}/{name}/loss"] = m["acc"], m["loss"]
                rows.append({"matching": matching, "normalization": name, "preserved_layers": 0, "alpha": alpha,
                             "acc": m["acc"], "loss": m["loss"], "params_ratio": 1.0, "flops_ratio": 1.0,
                             "seconds": time.perf_counter() - t0})  # fmt: skip
                self._rows.append([self.completed, matching, name, m["acc"], m["loss"]])
        if self.ensemble:
            e = s.ensemble_metrics()
            metrics["merge/ensemble/acc"], metrics["merge/ensemble/loss"] = e["acc"], e["loss"]
            bar.advance("ensemble", acc=e["acc"], loss=e["loss"])

    def _report(self, trainer: L.Trainer, s: MergeSession, rows: list[dict[str, Any]]) -> None:
        rep = self.report(trainer)
        names = list(pl_names(trainer))
        rep.sections["endpoints"] = dict(zip(names, s.endpoint_metrics()))
        if self.ensemble:
            rep.sections["ensemble"] = s.ensemble_metrics()
        align = rep.sections.setdefault("alignment", {})
        for matching in self.matchings:
            align[matching] = s.alignment_report(matching)
        rep.rows.extend(rows)
        if s.data.select is not None:
            for r in rows:
                score = s.evaluate_variant(r["matching"], r["normalization"], r["alpha"], split="select")["acc"]
                rep.offer("merged", score, s.normalized(r["matching"], r["normalization"], r["alpha"]),
                          f"{r['matching']}/{r['normalization']}", alpha=r["alpha"], val_acc=score,
                          test_acc=r["acc"])  # fmt: skip


def pl_names(trainer: L.Trainer) -> list[str]:
    """Names of the module's networks (``a``, ``b``, ...)."""
    return list(trainer.lightning_module.networks())  # type: ignore[operator]


class InterpolationCallback(_Merging):
    """The interpolation curve θ_α = (1−α)θ_A + αθ_B' and its barriers at chosen points of training.

    ``lmc_freq`` gives record points as the reference does (fractions ``arange(0, 1, lmc_freq) ∪ {1}`` of
    ``max_epochs``; 0 = before training); otherwise every ``every_n_epochs``. ``alphas`` is a number of evenly
    spaced points or an explicit list. Normalized points use goals interpolated at the same α. Logs
    ``lmc/e<trained_epochs>/<matching>/<normalization>/{acc,loss}`` with one step per α (against ``lmc/alpha``),
    ``barrier/<matching>/<normalization>/{acc,loss}`` (against ``trained_epochs``), and on W&B the line plots
    ``lmc_curves/{acc,loss}`` of the latest record point plus ``lmc_table`` of every curve; in ``vf merge`` the
    report's ``lmc`` section. Pairs only.
    """

    state_attrs = ("_rows",)
    permutation_only = True

    def __init__(self, alphas: int | list[float] = 5, lmc_freq: float | None = None,
                 normalizations: list[str] | None = None, **kwargs: Any) -> None:  # fmt: skip
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

    def measure(self, s: MergeSession) -> dict[str, dict[str, list[float]]]:
        """``{"<matching>/<normalization>": {"alphas", "acc", "loss"}}`` (endpoints as they are)."""
        ends = s.endpoint_metrics()
        curves: dict[str, dict[str, list[float]]] = {}
        inner = [a for a in self.alphas if a not in (0.0, 1.0)]
        with self.steps(len(self.matchings) * len(self.normalizations) * len(inner), unit="point") as bar:
            for matching in self.matchings:
                for name in self.normalizations:
                    c: dict[str, list[float]] = {"alphas": list(self.alphas), "acc": [], "loss": []}
                    for alpha in self.alphas:
                        m = ends[int(alpha)] if alpha in (0.0, 1.0) else s.evaluate_variant(matching, name, alpha)
                        bar.advance(n=0 if alpha in (0.0, 1.0) else 1)
                        c["acc"].append(m["acc"])
                        c["loss"].append(m["loss"])
                    curves[f"{matching}/{name}"] = c
                    bar.log(f"{matching}/{name}", acc_barrier=barrier(c["acc"], "acc"),
                            loss_barrier=barrier(c["loss"], "loss"))  # fmt: skip
        return curves

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        s = self.pair_session(trainer, pl_module, data, "interpolation curves are")
        if s is None:
            return
        curves = self.measure(s)
        epoch = self.completed  # completed training epochs (0 = before training)
        tag = f"e{epoch}"
        barriers: dict[str, dict[str, float]] = {
            v: {"acc": barrier(c["acc"], "acc"), "loss": barrier(c["loss"], "loss")} for v, c in curves.items()
        }
        self.log_scalars(trainer, {f"barrier/{v}/{k}": b[k] for v, b in barriers.items() for k in ("acc", "loss")})
        points = [{ALPHA_AXIS: alpha, **{f"lmc/{tag}/{v}/{k}": c[k][i] for v, c in curves.items()
                                         for k in ("acc", "loss")}} for i, alpha in enumerate(self.alphas)]  # fmt: skip
        self.log_rows(trainer, ALPHA_AXIS, points)
        for variant, c in curves.items():
            self._rows += [[epoch, trainer.global_step, variant, al, acc, loss]
                           for al, acc, loss in zip(c["alphas"], c["acc"], c["loss"])]  # fmt: skip
        self.log_wandb(trainer, lambda: {
            "lmc_curves/acc": line_plot(self.alphas, {v: c["acc"] for v, c in curves.items()},
                                        f"interpolation accuracy after {epoch} epochs", "alpha"),
            "lmc_curves/loss": line_plot(self.alphas, {v: c["loss"] for v, c in curves.items()},
                                         f"interpolation loss after {epoch} epochs", "alpha"),
            "lmc_table": table([EPOCH_AXIS, "step", "variant", "alpha", "acc", "loss"], self._rows),
        })  # fmt: skip
        if trainer.state.fn == "validate":
            rep = self.report(trainer)
            rep.sections["lmc"] = {"alphas": list(self.alphas),
                                   "curves": {v: {"acc": c["acc"], "loss": c["loss"]} for v, c in curves.items()},
                                   "barrier": barriers}  # fmt: skip


class VarianceCollapseCallback(_Merging):
    """Per-layer variance ratio std(merged)/std(goal) and vanishing-feature ratio of merge variants over training.

    The variance ratio (DESIGN §5) is, per layer, the mean over channels of std(merged) / std(goal) at the inputs
    of the activations, with goals in the merged basis — the same definition and sites in every command.
    Variants are ``<matching>/none`` (before) and ``<matching>/<normalization>`` (after). Every logger gets
    ``variance/<variant>/{mean,min,first,middle,last}`` (the ratio at the first, middle and last site: the
    over-training panel) and ``vf/<variant>/{mean,last}`` as one step against ``trained_epochs``; in ``vf merge``
    also the per-layer curves ``variance_layer/<variant>`` (one step per site, against ``layer``) and
    ``vf_layer/<variant>`` (against ``vf_layer``). W&B also gets ``variance_collapse/per_layer`` (a line per
    variant over the sites, re-logged at every validation), ``variance_collapse/evolution``,
    ``variance_collapse/table`` (every trained_epochs × variant × layer) and, in the run config,
    ``variance_sites``; in ``vf merge`` the report's ``variance_ratio`` and ``vanishing_feature`` sections.
    """

    state_attrs = ("_rows", "_history", "_epochs")

    def __init__(self, normalizations: list[str] | None = None, vanishing_feature: bool = True,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(normalizations=normalizations if normalizations is not None else ["repair"], **kwargs)
        self.vanishing_feature = vanishing_feature
        self._rows: list[list[Any]] = []
        self._history: dict[str, list[float]] = {}
        self._epochs: list[int] = []

    def measure(self, s: MergeSession) -> dict[str, Any]:
        """``{"layers": [...], "variance": {variant: [...]}, "vf_layers": [...], "vf": {variant: [...]}}``."""
        alpha = self.alpha if s.is_pair else None
        vr: dict[str, list[float]] = {}
        vf: dict[str, list[float]] = {}
        vf_layers: list[str] = []
        with self.steps(len(self.matchings) * len(self.normalizations)) as bar:
            refs = [vf_profile_reduced(m, s.data) for m in s.models] if self.vanishing_feature else None
            for matching in self.matchings:
                for name in self.normalizations:
                    vr[f"{matching}/{name}"] = ratios = list(s.variance_ratio(matching, name, alpha).values())
                    if refs is not None:
                        bar.status(f"vanishing-feature profile {matching}/{name}")
                        e = vf_ratio(vf_profile_reduced(s.normalized(matching, name, alpha), s.data), refs)
                        vf_layers = list(e)
                        vf[f"{matching}/{name}"] = list(e.values())
                    finite = [x for x in ratios if x == x] or [float("nan")]
                    bar.advance(f"{matching}/{name}", mean_variance_ratio=sum(finite) / len(finite),
                                last_layer=ratios[-1] if ratios else float("nan"))  # fmt: skip
        return {"layers": list(s.vr_sites), "variance": vr, "vf_layers": vf_layers, "vf": vf}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        res = self.measure(self.session(trainer, pl_module, data))
        epoch = self.completed
        layers: list[str] = res["layers"]
        chosen = chosen_layers(layers)
        scalars: dict[str, float] = {}
        for variant, v in res["variance"].items():
            finite = [x for x in v if x == x] or [float("nan")]
            scalars.update({f"variance/{variant}/mean": sum(finite) / len(finite),
                            f"variance/{variant}/min": min(finite)})  # fmt: skip
            scalars.update({f"variance/{variant}/{pos}": v[i] for pos, i in chosen.items()})
            self._history.setdefault(variant, []).append(scalars[f"variance/{variant}/mean"])
        for variant, v in res["vf"].items():
            scalars.update({f"vf/{variant}/mean": sum(v) / len(v), f"vf/{variant}/last": v[-1]})
        self._epochs.append(epoch)
        self.log_scalars(trainer, scalars)
        if trainer.state.fn == "validate":  # one validation: the per-layer curves as rows against the layer index
            self.log_rows(trainer, LAYER_AXIS, [{LAYER_AXIS: i, **{f"variance_layer/{k}": v[i]
                                                                  for k, v in res["variance"].items()}}
                                                for i in range(len(layers))])  # fmt: skip
            self.log_rows(trainer, VF_LAYER_AXIS, [{VF_LAYER_AXIS: i, **{f"vf_layer/{k}": v[i]
                                                                        for k, v in res["vf"].items()}}
                                                   for i in range(len(res["vf_layers"]))])  # fmt: skip
        for variant, v in res["variance"].items():
            e = res["vf"].get(variant)
            vf_by_layer = dict(zip(res["vf_layers"], e)) if e is not None else {}
            self._rows += [[epoch, variant, i, layer, ratio, vf_by_layer.get(layer)]
                           for i, (layer, ratio) in enumerate(zip(layers, v))]  # fmt: skip

        def payload() -> dict[str, Any]:
            out = {
                "variance_collapse/table": table([EPOCH_AXIS, "variant", "layer_index", "layer", "variance_ratio",
                                                  "vf_ratio"], self._rows),
                "variance_collapse/per_layer": line_plot(list(range(len(layers))), res["variance"],
                                                         f"variance ratio per layer after {epoch} epochs",
                                                         "layer index"),
                "variance_collapse/evolution": line_plot(self._epochs, self._history,
                                                         "mean variance ratio over training", EPOCH_AXIS),
            }  # fmt: skip
            if res["vf"]:
                out["variance_collapse/vf_per_layer"] = line_plot(list(range(len(res["vf_layers"]))), res["vf"],
                                                                  f"vanishing-feature ratio after {epoch} epochs",
                                                                  "layer index")  # fmt: skip
            return out

        update_config(trainer, {"variance_sites": {"layers": layers, **{p: layers[i] for p, i in chosen.items()}}})
        self.log_wandb(trainer, payload)
        if trainer.state.fn == "validate":
            rep = self.report(trainer)
            rep.sections["variance_ratio"] = {"layers": res["layers"], "curves": res["variance"]}
            if res["vf"]:
                rep.sections["vanishing_feature"] = {"layers": res["vf_layers"], "curves": res["vf"]}


class PFMCallback(_Merging):
    """Preserve-First Merging over numbers of preserved layers: accuracy against parameter and FLOP ratios.

    ``preserve`` lists numbers of preserved layers (0 = full merge, -1 = every layer: the ensemble). Runs at the
    end of fit by default (``every_n_epochs`` to run periodically). Logs one step per depth against
    ``pfm/preserved_layers`` holding ``pfm/params_ratio``, ``pfm/flops_ratio`` and
    ``pfm/e<trained_epochs>/<matching>/<normalization>/{acc,loss}``; on W&B ``pfm_table`` and ``pfm_plot``
    (accuracy against parameter ratio, a line per variant); in ``vf merge`` the PFM ``results`` rows, and the
    variant that scores best on the held-out validation half is offered for ``merged_pfm.pt``. Pairs only.
    """

    state_attrs = ("_rows",)

    def __init__(self, preserve: list[int] | None = None, normalizations: list[str] | None = None,
                 every_n_epochs: int | None = None, at_fit_end: bool = True, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(normalizations=normalizations if normalizations is not None else ["none", "repair"],
                         every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, **kwargs)  # fmt: skip
        self.preserve = list(preserve) if preserve is not None else [0, 2, 4, -1]
        if not self.preserve or any(k < -1 for k in self.preserve):
            raise ValueError(f"PFMCallback: preserve takes numbers of preserved layers ≥ 0 (or -1 for all), "
                             f"got {preserve}")  # fmt: skip
        self._rows: list[list[Any]] = []

    def measure(self, s: MergeSession, validate: bool) -> list[dict[str, Any]]:
        """Rows of ``pfm_sweep`` (``preserved_layers``, ``normalization``, ``acc``, ... ) with ``matching``."""
        a, b = s.models
        example = s.data.example()
        top = max_preserved(a, example, s.spec)
        depths = list(dict.fromkeys(top if k == -1 else k for k in self.preserve))
        if validate:  # in vf merge the full merge (k = 0) is MergeCallback's row
            depths = [k for k in depths if k != 0]
        bad = [k for k in depths if k > top]
        if bad:
            raise ValueError(f"PFMCallback: preserve {bad} exceeds this model's {top} preservable layers")
        rep = self.report(self._trainer) if validate and self._trainer is not None else None
        with self.steps(len(self.matchings) * len(depths) * len(self.normalizations)) as bar:
            return self._sweep(s, depths, rep, bar)

    def _sweep(self, s: MergeSession, depths: list[int], rep: RunReport | None, bar: Steps) -> list[dict[str, Any]]:
        """PFM rows of every matching over ``depths`` × normalizations, depth by depth (a depth's variants of every
        matching evaluated in one pass; each variant offered for merged_pfm.pt)."""
        a, b = s.models
        example = s.data.example()
        selected: dict[int, float] = {}  # validation-half accuracy of each variant of the depth being swept

        def evaluate(variants: Sequence[PFMModel]) -> list[dict[str, float]]:
            """Test half for the rows (and validation half for merged_pfm.pt): one pass each over a depth's variants."""
            with s.timer.phase("evaluation"):
                if rep is not None and s.data.select is not None:
                    scores = evaluate_variants(variants, s.data.select, s.data.device)
                    selected.update({id(v): r["acc"] for v, r in zip(variants, scores)})
                return evaluate_variants(variants, s.data.eval, s.data.device)

        def keep(pfm: nn.Module, row: dict[str, Any]) -> None:
            name = f"{row['matching']}/{row['normalization']}/k={row['preserved_layers']}"
            bar.advance(name, acc=row["acc"], params_ratio=row["params_ratio"])
            if rep is None or s.data.select is None:
                return
            score = selected.pop(id(pfm))
            rep.offer("merged_pfm", score, pfm, name, val_acc=score, test_acc=row["acc"],
                      preserved_layers=row["preserved_layers"], params_ratio=row["params_ratio"],
                      flops_ratio=row["flops_ratio"])  # fmt: skip

        sources = {}
        for matching in self.matchings:
            merge = s.merge(matching, 0.5)
            # the session's statistics sites cover every non-output conv/linear, i.e. any depth's merged part
            goals = s.goals(merge, s.stat_sites) if any(n not in NO_GOALS for n in self.normalizations) else None
            sources[matching] = PFMSource(s.alignment(matching), goals, merge.model)
        with s.timer.phase("pfm"):
            found = pfm_sweep(a, b, sources, depths, self.normalizations, s.data.calib, evaluate, example,
                              on_variant=keep, sites=s.fix_sites)  # fmt: skip
        return [{"matching": r["matching"], "alpha": 0.5, **r} for r in found]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        s = self.pair_session(trainer, pl_module, data, "Preserve-First Merging is")
        if s is None:
            return
        validate = trainer.state.fn == "validate"
        rows = self.measure(s, validate)
        epoch = self.completed
        by_depth: dict[int, dict[str, float]] = {}
        for r in rows:
            k = r["preserved_layers"]
            point = by_depth.setdefault(k, {PFM_AXIS: k, "pfm/params_ratio": r["params_ratio"],
                                            "pfm/flops_ratio": r["flops_ratio"]})  # fmt: skip
            point[f"pfm/e{epoch}/{r['matching']}/{r['normalization']}/acc"] = r["acc"]
            point[f"pfm/e{epoch}/{r['matching']}/{r['normalization']}/loss"] = r["loss"]
            self._rows.append([epoch, r["matching"], r["normalization"], k, r["acc"], r["loss"], r["params_ratio"],
                               r["flops_ratio"]])  # fmt: skip
        self.log_rows(trainer, PFM_AXIS, [by_depth[k] for k in sorted(by_depth)])
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in sorted(rows, key=lambda r: r["params_ratio"]):
            xs, ys = series.setdefault(f"{r['matching']}/{r['normalization']}", ([], []))
            xs.append(r["params_ratio"])
            ys.append(r["acc"])

        def payload() -> dict[str, Any]:
            import wandb

            out: dict[str, Any] = {
                "pfm_table": table([EPOCH_AXIS, "matching", "normalization", "preserved_layers", "acc", "loss",
                                    "params_ratio", "flops_ratio"], self._rows),
            }  # fmt: skip
            if series:
                out["pfm_plot"] = wandb.plot.line_series(
                    xs=[s[0] for s in series.values()], ys=[s[1] for s in series.values()], keys=list(series),
                    title=f"PFM accuracy vs parameter ratio after {epoch} epochs", xname="params_ratio",
                )
            return out

        self.log_wandb(trainer, payload)
        if validate:
            self.report(trainer).rows.extend(rows)


__all__ = ["InterpolationCallback", "MergeCallback", "PFMCallback", "VarianceCollapseCallback"]
