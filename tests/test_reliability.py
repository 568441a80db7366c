"""Bad inputs and faults (issue 14, docs/RELIABILITY.md): damaged and non-finite checkpoints, strict report.json,
all-or-nothing outputs, writability and model ↔ data checks before any work, a missing data_dir, the umask."""

from __future__ import annotations

import io
import json
import os
import signal
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from background import Command, Job, job, python_env
from torch import nn
from vf_lightning.callbacks import MergeCallback, ReportWriter, VarianceCollapseCallback
from vf_lightning.callbacks import report as report_module
from vf_lightning.callbacks.base import RunReport

from vf_lightning import io as vio
from vf_lightning.checkpoint import CheckpointError, load_model_checkpoint, load_networks, save_model_checkpoint
from vf_lightning.cli import main
from vf_lightning.data import FashionMNISTDataModule, VisionDataModule
from vf_lightning.data import sources as data_sources
from vf_lightning.data.sources import DataDirError
from vf_lightning.io import OutputError, atomic_write_bytes, check_writable, clean_stale, publish_dir, staging_dir
from vf_lightning.lit import PairModule
from vf_lightning.lit.optim import OptimConfig
from vf_lightning.models import ModelConfig, build_model

CFG = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1)
DATA = ["--data.calib_samples", "64", "--data.val_subset", "500", "--data.eval_batch_size", "250",
        "--data.num_workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 1-channel 32×32 VGG11s (a, b) and a 3-channel one (rgb)."""
    d = tmp_path_factory.mktemp("rel")
    torch.manual_seed(0)
    paths = {"a": d / "a.pt", "b": d / "b.pt", "rgb": d / "rgb.pt"}
    save_model_checkpoint(build_model(CFG), CFG, paths["a"])
    save_model_checkpoint(build_model(CFG), CFG, paths["b"])
    rgb = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=3)
    save_model_checkpoint(build_model(rgb), rgb, paths["rgb"])
    return paths


