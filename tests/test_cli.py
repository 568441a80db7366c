"""The `vf` command: every fit config parses, bad configs fail naming the problem, W&B offline runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from background import REPO, Command, Job, job
from conftest import wait_for_wandb_record

from vf_lightning.cli import main

FIT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "fit").glob("*.yaml"))


def test_vf_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("fit", "merge", "prune"):
        assert f"  {cmd}" in out


def test_the_console_script_runs_vf_and_leaves_the_garbage_collector_on(capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import configparser
    import gc
    import importlib

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    (script,) = [line for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    name, target = (part.strip() for part in script.split("="))
    module, func = target.split(":")
    assert name == "vf" and module == "vf_lightning.__main__"  # python -m vf_lightning is the same program
    entry = getattr(importlib.import_module(module), func)
    assert gc.isenabled() and gc.get_freeze_count() > 0  # paused for the imports only; what they made is frozen
    monkeypatch.setattr("sys.argv", ["vf", "--help"])
    entry()
    assert capsys.readouterr().out.startswith("usage: vf {fit,validate,test,merge,prune}") and gc.isenabled()


@job(seconds=10)
def vf_import_order(tmp: Path) -> list[list[Command]]:
    return [[Command("help", ["-X", "importtime", "-m", "vf_lightning", "--help"])]]


@pytest.mark.background(factory=vf_import_order)
def test_the_vf_process_imports_wandb_before_torch(background: Job) -> None:
    """W&B (with the launch package wandb.init imports) comes first: its pydantic classes then scan few modules
    (vf_lightning.runtime.import_wandb_first)."""
    background.check()
    names = [line.rsplit("|", 1)[-1].strip() for line in background.stderr("help").splitlines()
             if line.startswith("import time:") and "|" in line]  # fmt: skip
    first_torch = next(i for i, n in enumerate(names) if n.split(".")[0] == "torch")
    assert names.index("wandb.sdk.launch.inputs.internal") < first_torch
    assert (background.dir / "help.out").read_text().startswith("usage: vf ")


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: p.stem)
def test_print_config_works_for_every_fit_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: vf_lightning.lit." in out and "arch:" in out


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def test_unknown_model_fails_naming_it(capsys: pytest.CaptureFixture[str], repo: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a fresh directory: no earlier run of the recipe to refuse overwriting
    cfg = str(repo / "configs/fit/fmnist_vgg_pair.yaml")
    err = _fails(["fit", "--config", cfg, "--model.init_args.net.arch", "vgg99", "--trainer.max_epochs", "0"], capsys)
    assert "unknown model arch 'vgg99'" in err


def test_wrong_type_fails_naming_the_key(capsys: pytest.CaptureFixture[str], repo: Path) -> None:
    cfg = str(repo / "configs/fit/fmnist_vgg_pair.yaml")
    err = _fails(["fit", "--config", cfg, "--model.init_args.net.width", "wide", "--print_config"], capsys)
    assert "net.width" in err and "wide" in err


@job(seconds=10)
def fit_wandb(tmp: Path) -> list[list[Command]]:
    """`vf fit` of the MLP pair in a fresh process, as a user runs it (W&B's service keeps per-process state)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no inherited W&B service
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO))
    return [[Command("fit", [
        "-m", "vf_lightning",
        "fit", "--config", str(REPO / "configs/fit/fmnist_mlp_pair.yaml"),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "2",
        "--data.init_args.train_subset", "512", "--data.init_args.val_subset", "256",
        "--data.init_args.num_workers", "0",
        "--model.init_args.export_dir", str(tmp / "export"),
    ], env=env)]]  # fmt: skip


@pytest.mark.background(factory=fit_wandb)
def test_fit_writes_an_offline_wandb_run_with_the_metric_names(background: Job, fmnist: Path) -> None:
    background.check()
    tmp_path = background.dir
    runs = list((tmp_path / "outputs/fmnist_mlp_pair/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run's record file (what `wandb sync` uploads) holds the metric names and the config
    keys = ["val/acc_a", "val/acc_b", "train/loss_a", "train/loss_b", "val/acc5_a", "seed_a", "weight_decay"]
    assert wait_for_wandb_record(runs[0].parent, keys) == []  # metric names and hyper-parameters
    csv = next((tmp_path / "outputs/fmnist_mlp_pair/csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "val/acc_a" in csv
    assert (tmp_path / "export/net_a.pt").is_file() and (tmp_path / "export/net_b.pt").is_file()
