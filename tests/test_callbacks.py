"""Diagnostic callbacks: they log the expected keys to CSV and W&B, never change training, and fail early."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import wait_for_wandb_record
from lightning.pytorch.loggers import CSVLogger
from vf_lightning.callbacks import (
    InterpolationCallback,
    MergeCallback,
    PFMCallback,
    PruneCallback,
    VarianceCollapseCallback,
)

from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import ClassifierModule, OptimConfig, PairModule
from vf_lightning.models import ModelConfig

SMALL = {"calib_samples": 128, "eval_samples": 128, "batch_size": 128}
TINY_VGG = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1, num_classes=10)


def tiny_data() -> FashionMNISTDataModule:
    return FashionMNISTDataModule(num_workers=0, train_subset=256, val_subset=128, batch_size=64, pad_to_32=True,
                                  calib_samples=128, augment=False)  # fmt: skip


def trainer(tmp_path: Path, callbacks: list[Any], epochs: int = 1, logger: Any = False) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), log_every_n_steps=1)  # fmt: skip


def all_callbacks() -> list[Any]:
    return [
        MergeCallback(matchings=["weight"], normalizations=["reset"], **SMALL),
        InterpolationCallback(alphas=3, lmc_freq=0.5, normalizations=["none", "reset"], **SMALL),
        VarianceCollapseCallback(matchings=["weight"], normalizations=["reset"], **SMALL),
        PFMCallback(preserve=[0, 2], normalizations=["none"], **SMALL),
        PruneCallback(sparsities=[0.5], normalizations=["auto"], **SMALL),
    ]


EXPECTED_KEYS = [
    "merge/weight/none/acc", "merge/weight/reset/acc", "merge/weight/reset/loss",
    "barrier/weight/none/acc", "barrier/weight/reset/loss", "lmc/e1/weight/none/acc", "lmc/e2/weight/reset/loss",
    "lmc/alpha", "variance/weight/none/mean", "variance/weight/reset/last", "vf/weight/reset/mean",
    "pfm/preserved_layers", "pfm/params_ratio", "pfm/e2/weight/none/acc", "prune/a/dense/acc", "prune/sparsity",
    "prune/e2/a/global_magnitude/none/acc", "prune/e2/a/global_magnitude/auto/acc", "trained_epochs",
    "variance/weight/reset/first", "timing/MergeCallback",
]  # fmt: skip


def test_fit_with_all_callbacks_logs_the_keys_to_csv_and_to_an_offline_wandb_run(
    tmp_path: Path, fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from vf_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    L.seed_everything(0)
    csv = CSVLogger(str(tmp_path), name="csv")
    wb = WandbLogger(name="callbacks-test", save_dir=str(tmp_path), offline=True)
    callbacks = all_callbacks()
    tr = trainer(tmp_path, callbacks, epochs=2, logger=[wb, csv])
    tr.fit(PairModule(TINY_VGG, OptimConfig(lr=0.05)), tiny_data())
    wandb.finish()

    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    missing = [k for k in EXPECTED_KEYS if k not in header]
    assert not missing, f"not in metrics.csv: {missing}"
    assert "merge/weight/reset/acc" in tr.callback_metrics  # also visible to checkpointing / early stopping
    assert len(callbacks[1].seconds) == 3  # lmc_freq 0.5 of 2 epochs: before training, after epoch 1 and 2
    hparams = next((tmp_path / "csv").rglob("hparams.yaml")).read_text()
    assert "callbacks/MergeCallback" in hparams and "calib_samples" in hparams

    wanted = [*EXPECTED_KEYS, "variance_collapse/table", "variance_collapse/evolution", "lmc_table", "pfm_table",
              "prune_table", "merge_table", "callbacks/VarianceCollapseCallback"]  # fmt: skip
    missing = wait_for_wandb_record(tmp_path / "wandb", wanted)
    assert not missing, f"not in the W&B record: {missing}"


# ------------------------------------------------------------------------------------------------------------
# no side effects


def digest(pl_module: L.LightningModule, tr: L.Trainer) -> str:
    """Hash of everything training depends on: weights and buffers, optimizer state, RNGs, train/eval modes."""
    h = hashlib.sha256()
    for k, v in sorted(pl_module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    for opt in tr.optimizers:
        for pid, st in sorted(opt.state_dict()["state"].items()):
            for k, v in sorted(st.items()):
                h.update(f"{pid}{k}".encode() + (v.cpu().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode()))
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(repr(np.random.get_state()[1].tolist()).encode() + repr(random.getstate()).encode())
    h.update(repr([m.training for m in pl_module.modules()]).encode())
    return h.hexdigest()


def test_callbacks_leave_weights_optimizer_rng_and_modes_unchanged(tmp_path: Path, fmnist: Path) -> None:
    callbacks = all_callbacks()
    checks: list[tuple[str, str, str]] = []
    for cb in callbacks:
        original = cb._run

        def probe(tr: L.Trainer, pl: L.LightningModule, completed: int, cb: Any = cb, original: Any = original) -> None:
            before = digest(pl, tr)
            original(tr, pl, completed)
            checks.append((type(cb).__name__, before, digest(pl, tr)))

        cb._run = probe  # type: ignore[method-assign]
    L.seed_everything(0)
    with_cbs = PairModule(TINY_VGG, OptimConfig(lr=0.05))
    tr = trainer(tmp_path, callbacks)
    tr.fit(with_cbs, tiny_data())
    assert {c[0] for c in checks} == {type(cb).__name__ for cb in callbacks}
    for name, before, after in checks:
        assert before == after, f"{name} changed the training state"
    assert all(cb.seconds for cb in callbacks)

    L.seed_everything(0)
    without = PairModule(TINY_VGG, OptimConfig(lr=0.05))
    tr2 = trainer(tmp_path, [])
    tr2.fit(without, tiny_data())
    assert digest(with_cbs, tr) == digest(without, tr2)  # the same run with and without the callbacks


# ------------------------------------------------------------------------------------------------------------
# misconfiguration fails early


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MergeCallback(matchings=["wieght"]), "unknown matching method 'wieght'"),
        (lambda: MergeCallback(normalizations=["repiar"]), "unknown normalization ['repiar']"),
        (lambda: MergeCallback(alpha=1.5), "alpha must lie in [0, 1]"),
        (lambda: MergeCallback(matchings=["zip"], matching_options={"zip": {"alpah": 0.3}}), "no option 'alpah'"),
        (lambda: MergeCallback(matchings=["cca"], matching_options={"cca": {"gamma": "big"}}), "option 'gamma'"),
        (lambda: MergeCallback(matchings=["weight"], matching_options={"zip": {"a": 0.3}}), "not in matchings"),
        (lambda: MergeCallback(matchings=["activation"], matching_options={"activation": {"precision": "float16"}}),
         "option 'precision'"),
        (lambda: MergeCallback(every_n_epochs=0), "every_n_epochs must be ≥ 1"),
        (lambda: InterpolationCallback(matchings=["zip"]), "no interpolation path"),
        (lambda: InterpolationCallback(alphas=[0.2, 0.5]), "alphas must include 0 and 1"),
        (lambda: InterpolationCallback(lmc_freq=0.0), "lmc_freq must lie in (0, 1]"),
        (lambda: VarianceCollapseCallback(normalizations=["nope"]), "unknown normalization ['nope']"),
        (lambda: PFMCallback(preserve=[-2]), "preserve takes numbers of preserved layers"),
        (lambda: PruneCallback(pruner="random"), "unknown pruner ['random']"),
        (lambda: PruneCallback(sparsities=[1.5]), "sparsities must lie in [0, 1)"),
    ],
)
def test_misconfigured_callback_fails_at_construction_naming_the_problem(make: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_callback_on_the_wrong_module_fails_before_training(tmp_path: Path, fmnist: Path) -> None:
    tr = trainer(tmp_path, [MergeCallback(**SMALL)])
    with pytest.raises(TypeError, match="needs at least 2 networks"):
        tr.fit(ClassifierModule(TINY_VGG), tiny_data())
    assert tr.global_step == 0
    tr = trainer(tmp_path, [MergeCallback(normalizations=["bias_calibration"], **SMALL)])
    with pytest.raises(ValueError, match="bias_calibration is defined for networks without normalization"):
        tr.fit(PairModule(TINY_VGG), tiny_data())
    assert tr.global_step == 0
