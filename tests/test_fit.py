"""Training: a one-epoch pair fit on real Fashion-MNIST data, checkpoints, export and reload."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from vf_lightning.checkpoint import CheckpointError, load_model_checkpoint, load_networks, load_pair
from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.evaluate import evaluate
from vf_lightning.lit import ClassifierModule, OptimConfig, PairModule, ScheduleConfig
from vf_lightning.models import ModelConfig

NET = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1)


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[PairModule, FashionMNISTDataModule, Path]:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: run `make data`")
    out = tmp_path_factory.mktemp("pair")
    L.seed_everything(0)
    dm = FashionMNISTDataModule(num_workers=0, train_subset=2048, val_subset=1000, batch_size=64, pad_to_32=True)
    module = PairModule(
        NET, OptimConfig(lr=0.05), ScheduleConfig(kind="warmup_cosine", warmup_iters=10), export_dir=str(out / "export")
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(out),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    trainer.save_checkpoint(out / "pair.ckpt")
    return module, dm, out


def test_pair_networks_start_from_different_initializations() -> None:
    m = PairModule(NET)
    assert not torch.equal(m.net_a.features[0].weight, m.net_b.features[0].weight)
    again = PairModule(NET)
    assert torch.equal(m.net_a.features[0].weight, again.net_a.features[0].weight)
    with pytest.raises(ValueError, match="different seeds"):
        PairModule(NET, seed_a=3, seed_b=3)


def test_one_epoch_pair_fit_beats_chance_for_both_networks(trained_pair) -> None:  # type: ignore[no-untyped-def]
    module, dm, _ = trained_pair
    metrics = module.trainer.callback_metrics
    assert metrics["val/acc_a"] > 0.5 and metrics["val/acc_b"] > 0.5  # chance is 0.1
    for key in ("train/loss_a", "train/loss_b", "val/acc5_a", "val/loss_b"):
        assert key in metrics
    assert not torch.equal(module.net_a.features[0].weight, module.net_b.features[0].weight)


def test_exported_networks_reload_as_standalone_checkpoints(trained_pair) -> None:  # type: ignore[no-untyped-def]
    module, dm, out = trained_pair
    net_a, cfg = load_model_checkpoint(out / "export" / "net_a.pt")
    assert cfg == NET
    x = next(iter(dm.val_dataloader()))[0][:8]
    module.net_a.eval()
    assert torch.allclose(net_a(x), module.net_a(x), atol=1e-6)
    acc = evaluate(net_a, dm.val_dataloader())["acc"]
    assert acc == pytest.approx(float(module.trainer.callback_metrics["val/acc_a"]), abs=1e-6)


def test_pair_checkpoint_holds_both_networks(trained_pair) -> None:  # type: ignore[no-untyped-def]
    module, _, out = trained_pair
    a, b, cfg = load_pair(out / "pair.ckpt")
    assert cfg == NET
    assert torch.equal(b.state_dict()["classifier.weight"], module.net_b.classifier.weight.detach())
    models, _ = load_networks([str(out / "pair.ckpt")])
    assert len(models) == 2


def test_wrong_or_missing_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vf-lightning model checkpoint"):
        load_model_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a PairModule checkpoint"):
        load_pair(tmp_path / "other.pt")


def test_classifier_module_trains_a_single_network(fmnist: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(num_workers=0, train_subset=1024, val_subset=500, batch_size=64)
    mlp = ModelConfig(arch="mlp", in_channels=1, image_size=28, hidden=(64,))
    module = ClassifierModule(mlp, OptimConfig(lr=0.05), seed=0)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, dm)
    assert trainer.callback_metrics["val/acc"] > 0.5
    path = module.export_network(tmp_path / "net.pt")
    assert load_model_checkpoint(path)[1] == mlp