def _merge_config(tmp_path: Path, checkpoints: list[Path], out: Path, alpha: float = 0.5) -> Path:
    """A small `vf merge` run: one full merge (identity matching, no normalization) and the ReportWriter."""
    cb = "vf_lightning.callbacks."
    cfg = {
        "trainer": {"accelerator": "cpu", "callbacks": [
            {"class_path": cb + "MergeCallback", "init_args": {
                "matchings": ["identity"], "normalizations": ["none"], "alpha": alpha, "ensemble": False,
                "calib_samples": None, "eval_samples": None, "batch_size": 250}},
            {"class_path": cb + "ReportWriter", "init_args": {"out_dir": str(out)}},
        ]},
        "model": {"class_path": "vf_lightning.lit.MergeModule",
                  "init_args": {"checkpoints": [str(p) for p in checkpoints]}},
    }  # fmt: skip
    path = tmp_path / f"merge-{alpha}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fails_in_one_line(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run ``vf ARGS``; it must exit 2 with exactly one ``error:`` line containing every needle and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _corrupt_tensor_bytes(path: Path) -> None:
    """Flip bytes inside the first tensor-data record of a zip checkpoint (the zip CRC no longer matches)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 64)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    for i in range(start + 8, start + 40):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------------------------
# 1. damaged checkpoints


def test_checkpoint_with_corrupted_tensor_bytes_is_refused_naming_the_file(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpts["a"].read_bytes())
    _corrupt_tensor_bytes(bad)
    with pytest.raises(CheckpointError, match="CRC mismatch") as err:
        load_model_checkpoint(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    _fails_in_one_line(["merge", "--checkpoints", json.dumps([str(bad), str(ckpts["b"])]),
                        "--out_dir", str(tmp_path / "out")], capsys, str(bad), "CRC")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_refused_naming_the_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpts["a"].read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_model_checkpoint(cut)


# ---------------------------------------------------------------------------------------------------------------
# 3. non-finite weights; strict report.json


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_checkpoint_and_tensor(
    value: float, tmp_path: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_model(CFG)
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point() and k.endswith("weight"))
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = value
    path = tmp_path / "diverged.pt"
    save_model_checkpoint(model, CFG, path)
    with pytest.raises(CheckpointError) as err:
        load_networks([str(ckpts["a"]), str(path)])
    assert str(path) in str(err.value) and repr(name) in str(err.value)
    _fails_in_one_line(["merge", "--checkpoints", json.dumps([str(ckpts["a"]), str(path)]),
                        "--out_dir", str(tmp_path / "out")], capsys, str(path), name)  # fmt: skip


def test_report_json_is_strict_json_when_numbers_are_not_finite(tmp_path: Path) -> None:
    rep = RunReport()
    rep.sections["endpoints"] = {"a": {"acc": 0.5, "loss": float("nan")}, "b": {"acc": 0.5, "loss": float("inf")}}
    rep.rows.append({"matching": "identity", "normalization": "none", "acc": float("nan"),
                     "loss": torch.tensor(float("-inf")).item(), "curve": torch.tensor([1.0, float("nan")])})
    writer = ReportWriter(out_dir=str(tmp_path / "out"), save_model=False, plots=False, summary=False)
    report = writer.build(rep)
    writer.write(report, rep, L.LightningModule())

    def refuse(token: str) -> Any:
        raise AssertionError(f"report.json holds {token}")

    loaded = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=refuse)
    assert loaded["endpoints"]["a"]["loss"] is None and loaded["results"][0]["curve"] == [1.0, None]
    with pytest.raises(ValueError):
        vio.atomic_write_json({"x": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. the output set is all-or-nothing


def test_failed_write_phase_leaves_the_old_set_and_no_leftovers(
    ckpts: dict[str, Path], tmp_path: Path, fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    main(["merge", "--config", str(_merge_config(tmp_path, [ckpts["a"], ckpts["b"]], out, alpha=0.5)), *DATA])
    (out / "notes.txt").write_text("mine")  # not part of the set: kept across runs
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"report.json", "merged.pt"} <= set(old)
    assert json.loads(old["report.json"])["merged_checkpoint"]["path"] == str(out / "merged.pt")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "save_model_checkpoint", fail)
    with pytest.raises(OSError, match="No space left"):
        main(["merge", "--config", str(_merge_config(tmp_path, [ckpts["a"], ckpts["b"]], out, alpha=0.3)), *DATA])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert not list(out.glob(".*"))


def test_publish_replaces_the_set_keeps_other_files_and_cleans_killed_runs(tmp_path: Path) -> None:
    owned = report_module.owned_by_writer
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    (out / "lmc.png").write_text("old plot")  # of the old set only: must not sit beside the new report
    (out / "settings.yaml").write_text("the user's")
    (out / "logs").mkdir()
    (out / "logs" / "metrics.csv").write_text("m")
    (out / ".report.json.x1.tmp").write_text("half")  # an interrupted atomic write
    dead = tmp_path / "out.tmp-999999999"  # the staging directory of a killed run
    dead.mkdir()
    (dead / "report.json").write_text("killed")
    clean_stale(out, owned)
    assert not dead.exists() and not (out / ".report.json.x1.tmp").exists()
    stage = staging_dir(out)
    stage.mkdir()
    (stage / "report.json").write_text("new")
    (stage / "merged.pt").write_text("new model")
    publish_dir(stage, out, owned)
    assert sorted(p.name for p in out.iterdir()) == ["logs", "merged.pt", "report.json", "settings.yaml"]
    assert (out / "report.json").read_text() == "new" and (out / "logs" / "metrics.csv").read_text() == "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # killed between the two renames: the old directory waits as out.old-<pid> and comes back
    os.rename(out, tmp_path / "out.old-999999999")
    clean_stale(out, owned)
    assert (out / "report.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# 5. outputs are checked before any work


@pytest.fixture
def no_data_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def touched(self: Any, stage: str | None = None) -> None:
        raise AssertionError("the data was loaded before the output check")

    monkeypatch.setattr(VisionDataModule, "setup", touched)


def test_unusable_out_dir_fails_in_one_line_before_any_work(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data_work: None
) -> None:
    (tmp_path / "file").write_text("x")
    pair = ["--checkpoints", json.dumps([str(ckpts["a"]), str(ckpts["b"])])]
    _fails_in_one_line(["merge", *pair, "--out_dir", str(tmp_path / "file")], capsys, "is a file")
    _fails_in_one_line(["merge", *pair, "--out_dir", str(tmp_path / "file" / "sub")], capsys, "lies under the file")
    _fails_in_one_line(["prune", "--checkpoint", str(ckpts["a"]), "--out_dir", str(tmp_path / "file")], capsys,
                       "is a file")  # fmt: skip


def test_unwritable_out_dir_fails_in_one_line(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    no_data_work: None,
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real = vio.tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if Path(kwargs.get("dir") or "") == locked:
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(vio.tempfile, "mkstemp", mkstemp)  # the probe fails as on a read-only or foreign folder
    pair = ["--checkpoints", json.dumps([str(ckpts["a"]), str(ckpts["b"])])]
    _fails_in_one_line(["merge", *pair, "--out_dir", str(locked / "out")], capsys, "not writable", "Permission")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable(ro / "out")
    finally:
        ro.chmod(0o755)


def test_pair_export_dir_that_is_a_file_fails_at_the_start_of_fit(tmp_path: Path, fmnist: Path) -> None:
    (tmp_path / "exports").write_text("x")
    module = PairModule(net=CFG, export_dir=str(tmp_path / "exports"))
    steps: list[int] = []
    module.training_step = lambda batch, i: steps.append(i)  # type: ignore[method-assign, assignment, return-value]
    dm = FashionMNISTDataModule(num_workers=0, train_subset=64, val_subset=64, calib_samples=16, batch_size=32,
                                pad_to_32=True)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(OutputError, match="export_dir .* is a file"):
        trainer.fit(module, datamodule=dm)
    assert steps == []


# ---------------------------------------------------------------------------------------------------------------
# 6. model ↔ data compatibility, with one batch before the work


@pytest.mark.parametrize(
    ("model", "data", "needles"),
    [
        ("a", ["--data.pad_to_32", "false"], ["32×32 images", "28×28", "pad_to_32: true"]),
        ("a", ["--data.classes", "[0, 1, 2]"], ["10 classes", "3 classes", "data.init_args.classes"]),
        ("rgb", [], ["3 input channels", "1 channel", "3-channel images"]),
    ],
)
def test_model_and_data_that_do_not_fit_fail_in_one_line_saying_what_to_change(
    model: str, data: list[str], needles: list[str], ckpts: dict[str, Path], tmp_path: Path, fmnist: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = ckpts[model]
    args = ["merge", "--checkpoints", json.dumps([str(ckpts[model]), str(other)]), "--out_dir", str(tmp_path / "o"),
            *DATA, *data]  # fmt: skip
    line = _fails_in_one_line(args, capsys, "model expects", "but the data module gives", *needles)
    assert "Traceback" not in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# 8. a data_dir that does not exist is refused


def test_missing_data_dir_is_refused_not_replaced_by_the_system_copy(
    tmp_path: Path, fmnist: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataDirError, match="does not exist"):
        FashionMNISTDataModule(data_dir=str(missing), num_workers=0).setup("fit")
    _fails_in_one_line(["merge", "--checkpoints", json.dumps([str(ckpts["a"]), str(ckpts["b"])]),
                        "--out_dir", str(tmp_path / "o"), "--data.data_dir", str(missing), *DATA], capsys,
                       str(missing), "does not exist")  # fmt: skip
    FashionMNISTDataModule(data_dir=str(fmnist), num_workers=0, val_subset=8, train_subset=8).setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# inputs that were already refused in one line before any work (kept true here)


class _RunsCode:
    """A pickle that runs a shell command when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["state_dict", "top"])
