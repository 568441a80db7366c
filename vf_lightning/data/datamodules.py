"""LightningDataModules for the datasets of the papers, with a fixed calibration subset for statistics passes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vf_lightning.data.datasets import TensorImageDataset, select_classes
from vf_lightning.data.sources import DataFileError, DataNotFoundError, candidate_dirs, find_idx_split, read_idx


class PermutedView(Dataset[Any]):
    """``dataset`` read through a fixed random permutation: gives a second, independent data order.

    Used for the second network of a pair, so that even under a shared (distributed) sampler both
    networks see a different sequence of samples.
    """

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(dataset), generator=g)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.perm)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.perm[i])]

    def __getitems__(self, indices: list[int]) -> Any:
        mapped = self.perm[torch.as_tensor(indices, dtype=torch.long)].tolist()
        many = getattr(self.dataset, "__getitems__", None)
        return many(mapped) if many is not None else [self.dataset[i] for i in mapped]


def check_sizes(owner: str, num_workers: int, **sizes: int | None) -> None:
    """Refuse ``num_workers`` < 0 and non-positive sizes (None = unset) at construction, in one line each."""
    if num_workers < 0:
        raise ValueError(f"{owner}: num_workers must be ≥ 0 (0 = load in the main process), got {num_workers}")
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{owner}: {name} must be ≥ 1, got {value}")


class VisionDataModule(L.LightningDataModule):
    """Common loaders: train (optionally two independent orders for a pair), val, test, calibration.

    Args:
        data_dir: where to look first (then ``$VF_DATA_DIR``, then system locations, DESIGN §6).
        batch_size / eval_batch_size: training / evaluation batch sizes (per process).
        num_workers: loader worker processes (``persistent_workers`` and ``pin_memory`` are enabled when useful).
        augment: the reference training augmentation (random crop + flip for CIFAR); None = the dataset's
            default (on for CIFAR, off for MNIST-like data); False for a clean train loader.
        pad_to_32: zero-pad smaller images (28×28) to 32×32.
        train_subset / val_subset: use only the first N samples of a fixed shuffle (quick runs, tests).
        calib_samples: size of the fixed calibration subset of the training set used for statistics passes.
        classes: keep only these classes, relabelled 0..k-1 (task splits).
        download: let torchvision download the data when it is missing (needs the network).
        seed: seed of subset selection and of the second data order.
    """

    name = "dataset"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    num_classes = 10
    default_augment = True

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 2,
        augment: bool | None = None,
        pad_to_32: bool = False,
        train_subset: int | None = None,
        val_subset: int | None = None,
        calib_samples: int = 4096,
        classes: list[int] | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_sizes(type(self).__name__, batch_size=batch_size, eval_batch_size=eval_batch_size,
                    num_workers=num_workers, train_subset=train_subset, val_subset=val_subset,
                    calib_samples=calib_samples)  # fmt: skip
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = self.default_augment if augment is None else augment
        self.pad_to_32 = pad_to_32
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.calib_samples = calib_samples
        self.classes = list(classes) if classes is not None else None
        self.download = download
        self.seed = seed
        self.pair_streams = False  # set by PairModule: two independent training orders
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.calib_set: Dataset[Any] | None = None

    # ----------------------------------------------------------------------------------------------
    @property
    def out_classes(self) -> int:
        """Number of classes the model must predict (after any class selection)."""
        return len(self.classes) if self.classes is not None else self.num_classes

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(uint8 images N×C×H×W, labels)`` for a split; subclasses implement it."""
        raise NotImplementedError

    def _dataset(self, train: bool, augment: bool) -> TensorImageDataset:
        images, labels = self.load_split(train)
        index = None
        if self.classes is not None:
            index, labels = select_classes(labels, self.classes)
        crop, flip = self.augmentation() if augment else (0, False)
        return TensorImageDataset(
            images, labels, self.mean, self.std, 32 if self.pad_to_32 else None, crop, flip, index=index
        )

    def augmentation(self) -> tuple[int, bool]:
        """(random-crop padding, horizontal flip) of the reference training augmentation."""
        return 0, False

    def _subset(self, ds: TensorImageDataset, n: int | None, salt: int) -> TensorImageDataset:
        if n is None or n >= len(ds):
            return ds
        g = torch.Generator().manual_seed(self.seed * 1000 + salt)
        return ds.subset(torch.randperm(len(ds), generator=g)[:n])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            full_train = self._dataset(True, self.augment)
            self.train_set = self._subset(full_train, self.train_subset, 1)
            g = torch.Generator().manual_seed(self.seed * 1000 + 2)
            calib_idx = torch.randperm(len(full_train), generator=g)[: self.calib_samples]
            self.calib_set = full_train.subset(calib_idx, augment=False)
        if self.val_set is None:
            self.val_set = self._subset(self._dataset(False, False), self.val_subset, 3)

    # ----------------------------------------------------------------------------------------------
    def _loader(self, ds: Dataset[Any], batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader[Any]:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> Any:
        assert self.train_set is not None, "call setup() first"
        loader = self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=True)
        if not self.pair_streams:
            return loader
        other = self._loader(PermutedView(self.train_set, self.seed + 7919), self.batch_size, True, True)
        return {"a": loader, "b": other}

    def val_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self.val_dataloader()

    def calibration_dataloader(
        self, num_samples: int | None = None, batch_size: int | None = None, shard: bool = True
    ) -> DataLoader[Any]:
        """Loader over the fixed, augmentation-free calibration subset (first ``num_samples`` of it).

        Under an initialized process group, ``shard=True`` gives each rank a disjoint slice so that
        statistics reduced across ranks equal the single-process statistics.
        """
        if self.calib_set is None:
            self.setup("fit")
        assert self.calib_set is not None
        n = len(self.calib_set) if num_samples is None else min(num_samples, len(self.calib_set))  # type: ignore[arg-type]
        idx = np.arange(n)
        if shard and dist.is_available() and dist.is_initialized():
            idx = idx[dist.get_rank() :: dist.get_world_size()]
        ds = torch.utils.data.Subset(self.calib_set, idx.tolist())
        return DataLoader(ds, batch_size=batch_size or self.eval_batch_size, shuffle=False, num_workers=0)


