"""A short `vf fit` with the shipped callbacks and a `vf merge` of its exported networks, each writing an offline W&B
run that is read back from its record file: step axes, one step per validation / α / layer / depth, headline
summary, resolved config, fit → merge lineage, the dashboard's panels — and progress lines in the terminal."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, fmnist_available
from vf_lightning.callbacks.wandb_log import artifact_name
from wandb_offline import OfflineRun, offline_run

from vf_lightning import progress
from vf_lightning.cli import main
from vf_lightning.dashboard import SECTIONS

NET = {"arch": "mlp", "norm": "none", "hidden": [32, 32], "in_channels": 1, "num_classes": 10, "image_size": 28}
DATA = {"train_subset": 128, "val_subset": 64, "batch_size": 64, "num_workers": 0, "pad_to_32": False,
        "calib_samples": 64}  # fmt: skip


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fit_config(out: Path) -> Path:
    """configs/fit/fmnist_vgg_pair.yaml (its loggers and callbacks) on a tiny MLP, 2 epochs of 128 images, with
    ``out`` as its run directory."""
    cfg = yaml.safe_load((REPO / "configs" / "fit" / "fmnist_vgg_pair.yaml").read_text())
    cfg["trainer"].update(max_epochs=2, default_root_dir=str(out / "run"), accelerator="cpu", log_every_n_steps=1,
                          enable_model_summary=False, enable_progress_bar=False)  # fmt: skip
    loggers = [lg["class_path"].rsplit(".", 1)[1] for lg in cfg["trainer"]["logger"]]
    assert loggers == ["WandbLogger", "CSVLogger"]
    diagnostics = cfg["trainer"]["callbacks"][1:]
    assert {c["class_path"].rsplit(".", 1)[1] for c in diagnostics} == {
        "MergeCallback", "InterpolationCallback", "VarianceCollapseCallback"}  # fmt: skip
    for cb in diagnostics:
        cb["init_args"].update(calib_samples=64, eval_samples=64, batch_size=64)
    cfg["model"]["init_args"]["net"] = NET
    cfg["data"]["init_args"].update(DATA)
    path = out / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def merge_config(out: Path, checkpoints: list[Path]) -> Path:
    small = {"calib_samples": None, "eval_samples": None, "batch_size": 64}
    cb = "vf_lightning.callbacks."
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False,
                    "logger": [{"class_path": "vf_lightning.loggers.WandbLogger",
                                "init_args": {"name": "merge-test", "save_dir": str(out), "offline": True}}],
                    "callbacks": [
                        {"class_path": cb + "MergeCallback", "init_args": {
                            "matchings": ["identity", "weight"], "normalizations": ["none", "reset"], "ensemble": True,
                            **small}},
                        {"class_path": cb + "PFMCallback", "init_args": {
                            "matchings": ["weight"], "preserve": [1, -1], "normalizations": ["none", "reset"],
                            **small}},
                        {"class_path": cb + "InterpolationCallback", "init_args": {
                            "matchings": ["weight"], "alphas": 3, "normalizations": ["none"], **small}},
                        {"class_path": cb + "VarianceCollapseCallback", "init_args": {
                            "matchings": ["identity", "weight"], "normalizations": ["none", "reset"], **small}},
                        {"class_path": cb + "ReportWriter", "init_args": {"out_dir": str(out / "report")}},
                    ]},
        "model": {"class_path": "vf_lightning.lit.MergeModule",
                  "init_args": {"checkpoints": [str(p) for p in checkpoints]}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule",
                 "init_args": {"pad_to_32": False, "calib_samples": 64, "val_subset": 128, "num_workers": 0,
                               "eval_batch_size": 64}},
    }  # fmt: skip
    path = out / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prune_config(out: Path, checkpoint: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False,
                    "logger": [{"class_path": "vf_lightning.loggers.WandbLogger",
                                "init_args": {"name": "prune-test", "save_dir": str(out), "offline": True}}],
                    "callbacks": [
                        {"class_path": "vf_lightning.callbacks.PruneCallback", "init_args": {
                            "sparsities": [0.5, 0.9], "normalizations": ["none", "auto"], "calib_samples": None,
                            "eval_samples": None, "batch_size": 64}},
                        {"class_path": "vf_lightning.callbacks.ReportWriter",
                         "init_args": {"out_dir": str(out / "report")}},
                    ]},
        "model": {"class_path": "vf_lightning.lit.MergeModule", "init_args": {"checkpoints": [str(checkpoint)]}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule",
                 "init_args": {"pad_to_32": False, "calib_samples": 64, "val_subset": 128, "num_workers": 0,
                               "eval_batch_size": 64}},
    }  # fmt: skip
    path = out / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both runs (read back), the merge report and the progress lines of each command."""
    if not fmnist_available():
        pytest.fail("Fashion-MNIST is missing: run `make data` (installs Debian's dataset-fashion-mnist)")
    import wandb

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setattr(sys, "argv", ["vf"])
    handler, level = Lines(), progress.log.level
    progress.log.addHandler(handler)
    progress.set_quiet(False)
    try:
        fit_dir = tmp_path_factory.mktemp("fit")
        main(["fit", "--config", str(fit_config(fit_dir))])
        fit_dir = fit_dir / "run"  # the run directory: wandb/, csv/, checkpoints/, net_a.pt, net_b.pt
        wandb.finish()
        fit_lines, handler.lines = handler.lines, []
        merge_dir = tmp_path_factory.mktemp("merge")
        exported = [fit_dir / "net_a.pt", fit_dir / "net_b.pt"]
        main(["merge", "--config", str(merge_config(merge_dir, exported))])
        wandb.finish()
        merge_lines, handler.lines = handler.lines, []
        prune_dir = tmp_path_factory.mktemp("prune")
        main(["prune", "--config", str(prune_config(prune_dir, merge_dir / "report" / "merged.pt"))])
        wandb.finish()
        yield {"fit": offline_run(fit_dir / "wandb"), "merge": offline_run(merge_dir / "wandb"),
               "prune": offline_run(prune_dir / "wandb"),
               "report": json.loads((merge_dir / "report" / "report.json").read_text()),
               "prune_report": json.loads((prune_dir / "report" / "report.json").read_text()), "exported": exported,
               "merge_dir": merge_dir, "prune_dir": prune_dir, "fit_lines": fit_lines, "merge_lines": merge_lines,
               "prune_lines": handler.lines}  # fmt: skip
    finally:
        progress.log.removeHandler(handler)
        progress.log.setLevel(level)
        mp.undo()


