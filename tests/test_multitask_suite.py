"""The offline multi-domain task suite (vf_lightning.data.tasksuite): transforms, splits, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vf_lightning.data import DigitsDataModule, DomainTaskDataModule, TaskSuiteDataModule
from vf_lightning.data.tasksuite import BatchedView, input_transform, resize_images


def _rows(ds) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_transforms_are_fixed_bijections_or_maps_and_differ_from_identity() -> None:
    x = _images()
    perm = input_transform("permute", seed=3)
    assert torch.equal(perm(x), input_transform("permute", seed=3)(x))  # fixed by the seed
    assert not torch.equal(perm(x), input_transform("permute", seed=4)(x))
    assert torch.equal(perm(x).flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # a pixel permutation
    assert torch.equal(input_transform("invert")(input_transform("invert")(x)), x)
    rot = input_transform("rotate")
    assert torch.equal(rot(rot(rot(rot(x)))), x) and not torch.equal(rot(x), x)
    contrast = input_transform("contrast", seed=1)
    y = contrast(x)
    assert y.dtype == torch.uint8 and torch.equal(y, input_transform("contrast", seed=1)(x))
    assert not torch.equal(y, x) and not torch.equal(y, input_transform("contrast", seed=2)(x))
    levels = contrast(torch.arange(256, dtype=torch.uint8).view(1, 16, 16)).flatten().int()
    assert bool((levels.diff() < 0).any()) and bool((levels.diff() > 0).any())  # non-monotone: it folds levels
    assert torch.equal(input_transform("none")(x), x)
    with pytest.raises(ValueError, match="unknown input transform 'blur'"):
        input_transform("blur")


def test_digits_keep_their_split_and_are_resized_to_28_pixels() -> None:
    dm = DomainTaskDataModule(source="digits", val_samples=100)
    small = DigitsDataModule(num_workers=0)
    for train in (True, False):
        x, y = dm.load_split(train)
        x8, y8 = small.load_split(train)
        assert x.shape == (len(x8), 1, 28, 28) and x.dtype == torch.uint8 and torch.equal(y, y8)
        assert int(x.max()) == 255 and set(y.tolist()) == set(range(10))
    assert len(dm.load_split(True)[1]) + len(dm.load_split(False)[1]) == 1797
    img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    img[0, :4] = 255  # top half bright: stays the top half after resizing
    big = resize_images(img, 28)
    assert big.shape == (1, 28, 28) and int(big[0, :12].min()) == 255 and int(big[0, 16:].max()) == 0


def test_domain_task_data_module_is_deterministic_with_disjoint_splits() -> None:
    def make(split_seed: int = 0, seed: int = 0) -> DomainTaskDataModule:
        dm = DomainTaskDataModule(source="digits", transform="permute", transform_seed=5, classes=[3, 1, 7],
                                  val_samples=40, calib_samples=30, split_seed=split_seed, seed=seed)  # fmt: skip
        dm.setup("fit")
        return dm

    a, b = make(), make()
    for split in ("train_set", "val_set", "calib_set", "test_set"):
        torch.testing.assert_close(_rows(getattr(a, split)), _rows(getattr(b, split)), rtol=0, atol=0)
    assert len(a.val_set) == 40 and len(a.calib_set) == 30  # type: ignore[arg-type]
    assert set(a.val_set.index.tolist()).isdisjoint(a.train_set.index.tolist())  # type: ignore[union-attr]
    assert set(a.calib_set.index.tolist()) <= set(a.train_set.index.tolist())  # type: ignore[union-attr]
    labels = torch.tensor([a.test_set[i][1] for i in range(len(a.test_set))])  # type: ignore[arg-type, index]
    assert set(labels.tolist()) == {0, 1, 2}  # classes [3, 1, 7] relabelled 0..2
    assert a.out_classes == 3
    assert not torch.equal(_rows(make(split_seed=1).val_set), _rows(a.val_set))  # split_seed picks the hold-out
    assert torch.equal(_rows(make(seed=1).val_set), _rows(a.val_set))  # the training seed does not
    x, y = next(iter(a.test_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.long


def test_fashion_mnist_task_applies_its_transform(fmnist: Path) -> None:
    kw = {"data_dir": str(fmnist), "classes": [0, 1], "val_samples": 10, "calib_samples": 10, "test_subset": 50}
    plain = DomainTaskDataModule(**kw)  # type: ignore[arg-type]
    inv = DomainTaskDataModule(transform="invert", **kw)  # type: ignore[arg-type]
    plain.setup()
    inv.setup()
    torch.testing.assert_close(_rows(inv.test_set), -_rows(plain.test_set))  # (255 − v) normalized at 0.5 / 0.5
    assert len(inv.test_set) == 50 and len(inv.train_set) == 12000 - 10  # type: ignore[arg-type]


def test_domain_task_data_module_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown source 'svhn'"):
        DomainTaskDataModule(source="svhn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown input transform"):
        DomainTaskDataModule(transform="blur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_samples must be ≥ 1"):
        DomainTaskDataModule(val_samples=0)
    dm = DomainTaskDataModule(source="digits", classes=[0], val_samples=500)
    with pytest.raises(ValueError, match="leaves no training data"):
        dm.setup()


def test_task_suite_gives_each_task_its_data_module() -> None:
    suite = TaskSuiteDataModule({"p": {"transform": "permute", "classes": [0, 1]},
                                 "r": {"transform": "rotate", "classes": [2, 3, 4]}},
                                defaults={"source": "digits", "val_samples": 20, "calib_samples": 16})  # fmt: skip
    assert suite.task_names == ["p", "r"]
    p, r = suite.task_datamodule("p", [0, 1]), suite.task_datamodule("r")
    assert (p.transform, p.classes, p.val_samples) == ("permute", [0, 1], 20) and r.out_classes == 3
    assert suite.task_datamodule("p") is p
    with pytest.raises(KeyError, match="'q' is not in the suite's tasks"):
        suite.task_datamodule("q")
    with pytest.raises(ValueError, match=r"classes \[1, 0\] differ"):
        suite.task_datamodule("p", [1, 0])
    with pytest.raises(ValueError, match="task 'p'.*colour"):
        TaskSuiteDataModule({"p": {"colour": 1}})
    with pytest.raises(ValueError, match="`tasks` is empty"):
        TaskSuiteDataModule({})


def test_training_batches_are_read_whole_and_equal_the_per_sample_values() -> None:
    dm = DomainTaskDataModule(source="digits", transform="contrast", classes=[0, 1], val_samples=20,
                              epoch_samples=96, batch_size=32)  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(x.shape == (32, 1, 28, 28) for x, _ in batches)  # epoch_samples / batch_size
    view = BatchedView(dm.train_set)  # type: ignore[arg-type]
    x, y = view.__getitems__([3, 0, 7])
    torch.testing.assert_close(x, torch.stack([dm.train_set[i][0] for i in (3, 0, 7)]))  # type: ignore[index]
    assert y.tolist() == [int(dm.train_set[i][1]) for i in (3, 0, 7)]  # type: ignore[index]
    with pytest.raises(ValueError, match="augmentation-free"):
        BatchedView(DomainTaskDataModule(source="digits", augment=True, val_samples=20)._dataset(True, True))
