"""Metrics for long-tailed learning (torchmetrics ``Metric``s, DDP-synced)."""

from lightning_lt.metrics.accuracy import LongTailAccuracy, PerClassAccuracy
from lightning_lt.metrics.detection import FREQUENCY_GROUPS, DetectionMAP, frequency_groups
from lightning_lt.metrics.groups import SHOT_NAMES, describe_group, shot_groups, validate_class_counts
from lightning_lt.metrics.multilabel import MultilabelAP, label_tail_groups
from lightning_lt.metrics.ood import (
    FPR_CONVENTIONS,
    OOD_SCORES,
    OODDetection,
    extract_features,
    oe_dilation_distance,
    ood_scores,
    rank_oe_sets,
)
from lightning_lt.metrics.segmentation import SegmentationIoU, pixel_tail_classes, validate_tail_classes

__all__ = [
    "FPR_CONVENTIONS",
    "FREQUENCY_GROUPS",
    "OOD_SCORES",
    "SHOT_NAMES",
    "DetectionMAP",
    "LongTailAccuracy",
    "MultilabelAP",
    "OODDetection",
    "PerClassAccuracy",
    "SegmentationIoU",
    "describe_group",
    "extract_features",
    "frequency_groups",
    "label_tail_groups",
    "oe_dilation_distance",
    "ood_scores",
    "pixel_tail_classes",
    "rank_oe_sets",
    "shot_groups",
    "validate_class_counts",
    "validate_tail_classes",
]
