"""`vf merge` / `vf prune` as LightningCLI runs of the callbacks, end to end on Fashion-MNIST data: report contract,
invariants, N-model merging, the same variance ratios as during `vf fit`, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from vf_lightning.callbacks import VarianceCollapseCallback

from vf_lightning.align import apply_permutation, build_permutation_spec, random_perms
from vf_lightning.checkpoint import load_model_checkpoint, save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.models import ModelConfig, build_model

CFG = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1)
DATA = ["--data.calib_samples", "256", "--data.val_subset", "1000", "--data.eval_batch_size", "250",
        "--data.num_workers", "0"]  # fmt: skip
SMALL = {"calib_samples": None, "eval_samples": None, "batch_size": 250}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """Network A (random, non-trivial BN statistics), B and B2 = random permutations of A, C = another width."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    a = build_model(CFG)
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    a.eval()
    spec = build_permutation_spec(a, torch.randn(2, 1, 32, 32))
    other = ModelConfig(arch="vgg11", norm="bn", width=0.25, in_channels=1)
    paths = (d / "a.pt", d / "b.pt", d / "b2.pt", d / "c.pt")
    save_model_checkpoint(a, CFG, paths[0])
    save_model_checkpoint(apply_permutation(a, spec, random_perms(spec, seed=3)), CFG, paths[1])
    save_model_checkpoint(apply_permutation(a, spec, random_perms(spec, seed=5)), CFG, paths[2])
    save_model_checkpoint(build_model(other), other, paths[3])
    return paths


def _callbacks(out: Path, **extra: Any) -> list[dict[str, Any]]:
    cb = "vf_lightning.callbacks."
    return [
        {"class_path": cb + "MergeCallback", "init_args": {"matchings": ["identity", "weight"],
                                                           "normalizations": ["none", "reset"], "ensemble": True,
                                                           **SMALL}},
        {"class_path": cb + "PFMCallback", "init_args": {"matchings": ["weight"], "preserve": [3, -1],
                                                         "normalizations": ["none", "reset"], **SMALL}},
        {"class_path": cb + "InterpolationCallback", "init_args": {"matchings": ["identity", "weight"], "alphas": 3,
                                                                   "normalizations": ["none", "reset"], **SMALL}},
        {"class_path": cb + "VarianceCollapseCallback", "init_args": {"matchings": ["identity", "weight"],
                                                                      "normalizations": ["none", "reset"], **SMALL}},
        {"class_path": cb + "ReportWriter", "init_args": {"out_dir": str(out), **extra}},
    ]  # fmt: skip


