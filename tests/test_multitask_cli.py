"""``vf merge`` of foundations + task experts: ExpertsModule + TaskMergeCallback + ReportWriter, in-process."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vf_lightning.checkpoint import CheckpointError, load_expert, save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.data import DomainTaskDataModule, FashionMNISTDataModule, TaskSuiteDataModule, VisionDataModule
from vf_lightning.evaluate import evaluate
from vf_lightning.lit import ExpertEntry, ExpertsModule
from vf_lightning.lit.expert import ExpertModule
from vf_lightning.lit.optim import OptimConfig
from vf_lightning.merge.experts import Expert, head_name, relative_distance
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
    assert len({(r["method"], r["correction"], r["aligned"], r["task"]) for r in rows}) == len(rows)  # one each
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


@pytest.mark.parametrize("name", ["fmnist_nonlocal", "fmnist_local", "cifar100_nonlocal"])
def test_multitask_merge_configs_print(name: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--config", str(repo / f"configs/merge/{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == "vf_lightning.lit.ExpertsModule"
    assert len(out["model"]["init_args"]["experts"]) == 5
    assert out["data"]["class_path"] == "vf_lightning.data.TaskSuiteDataModule"
    assert [c["class_path"].rsplit(".", 1)[1] for c in out["trainer"]["callbacks"]] == ["TaskMergeCallback",
                                                                                        "ReportWriter"]


# ------------------------------------------------------------------------------------- the multi-domain task suite
SUITE = {"p": {"transform": "permute", "transform_seed": 0, "classes": [0, 1, 2, 3, 4]},
         "r": {"transform": "rotate", "transform_seed": 1, "classes": [5, 6, 7, 8, 9]}}  # fmt: skip
SUITE_DEFAULTS = {"source": "digits", "val_samples": 100, "calib_samples": 64, "eval_batch_size": 100}


def _suite_batches(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DomainTaskDataModule(**{**SUITE_DEFAULTS, **SUITE[task]})  # type: ignore[arg-type]
    dm.setup("fit")
    return next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=len(dm.train_set))))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def suite_zoo(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo's two foundations plus one expert per task of a two-task digits suite (p from A, r from B)."""
    root = tmp_path_factory.mktemp("suite_zoo")
    paths = {"a": zoo["a"], "b": zoo["b"]}
    for t, (task, f) in enumerate([("p", "a"), ("r", "b")]):
        classes = SUITE[task]["classes"]
        x, y = _suite_batches(task)
        net = build_model(_config(len(classes)))
        head = head_name(net)
        found, _, _ = load_expert(zoo[f])
        net.load_state_dict({k: v for k, v in found.state_dict().items() if not k.startswith(head + ".")},
                            strict=False)  # fmt: skip
        _train(net, x, y, steps=60, seed=20 + t)
        meta = {"task": task, "classes": classes, "foundation": f}
        paths[task] = save_model_checkpoint(net, _config(len(classes)), root / f"{task}.pt", meta=meta)
    return paths


def test_vf_merge_on_the_task_suite_reports_one_row_per_variant_and_task(suite_zoo: dict[str, Path],
                                                                         tmp_path: Path, fmnist: Path) -> None:
    out = tmp_path / "out"
    model = {"foundations": {"a": str(suite_zoo["a"]), "b": str(suite_zoo["b"])},
             "experts": [{"path": str(suite_zoo["p"])}, {"path": str(suite_zoo["r"])}]}  # fmt: skip
    cfg_path = _write_config(tmp_path / "suite.yaml", suite_zoo, out, fmnist, **model)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"] = {"class_path": "vf_lightning.data.TaskSuiteDataModule",
                   "init_args": {"tasks": SUITE, "defaults": SUITE_DEFAULTS}}  # fmt: skip
    cfg["trainer"]["callbacks"][0]["init_args"].update(setting="suite", eval_samples=None)
    cfg_path.write_text(yaml.safe_dump(cfg))
    main(["merge", "--config", str(cfg_path)])
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    variants = [(m, c, a) for m in ("task_arithmetic", "ties") for c in ("none", "repair", "tact")
                for a in (True, False)]  # fmt: skip
    keys = [(r["method"], r["correction"], r["aligned"], r["task"]) for r in rows]
    assert sorted(keys) == sorted((*v, t) for v in variants for t in ("p", "r"))  # exactly one row each
    row_keys = {"setting", "task", "method", "correction", "aligned", "lam", "acc", "normalized_acc", "expert_acc",
                "variance_ratio", "variance_ratio_of_means", "seconds"}  # fmt: skip
    assert all(set(r) == row_keys for r in rows), set(rows[0]) ^ row_keys
    assert all(r["setting"] == "suite" and 0.0 <= r["acc"] <= 1.0 for r in rows)
    summary = {(s["method"], s["correction"], s["aligned"]) for s in report["multitask_summary"]}
    assert summary == set(variants)
    experts = {e["task"]: e for e in report["experts"]}
    assert set(experts) == {"p", "r"} and [experts[t]["foundation"] for t in ("p", "r")] == ["a", "b"]
    assert all(e["distance"] > 0 and e["acc"] > 0.5 for e in experts.values())  # trained on their own domain
    # the test split is the digits' own test split (360 images → each task's classes), not the validation hold-out
    dm = DomainTaskDataModule(**{**SUITE_DEFAULTS, **SUITE["p"]})  # type: ignore[arg-type]
    dm.setup()
    net, _, _ = load_expert(suite_zoo["p"])
    assert experts["p"]["acc"] == pytest.approx(evaluate(net, dm.test_dataloader())["acc"])
    curves = report["variance_ratio"]["curves"]
    assert set(curves) == {f"{m}/{c}/{'aligned' if a else 'unaligned'}" for m, c, a in variants}
    assert all(abs(v - 1.0) < 0.1 for v in curves["ties/tact/aligned"])
    assert report["alignment"]["weight"]["reference"] == "a"
    assert {"multitask_align", "multitask_prepare", "multitask_variants"} <= set(report["timing"])


