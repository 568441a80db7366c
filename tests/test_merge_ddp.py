"""`vf merge --trainer.devices 2 --trainer.strategy ddp` gives the single-process report, and only rank 0 writes.

Weight matching and identity are exact functions of the weights; statistics are reduced over ranks in float64.
(Activation matching solves a LAP on reduced correlations: on untrained nets dead units tie exactly and the
rounding of the reduction may break a tie differently — tests/test_callbacks_ddp.py covers it on trained nets.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from background import Command, Job, job

from vf_lightning.checkpoint import save_model_checkpoint
from vf_lightning.models import ModelConfig, build_model

CFG = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1)


def _config(tmp: Path, out: Path) -> Path:
    small = {"calib_samples": None, "eval_samples": None, "batch_size": 100}
    cb = "vf_lightning.callbacks."
    cfg = {
        "trainer": {"accelerator": "cpu", "callbacks": [
            {"class_path": cb + "MergeCallback", "init_args": {"matchings": ["identity", "weight"],
                                                               "normalizations": ["none", "reset"], **small}},
            {"class_path": cb + "InterpolationCallback", "init_args": {"matchings": ["weight"], "alphas": 3,
                                                                       "normalizations": ["none", "reset"], **small}},
            {"class_path": cb + "VarianceCollapseCallback", "init_args": {"matchings": ["weight"],
                                                                          "normalizations": ["reset"], **small}},
            {"class_path": cb + "ReportWriter", "init_args": {"out_dir": str(out)}},
        ]},
        "model": {"class_path": "vf_lightning.lit.MergeModule",
                  "init_args": {"checkpoints": [str(tmp / "a.pt"), str(tmp / "b.pt")]}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule",
                 "init_args": {"pad_to_32": True, "num_workers": 0, "calib_samples": 200, "val_subset": 400,
                               "eval_batch_size": 100}},
    }  # fmt: skip
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(tmp: Path, name: str, *extra: str) -> Command:
    return Command(name, ["-m", "vf_lightning", "merge", "--config", str(_config(tmp, tmp / name)), *extra])


@job(seconds=30)
def merge_ddp(tmp: Path) -> list[list[Command]]:
    """Two untrained VGG11s, merged by one process and (at the same time) by two DDP ranks."""
    for seed, name in ((1, "a.pt"), (2, "b.pt")):
        torch.manual_seed(seed)
        save_model_checkpoint(build_model(CFG), CFG, tmp / name)
    return [[_command(tmp, "single"), _command(tmp, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")]]


@pytest.mark.ddp
@pytest.mark.background(factory=merge_ddp)
def test_ddp_merge_report_equals_the_single_process_report(background: Job, fmnist: Path) -> None:
    background.check()
    tmp_path = background.dir
    single, ddp = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("single", "ddp"))
    assert str(ddp["config"]["trainer"]["devices"]) == "2"
    key = ("matching", "normalization", "preserved_layers")
    rows1 = {tuple(r[k] for k in key): r for r in single["results"]}
    rows2 = {tuple(r[k] for k in key): r for r in ddp["results"]}
    assert rows1.keys() == rows2.keys()
    for k, r in rows1.items():
        assert abs(r["acc"] - rows2[k]["acc"]) <= 1e-6, k
        assert abs(r["loss"] - rows2[k]["loss"]) <= 1e-5, k
    for net in ("a", "b"):
        assert abs(single["endpoints"][net]["acc"] - ddp["endpoints"][net]["acc"]) <= 1e-6
    assert single["alignment"]["weight"]["objective"] == ddp["alignment"]["weight"]["objective"]
    for variant, curve in single["variance_ratio"]["curves"].items():
        assert ddp["variance_ratio"]["curves"][variant] == pytest.approx(curve, rel=1e-5)
    # identical permutations: the chosen merged model has identical weights
    m1 = torch.load(tmp_path / "single/merged.pt", weights_only=True)
    m2 = torch.load(tmp_path / "ddp/merged.pt", weights_only=True)
    assert m1["meta"]["variant"] == m2["meta"]["variant"]
    for k, v in m1["state_dict"].items():
        torch.testing.assert_close(m2["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    # only rank 0 wrote: one report, no stray per-rank files
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix == ".json") == ["report.json"]