def _config(tmp_path: Path, checkpoints: list[Path], out: Path) -> Path:
    cfg = {
        "trainer": {"accelerator": "cpu", "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                     "init_args": {"save_dir": str(tmp_path / "csv")}},
                    "callbacks": _callbacks(out)},
        "model": {"class_path": "vf_lightning.lit.MergeModule",
                  "init_args": {"checkpoints": [str(p) for p in checkpoints]}},
    }  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_report_follows_the_contract_and_recovers_a_permuted_copy(
    pair: tuple[Path, ...], tmp_path: Path, fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair[:2]
    out = tmp_path / "merge"
    main(["merge", "--config", str(_config(tmp_path, [a, b], out)), *DATA])
    report = json.loads((out / "report.json").read_text())
    for key in ("config", "endpoints", "ensemble", "alignment", "results", "lmc", "variance_ratio", "timing"):
        assert key in report
    info = report["alignment"]["weight"]
    assert set(info) >= {"matching", "seconds", "max_abs_logit_diff", "self_check", "groups"}
    assert info["max_abs_logit_diff"] < 1e-4 and info["self_check"] < 1e-4
    row_keys = {"matching", "normalization", "preserved_layers", "alpha", "acc", "loss", "params_ratio",
                "flops_ratio", "seconds"}  # fmt: skip
    assert all(row_keys <= set(r) for r in report["results"])
    acc_a = report["endpoints"]["a"]["acc"]
    weight_none = next(r for r in report["results"] if r["matching"] == "weight" and r["normalization"] == "none"
                       and r["preserved_layers"] == 0)  # fmt: skip
    assert weight_none["acc"] == pytest.approx(acc_a, abs=1e-9)  # merging A with a permuted copy gives A back
    assert report["ensemble"]["acc"] == pytest.approx(acc_a, abs=1e-9)
    pfm = [r for r in report["results"] if r["preserved_layers"] > 0]
    assert {r["preserved_layers"] for r in pfm} == {3, 9}  # VGG11: 8 convs + classifier; -1 = all
    assert all(r["acc"] == pytest.approx(acc_a, abs=1e-9) for r in pfm if r["normalization"] == "none")
    top = next(r for r in pfm if r["preserved_layers"] == 9 and r["normalization"] == "none")
    assert top["params_ratio"] == pytest.approx(2.0, abs=5e-3) and top["flops_ratio"] == pytest.approx(2.0, abs=5e-3)
    assert report["lmc"]["alphas"] == [0.0, 0.5, 1.0]
    assert report["lmc"]["barrier"]["weight/none"]["acc"] == pytest.approx(0.0, abs=1e-9)
    assert set(report["lmc"]["curves"]) == {"identity/none", "identity/reset", "weight/none", "weight/reset"}
    vr = report["variance_ratio"]
    assert len(vr["layers"]) > 0 and all(len(c) == len(vr["layers"]) for c in vr["curves"].values())
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in vr["curves"]["weight/none"])
    # the saved models were chosen on the validation half; their test accuracy is the reported one
    merged, cfg = load_model_checkpoint(out / "merged.pt")
    assert cfg == CFG and report["merged_checkpoint"]["val_acc"] is not None
    assert (out / "merged_pfm.pt").is_file()
    assert (out / "lmc.png").is_file() and (out / "variance_ratio.png").is_file()
    html = (out / "report.html").read_text()
    assert 'id="results"' in html and "data:image/png;base64," in html  # self-contained page beside report.json
    assert next((tmp_path / "csv").rglob("metrics.csv")).read_text().count("merge/weight/none/acc") == 1
    assert "weight" in capsys.readouterr().out


def test_three_checkpoints_merge_with_n_model_matching(
    pair: tuple[Path, ...], tmp_path: Path, fmnist: Path
) -> None:
    a, b, b2 = pair[:3]
    out = tmp_path / "merge3"
    main(["merge", "--checkpoints", json.dumps([str(a), str(b), str(b2)]), "--matching", "[weight]",
          "--normalization", "[none]", "--out_dir", str(out), *DATA])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert set(report["endpoints"]) == {"a", "b", "c"}
    row = next(r for r in report["results"] if r["matching"] == "weight")
    assert row["acc"] == pytest.approx(report["endpoints"]["a"]["acc"], abs=1e-9)
    assert report["alignment"]["weight"]["max_abs_logit_diff"] < 1e-4