def test_malicious_pickle_is_refused_without_running_it(
    where: str, tmp_path: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str], no_data_work: None
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = _RunsCode(marker)
    torch.save({"format": "vf-model", "model_config": CFG.to_dict(), "state_dict": payload} if where == "state_dict"
               else payload, evil)  # fmt: skip
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model_checkpoint(evil)
    _fails_in_one_line(["merge", "--checkpoints", json.dumps([str(ckpts["a"]), str(evil)]),
                        "--out_dir", str(tmp_path / "o")], capsys, str(evil), "malicious")  # fmt: skip
    _fails_in_one_line(["prune", "--checkpoint", str(evil), "--out_dir", str(tmp_path / "o")], capsys, str(evil))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--matching", "[wieght]"], "wieght"),
        (["--normalization", "[repiar]"], "repiar"),
        (["--alpha", "1.5"], "alpha must lie in [0, 1]"),
        (["--out_dri", "x"], "--out_dri"),
        (["--matching", "[]"], "--matching is an empty list"),
    ],
)
def test_unknown_names_bad_alpha_and_flag_typos_fail_in_one_line_before_any_work(
    args: list[str], needle: str, ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_data_work: None,
) -> None:
    _fails_in_one_line(["merge", "--checkpoints", json.dumps([str(ckpts["a"]), str(ckpts["b"])]),
                        "--out_dir", str(tmp_path / "o"), *args], capsys, needle)  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["merge", "--data.pad_to32", "true"], ["data.init_args.pad_to32 is not an option of FashionMNISTDataModule",
                                                "did you mean data.init_args.pad_to_32?"]),
        (["fit", "--model.init_args.optim.lrr", "0.1"], ["model.init_args.optim.lrr", "did you mean "
                                                         "model.init_args.optim.lr?"]),
        (["fit", "--model.init_args.net.width", "wide"], ["model.init_args.net.width", "float", "wide"]),
    ],
)
def test_typo_in_a_nested_key_fails_in_one_line_naming_it_with_the_closest_option(
    args: list[str], needles: list[str], ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_data_work: None,
) -> None:
    """jsonargparse's several-line message for a nested key (issue 14 item 7) becomes one line with the full key."""
    where = (["--checkpoints", json.dumps([str(ckpts["a"]), str(ckpts["b"])])] if args[0] == "merge"
             else ["--config", str(_fit_config(tmp_path))])  # fmt: skip
    _fails_in_one_line([args[0], *where, *args[1:]], capsys, *needles)


