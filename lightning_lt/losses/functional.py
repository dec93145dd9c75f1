"""Functional forms of every loss in :mod:`lightning_lt.losses` (the modules call these).

Example:
    >>> import torch
    >>> from lightning_lt.losses import functional as LF
    >>> logits, target = torch.tensor([[1.0, 1.0]]), torch.tensor([1])
    >>> print(f"{LF.cross_entropy(logits, target).item():.4f}")
    0.6931
"""

from lightning_lt.losses.base import weighted_reduce
from lightning_lt.losses.class_balanced import class_balanced_loss, class_balanced_weights
from lightning_lt.losses.cross_entropy import cross_entropy
from lightning_lt.losses.experts import dirichlet_meta_draws, dirmixe_loss, inverse_prior, ride_loss, sade_loss, semi_variance
from lightning_lt.losses.focal import focal_loss
from lightning_lt.losses.label_aware_smoothing import label_aware_smoothing, label_aware_smoothing_epsilons
from lightning_lt.losses.ldam import ldam_loss, ldam_margins
from lightning_lt.losses.logit_adjusted import balanced_softmax_loss, logit_adjusted_cross_entropy
from lightning_lt.losses.mixing import mixed_loss
from lightning_lt.losses.multilabel import asymmetric_loss, energy_gap_loss, joint_energy, outlier_confidence_loss
from lightning_lt.losses.pixel_auc import pixel_auc_loss

__all__ = [
    "asymmetric_loss",
    "energy_gap_loss",
    "joint_energy",
    "outlier_confidence_loss",
    "balanced_softmax_loss",
    "class_balanced_loss",
    "class_balanced_weights",
    "cross_entropy",
    "dirichlet_meta_draws",
    "dirmixe_loss",
    "inverse_prior",
    "focal_loss",
    "label_aware_smoothing",
    "label_aware_smoothing_epsilons",
    "ldam_loss",
    "ldam_margins",
    "logit_adjusted_cross_entropy",
    "mixed_loss",
    "pixel_auc_loss",
    "ride_loss",
    "sade_loss",
    "semi_variance",
    "weighted_reduce",
]