def test_merge_refuses_different_architectures_and_bad_input_before_any_work(
    pair: tuple[Path, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _, c = pair
    for args, needle in (
        (["--checkpoints", json.dumps([str(a), str(c)])], "features.0.weight"),
        (["--checkpoints", json.dumps([str(a), str(tmp_path / "nope.pt")])], "does not exist"),
        (["--checkpoints", json.dumps([str(a), str(b)]), "--normalization", "[repiar]"], "repiar"),
        (["--checkpoints", json.dumps([str(a), str(b)]), "--normalization", "[bias_calibration]"], "bias_calibration"),
        (["--checkpoints", json.dumps([str(a), str(b)]), "--matching", "[wieght]"], "wieght"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["merge", *args, "--out_dir", str(tmp_path / "y")])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_merge_help_lists_the_trainer_flags_and_the_shortcuts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in ("--trainer.devices", "--trainer.strategy", "--trainer.num_nodes", "--checkpoints", "--matching",
                 "--normalization", "--preserve", "--out_dir", "--data", "--seed_everything"):
        assert flag in text, flag


@pytest.mark.parametrize("config", sorted(Path(__file__).resolve().parents[1].glob("configs/[mp][er]*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_print_config_works_for_every_merge_and_prune_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = "merge" if config.parent.name == "merge" else "prune"
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"] and printed["model"]["class_path"]


def test_prune_reaches_sparsity_and_normalization_at_zero_sparsity_changes_nothing(
    pair: tuple[Path, ...], tmp_path: Path, fmnist: Path
) -> None:
    from vf_lightning.repair import reset_bn_stats

    model, _ = load_model_checkpoint(pair[0])
    dm = FashionMNISTDataModule(num_workers=0, pad_to_32=True, calib_samples=256)
    model = reset_bn_stats(model, dm.calibration_dataloader(256))  # BN statistics of the calibration data
    a = save_model_checkpoint(model, CFG, tmp_path / "dense.pt")
    out = tmp_path / "prune"
    main(["prune", "--checkpoint", str(a), *DATA, "--sparsities", "[0.0, 0.9]", "--normalization", "[none, auto]",
          "--out_dir", str(out)])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    dense = report["endpoints"]["dense"]["acc"]
    rows = {(r["sparsity"], r["normalization"]): r for r in report["results"]}
    assert rows[(0.0, "auto:reset")]["acc"] == pytest.approx(dense, abs=1e-9)
    assert rows[(0.9, "none")]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rows[(0.9, "none")]["params_ratio"] < 0.2
    assert set(report["variance_ratio"]["curves"]) >= {"global_magnitude/0.9/none", "global_magnitude/0.9/auto:reset"}
    pruned, _ = load_model_checkpoint(out / "pruned.pt")
    assert sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if n.endswith("weight") and p.dim() > 1) > 0
    assert (out / "accuracy.png").is_file()


def test_variance_ratios_of_vf_fit_callbacks_equal_those_of_vf_merge(tmp_path: Path, fmnist: Path) -> None:
    """One definition and one set of sites: the callback during fit and `vf merge` on the exported pair agree."""
    dm_args = {"num_workers": 0, "train_subset": 256, "val_subset": 256, "batch_size": 64, "pad_to_32": True,
               "calib_samples": 128, "augment": False}  # fmt: skip
    cb = VarianceCollapseCallback(matchings=["weight"], normalizations=["none", "reset"], vanishing_feature=False,
                                  calib_samples=None, eval_samples=None, batch_size=128)  # fmt: skip
    L.seed_everything(0)
    module = PairModule(CFG, OptimConfig(lr=0.05), export_dir=str(tmp_path / "pair"))
    tr = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    tr.fit(module, FashionMNISTDataModule(**dm_args))
    during_fit: dict[str, list[float]] = {}
    for _epoch, variant, _i, _layer, ratio, _vf in cb._rows:
        during_fit.setdefault(variant, []).append(ratio)
    out = tmp_path / "merge"
    main(["merge", "--checkpoints", json.dumps([str(tmp_path / "pair/net_a.pt"), str(tmp_path / "pair/net_b.pt")]),
          "--matching", "[weight]", "--normalization", "[none, reset]", "--out_dir", str(out),
          *[f"--data.{k}={v}" for k, v in dm_args.items() if k != "train_subset"]])  # fmt: skip
    report = json.loads((out / "report.json").read_text())["variance_ratio"]
    assert report["layers"] and set(report["curves"]) == set(during_fit) == {"weight/none", "weight/reset"}
    for variant, curve in during_fit.items():
        assert report["curves"][variant] == pytest.approx(curve, rel=1e-6, abs=1e-9), variant
