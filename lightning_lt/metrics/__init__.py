"""Metrics for long-tailed learning (torchmetrics ``Metric``s, DDP-synced)."""

from lightning_lt.metrics.accuracy import LongTailAccuracy, PerClassAccuracy
from lightning_lt.metrics.groups import SHOT_NAMES, describe_group, shot_groups, validate_class_counts

__all__ = [
    "SHOT_NAMES",
    "LongTailAccuracy",
    "PerClassAccuracy",
    "describe_group",
    "shot_groups",
    "validate_class_counts",
]
