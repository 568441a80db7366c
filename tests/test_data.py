"""Data modules: offline Fashion-MNIST, clear errors when data is missing, pair streams, calibration subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vf_lightning.data import DataNotFoundError, FashionMNISTDataModule, sources


def test_fashion_mnist_loads_a_subset_offline(fmnist: Path) -> None:
    dm = FashionMNISTDataModule(num_workers=0, train_subset=512, val_subset=256, batch_size=64, pad_to_32=True)
    dm.setup("fit")
    assert len(dm.train_set) == 512 and len(dm.val_set) == 256
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and y.dtype == torch.long
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    # normalized: the full training images have roughly zero mean / unit std in the unpadded region
    xs = torch.stack([dm.val_set[i][0] for i in range(256)])[..., 2:30, 2:30]
    assert abs(xs.mean().item()) < 0.15 and 0.8 < xs.std().item() < 1.2


def test_missing_data_error_names_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [str(tmp_path / "system")])
    monkeypatch.delenv("VF_DATA_DIR", raising=False)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "mine"), num_workers=0)
    with pytest.raises(DataNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "system") in msg
    assert "dataset-fashion-mnist" in msg


def test_vf_data_dir_is_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmnist: Path) -> None:
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [])
    target = tmp_path / "fashion-mnist"
    target.mkdir()
    for f in fmnist.glob("t10k-*"):
        (target / f.name).symlink_to(f)
    for f in fmnist.glob("train-*"):
        (target / f.name).symlink_to(f)
    monkeypatch.setenv("VF_DATA_DIR", str(tmp_path))
    dm = FashionMNISTDataModule(num_workers=0, val_subset=10, train_subset=10)
    dm.setup("fit")
    assert len(dm.val_set) == 10


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        sources.read_idx(bad)


def _idx(path: Path, values: list[int]) -> None:
    path.write_bytes(b"\x00\x00\x08\x01" + len(values).to_bytes(4, "big") + bytes(values))


def test_an_idx_file_is_decoded_once_per_process_into_independent_copies_and_reread_when_replaced(
    tmp_path: Path,
) -> None:
    f = tmp_path / "train-labels-idx1-ubyte"
    _idx(f, [1, 2, 3])
    first = sources.read_idx(f)
    first[0] = 9  # a caller's change stays in its own copy
    hits = sources._decoded_idx.cache_info().hits
    again = sources.read_idx(f)
    assert again.tolist() == [1, 2, 3] and sources._decoded_idx.cache_info().hits == hits + 1
    _idx(f, [4, 5, 6, 7])  # replaced (another size): read again
    assert sources.read_idx(f).tolist() == [4, 5, 6, 7]
    f.unlink()
    with pytest.raises(ValueError, match="damaged"):  # gone: the data error naming it, not a stale copy
        sources.read_idx(f)


def test_class_selection_relabels(fmnist: Path) -> None:
    dm = FashionMNISTDataModule(num_workers=0, classes=[7, 3], val_subset=200)
    dm.setup("fit")
    labels = torch.tensor([dm.val_set[i][1] for i in range(len(dm.val_set))])
    assert set(labels.tolist()) == {0, 1}
    assert dm.out_classes == 2


def test_pair_streams_give_two_different_orders_and_a_fixed_calibration_set(fmnist: Path) -> None:
    dm = FashionMNISTDataModule(num_workers=0, train_subset=256, batch_size=32, calib_samples=100)
    dm.setup("fit")
    dm.pair_streams = True
    loaders = dm.train_dataloader()
    xa, _ = next(iter(loaders["a"]))
    xb, _ = next(iter(loaders["b"]))
    assert not torch.equal(xa, xb)
    c1 = torch.cat([b[0] for b in dm.calibration_dataloader(64, batch_size=16)])
    c2 = torch.cat([b[0] for b in dm.calibration_dataloader(64, batch_size=64)])
    assert c1.shape[0] == 64 and torch.equal(c1, c2)


def test_a_loader_batch_is_fetched_at_once_and_equals_per_sample_access() -> None:
    """``__getitems__`` (what the DataLoader calls) gives the per-sample values, padded; augmentation keeps shapes
    and crops within the padding."""
    from vf_lightning.data.datasets import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(20) % 10, [0.5], [0.25], pad_to=32)
    batch = ds.__getitems__([3, 7, 0])
    for (x, y), i in zip(batch, [3, 7, 0]):
        xi, yi = ds[i]
        assert torch.equal(x, xi) and int(y) == int(yi) == i % 10
        assert x.shape == (1, 32, 32) and torch.equal(x[:, 2:30, 2:30], (images[i].float() / 255 - 0.5) / 0.25)
    aug = TensorImageDataset(images, torch.arange(20), [0.5], [0.25], crop_padding=4, flip=True)
    xs = torch.stack([x for x, _ in aug.__getitems__(list(range(20)))])
    assert xs.shape == (20, 1, 28, 28)
    plain = torch.stack([x for x, _ in ds.subset(torch.arange(20)).__getitems__(list(range(20)))])
    assert not torch.equal(xs, plain[..., 2:30, 2:30])
