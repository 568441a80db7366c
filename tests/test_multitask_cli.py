"""``vf merge`` of foundations + task experts: ExpertsModule + TaskMergeCallback + ReportWriter, in-process."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vf_lightning.checkpoint import CheckpointError, save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.data import FashionMNISTDataModule, VisionDataModule
from vf_lightning.lit import ExpertEntry, ExpertsModule
from vf_lightning.merge.experts import head_name
from vf_lightning.models import ModelConfig, build_model

HIDDEN = (32, 32)


def _config(num_classes: int, hidden: tuple[int, ...] = HIDDEN) -> ModelConfig:
    return ModelConfig(arch="mlp", in_channels=1, image_size=28, hidden=hidden, num_classes=num_classes)


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 40, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def _train_data(fmnist: Path, classes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    dm = FashionMNISTDataModule(data_dir=str(fmnist), train_subset=1000, num_workers=0, classes=classes)
    dm.setup("fit")
    assert dm.train_set is not None
    x, y = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=1000)))
    return x, y


TASKS = {"task0": ([0, 1], "a"), "task1": ([2, 3], "b")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two foundations (different seeds) and one briefly fine-tuned expert per task from each, as model files."""
    fmnist = Path("/usr/share/datasets/fashion-mnist")
    if not (fmnist / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: run `make data` (installs Debian's dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("zoo")
    x, y = _train_data(fmnist, None)
    paths: dict[str, Path] = {}
    found: dict[str, nn.Module] = {}
    for i, name in enumerate("ab"):
        torch.manual_seed(i)
        found[name] = _train(build_model(_config(10)), x, y, seed=i)
        paths[name] = save_model_checkpoint(found[name], _config(10), root / f"foundation_{name}.pt")
    for t, (task, (classes, f)) in enumerate(TASKS.items()):
        xt, yt = _train_data(fmnist, classes)
        net = build_model(_config(len(classes)))
        head = head_name(net)
        body = {k: v for k, v in found[f].state_dict().items() if not k.startswith(head + ".")}
        net.load_state_dict(body, strict=False)
        _train(net, xt, yt, seed=10 + t)
        meta = {"task": task, "classes": classes, "foundation": f}
        paths[task] = save_model_checkpoint(net, _config(len(classes)), root / f"{task}.pt", meta=meta)
    return paths


def _write_config(path: Path, zoo: dict[str, Path], out_dir: Path, fmnist: Path, **model: Any) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(out_dir), "name": "csv"}}],
            "callbacks": [
                {"class_path": "vf_lightning.callbacks.TaskMergeCallback",
                 "init_args": {"setting": "nonlocal", "methods": ["task_arithmetic", "ties"],
                               "corrections": ["none", "repair", "tact"], "aligned": [True, False],
                               "grids": {"task_arithmetic": [0.5, 1.0], "ties": [1.0]},
                               "options": {"ties": {"k": 0.2}}, "calib_samples": 64, "eval_samples": 200,
                               "batch_size": 100}},
                {"class_path": "vf_lightning.callbacks.ReportWriter", "init_args": {"out_dir": str(out_dir)}},
            ],
        },  # fmt: skip
        "model": {
            "class_path": "vf_lightning.lit.ExpertsModule",
            "init_args": model or {
                "foundations": {"a": str(zoo["a"]), "b": str(zoo["b"])},
                "experts": [{"path": str(zoo["task0"])}, {"path": str(zoo["task1"]), "task": "task1"}],
            },
        },
        "data": {
            "class_path": "vf_lightning.data.FashionMNISTDataModule",
            "init_args": {"data_dir": str(fmnist), "pad_to_32": False, "train_subset": 256, "val_subset": 400,
                          "calib_samples": 64, "eval_batch_size": 100, "num_workers": 0},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_vf_merge_of_experts_writes_multitask_report(zoo: dict[str, Path], tmp_path: Path, fmnist: Path) -> None:
    out = tmp_path / "out"
    cfg = _write_config(tmp_path / "merge.yaml", zoo, out, fmnist)
    main(["merge", "--config", str(cfg)])
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert len(rows) == 2 * 3 * 2 * 2  # methods × corrections × aligned × tasks
    for r in rows:
        assert {"task", "method", "correction", "aligned", "acc", "normalized_acc", "setting"} <= set(r)
        assert 0.0 <= r["acc"] <= 1.0
    assert {r["task"] for r in rows} == {"task0", "task1"}  # task0's name comes from its checkpoint
    assert {(r["aligned"], r["correction"]) for r in rows} == {(a, c) for a in (True, False)
                                                               for c in ("none", "repair", "tact")}  # fmt: skip
    vr = report["variance_ratio"]
    assert len(vr["layers"]) == len(HIDDEN) and "task_arithmetic/tact/aligned" in vr["curves"]
    assert all(len(c) == len(vr["layers"]) for c in vr["curves"].values())
    assert all(abs(v - 1.0) < 0.05 for v in vr["curves"]["task_arithmetic/tact/aligned"])  # TACT restores it
    assert set(report["variance_ratio_of_means"]["curves"]) == set(vr["curves"])
    assert [e["foundation"] for e in report["experts"]] == ["a", "b"]
    assert report["alignment"]["weight"]["matching"] == "weight"
    assert len(report["multitask_summary"]) == 2 * 3 * 2
    assert report["timing"]["multitask_variants"] > 0
    assert (out / "normalized_acc.png").is_file() and (out / "variance_ratio.png").is_file()
    metrics = next(out.rglob("metrics.csv"))
    header = next(csv.reader(metrics.open()))
    assert "multitask/ties/tact/unaligned/normalized_acc" in header


def test_bad_expert_path_fails_before_any_data_work(zoo: dict[str, Path], tmp_path: Path, fmnist: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def no_data(self: VisionDataModule, stage: str | None = None) -> None:
        raise AssertionError("data was touched")

    monkeypatch.setattr(VisionDataModule, "setup", no_data)
    missing = tmp_path / "no_such_expert.pt"
    model = {"foundations": {"a": str(zoo["a"])}, "experts": [{"path": str(missing), "classes": [0, 1]}]}
    cfg = _write_config(tmp_path / "bad.yaml", zoo, tmp_path / "out", fmnist, **model)
    with pytest.raises(SystemExit) as e:
        main(["merge", "--config", str(cfg)])
    assert e.value.code != 0
    assert str(missing) in capsys.readouterr().err


def test_experts_module_checks_its_inputs(zoo: dict[str, Path], tmp_path: Path) -> None:
    found = {"a": str(zoo["a"]), "b": str(zoo["b"])}
    m = ExpertsModule(found, [ExpertEntry(str(zoo["task0"])), ExpertEntry(str(zoo["task1"]))])
    assert list(m.networks()) == ["task0", "task1", "foundation_a", "foundation_b"]
    experts, foundations = m.experts_and_foundations()
    assert [(e.name, e.classes, e.foundation) for e in experts] == [("task0", [0, 1], "a"), ("task1", [2, 3], "b")]
    assert set(foundations) == {"a", "b"} and m.model_config.num_classes == 2
    with pytest.raises(ValueError, match="empty"):
        ExpertsModule(found, [])
    with pytest.raises(ValueError, match="foundation 'b'"):
        ExpertsModule({"a": str(zoo["a"])}, [ExpertEntry(str(zoo["task1"]))])
    with pytest.raises(ValueError, match="more than one expert"):
        ExpertsModule(found, [ExpertEntry(str(zoo["task0"])), ExpertEntry(str(zoo["task1"]), task="task0")])
    other = save_model_checkpoint(build_model(_config(2, (16, 16))), _config(2, (16, 16)), tmp_path / "w.pt",
                                  meta={"task": "w", "classes": [4, 5], "foundation": "a"})  # fmt: skip
    with pytest.raises(ValueError, match="architecture"):
        ExpertsModule(found, [ExpertEntry(str(zoo["task0"])), ExpertEntry(str(other))])
    with pytest.raises(CheckpointError, match="nope.pt"):
        ExpertsModule({"a": str(tmp_path / "nope.pt")}, [ExpertEntry(str(zoo["task0"]))])


@pytest.mark.parametrize("name", ["fmnist_nonlocal", "fmnist_local"])
def test_multitask_merge_configs_print(name: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--config", str(repo / f"configs/merge/{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == "vf_lightning.lit.ExpertsModule"
    assert len(out["model"]["init_args"]["experts"]) == 4 and out["data"]["init_args"]["pad_to_32"] is False
    assert [c["class_path"].rsplit(".", 1)[1] for c in out["trainer"]["callbacks"]] == ["TaskMergeCallback",
                                                                                        "ReportWriter"]
