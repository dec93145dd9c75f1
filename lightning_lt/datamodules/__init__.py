"""LightningDataModules for long-tailed learning, with re-sampling and the standard transforms."""

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.cifar import CIFAR10LT, CIFAR100LT
from lightning_lt.datamodules.detection import COCODetection, DetectionDataModule, DetectionDataset, VOCDetection
from lightning_lt.datamodules.digits import DigitsLT
from lightning_lt.datamodules.folder import ImageFolderLT
from lightning_lt.datamodules.list_file import ListFileDataModule
from lightning_lt.datamodules.multilabel import (
    COCOMultiLabel,
    MultiLabelDataset,
    MultiLabelOODDataModule,
    OODEvalDataset,
    OODImageFolder,
    VOCMultiLabel,
)
from lightning_lt.datamodules.profiles import imbalance_counts, long_tailed_indices
from lightning_lt.datamodules.samplers import ResampledSampler
from lightning_lt.datamodules.segmentation import ADE20K, CamVid, Cityscapes, SegmentationDataModule, SegmentationDataset
from lightning_lt.datamodules.test_distributions import (
    TestDistribution,
    dirichlet_test_distribution,
    sade_test_counts,
    sade_test_distributions,
)

__all__ = [
    "ADE20K",
    "CIFAR10LT",
    "CIFAR100LT",
    "COCODetection",
    "COCOMultiLabel",
    "CamVid",
    "Cityscapes",
    "DetectionDataModule",
    "DetectionDataset",
    "DigitsLT",
    "ImageFolderLT",
    "ListFileDataModule",
    "LongTailDataModule",
    "MultiLabelDataset",
    "MultiLabelOODDataModule",
    "OODEvalDataset",
    "OODImageFolder",
    "ResampledSampler",
    "SegmentationDataModule",
    "SegmentationDataset",
    "TestDistribution",
    "VOCDetection",
    "VOCMultiLabel",
    "dirichlet_test_distribution",
    "imbalance_counts",
    "long_tailed_indices",
    "sade_test_counts",
    "sade_test_distributions",
]