# ---------------------------------------------------------------------------------------------------------------
# 10. written files honour the umask


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "f.bin")
        model_path = save_model_checkpoint(nn.Linear(2, 2), CFG, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert model_path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------------
# 2. resume / validate / test from an explicit checkpoint file, with the callbacks' state


def _fit_config(tmp_path: Path) -> Path:
    """A tiny `vf fit` run of a PairModule (MLP, 256 training images) with a MergeCallback and last.ckpt."""
    root = tmp_path / "run"
    cfg = {
        "seed_everything": 1,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(root / "checkpoints"), "filename": "last"}},
                        {"class_path": "vf_lightning.callbacks.MergeCallback",
                         "init_args": {"matchings": ["identity"], "normalizations": ["none"], "calib_samples": 64,
                                       "eval_samples": 128, "batch_size": 64}}]},
        "model": {"class_path": "vf_lightning.lit.PairModule", "init_args": {
            "net": {"arch": "mlp", "in_channels": 1, "hidden": [32], "image_size": 28}, "optim": {"lr": 0.05}}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule", "init_args": {
            "batch_size": 64, "num_workers": 0, "train_subset": 256, "val_subset": 128, "calib_samples": 64}},
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MergeCallback")]
    return state  # type: ignore[no-any-return]


def test_fit_validate_test_and_resume_from_an_explicit_checkpoint_file(
    tmp_path: Path, fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_fit_config(tmp_path))
    last = tmp_path / "run/checkpoints/last.ckpt"
    main(["fit", "--config", cfg])
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 4 and first["hyper_parameters"]["_class_path"].endswith("PairModule")
    rows0 = _merge_state(first)["_rows"]
    assert [r[0] for r in rows0] == [1]  # merge_table's first column: trained_epochs
    for cmd in ("validate", "test"):
        capsys.readouterr()
        main([cmd, "--config", cfg, "--ckpt_path", str(last)])
        out = capsys.readouterr()
        assert "val/acc_a" in out.out and "Parsing of ckpt_path" not in out.err
    main(["fit", "--config", cfg, "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 8 and resumed["epoch"] == 1  # continued, not restarted
    state = _merge_state(resumed)
    assert state["_rows"][0] == rows0[0] and [r[0] for r in state["_rows"]] == [1, 2]  # first kept, not redone
    assert len(state["seconds"]) == 2 and sorted(d[1] for d in state["done"]) == [1, 2]


def test_diagnostic_callback_state_round_trips_and_is_kept_per_callback() -> None:
    a = MergeCallback(matchings=["identity"], normalizations=["none"])
    b = MergeCallback(matchings=["weight"], normalizations=["none"])
    assert a.state_key != b.state_key
    a._rows = [[0, "identity", "none", np.float32(0.5), torch.tensor(1.25)]]
    a._done, a.seconds, a.last = {("fit", 1)}, [0.1], {"merge/identity/none/acc": 0.5}
    fresh = MergeCallback(matchings=["identity"], normalizations=["none"])
    assert fresh.state_key == a.state_key
    saved = a.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh._rows == [[0, "identity", "none", 0.5, 1.25]] and fresh._done == {("fit", 1)}
    assert fresh.seconds == [0.1] and fresh.last == a.last
    v = VarianceCollapseCallback(normalizations=["none"])
    v._history, v._epochs = {"identity/none": [0.9]}, [1]
    w = VarianceCollapseCallback(normalizations=["none"])
    w.load_state_dict(v.state_dict())
    assert w._history == {"identity/none": [0.9]} and w._epochs == [1]


# ---------------------------------------------------------------------------------------------------------------
# 7. runtime configuration errors of `vf fit` are one `error:` line


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--data.init_args.batch_size", "0"], ["batch_size must be ≥ 1", "got 0"]),
        (["--data.init_args.eval_batch_size", "-4"], ["eval_batch_size must be ≥ 1"]),
        (["--data.init_args.num_workers", "-1"], ["num_workers must be ≥ 0", "got -1"]),
        (["--model.init_args.optim.lr", "0"], ["optim.lr", "must be > 0"]),
        (["--model.init_args.optim.lr", "-0.1"], ["optim.lr", "must be > 0", "-0.1"]),
        (["--trainer.max_epochs", "-3"], ["trainer.max_epochs must be ≥ 0", "-3"]),
        (["--ckpt_path", "NOFILE"], ["ckpt_path", "does not exist"]),
        (["--ckpt_path", "CUTCKPT"], ["ckpt_path", "cut.ckpt", "damaged or truncated"]),
        (["--ckpt_path", "NOTCKPT"], ["ckpt_path", "not.ckpt", "weights_only"]),
        (["--data.init_args.data_dir", "DAMAGED"], ["dataset file", "images-idx3-ubyte.gz", "is damaged",
                                                    "make data"]),
        (["--data.init_args.data_dir", "EMPTY"], ["dataset 'fashion_mnist' not found", "How to get it"]),
        (["--model.init_args.export_dir", "AFILE"], ["model.init_args.export_dir", "is a file"]),
    ],
)
def test_fit_configuration_errors_are_one_line(
    args: list[str], needles: list[str], tmp_path: Path, fmnist: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "empty").mkdir()
    if "EMPTY" in args:  # the dataset is nowhere to be found
        monkeypatch.setitem(data_sources.SYSTEM_DIRS, "fashion_mnist", [])
        monkeypatch.delenv("VF_DATA_DIR", raising=False)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cut.ckpt").write_bytes(_pair_checkpoint_bytes()[:5000])  # a checkpoint cut short
    (tmp_path / "not.ckpt").write_bytes(b"not a checkpoint\n")
    if "DAMAGED" in args:  # the Fashion-MNIST files, image files cut short
        (tmp_path / "damaged").mkdir()
        for f in fmnist.glob("*-ubyte.gz"):
            data = f.read_bytes()
            (tmp_path / "damaged" / f.name).write_bytes(data[: len(data) // 2] if "images" in f.name else data)
    subst = {"NOFILE": str(tmp_path / "no.ckpt"), "EMPTY": str(tmp_path / "empty"), "AFILE": str(tmp_path / "afile"),
             "CUTCKPT": str(tmp_path / "cut.ckpt"), "NOTCKPT": str(tmp_path / "not.ckpt"),
             "DAMAGED": str(tmp_path / "damaged")}  # fmt: skip
    args = [subst.get(a, a) for a in args]
    _fails_in_one_line(["fit", "--config", str(_fit_config(tmp_path)), *args], capsys, *needles)
    assert not (tmp_path / "run/checkpoints").exists()


def _pair_checkpoint_bytes() -> bytes:
    """A Lightning-style checkpoint (zip archive) of some size, for cutting short."""
    buf = io.BytesIO()
    torch.save({"state_dict": build_model(CFG).state_dict(), "hyper_parameters": {}}, buf)
    return buf.getvalue()


def test_damaged_cifar_batch_file_is_named(tmp_path: Path) -> None:
    from vf_lightning.data import CIFAR10DataModule, DataFileError

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):  # fmt: skip
        (folder / name).write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="data_batch_1.* MD5"):
        CIFAR10DataModule(data_dir=str(tmp_path), num_workers=0).setup("fit")


