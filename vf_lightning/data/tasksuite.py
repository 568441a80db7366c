"""An offline multi-domain task suite for non-local multi-task merging (issue 12, nonlocal-spec §1.3, §6).

The paper merges experts of 8 different datasets (colorectal histology, CIFAR-10, EuroSAT, pets, RESISC45,
CIFAR-100, cassava, SVHN). None of them is on disk here and nothing may be downloaded, so this suite is a
stand-in built from data that is: Fashion-MNIST class groups, each seen through its own fixed input
transformation, and scikit-learn's 8×8 digits resized to 28×28. What the paper's datasets have and a plain
class split of one dataset lacks is that the tasks are different *input domains*: a body fine-tuned on one of
them has to move far from its foundation, and the per-task activation statistics differ from task to task.
The transformations give exactly that, deterministically and offline:

* ``permute``: a fixed random permutation of the pixels (as in permuted-MNIST benchmarks); it destroys the
  spatial structure a conv foundation relies on, so the expert must re-learn its early layers;
* ``invert``: intensity inversion ``255 − x`` (dark garments on a bright background);
* ``rotate``: rotation by 90° (``rot90``, exact);
* ``contrast``: a fixed random non-monotone intensity map ``v ↦ 255·|sin(π·f·v/255 + φ)|``, with ``f`` and ``φ``
  drawn from the transform seed (it folds the grey levels, so edges move and polarity flips within an image);
* ``none``: the images as they are.

:class:`DomainTaskDataModule` is one task (a source, a transformation, a class group, its own head): train /
validation (held out of the training split, chooses λ) / calibration (a fixed augmentation-free subset of the
training data, for statistics) / test (the source's test split). :class:`TaskSuiteDataModule` groups named
tasks for ``vf merge``: :meth:`TaskSuiteDataModule.task_datamodule` gives each expert's task its data module.
Everything is a pure function of the arguments (seeded permutations, no randomness at read time unless
``augment``), so two instances with the same arguments yield identical tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from vf_lightning.data.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    VisionDataModule,
    check_sizes,
)
from vf_lightning.data.datasets import TensorImageDataset

Source = Literal["fashion_mnist", "digits", "cifar10", "cifar100"]
Transform = Literal["none", "permute", "invert", "rotate", "contrast"]
UInt8Map = Callable[[torch.Tensor], torch.Tensor]


def input_transform(name: str, seed: int = 0, size: int = 28) -> UInt8Map:
    """The fixed transformation ``name`` of uint8 images ``N×H×W`` or ``N×C×H×W`` (``size``×``size``; the
    pixel permutation is shared by the channels), reproducible from ``seed``."""
    if name not in get_args(Transform):
        raise ValueError(f"unknown input transform {name!r}; choose from {', '.join(get_args(Transform))}")
    g = torch.Generator().manual_seed(seed)
    if name == "permute":
        perm = torch.randperm(size * size, generator=g)
        return lambda x: x.reshape(*x.shape[:-2], -1)[..., perm].reshape(x.shape)
    if name == "invert":
        return lambda x: 255 - x
    if name == "rotate":
        return lambda x: torch.rot90(x, 1, dims=(-2, -1)).contiguous()
    if name == "contrast":
        f, phase = 1.5 + torch.rand((), generator=g).item(), math.pi * torch.rand((), generator=g).item()
        levels = torch.arange(256, dtype=torch.float64)
        lut = (255.0 * (math.pi * f * levels / 255.0 + phase).sin().abs()).round().to(torch.uint8)
        return lambda x: lut[x.long()]
    return lambda x: x


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images ``N×H×W`` resized to ``N×size×size`` (bilinear), e.g. the 8×8 digits to 28×28."""
    x = F.interpolate(images.float().unsqueeze(1) / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    return (x.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8)


class BatchedView(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An augmentation-free :class:`TensorImageDataset` read a batch at a time (``__getitems__``: one indexing
    and one normalization per batch instead of per sample); same samples and values as the dataset."""

    def __init__(self, dataset: TensorImageDataset) -> None:
        if dataset.crop_padding or dataset.flip or dataset.pad_to is not None:
            raise ValueError("BatchedView reads augmentation-free, unpadded datasets only")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[i]

    def __getitems__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.dataset
        rows = ds.index[torch.as_tensor(index, dtype=torch.long)]
        return (ds.images[rows].float().div_(255.0) - ds.mean) / ds.std, ds.labels[rows]


def _whole_batch(batch: Any) -> Any:
    """The collate function of :class:`BatchedView` batches: they are already whole."""
    return batch


class DomainTaskDataModule(VisionDataModule):
    """One task of the multi-domain suite: a class group of ``source`` under the fixed input ``transform``.

    Splits: ``train`` (the source's training split minus the validation hold-out), ``val`` (``val_samples``
    held out of the training split, fixed by ``split_seed``; chooses λ in the merge), ``calib`` (``calib_samples`` of
    the training split, no augmentation), ``test`` (the source's test split; ``test_subset`` keeps the first N
    of a fixed shuffle). Labels of ``classes`` are relabelled 0..k-1. The digits (1,797 images) keep the 80 / 20
    train / test split of :class:`~vf_lightning.data.DigitsDataModule`, resized from 8×8 to 28×28.

    Args:
        source: ``fashion_mnist`` (from disk, see :class:`FashionMNISTDataModule`), ``digits`` (scikit-learn; both
            1×28×28) or, for GPU-sized suites, ``cifar10`` / ``cifar100`` (3×32×32, from disk).
        transform / transform_seed: the task's fixed input transformation (see :func:`input_transform`).
        val_samples: size of the validation hold-out; test_subset: cap on the test split (None = all).
        epoch_samples: training samples per epoch (drawn as repeated shuffles; None = the training split once),
            so that tasks of different sizes (30k images vs the digits' 1.4k) train for the same number of steps.
        split_seed: fixes the validation / calibration / test subsets (keep it equal for an expert's fit and its
            merge, so that λ is chosen on data the expert did not train on).
        Other arguments as :class:`VisionDataModule` (``augment`` defaults to off; ``seed`` only picks
        ``train_subset``).
    """

    name = "domain_task"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    default_augment = False

    def __init__(
        self,
        source: Source = "fashion_mnist",
        transform: Transform = "none",
        transform_seed: int = 0,
        classes: list[int] | None = None,
        val_samples: int = 1000,
        test_subset: int | None = None,
        epoch_samples: int | None = None,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        augment: bool | None = None,
        train_subset: int | None = None,
        calib_samples: int = 1000,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        if source not in get_args(Source):
            raise ValueError(f"DomainTaskDataModule: unknown source {source!r}; choose from "
                             f"{', '.join(get_args(Source))}")  # fmt: skip
        input_transform(transform)  # fails early on an unknown name
        check_sizes(type(self).__name__, num_workers, val_samples=val_samples, test_subset=test_subset,
                    epoch_samples=epoch_samples)
        super().__init__(data_dir=data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment=augment, train_subset=train_subset,
                         calib_samples=calib_samples, classes=classes, seed=seed)  # fmt: skip
        self.save_hyperparameters()
        self.source = source
        self.transform = transform
        self.transform_seed = transform_seed
        self.val_samples = val_samples
        self.test_subset = test_subset
        self.epoch_samples = epoch_samples
        self.split_seed = split_seed
        self.test_set: Dataset[Any] | None = None
        self.num_classes = 100 if source == "cifar100" else 10
        self.channels, self.size = (3, 32) if source.startswith("cifar") else (1, 28)
        self.mean = (0.5,) * self.channels
        self.std = (0.5,) * self.channels

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``N×C×H×W`` images of the split after the task's transformation, and their labels."""
        if self.source == "digits":
            images, labels = DigitsDataModule(num_workers=0).load_split(train)
            images = resize_images(images, self.size)
        else:
            sources: dict[str, type[VisionDataModule]] = {"fashion_mnist": FashionMNISTDataModule,
                                                          "cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule}
            images, labels = sources[self.source](data_dir=self.data_dir, num_workers=0).load_split(train)
        images = images.reshape(-1, self.channels, self.size, self.size)
        images = input_transform(self.transform, self.transform_seed, self.size)(images)
        return images.contiguous(), labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None and self.test_set is not None:
            return
        full = self._dataset(True, self.augment)
        g = torch.Generator().manual_seed(self.split_seed * 1000 + 5)
        order = torch.randperm(len(full), generator=g)
        if self.val_samples >= len(full):
            raise ValueError(f"DomainTaskDataModule: val_samples={self.val_samples} leaves no training data "
                             f"({len(full)} samples in classes {self.classes} of {self.source})")  # fmt: skip
        self.val_set = full.subset(order[: self.val_samples], augment=False)
        train_idx = order[self.val_samples :]
        if self.train_subset is not None:
            pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.seed * 1000 + 1))
            train_idx = train_idx[pick[: self.train_subset]]
        self.train_set = full.subset(train_idx)
        g = torch.Generator().manual_seed(self.split_seed * 1000 + 2)
        calib_order = torch.randperm(len(train_idx), generator=g)
        self.calib_set = full.subset(train_idx[calib_order[: self.calib_samples]], augment=False)
        test = self._dataset(False, False)
        if self.test_subset is not None and self.test_subset < len(test):
            keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.split_seed * 1000 + 3))
            test = test.subset(keep[: self.test_subset])
        self.test_set = test

    def augmentation(self) -> tuple[int, bool]:
        """Random crops (padding 2) only: a flip would change what ``rotate`` means."""
        return 2, False

    def train_dataloader(self) -> Any:
        """Shuffled training batches (``epoch_samples`` per epoch when set); without augmentation each batch is
        read in one indexing operation (:class:`BatchedView`)."""
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        assert isinstance(ds, TensorImageDataset)
        sampler = RandomSampler(ds, num_samples=self.epoch_samples)
        batched = not self.augment
        return DataLoader(BatchedView(ds) if batched else ds, batch_size=self.batch_size, sampler=sampler,
                          drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=_whole_batch if batched else None,
                          pin_memory=torch.cuda.is_available())  # fmt: skip

    def test_dataloader(self) -> DataLoader[Any]:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)