def kinds(run: OfflineRun) -> dict[str, set[str]]:
    """What each history key holds: ``number`` or the media ``_type``."""
    out: dict[str, set[str]] = {}
    for row in run.history:
        for k, v in row.items():
            out.setdefault(k, set()).add(v.get("_type", "dict") if isinstance(v, dict) else "number")
    return out


def test_fit_logs_each_validation_live_as_one_step_against_trained_epochs(runs: dict[str, Any]) -> None:
    fit: OfflineRun = runs["fit"]
    variants = ("weight/none", "weight/reset")
    per_validation = [f"merge/{v}/acc" for v in variants] + [f"variance/{v}/{p}" for v in variants
                                                             for p in ("first", "middle", "last", "mean")]
    for key in [*per_validation, "barrier/weight/none/acc", "vf/weight/reset/mean", "timing/MergeCallback"]:
        assert fit.step_metric.get(key) == "trained_epochs", key
    rows = fit.rows_with("variance/weight/reset/first")
    assert [r["trained_epochs"] for r in rows] == [1, 2]  # one step per validation, every variant in it
    assert all(set(per_validation[2:]) <= set(r) for r in rows)
    assert [r["trained_epochs"] for r in fit.rows_with("merge/weight/none/acc")] == [1, 2]
    first = fit.history.index(rows[0])
    assert any("train/loss_a" in r for r in fit.history[first + 1 :])  # logged while training went on
    for epoch in (1, 2):
        assert fit.step_metric[f"lmc/e{epoch}/weight/none/acc"] == "lmc/alpha"
        alphas = [r["lmc/alpha"] for r in fit.rows_with(f"lmc/e{epoch}/weight/none/acc")]
        assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    visualize = fit.config["_wandb"]["visualize"]
    assert {"variance_collapse/per_layer", "variance_collapse/evolution", "lmc_curves/acc"} <= set(visualize)
    assert len(fit.rows_with("variance_collapse/per_layer_table")) == 2  # one key, updated per validation
    assert not [k for k in fit.keys() if re.search(r"/e\d+$|layers/e\d+", k)]  # no panel per epoch
    mixed = {k: v for k, v in kinds(fit).items() if len(v) > 1}
    assert not mixed, f"keys holding two kinds of object: {mixed}"


