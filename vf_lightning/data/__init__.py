"""Data modules and dataset sources."""

from vf_lightning.data.datamodules import (
    DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    PermutedView,
    VisionDataModule,
)
from vf_lightning.data.sources import DataFileError, DataNotFoundError
from vf_lightning.data.tasksuite import DomainTaskDataModule, TaskSuiteDataModule

__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataFileError",
    "DataNotFoundError",
    "DigitsDataModule",
    "DomainTaskDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "PermutedView",
    "TaskSuiteDataModule",
    "VisionDataModule",
]
