"""Task modules: one LightningModule per task family."""

from lightning_lt.tasks.classification import LongTailClassifier
from lightning_lt.tasks.decoupling import DecoupledClassifier
from lightning_lt.tasks.detection import DetectionModule
from lightning_lt.tasks.experts import MultiExpertClassifier
from lightning_lt.tasks.multilabel_ood import MultiLabelOODModule
from lightning_lt.tasks.segmentation import SegmentationModule

__all__ = [
    "DecoupledClassifier",
    "DetectionModule",
    "LongTailClassifier",
    "MultiExpertClassifier",
    "MultiLabelOODModule",
    "SegmentationModule",
]
