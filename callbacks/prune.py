"""One-shot pruning of the module's networks at a list of sparsities, with and without post-pruning normalization
(``vf fit`` at chosen epochs, ``vf prune`` on a finished checkpoint)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from vf_lightning.align import ModelGraph
from vf_lightning.diagnostics import count_params, variance_ratio
from vf_lightning.distributed import broadcast_module
from vf_lightning.merge.session import SessionData, check_normalizations, evaluate_model
from vf_lightning.progress import Steps
from vf_lightning.prune import PRUNERS, normalize_pruned, prune_model, sparsity_report
from vf_lightning.repair import FoldPlans, Goals, Measure, auto_normalization, reference_stats

from .base import DiagnosticCallback, networks_of
from .wandb_log import EPOCH_AXIS, LAYER_AXIS, SPARSITY_AXIS, line_plot, table


@dataclass
class _Dense:
    """A dense network and what every pruning level reuses: goal statistics, sites, parameter count, labelled data."""

    name: str
    model: nn.Module
    goals: Goals
    vr_goals: Goals
    fix_sites: list[str]
    auto: str
    n_params: int
    labelled: list[tuple[torch.Tensor, torch.Tensor]]
    plans: FoldPlans  # the pruned variants share the dense model's fold plan


class PruneCallback(DiagnosticCallback):
    """Prune copies of the networks (``networks``: names from the module's ``networks()``, default the first).

    Runs at the end of fit by default (``every_n_epochs`` to run periodically), and once in ``vf prune``. For each
    pruner and sparsity the pruned copy is evaluated as is (``none``) and after each of ``normalizations``
    (``auto`` = reset for BatchNorm, repair for LayerNorm, rescale otherwise) against the dense network's
    statistics (one statistics pass, reused). Logs one step per sparsity against ``prune/sparsity`` holding
    ``prune/e<trained_epochs>/<net>/<pruner>/<normalization>/{acc,loss}`` and ``.../<pruner>/achieved_sparsity``,
    and ``prune/<net>/dense/{acc,loss}`` against ``trained_epochs``; on W&B ``prune_table`` and ``prune_plot``
    (accuracy against sparsity), in ``vf prune`` also ``variance_layer/<net>/...`` against ``layer``; in
    ``vf prune`` the report's ``endpoints``, ``results`` rows and ``variance_ratio``, and the best variant at the
    highest sparsity (scored on the held-out validation half) is offered for ``pruned.pt``.
    """

    state_attrs = ("_rows",)
    min_networks = 1

    def __init__(
        self,
        sparsities: list[float] | None = None,
        pruner: str | list[str] = "global_magnitude",
        normalizations: list[str] | None = None,
        networks: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fisher_samples: int = 512,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, **kwargs)
        self.sparsities = [float(s) for s in (sparsities if sparsities is not None else [0.5, 0.7, 0.9])]
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"PruneCallback: sparsities must lie in [0, 1), got {sparsities}")
        self.pruners = [pruner] if isinstance(pruner, str) else list(pruner)
        bad = [p for p in self.pruners if p not in PRUNERS]
        if bad or not self.pruners:
            raise ValueError(f"PruneCallback: unknown pruner {bad}; choose from {', '.join(sorted(PRUNERS))}")
        self.normalizations = check_normalizations(normalizations if normalizations is not None else ["auto"],
                                                   "PruneCallback", allow_auto=True)  # fmt: skip
        if "bias_calibration" in self.normalizations:
            raise ValueError("PruneCallback: bias_calibration is a merging normalization; use auto | reset | repair | "
                             "rescale | reshift | zero_bias")  # fmt: skip
        self.networks = list(networks) if networks is not None else None
        self.include = include
        self.exclude = list(exclude or [])
        self.fisher_samples = fisher_samples
        self._rows: list[list[Any]] = []

    def _selected(self, nets: dict[str, nn.Module], owner: str) -> dict[str, nn.Module]:
        names = self.networks if self.networks is not None else list(nets)[:1]
        missing = [n for n in names if n not in nets]
        if missing:
            raise ValueError(f"PruneCallback: network(s) {missing} not in {owner}; choose from {', '.join(nets)}")
        return {n: nets[n] for n in names}

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        self._selected(pl_module.networks(), type(pl_module).__name__)  # type: ignore[operator]

    def measure(self, name: str, dense: nn.Module, data: SessionData, validate: bool) -> dict[str, Any]:
        """Dense and pruned (± normalization) accuracies and losses of one network, reduced over ranks."""
        graph = ModelGraph.of(dense)
        fix_sites, vr_sites = graph.correction_sites(), graph.variance_sites()
        plans = FoldPlans()
        d = evaluate_model(dense, data.eval, data.device, plans)
        stats = reference_stats([dense], data.calib, list(dict.fromkeys([*fix_sites, *vr_sites])))[0]
        # diag_fisher needs labels: validation batches (rank 0's mask is then broadcast to all ranks)
        ref = _Dense(name, dense, stats.subset(fix_sites), stats.subset(vr_sites), fix_sites,
                     auto_normalization(dense), count_params(dense),
                     data.select if data.select is not None else data.eval, plans)  # fmt: skip
        rows: list[dict[str, Any]] = []
        curves: dict[str, list[float]] = {}
        with self.steps(len(self.pruners) * len(self.sparsities) * len(self.normalizations)) as bar:
            for pruner in self.pruners:
                for s in self.sparsities:
                    self._level(ref, data, validate, pruner, s, rows, curves, bar)
        return {"dense": d, "rows": rows, "variance": {"layers": vr_sites, "curves": curves}}

    def _level(self, ref: _Dense, data: SessionData, validate: bool, pruner: str, s: float,
               rows: list[dict[str, Any]], curves: dict[str, list[float]], bar: Steps) -> None:  # fmt: skip
        """One pruner at one sparsity: prune, then evaluate as is and after each normalization."""
        t0 = time.perf_counter()
        with torch.enable_grad():
            pruned = prune_model(ref.model, pruner, s, ref.labelled if pruner == "diag_fisher" else None,
                                 self.include, self.exclude, self.fisher_samples)  # fmt: skip
        pruned = broadcast_module(pruned, data.device)
        achieved = float(sparsity_report(pruned, self.include, self.exclude)["global"])  # type: ignore[arg-type]
        t_prune = time.perf_counter() - t0
        for norm in self.normalizations:
            t1 = time.perf_counter()
            label = f"auto:{ref.auto}" if norm == "auto" else norm
            wanted = Measure(ref.vr_goals.sites) if validate else None  # the variance ratio from its own pass
            model = pruned if norm == "none" else normalize_pruned(
                pruned, ref.model, data.calib, norm, None, ref.goals, ref.fix_sites, measure=wanted)[0]  # fmt: skip
            m = evaluate_model(model, data.eval, data.device, ref.plans)
            row = {"network": ref.name, "pruner": pruner, "sparsity": s, "achieved_sparsity": achieved,
                   "normalization": label, "acc": m["acc"], "loss": m["loss"],
                   "params_ratio": count_params(model, nonzero=True) / ref.n_params, "flops_ratio": 1.0,
                   "seconds": t_prune + time.perf_counter() - t1}  # fmt: skip
            rows.append(row)
            bar.advance(f"{ref.name}/{pruner}/{s:g}/{label}", acc=m["acc"], sparsity=achieved)
            if validate:
                known = wanted.goals if wanted is not None else None
                curves[f"{pruner}/{s:g}/{label}"] = list(variance_ratio(model, ref.vr_goals, data.calib,
                                                                        known=known).values())  # fmt: skip
                if data.select is not None and s == max(self.sparsities):
                    score = evaluate_model(model, data.select, data.device, ref.plans)["acc"]
                    self.report(self._trainer).offer(  # type: ignore[arg-type]
                        "pruned", score, model, f"{ref.name}/{pruner}/{s:g}/{label}", val_acc=score,
                        test_acc=m["acc"])  # fmt: skip

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: SessionData) -> None:
        validate = trainer.state.fn == "validate"
        scalars: dict[str, float] = {}
        nets = self._selected(networks_of(trainer, pl_module), type(pl_module).__name__)
        epoch = self.completed
        by_sparsity: dict[float, dict[str, float]] = {}
        for name, net in nets.items():
            res = self.measure(name, net, data, validate)
            scalars[f"prune/{name}/dense/acc"], scalars[f"prune/{name}/dense/loss"] = (res["dense"]["acc"],
                                                                                      res["dense"]["loss"])
            for r in res["rows"]:
                base = f"prune/e{epoch}/{name}/{r['pruner']}"
                key = "auto" if r["normalization"].startswith("auto:") else r["normalization"]
                point = by_sparsity.setdefault(r["sparsity"], {SPARSITY_AXIS: r["sparsity"]})
                point[f"{base}/achieved_sparsity"] = r["achieved_sparsity"]
                point[f"{base}/{key}/acc"], point[f"{base}/{key}/loss"] = r["acc"], r["loss"]
                self._rows.append([epoch, name, r["pruner"], r["sparsity"], r["normalization"], r["acc"], r["loss"]])
            if validate:
                rep = self.report(trainer)
                rep.sections.setdefault("endpoints", {})["dense" if len(nets) == 1 else f"dense_{name}"] = res["dense"]
                rep.rows.extend(res["rows"])
                rep.sections["variance_ratio"] = vr = res["variance"]
                self.log_rows(trainer, LAYER_AXIS, [{LAYER_AXIS: i, **{f"variance_layer/{name}/{k}": v[i]
                                                                 for k, v in vr["curves"].items()}}
                                                 for i in range(len(vr["layers"]))])  # fmt: skip
        self.log_scalars(trainer, scalars)
        self.log_rows(trainer, SPARSITY_AXIS, [by_sparsity[k] for k in sorted(by_sparsity)])
        rows = [r for r in self._rows if r[0] == epoch]

        def payload() -> dict[str, Any]:
            curves: dict[str, list[float]] = {}
            for r in sorted(rows, key=lambda r: r[3]):
                curves.setdefault(f"{r[1]}/{r[2]}/{r[4]}", []).append(r[5])
            return {
                "prune_table": table([EPOCH_AXIS, "network", "pruner", "sparsity", "normalization", "acc", "loss"],
                                     self._rows),
                "prune_plot": line_plot(sorted(self.sparsities), curves,
                                        f"accuracy after pruning, {epoch} training epochs", "sparsity"),
            }  # fmt: skip

        self.log_wandb(trainer, payload)
