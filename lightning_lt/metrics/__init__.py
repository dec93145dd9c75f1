"""Metrics for long-tailed learning (torchmetrics ``Metric``s, DDP-synced)."""

from lightning_lt.metrics.accuracy import LongTailAccuracy, PerClassAccuracy
from lightning_lt.metrics.groups import SHOT_NAMES, describe_group, shot_groups, validate_class_counts
from lightning_lt.metrics.segmentation import SegmentationIoU, pixel_tail_classes, validate_tail_classes

__all__ = [
    "SHOT_NAMES",
    "LongTailAccuracy",
    "PerClassAccuracy",
    "SegmentationIoU",
    "describe_group",
    "pixel_tail_classes",
    "shot_groups",
    "validate_class_counts",
    "validate_tail_classes",
]
