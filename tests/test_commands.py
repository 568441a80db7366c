"""`vf merge` / `vf prune` end to end on Fashion-MNIST data: report contract, invariants, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vf_lightning.align import apply_permutation, build_permutation_spec, random_perms
from vf_lightning.checkpoint import load_model_checkpoint, save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.models import ModelConfig, build_model

CFG = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1)
DATA = ["--data.calib_samples", "256", "--data.eval_samples", "500", "--data.batch_size", "250"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Network A (random, non-trivial BN statistics), B = a random permutation of A, C = another architecture."""
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
    b = apply_permutation(a, spec, random_perms(spec, seed=3))
    other = ModelConfig(arch="vgg11", norm="bn", width=0.25, in_channels=1)
    paths = (d / "a.pt", d / "b.pt", d / "c.pt")
    save_model_checkpoint(a, CFG, paths[0])
    save_model_checkpoint(b, CFG, paths[1])
    save_model_checkpoint(build_model(other), other, paths[2])
    return paths


def test_merge_report_follows_the_contract_and_recovers_a_permuted_copy(
    pair: tuple[Path, Path, Path], tmp_path: Path, fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = pair
    out = tmp_path / "merge"
    main([
        "merge", "--checkpoints", json.dumps([str(a), str(b)]), *DATA, "--matching", "[identity, weight]",
        "--normalization", "[none, reset]", "--alphas", "3", "--out_dir", str(out), "--logger.kind", "csv",
        "--preserve", "[0, 3, -1]",
    ])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    for key in ("endpoints", "ensemble", "alignment", "results", "lmc", "variance_ratio"):
        assert key in report
    assert set(report["alignment"]["weight"]) >= {"matching", "seconds", "max_abs_logit_diff", "groups"}
    assert report["alignment"]["weight"]["max_abs_logit_diff"] < 1e-4
    row_keys = {"matching", "normalization", "preserved_layers", "alpha", "acc", "loss", "params_ratio",
                "flops_ratio", "seconds"}  # fmt: skip
    assert all(row_keys <= set(r) for r in report["results"])
    acc_a = report["endpoints"]["a"]["acc"]
    weight_none = next(r for r in report["results"] if r["matching"] == "weight" and r["normalization"] == "none")
    assert weight_none["acc"] == pytest.approx(acc_a, abs=1e-9)  # merging A with a permuted copy gives A back
    assert report["ensemble"]["acc"] == pytest.approx(acc_a, abs=1e-9)
    pfm = [r for r in report["results"] if r["matching"] == "weight" and r["preserved_layers"] > 0]
    assert {r["preserved_layers"] for r in pfm} == {3, 9}  # VGG11: 8 convs + classifier; -1 = all
    assert all(r["acc"] == pytest.approx(acc_a, abs=1e-9) for r in pfm if r["normalization"] == "none")
    top = next(r for r in pfm if r["preserved_layers"] == 9 and r["normalization"] == "none")
    assert top["params_ratio"] == pytest.approx(2.0, abs=5e-3) and top["flops_ratio"] == pytest.approx(2.0, abs=5e-3)
    assert (out / "merged_pfm.pt").is_file()
    assert report["lmc"]["alphas"] == [0.0, 0.5, 1.0]
    assert report["lmc"]["barrier"]["weight/none"]["acc"] == pytest.approx(0.0, abs=1e-9)
    assert set(report["lmc"]["curves"]) == {"identity/none", "identity/reset", "weight/none", "weight/reset"}
    vr = report["variance_ratio"]
    assert len(vr["layers"]) > 0 and all(len(c) == len(vr["layers"]) for c in vr["curves"].values())
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in vr["curves"]["weight/none"])
    merged, cfg = load_model_checkpoint(out / "merged.pt")
    assert cfg == CFG
    assert (out / "lmc.png").is_file() and (out / "variance_ratio.png").is_file() and (out / "results.csv").is_file()
    assert "weight" in capsys.readouterr().out


def test_merge_refuses_different_architectures_before_any_work(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _, c = pair
    with pytest.raises(SystemExit) as e:
        main(["merge", "--checkpoints", json.dumps([str(a), str(c)]), "--out_dir", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "features.0.weight" in err
    assert not (tmp_path / "x").exists()


def test_merge_missing_checkpoint_and_bad_options_fail_clearly(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = pair
    for args, needle in (
        (["--checkpoints", json.dumps([str(a), str(tmp_path / "nope.pt")])], "does not exist"),
        (["--checkpoints", json.dumps([str(a), str(b)]), "--normalization", "[repiar]"], "repiar"),
        (["--checkpoints", json.dumps([str(a), str(b)]), "--normalization", "[bias_calibration]"], "bias_calibration"),
    ):
        with pytest.raises(SystemExit):
            main(["merge", *args, "--out_dir", str(tmp_path / "y")])
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_prune_reaches_sparsity_and_normalization_at_zero_sparsity_changes_nothing(
    pair: tuple[Path, Path, Path], tmp_path: Path, fmnist: Path
) -> None:
    from vf_lightning.data import FashionMNISTDataModule
    from vf_lightning.repair import reset_bn_stats

    model, _ = load_model_checkpoint(pair[0])
    dm = FashionMNISTDataModule(num_workers=0, pad_to_32=True, calib_samples=256)
    model = reset_bn_stats(model, dm.calibration_dataloader(256))  # BN statistics of the calibration data
    a = save_model_checkpoint(model, CFG, tmp_path / "dense.pt")
    out = tmp_path / "prune"
    main(["prune", "--checkpoint", str(a), *DATA, "--sparsities", "[0.0, 0.9]", "--normalization", "[none, auto]",
          "--out_dir", str(out), "--logger.kind", "none"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    dense = report["endpoints"]["dense"]["acc"]
    rows = {(r["sparsity"], r["normalization"]): r for r in report["results"]}
    assert rows[(0.0, "auto:reset")]["acc"] == pytest.approx(dense, abs=1e-9)
    assert rows[(0.9, "none")]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rows[(0.9, "none")]["params_ratio"] < 0.2
    assert set(report["variance_ratio"]["curves"]) >= {"global_magnitude/0.9/none", "global_magnitude/0.9/auto:reset"}
    pruned, _ = load_model_checkpoint(out / "pruned.pt")
    assert sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if n.endswith("weight") and p.dim() > 1) > 0
