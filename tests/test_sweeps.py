"""The W&B sweep files (configs/sweeps/*.yaml) on a cluster (issue 13 item 5): a fake agent expands each file's
command line for two grid points as `wandb agent` does (``${args}`` → ``--key=value``, ``$WANDB_RUN_ID`` set),
bash runs it against a stand-in ``vf`` that records its arguments, and the recorded command runs offline on tiny
data. Each run must land in its own folder — config, checkpoints / report, CSV and W&B — under its own name."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vf_lightning.checkpoint import save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.models import ModelConfig, build_model

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml"))

# appended to each recorded command: the same runs on tiny data (the CIFAR pair's merge runs on Fashion-MNIST)
TINY_FIT = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0", "--trainer.limit_train_batches=2",
            "--data.init_args.train_subset=128", "--data.init_args.val_subset=100", "--data.init_args.num_workers=0",
            "--data.init_args.calib_samples=64", "--model.init_args.net.arch=mlp", "--model.init_args.net.norm=none",
            "--model.init_args.net.hidden=[16]",
            "--model.init_args.net.image_size=32", "--data.init_args.pad_to_32=true"]  # fmt: skip
TINY_MERGE = ["--data=vf_lightning.data.FashionMNISTDataModule", "--data.pad_to_32=true", "--data.calib_samples=64",
              "--data.val_subset=200", "--data.eval_batch_size=100", "--data.num_workers=0"]  # fmt: skip
# the trained pair a merge sweep reads, as tiny untrained MLP stand-ins (both grid points merge fully: preserve [0])
PAIRS = {"configs/merge/fmnist_demo.yaml": "outputs/fmnist_vgg_pair",
         "configs/merge/cifar10_vgg16_bn.yaml": "outputs/cifar10_vgg16_bn"}  # fmt: skip
STAND_IN = ModelConfig(arch="mlp", norm="none", in_channels=1, image_size=32, hidden=(16,))


def agent_args(params: dict[str, Any]) -> list[str]:
    """What `wandb agent` puts for ``${args}``: one ``--key=value`` per swept parameter."""
    return [f"--{k}={v}" for k, v in params.items()]


def grid_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Two points of a grid sweep: the first, and the one with every parameter at its last value but the final
    one (width / preserved layers) at its first — both in the grid, different, and the cheap end of it."""
    keys = list(sweep["parameters"])
    values = [sweep["parameters"][k]["values"] for k in keys]
    grid = list(itertools.product(*values))
    second = (*(v[-1] for v in values[:-1]), values[-1][0])
    assert second in grid and second != grid[0]
    return [dict(zip(keys, grid[0])), dict(zip(keys, second))]


def recorded_command(sweep: dict[str, Any], params: dict[str, Any], run_id: str, tmp: Path) -> list[str]:
    """Run the sweep's command as the agent would, with a ``vf`` on PATH that records its arguments."""
    shim = tmp / "bin" / "vf"
    if not shim.exists():
        shim.parent.mkdir()
        shim.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$VF_ARGV_FILE"\n')
        shim.chmod(0o755)
    argv_file = tmp / f"argv-{run_id}"
    command = []
    for token in sweep["command"]:
        command.extend(agent_args(params) if token == "${args}" else [token])
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "WANDB_RUN_ID": run_id,
           "VF_ARGV_FILE": str(argv_file)}  # fmt: skip
    subprocess.run(command, cwd=tmp, env=env, check=True, timeout=60)
    return argv_file.read_text().splitlines()


def _finish_wandb() -> None:
    """End the run's W&B state as the end of an agent's process does (W&B keeps the run id per process)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
        wandb.teardown()


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_each_sweep_run_lands_in_its_own_folder_under_its_own_name(
    sweep_file: Path, tmp_path: Path, repo: Path, fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["program"] == "vf" and sweep["method"] == "grid" and "${args}" in sweep["command"]
    (tmp_path / "configs").symlink_to(repo / "configs")  # the agent runs in the repository root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = []
    for i, params in enumerate(grid_points(sweep)):
        run_id = f"fake{i}"
        argv = recorded_command(sweep, params, run_id, tmp_path)
        assert argv[0] in ("fit", "merge") and argv[-len(params) :] == agent_args(params)
        config = argv[argv.index("--config") + 1]
        if argv[0] == "merge":
            for name in ("net_a.pt", "net_b.pt"):
                if not (tmp_path / PAIRS[config] / name).exists():
                    save_model_checkpoint(build_model(STAND_IN), STAND_IN, tmp_path / PAIRS[config] / name)
        monkeypatch.setenv("WANDB_RUN_ID", run_id)  # as the agent's environment
        torch.manual_seed(i)
        _finish_wandb()  # a fresh W&B state, as in the agent's fresh process (W&B reads WANDB_RUN_ID at setup)
        try:
            main([*argv, *(TINY_FIT if argv[0] == "fit" else TINY_MERGE)])
        finally:
            _finish_wandb()
        (run,) = [p for p in (tmp_path / "outputs/sweeps").glob(f"*/{run_id}")]
        runs.append(run)

    assert len({r.parent for r in runs}) == 1 and runs[0] != runs[1]  # side by side, one folder per run
    for i, run in enumerate(runs):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["run_name"] == f"fake{i}"  # its own name ...
        loggers = saved["trainer"]["logger"]
        wandb_logger = next(lg for lg in loggers if lg["class_path"].endswith("WandbLogger"))
        assert wandb_logger["init_args"]["name"] == f"fake{i}"  # ... for the W&B run too
        (offline,) = list((run / "wandb").glob("offline-run-*"))  # its own W&B folder, with the agent's run id
        assert offline.name.endswith(f"-fake{i}")
        if "fit" in sweep_file.stem:
            assert (run / "checkpoints/last.ckpt").is_file() and (run / "net_a.pt").is_file()
            assert len(list((run / "csv").rglob("metrics.csv"))) == 1
            for key, value in grid_points(sweep)[i].items():  # the swept values reached the run
                node: Any = saved
                for part in key.split("."):
                    node = node[part]
                assert node == value
        else:
            assert (run / "report.json").is_file() and (run / "merged.pt").is_file()
    assert not (tmp_path / "outputs/fmnist_vgg_pair/wandb").exists()  # nothing in a shared folder
