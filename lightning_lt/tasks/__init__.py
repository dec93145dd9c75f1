"""Task modules: one LightningModule per task family."""

from lightning_lt.tasks.classification import LongTailClassifier

__all__ = ["LongTailClassifier"]
