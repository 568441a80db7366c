"""The ready W&B workspace of vf-lightning runs: panel definitions (sections of line panels over the logged keys,
each on its step axis) and ``python -m vf_lightning.dashboard --entity E --project P``, which saves them as a
workspace with ``wandb-workspaces`` (``pip install wandb-workspaces``; needs ``wandb login``) and prints its URL.

The same definitions are listed in docs/DASHBOARD.md for building the panels by hand; a test checks that every
panel's keys and axis exist in the offline runs of a short ``vf fit`` and ``vf merge``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vf_lightning.callbacks.wandb_log import (
    ALPHA_AXIS,
    EPOCH_AXIS,
    LAYER_AXIS,
    PFM_AXIS,
    SPARSITY_AXIS,
    VF_LAYER_AXIS,
)

Command = Literal["fit", "merge", "prune"]


@dataclass(frozen=True)
class Panel:
    """A line panel: every history key matching ``y`` (a regular expression) against the step axis ``x``."""

    title: str
    y: str
    x: str
    runs: tuple[Command, ...]
    log_y: bool = False


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]


VARIANT = r"[^/]+/[^/]+"  # <matching>/<normalization>

SECTIONS: tuple[Section, ...] = (
    Section("Variance collapse", (
        Panel("variance ratio at the first / middle / last layer over training",
              rf"variance/{VARIANT}/(first|middle|last)", EPOCH_AXIS, ("fit", "merge"), log_y=True),
        Panel("mean variance ratio over training", rf"variance/{VARIANT}/mean", EPOCH_AXIS, ("fit", "merge"),
              log_y=True),
        Panel("variance ratio per layer (lines: merge variants)", r"variance_layer/.+", LAYER_AXIS,
              ("merge", "prune"), log_y=True),
        Panel("vanishing-feature ratio per layer (lines: merge variants)", r"vf_layer/.+", VF_LAYER_AXIS,
              ("merge",)),
        Panel("vanishing-feature ratio over training", rf"vf/{VARIANT}/mean", EPOCH_AXIS, ("fit",)),
    )),
    Section("Merging", (
        Panel("merged accuracy over training", rf"merge/({VARIANT}|ensemble)/acc", EPOCH_AXIS, ("fit",)),
        Panel("accuracy barrier over training", rf"barrier/{VARIANT}/acc", EPOCH_AXIS, ("fit",)),
        Panel("interpolation accuracy against α (one line per variant and record point)",
              rf"lmc/e\d+/{VARIANT}/acc", ALPHA_AXIS, ("fit", "merge")),
        Panel("interpolation loss against α", rf"lmc/e\d+/{VARIANT}/loss", ALPHA_AXIS, ("fit", "merge")),
        Panel("PFM accuracy against preserved layers", rf"pfm/e\d+/{VARIANT}/acc", PFM_AXIS, ("merge",)),
        Panel("PFM parameter ratio against preserved layers", r"pfm/params_ratio", PFM_AXIS, ("merge",)),
    )),
    Section("Pruning", (
        Panel("accuracy against sparsity", r"prune/e\d+/[^/]+/[^/]+/[^/]+/acc", SPARSITY_AXIS, ("prune",)),
        Panel("variance ratio per layer after pruning", r"variance_layer/.+", LAYER_AXIS, ("prune",), log_y=True),
    )),
    Section("Cost", (
        Panel("seconds per diagnostic run", r"timing/.+", EPOCH_AXIS, ("fit",)),
    )),
)  # fmt: skip

# logged per validation as W&B media (their panels appear on their own): key → what it shows
MEDIA: dict[str, str] = {
    "variance_collapse/per_layer": "variance ratio per layer of every merge variant, latest validation (slider: "
    "earlier ones)",
    "variance_collapse/evolution": "mean variance ratio of every variant against trained epochs",
    "variance_collapse/vf_per_layer": "vanishing-feature ratio per layer, latest validation",
    "variance_collapse/table": "every trained_epochs × variant × layer (layer names)",
    "lmc_curves/acc": "interpolation accuracy of every variant against α, latest record point",
    "pfm_plot": "PFM accuracy against parameter ratio, one line per variant",
    "prune_plot": "accuracy against sparsity, one line per pruner / normalization",
    "results": "vf merge / vf prune: every result row of report.json",
}

# headline numbers in the run summary of vf merge / vf prune (chosen on validation data, reported on test data)
SUMMARY: tuple[str, ...] = ("endpoints/<net>/acc", "ensemble/acc", "best/merge/acc", "best/merge/variant",
                            "best/pfm/acc", "best/pfm/params_ratio", "best/pfm/variant", "best/pruned/acc",
                            "alignment/<matching>/self_check", "timing/<phase>")  # fmt: skip


def panels(command: Command | None = None) -> list[Panel]:
    """Every panel, or those with keys in runs of ``command``."""
    return [p for s in SECTIONS for p in s.panels if command is None or command in p.runs]


def workspace(entity: str, project: str, name: str = "vf-lightning") -> Any:
    """The workspace of :data:`SECTIONS` as a ``wandb_workspaces`` object (``.save()`` creates it on W&B)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise SystemExit("error: the workspace needs wandb-workspaces: pip install wandb-workspaces "
                         "(or build the panels by hand from docs/DASHBOARD.md)") from e  # fmt: skip
    sections = [ws.Section(name=s.name, is_open=True,
                           panels=[wr.LinePlot(title=p.title, x=p.x, metric_regex=p.y, log_y=p.log_y or None,
                                               title_x=p.x) for p in s.panels])
                for s in SECTIONS]  # fmt: skip
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vf_lightning.dashboard --entity E --project P [--name N]``: save the workspace, print its URL."""
    parser = argparse.ArgumentParser(prog="python -m vf_lightning.dashboard", description=__doc__)
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="vf-lightning", help="W&B project of the runs")
    parser.add_argument("--name", default="vf-lightning", help="name of the saved workspace view")
    args = parser.parse_args(argv)
    saved = workspace(args.entity, args.project, args.name).save()
    print(getattr(saved, "url", saved))


if __name__ == "__main__":
    main()