def test_optim_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        OptimConfig(weight_decay=-1e-4)
    with pytest.raises(ValueError, match="calib_samples must be ≥ 1"):
        FashionMNISTDataModule(calib_samples=0)


# ---------------------------------------------------------------------------------------------------------------
# 9. one run directory per run, derived from one setting; reruns are refused without --overwrite


def _run_config(tmp_path: Path) -> Path:
    """A tiny `vf fit` recipe that spells no output path (as configs/fit/*.yaml): CSV logs, last.ckpt, a
    LearningRateMonitor, a PairModule (exports net_a.pt / net_b.pt)."""
    cfg = {
        "seed_everything": 1,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1,
                    "logger": [{"class_path": "vf_lightning.loggers.CSVLogger"}],
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"filename": "last"}},
                        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]},
        "model": {"class_path": "vf_lightning.lit.PairModule", "init_args": {
            "net": {"arch": "mlp", "in_channels": 1, "hidden": [16], "image_size": 28}, "optim": {"lr": 0.05}}},
        "data": {"class_path": "vf_lightning.data.FashionMNISTDataModule", "init_args": {
            "batch_size": 64, "num_workers": 0, "train_subset": 128, "val_subset": 64, "calib_samples": 16}},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_writes_one_run_directory_and_refuses_a_rerun_without_overwrite(
    tmp_path: Path, fmnist: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = str(_run_config(tmp_path))
    main(["fit", "--config", cfg])  # no path anywhere: the run directory is outputs/<config name>
    run = tmp_path / "outputs/tiny"
    assert {p.name for p in run.iterdir()} == {"config.yaml", "checkpoints", "csv", "net_a.pt", "net_b.pt"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert (run / "csv/version_0/metrics.csv").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_name"] == "tiny" and saved["trainer"]["default_root_dir"] == "outputs/tiny"
    assert saved["model"]["init_args"]["export_dir"] == "outputs/tiny"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    exported = (run / "net_a.pt").stat().st_mtime_ns

    # a rerun into the same directory: one line, before anything is built or written
    _fails_in_one_line(["fit", "--config", cfg], capsys, "'outputs/tiny' already holds a run",
                       "--ckpt_path outputs/tiny/checkpoints/last.ckpt", "--run_name", "--overwrite")  # fmt: skip
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # --overwrite replaces the earlier run (its files only); --trainer.logger false with a LearningRateMonitor
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints/epoch=7.ckpt").write_bytes(b"old")
    main(["fit", "--config", cfg, "--overwrite", "--trainer.logger", "false"])
    assert {p.name for p in run.iterdir()} == {"config.yaml", "checkpoints", "net_a.pt", "net_b.pt", "notes.txt"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert (run / "net_a.pt").stat().st_mtime_ns > exported  # written again (the same seeds: the same bytes)


def test_run_name_and_root_dir_move_every_output_and_explicit_paths_are_kept(tmp_path: Path) -> None:
    """resolve_run_dir on parsed configs: one setting moves the config, checkpoints, logs and exports; a W&B run is
    named after the run; paths and names a recipe spells out stay (``--run_name`` renames the W&B run)."""
    from jsonargparse import Namespace

    from vf_lightning.cli import resolve_run_dir

    def cfg(**top: Any) -> Namespace:
        ns = Namespace(run_name=top.get("run_name"), trainer=Namespace(
            default_root_dir=top.get("root"),
            logger=[Namespace(class_path="vf_lightning.loggers.WandbLogger",
                              init_args=Namespace(save_dir=top.get("wandb_dir"), name=top.get("wandb_name"))),
                    Namespace(class_path="vf_lightning.loggers.CSVLogger", init_args=Namespace(save_dir=None,
                                                                                             name="csv"))],
            callbacks=[Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                 init_args=Namespace(dirpath=top.get("ckpt_dir"), filename="last"))]),
            model=Namespace(class_path="vf_lightning.lit.PairModule", init_args=Namespace(export_dir=None)))
        return ns  # fmt: skip

    c = cfg(run_name="r1")
    run = resolve_run_dir(c, c.trainer.default_root_dir, "recipe")
    assert run.path == Path("outputs/r1") and c.trainer.default_root_dir == "outputs/r1"
    assert c.trainer.logger[0].init_args.save_dir == "outputs/r1" and c.trainer.logger[0].init_args.name == "r1"
    assert c.trainer.logger[1].init_args.save_dir == "outputs/r1"
    assert c.trainer.callbacks[0].init_args.dirpath == "outputs/r1/checkpoints"
    assert c.model.init_args.export_dir == "outputs/r1"
    c = cfg(root=str(tmp_path / "sweep/abc"))  # a sweep agent's folder: the run is named after it
    resolve_run_dir(c, c.trainer.default_root_dir, "recipe")
    assert c.run_name == "abc" and c.trainer.logger[0].init_args.name == "abc"
    c = cfg(wandb_dir="elsewhere", wandb_name="mine", ckpt_dir=str(tmp_path / "ck"))  # spelt out: kept
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/last.ckpt").write_bytes(b"x")
    run = resolve_run_dir(c, None, "recipe")
    assert run.name == "recipe" and c.trainer.logger[0].init_args.save_dir == "elsewhere"
    assert c.trainer.logger[0].init_args.name == "mine" and c.trainer.callbacks[0].init_args.dirpath == str(
        tmp_path / "ck")
    assert run.previous() == [tmp_path / "ck/last.ckpt"]  # an explicit checkpoint folder's files count too
    c = cfg(run_name="given", wandb_name="mine")
    resolve_run_dir(c, None, "recipe")
    assert c.trainer.logger[0].init_args.name == "given"  # --run_name names the run everywhere


# ---------------------------------------------------------------------------------------------------------------
# 4. a real kill (SIGKILL) in the write phase leaves the old set or the new one, never a mix


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("out"))


@job(seconds=25)
def write_phase_kills(tmp: Path) -> list[list[Command]]:
    """`vf merge` writes a set into ``out`` (α = 0.5); the user adds a file; the set is copied to ``old`` (the
    reference) and ``second/out``; then two fresh processes rerun the merge (α = 0.3) at once and kill themselves
    (SIGKILL, ``VF_FAULT_POINT``) in the write phase: one on ``out`` with the new set complete in its staging
    directory, one on ``second/out`` between the two renames."""
    torch.manual_seed(0)
    ckpts = [tmp / "a.pt", tmp / "b.pt"]
    for path in ckpts:
        save_model_checkpoint(build_model(CFG), CFG, path)
    (tmp / "second").mkdir()

    def merge(name: str, d: Path, alpha: float, point: str | None = None) -> Command:
        argv = ["-m", "vf_lightning", "merge", "--config", str(_merge_config(d, ckpts, d / "out", alpha)), *DATA]
        if point is None:
            return Command(name, argv)
        return Command(name, argv, env=python_env(VF_FAULT_POINT=point), returncode=-signal.SIGKILL)

    copies = ("import shutil, sys; from pathlib import Path; t = Path(sys.argv[1]); "
              "(t / 'out/notes.txt').write_text('mine'); shutil.copytree(t / 'out', t / 'old'); "
              "shutil.copytree(t / 'out', t / 'second/out')")
    return [[merge("first", tmp, 0.5)], [Command("copies", ["-c", copies, str(tmp)])],
            [merge("staged", tmp, 0.3, "staged"), merge("between-renames", tmp / "second", 0.3, "between-renames")]]


@pytest.mark.background(factory=write_phase_kills)
def test_sigkill_in_the_write_phase_leaves_the_old_set_or_the_new_one(background: Job, fmnist: Path) -> None:
    background.check()  # both reruns died by SIGKILL at their fault point
    tmp = background.dir
    old = _files(tmp / "old")
    assert {"report.json", "merged.pt", "config.yaml", "notes.txt"} <= set(old)
    # killed with the new set complete in its staging directory: out_dir is the old set, byte for byte
    assert _files(tmp / "out") == old
    (staged,) = [tmp / n for n in _siblings(tmp) if n.startswith("out.tmp-")]
    assert json.loads((staged / "report.json").read_text())["config"]["trainer"]["callbacks"][0]["init_args"][
        "alpha"] == 0.3 and (staged / "merged.pt").is_file()  # the kill did land in the write phase  # fmt: skip

    # killed between the two renames: the old set waits as out.old-<pid>; the next run puts it back first
    second = tmp / "second"
    out = second / "out"
    assert not out.exists() and any(n.startswith("out.old-") for n in _siblings(second))
    clean_stale(out, report_module.owned_by_writer)  # what the next run does before anything else
    assert _files(out) == old and _siblings(second) == ["out"]