class TaskSuiteDataModule(VisionDataModule):
    """Named tasks of the multi-domain suite for ``vf merge`` (``TaskMergeCallback``).

    ``tasks`` maps each task name (the experts' ``task``) to the arguments of its :class:`DomainTaskDataModule`
    (``source``, ``transform``, ``transform_seed``, ``classes``, ...); ``defaults`` are shared by every task
    (``data_dir``, ``calib_samples``, ``eval_batch_size``, ``val_samples``, ``test_subset``, ``split_seed``, ...).
    It is not a data set of its own: its validation and calibration loaders are those of its first task (a
    ``vf merge`` validation run needs one) and it has no training loader; :meth:`task_datamodule` gives a task's
    data module.
    """

    def __init__(self, tasks: dict[str, dict[str, Any]], defaults: dict[str, Any] | None = None) -> None:
        super().__init__(num_workers=0)
        if not tasks:
            raise ValueError("TaskSuiteDataModule: `tasks` is empty; map task names to DomainTaskDataModule "
                             "arguments (source, transform, classes, ...)")  # fmt: skip
        self.save_hyperparameters()
        self.task_args = {name: {**dict(defaults or {}), **dict(args)} for name, args in tasks.items()}
        self._modules: dict[str, DomainTaskDataModule] = {}
        for name in self.task_args:  # construct (and check) every task now, before any data is read
            self._modules[name] = self._build(name)

    def _build(self, name: str) -> DomainTaskDataModule:
        try:
            return DomainTaskDataModule(**self.task_args[name])
        except TypeError as e:
            raise ValueError(f"TaskSuiteDataModule: task {name!r}: {e}") from None

    @property
    def task_names(self) -> list[str]:
        return list(self.task_args)

    def task_datamodule(self, name: str, classes: list[int] | None = None) -> DomainTaskDataModule:
        """The data module of task ``name``; ``classes`` (the expert's) must match the task's when both are set."""
        if name not in self._modules:
            raise KeyError(f"task {name!r} is not in the suite's tasks {self.task_names}; name each expert's "
                           "`task` after a suite task")  # fmt: skip
        dm = self._modules[name]
        if classes is not None and dm.classes is not None and list(classes) != list(dm.classes):
            raise ValueError(f"task {name!r}: the expert's classes {list(classes)} differ from the suite's "
                             f"{dm.classes}")  # fmt: skip
        return dm

    @property
    def _first(self) -> DomainTaskDataModule:
        return self._modules[self.task_names[0]]

    def setup(self, stage: str | None = None) -> None:
        self._first.setup(stage)
        self.val_set, self.calib_set = self._first.val_set, self._first.calib_set

    def train_dataloader(self) -> Any:
        raise RuntimeError("TaskSuiteDataModule has no training data of its own: train each task's expert with its "
                           "DomainTaskDataModule (configs/fit/fmnist_expert.yaml)")  # fmt: skip

    def val_dataloader(self) -> DataLoader[Any]:
        return self._first.val_dataloader()

    def calibration_dataloader(self, num_samples: int | None = None, batch_size: int | None = None,
                               shard: bool = True) -> DataLoader[Any]:  # fmt: skip
        return self._first.calibration_dataloader(num_samples, batch_size, shard)