def test_fit_run_config_holds_the_resolved_config_trainer_settings_seed_and_the_exported_networks(
    runs: dict[str, Any],
) -> None:
    fit: OfflineRun = runs["fit"]
    cfg = fit.config
    assert cfg["resolved_config"]["trainer"]["max_epochs"] == 2
    assert cfg["resolved_config"]["model"]["init_args"]["net"]["hidden"] == [32, 32]
    assert cfg["seed"] == 0 and cfg["trainer"]["max_epochs"] == 2 and cfg["trainer"]["stage"] == "fit"
    assert "RunLogger" in cfg["trainer"]["callbacks"]
    assert cfg["callbacks/MergeCallback"]["calib_samples"] == 64
    names = {artifact_name(p) for p in runs["exported"]}
    logged = {a["name"]: a for a in fit.artifacts if a["type"] == "model"}
    assert set(logged) == names and not any(a["use_after_commit"] for a in logged.values())
    assert {e["role"] for e in cfg["exported"]} == {"net_a", "net_b"}
    assert cfg["variance_sites"]["layers"] == runs["report"]["variance_ratio"]["layers"]  # the report's sites
    assert [cfg["variance_sites"][p] for p in ("first", "last")] == [cfg["variance_sites"]["layers"][0],
                                                                      cfg["variance_sites"]["layers"][-1]]


def test_merge_run_starts_before_the_work_and_logs_curves_against_their_axes(runs: dict[str, Any]) -> None:
    run: OfflineRun = runs["merge"]
    report = runs["report"]
    assert run.order.index("run") < run.order.index("history")
    assert run.config["resolved_config"]["model"]["init_args"]["checkpoints"] == [str(p) for p in runs["exported"]]
    axes = {"lmc/e0/weight/none/acc": "lmc/alpha", "pfm/e0/weight/reset/acc": "pfm/preserved_layers",
            "pfm/params_ratio": "pfm/preserved_layers", "merge/weight/reset/acc": "trained_epochs",
            "variance/identity/none/first": "trained_epochs"}  # fmt: skip
    for variant in report["variance_ratio"]["curves"]:
        axes[f"variance_layer/{variant}"] = "layer"
        axes[f"vf_layer/{variant}"] = "vf_layer"
    for key, axis in axes.items():
        assert run.step_metric.get(key) == axis, key
    layers = run.rows_with("layer")
    assert [r["layer"] for r in layers] == list(range(len(report["variance_ratio"]["layers"])))
    for variant, curve in report["variance_ratio"]["curves"].items():  # the same numbers as report.json
        assert [r[f"variance_layer/{variant}"] for r in layers] == pytest.approx(curve)
    pfm = run.rows_with("pfm/preserved_layers")
    assert [r["pfm/preserved_layers"] for r in pfm] == sorted({r["preserved_layers"] for r in report["results"]
                                                               if r["preserved_layers"] > 0})  # fmt: skip
    assert all({"pfm/params_ratio", "pfm/e0/weight/none/acc", "pfm/e0/weight/reset/acc"} <= set(r) for r in pfm)
    mixed = {k: v for k, v in kinds(run).items() if len(v) > 1}
    assert not mixed, f"keys holding two kinds of object: {mixed}"


def test_merge_summary_holds_the_headline_numbers_chosen_on_validation_data(runs: dict[str, Any]) -> None:
    run: OfflineRun = runs["merge"]
    report = runs["report"]
    s = run.summary
    assert s["endpoints/a/acc"] == report["endpoints"]["a"]["acc"] and s["ensemble/acc"] == report["ensemble"]["acc"]
    merged, pfm = report["merged_checkpoint"], report["merged_pfm_checkpoint"]
    assert (s["best/merge/acc"], s["best/merge/variant"], s["best/merge/params_ratio"]) == (
        merged["test_acc"], merged["variant"], 1.0)
    assert (s["best/pfm/acc"], s["best/pfm/variant"], s["best/pfm/params_ratio"]) == (
        pfm["test_acc"], pfm["variant"], pfm["params_ratio"])
    assert s["best/pfm/params_ratio"] > 1.0
    assert s["alignment/weight/self_check"] <= 1e-4 and "alignment/weight/max_abs_logit_diff" in s
    assert s["timing/statistics"] > 0 and "timing/callback/MergeCallback" in s
    assert not [k for k in run.keys() if k.startswith(("best/", "endpoints/", "alignment/"))]  # summary only
    assert "results" in run.keys() and "plots/variance_ratio" in run.keys()