class _IdxDataModule(VisionDataModule):
    """MNIST-format (IDX) datasets read straight from the idx(.gz) files."""

    subdirs: list[str] = []
    tv_class: str = ""

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if train else "test"
        dirs = candidate_dirs(self.name, self.data_dir, self.subdirs, must_exist=not self.download)
        for d in dirs:
            found = find_idx_split(d, split)
            if found is not None:
                return read_idx(found[0]), read_idx(found[1])
        if self.download:
            import torchvision

            root = Path(self.data_dir or os.environ.get("VF_DATA_DIR") or "data")
            ds = getattr(torchvision.datasets, self.tv_class)(str(root), train=train, download=True)
            return ds.data.clone(), ds.targets.clone()
        raise DataNotFoundError(self.name, [str(d) for d in dirs])


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST (70k 28×28 grey images); works offline from Debian's ``dataset-fashion-mnist``."""

    name = "fashion_mnist"
    subdirs = ["fashion-mnist", "fashion_mnist", "FashionMNIST/raw"]
    tv_class = "FashionMNIST"
    mean = (0.2860,)
    std = (0.3530,)

    default_augment = False

    def augmentation(self) -> tuple[int, bool]:
        return 2, True


class MNISTDataModule(_IdxDataModule):
    """MNIST with the reference normalization (0.1307, 0.3081) and no augmentation."""

    name = "mnist"
    subdirs = ["mnist", "MNIST/raw"]
    tv_class = "MNIST"
    mean = (0.1307,)
    std = (0.3081,)

    default_augment = False


class _CifarDataModule(VisionDataModule):
    tv_class = "CIFAR10"
    folder = "cifar-10-batches-py"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)

    def augmentation(self) -> tuple[int, bool]:
        return 4, True

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision

        dirs = candidate_dirs(self.name, self.data_dir, ["cifar", "CIFAR"], must_exist=not self.download)
        cls = getattr(torchvision.datasets, self.tv_class)
        for d in dirs:
            if (d / self.folder).is_dir():
                ds = self._read_cifar(cls, d, train)
                return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        if self.download:
            root = Path(self.data_dir or os.environ.get("VF_DATA_DIR") or "data")
            ds = cls(str(root), train=train, download=True)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        raise DataNotFoundError(self.name, [str(d / self.folder) for d in dirs])

    def _read_cifar(self, cls: Any, root: Path, train: bool) -> Any:
        """torchvision's CIFAR dataset from ``root``; a damaged or missing batch file is named
        (:class:`DataFileError`), not torchvision's "Dataset not found or corrupted"."""
        from torchvision.datasets.utils import check_integrity

        for name, md5 in cls.train_list if train else cls.test_list:
            path = root / self.folder / name
            if not path.is_file():
                raise DataFileError(path, "it is missing from the dataset folder")
            if not check_integrity(str(path), md5):
                raise DataFileError(path, "its MD5 checksum does not match torchvision's")
        try:
            return cls(str(root), train=train, download=False)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise DataFileError(root / self.folder, f"{type(e).__name__}: {e}") from e


class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10 with the reference crop+flip augmentation and normalization (method-spec §1.7)."""

    name = "cifar10"


class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100 with the reference crop+flip augmentation and normalization."""

    name = "cifar100"
    tv_class = "CIFAR100"
    folder = "cifar-100-python"
    num_classes = 100


class DigitsDataModule(VisionDataModule):
    """scikit-learn's 8×8 digits (1,797 images, offline); for quick experiments."""

    name = "digits"
    mean = (0.3,)
    std = (0.38,)

    default_augment = False

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]

        d = load_digits()
        images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))
        labels = torch.from_numpy(d.target)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(labels), generator=g)
        cut = int(0.8 * len(labels))
        idx = perm[:cut] if train else perm[cut:]
        return images[idx], labels[idx]


class ImageNetDataModule(VisionDataModule):
    """ImageNet from an ImageFolder tree (``train/`` and ``val/``), 224 px, torchvision transforms."""

    name = "imagenet"
    num_classes = 1000
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def _folder(self, split: str) -> Path:
        dirs = candidate_dirs(self.name, self.data_dir, ["imagenet", "ImageNet"])
        for d in dirs:
            if (d / split).is_dir():
                return d / split
        raise DataNotFoundError(self.name, [str(d / split) for d in dirs])

    def _image_folder(self, split: str, augment: bool) -> Dataset[Any]:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        norm = T.Normalize(self.mean, self.std)
        if augment:
            tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
        return ImageFolder(str(self._folder(split)), transform=tf)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._image_folder("train", self.augment)
            clean = self._image_folder("train", False)
            g = torch.Generator().manual_seed(self.seed * 1000 + 2)
            n = min(self.calib_samples, len(clean))  # type: ignore[arg-type]
            self.calib_set = torch.utils.data.Subset(clean, torch.randperm(len(clean), generator=g)[:n].tolist())  # type: ignore[arg-type]
        if self.val_set is None:
            self.val_set = self._image_folder("val", False)


DATAMODULES: dict[str, type[VisionDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "digits": DigitsDataModule,
    "imagenet": ImageNetDataModule,
}
