"""Losses for long-tailed classification: ``nn.Module``s whose class priors/weights are buffers.

The classification losses take ``class_counts`` as their first argument and reduce with optional per-class
weights like ``F.cross_entropy(weight=...)``; functional forms live in
:mod:`lightning_lt.losses.functional`. :class:`PixelAUCLoss` (AUCSeg) is the segmentation loss added to CE;
:mod:`lightning_lt.losses.multilabel` has the multi-label ones (asymmetric loss, outlier exposure, energy gap).
"""

from lightning_lt.losses import functional
from lightning_lt.losses.base import LongTailLoss
from lightning_lt.losses.class_balanced import ClassBalancedLoss, class_balanced_weights
from lightning_lt.losses.cross_entropy import CrossEntropyLoss
from lightning_lt.losses.experts import DirMixELoss, ExpertLoss, RIDELoss, SADELoss
from lightning_lt.losses.focal import FocalLoss
from lightning_lt.losses.label_aware_smoothing import LabelAwareSmoothingLoss
from lightning_lt.losses.ldam import LDAMLoss
from lightning_lt.losses.logit_adjusted import BalancedSoftmaxLoss, LogitAdjustedLoss
from lightning_lt.losses.mixing import MixedTarget, mixed_loss
from lightning_lt.losses.multilabel import AsymmetricLoss
from lightning_lt.losses.pixel_auc import PixelAUCLoss

__all__ = [
    "AsymmetricLoss",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "CrossEntropyLoss",
    "DirMixELoss",
    "ExpertLoss",
    "FocalLoss",
    "LDAMLoss",
    "LabelAwareSmoothingLoss",
    "LogitAdjustedLoss",
    "LongTailLoss",
    "MixedTarget",
    "PixelAUCLoss",
    "RIDELoss",
    "SADELoss",
    "class_balanced_weights",
    "functional",
    "mixed_loss",
]
