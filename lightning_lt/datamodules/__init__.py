"""LightningDataModules for long-tailed learning, with re-sampling and the standard transforms."""

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.cifar import CIFAR10LT, CIFAR100LT
from lightning_lt.datamodules.digits import DigitsLT
from lightning_lt.datamodules.folder import ImageFolderLT
from lightning_lt.datamodules.list_file import ListFileDataModule
from lightning_lt.datamodules.profiles import imbalance_counts, long_tailed_indices
from lightning_lt.datamodules.samplers import ResampledSampler

__all__ = [
    "CIFAR10LT",
    "CIFAR100LT",
    "DigitsLT",
    "ImageFolderLT",
    "ListFileDataModule",
    "LongTailDataModule",
    "ResampledSampler",
    "imbalance_counts",
    "long_tailed_indices",
]
