"""One-shot pruning of the training networks at a list of sparsities, with and without post-pruning normalization."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from vf_lightning.prune import PRUNERS, normalize_pruned, prune_model, sparsity_report
from vf_lightning.repair import auto_normalization, compute_goals

from .base import (
    CallbackData,
    DiagnosticCallback,
    broadcast_module,
    evaluate_reduced,
    frozen_copy,
    line_plot,
    table,
)
from .merging import check_normalizations


class PruneCallback(DiagnosticCallback):
    """Prune copies of the networks (``networks``: ``a``/``b`` of a PairModule, ``net`` of a ClassifierModule).

    Runs at the end of fit by default (``every_n_epochs`` to run periodically). For each sparsity the pruned copy
    is evaluated as is (``none``) and after each of ``normalizations`` (``auto`` = reset for BatchNorm, repair
    for LayerNorm, rescale otherwise) against the dense network's statistics. Logs
    ``prune/<net>/<pruner>/s<sparsity>/<normalization>/{acc,loss}`` and ``prune/<net>/dense/{acc,loss}``;
    on W&B a table and a line plot of accuracy against sparsity.
    """

    prefix = "prune"
    pair_only = False

    def __init__(
        self,
        sparsities: list[float] | None = None,
        pruner: str = "global_magnitude",
        normalizations: list[str] | None = None,
        networks: list[str] | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, **kwargs)
        self.sparsities = [float(s) for s in (sparsities if sparsities is not None else [0.5, 0.7, 0.9])]
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"PruneCallback: sparsities must lie in [0, 1), got {sparsities}")
        if pruner not in PRUNERS:
            raise ValueError(f"PruneCallback: unknown pruner {pruner!r}; choose from {', '.join(sorted(PRUNERS))}")
        self.pruner = pruner
        self.normalizations = check_normalizations(normalizations if normalizations is not None else ["auto"],
                                                   "PruneCallback", allow_auto=True)  # fmt: skip
        if "bias_calibration" in self.normalizations:
            raise ValueError("PruneCallback: bias_calibration is a merging normalization; use auto | reset | repair | "
                             "rescale | reshift | zero_bias")  # fmt: skip
        self.networks = list(networks) if networks is not None else None
        self._rows: list[list[Any]] = []

    def _selected(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Module]:
        nets: dict[str, torch.nn.Module] = pl_module.networks()  # type: ignore[operator]
        names = self.networks if self.networks is not None else list(nets)[:1]
        missing = [n for n in names if n not in nets]
        if missing:
            raise ValueError(f"PruneCallback: network(s) {missing} not in {type(pl_module).__name__}; "
                             f"choose from {', '.join(nets)}")  # fmt: skip
        return {n: nets[n] for n in names}

    def check_module(self, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "networks", None)):
            raise TypeError(f"PruneCallback needs a module with networks(); got {type(pl_module).__name__}")
        self._selected(pl_module)

    def measure(self, name: str, dense: torch.nn.Module, data: CallbackData) -> dict[str, float]:
        """Dense and pruned (± normalization) accuracies and losses of one network, reduced over ranks."""
        out: dict[str, float] = {}
        d = evaluate_reduced(dense, data)
        out[f"prune/{name}/dense/acc"], out[f"prune/{name}/dense/loss"] = d["acc"], d["loss"]
        goals = None
        if any(n in ("repair", "rescale", "reshift") or (n == "auto" and auto_normalization(dense) != "reset")
               for n in self.normalizations):  # fmt: skip
            goals = compute_goals([dense], data.calib, [1.0])
        # diag_fisher needs labels: this rank's evaluation batches (rank 0's mask is then broadcast to all ranks)
        loader = data.eval if self.pruner == "diag_fisher" else None
        for s in self.sparsities:
            with torch.enable_grad():
                pruned = broadcast_module(prune_model(dense, self.pruner, s, loader), data.device)
            achieved = float(sparsity_report(pruned)["global"])  # type: ignore[arg-type]
            base = f"prune/{name}/{self.pruner}/s{s:g}"
            out[f"{base}/sparsity"] = achieved
            for norm in self.normalizations:
                model = pruned if norm == "none" else normalize_pruned(pruned, dense, data.calib, norm, None, goals)[0]
                m = evaluate_reduced(model, data)
                out[f"{base}/{norm}/acc"], out[f"{base}/{norm}/loss"] = m["acc"], m["loss"]
        return out

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, data: CallbackData) -> None:
        scalars: dict[str, float] = {}
        for name, net in self._selected(pl_module).items():
            res = self.measure(name, broadcast_module(frozen_copy(net), data.device), data)
            scalars.update(res)
            for s in self.sparsities:
                for norm in self.normalizations:
                    base = f"prune/{name}/{self.pruner}/s{s:g}"
                    self._rows.append([trainer.current_epoch, name, self.pruner, s, norm, res[f"{base}/{norm}/acc"],
                                       res[f"{base}/{norm}/loss"]])  # fmt: skip
        self.log_scalars(trainer, scalars)
        epoch = trainer.current_epoch
        rows = [r for r in self._rows if r[0] == epoch]

        def payload() -> dict[str, Any]:
            curves = {f"{r[1]}/{r[4]}": [q[5] for q in rows if q[1] == r[1] and q[4] == r[4]] for r in rows}
            return {
                "prune_table": table(["epoch", "network", "pruner", "sparsity", "normalization", "acc", "loss"],
                                     self._rows),
                f"prune_plot/e{epoch}": line_plot(self.sparsities, curves, f"accuracy after pruning, epoch {epoch}",
                                                  "sparsity"),
            }  # fmt: skip

        self.log_wandb(trainer, payload)