def test_merge_run_uses_the_fit_runs_artifacts_and_logs_its_checkpoints(runs: dict[str, Any]) -> None:
    fit, run = runs["fit"], runs["merge"]
    produced = {(a["name"], a["digest"]) for a in fit.artifacts if a["type"] == "model"}
    used = {(a["name"], a["digest"]) for a in run.artifacts if a["type"] == "model" and a["use_after_commit"]}
    assert used == produced  # the same artifacts: W&B links the merge run to the fit run that logged them
    outputs = {a["name"] for a in run.artifacts if a["type"] == "model" and not a["use_after_commit"]}
    report_dir = runs["merge_dir"] / "report"
    assert outputs == {artifact_name(report_dir / "merged.pt"), artifact_name(report_dir / "merged_pfm.pt")}
    assert {e["role"] for e in run.config["inputs"]} == {"input_0", "input_1"}


def test_prune_run_uses_the_merged_checkpoint_and_logs_accuracy_against_sparsity(runs: dict[str, Any]) -> None:
    merge, run, report = runs["merge"], runs["prune"], runs["prune_report"]
    merged = next(a for a in merge.artifacts if a["name"] == artifact_name(runs["merge_dir"] / "report" / "merged.pt"))
    used = [(a["name"], a["digest"]) for a in run.artifacts if a["type"] == "model" and a["use_after_commit"]]
    assert used == [(merged["name"], merged["digest"])]  # fit → merge → prune
    outputs = [a["name"] for a in run.artifacts if a["type"] == "model" and not a["use_after_commit"]]
    assert outputs == [artifact_name(runs["prune_dir"] / "report" / "pruned.pt")]
    rows = run.rows_with("prune/sparsity")
    assert [r["prune/sparsity"] for r in rows] == [0.5, 0.9]
    for norm in ("none", "auto"):
        key = f"prune/e0/a/global_magnitude/{norm}/acc"
        assert run.step_metric[key] == "prune/sparsity"
        expected = [r["acc"] for r in report["results"] if r["normalization"].split(":")[0] == norm]
        assert [r[key] for r in rows] == pytest.approx(expected)
    assert run.summary["best/pruned/acc"] == report["pruned_checkpoint"]["test_acc"]
    assert run.summary["endpoints/dense/acc"] == report["endpoints"]["dense"]["acc"]
    assert any(k.startswith("variance_layer/a/") and run.step_metric[k] == "layer" for k in run.keys())
    assert "PruneCallback: a/global_magnitude/0.9/none  acc " in " | ".join(runs["prune_lines"])


def test_the_terminal_shows_each_variant_with_its_accuracy_during_fit_and_merge(runs: dict[str, Any]) -> None:
    fit, merge = " | ".join(runs["fit_lines"]), " | ".join(runs["merge_lines"])
    for epoch in (1, 2):
        assert f"[{epoch} epochs] MergeCallback: weight/reset  acc " in fit
        assert f"[{epoch} epochs] VarianceCollapseCallback: weight/reset  mean_variance_ratio " in fit
        assert f"[{epoch} epochs] InterpolationCallback: weight/none  acc_barrier " in fit
    for line in ("MergeCallback: identity/reset  acc ", "MergeCallback: ensemble  acc ",
                 "PFMCallback: weight/none/k=1  acc ", "VarianceCollapseCallback: weight/reset  mean_variance_ratio "):
        assert line in merge, line


def test_every_dashboard_panel_finds_its_keys_on_its_axis(runs: dict[str, Any]) -> None:
    doc = (REPO / "docs" / "DASHBOARD.md").read_text()
    for section in SECTIONS:
        for panel in section.panels:
            assert panel.title in doc, f"docs/DASHBOARD.md does not list {panel.title!r}"
            for command in panel.runs:
                run: OfflineRun = runs[command]
                keys = [k for k in run.keys() if re.fullmatch(panel.y, k)]
                assert keys, f"{command}: no key matches {panel.y!r} ({panel.title})"
                wrong = {k: run.step_metric.get(k) for k in keys if run.step_metric.get(k) != panel.x}
                assert not wrong, f"{command}: {panel.title}: keys not on {panel.x}: {wrong}"