def test_expert_module_probes_its_head_then_fine_tunes_head_and_body(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(5)
    export = tmp_path / "p.pt"
    expert = ExpertModule(cfg, foundation=str(zoo["a"]), foundation_name="a", task="p", classes=[0, 1, 2, 3, 4],
                          probe_epochs=1, export_path=str(export),
                          optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9), seed=0)  # fmt: skip
    head = expert.head
    found, _, _ = load_expert(zoo["a"])
    snapshots: list[dict[str, torch.Tensor]] = [{k: v.clone() for k, v in expert.net.state_dict().items()}]

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            snapshots.append({k: v.clone() for k, v in expert.net.state_dict().items()})

    dm = DomainTaskDataModule(**{**SUITE_DEFAULTS, **SUITE["p"], "epoch_samples": 640, "batch_size": 64})  # type: ignore[arg-type]
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Snapshot()])  # fmt: skip
    trainer.fit(expert, datamodule=dm)
    assert trainer.global_step == 2 * 10  # epoch_samples / batch_size steps per epoch
    init, probed, tuned = snapshots

    def body(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in s.items() if not k.startswith(head + ".")}

    def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a)

    assert not changed(body(init), body(found.state_dict()))  # starts from the foundation's body
    assert not changed(body(probed), body(init)) and changed(probed, init)  # probing trains the head only
    assert changed(body(tuned), body(probed))  # then the body is fine-tuned
    assert changed({k: v for k, v in tuned.items() if k.startswith(head)},
                   {k: v for k, v in probed.items() if k.startswith(head)})  # and the head with it  # fmt: skip
    loc = expert.locality_result
    assert set(loc) == {"distance", "barrier", "path_loss"} and len(loc["path_loss"]) == 5
    assert loc["distance"] == pytest.approx(relative_distance(body(init), body(tuned)))
    assert loc["barrier"] >= 0 and loc["path_loss"][-1] < loc["path_loss"][0]  # fine-tuning lowered the loss
    stored = torch.load(export, weights_only=True)["meta"]
    assert (stored["task"], stored["classes"], stored["foundation"]) == ("p", [0, 1, 2, 3, 4], "a")
    assert stored["distance"] == pytest.approx(loc["distance"]) and stored["barrier"] == pytest.approx(loc["barrier"])
    ex = Expert.from_checkpoint(export)
    assert all(torch.equal(ex.state[k], tuned[k]) for k in tuned)


def _makefile_tasks(repo: Path) -> dict[str, dict[str, Any]]:
    text = (repo / "Makefile").read_text().replace("\\\n", " ")
    specs = next(line for line in text.splitlines() if line.startswith("MT_TASKS :=")).split(":=", 1)[1].split()
    tasks = {}
    for spec in specs:
        name, source, transform, seed, classes = spec.split(":")
        tasks[name] = {"source": source, "transform": transform, "transform_seed": int(seed),
                       "classes": [int(c) for c in classes.split(",")]}  # fmt: skip
    return tasks


@pytest.mark.parametrize("name", ["fmnist_nonlocal", "fmnist_local"])
def test_demo_merge_configs_list_the_tasks_the_makefile_trains(name: str, repo: Path) -> None:
    cfg = yaml.safe_load((repo / f"configs/merge/{name}.yaml").read_text())
    suite = TaskSuiteDataModule(**cfg["data"]["init_args"])
    trained = _makefile_tasks(repo)
    assert suite.task_names == list(trained)
    for task, want in trained.items():
        dm = suite.task_datamodule(task)
        assert (dm.source, dm.transform, dm.transform_seed, dm.classes) == tuple(want.values()), task
    experts = cfg["model"]["init_args"]["experts"]
    assert [(e["task"], e["classes"]) for e in experts] == [(t, w["classes"]) for t, w in trained.items()]
    mk = (repo / "Makefile").read_text()
    key = "MT_NONLOCAL" if name == "fmnist_nonlocal" else "MT_LOCAL"
    foundations = next(line for line in mk.splitlines() if line.startswith(f"{key} :=")).split(":=")[1].split()
    assert [e["foundation"] for e in experts] == foundations
