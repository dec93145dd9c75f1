"""Softmax focal loss (Lin et al., 2017) for multi-class classification."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lightning_lt.losses.base import (
    LongTailLoss,
    Reduction,
    check_class_vector,
    check_logits_target,
    check_non_negative,
    check_positive,
    check_reduction,
    weighted_reduce,
)


def _check_focal_args(gamma: float, alpha: Optional[float], owner: str) -> None:
    check_non_negative(gamma, "gamma", owner)
    if alpha is not None:
        check_positive(alpha, "alpha", owner)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Softmax focal loss ``-alpha (1 - p_t)^gamma log p_t`` with ``p_t = softmax(logits)_{y}``.

    ``gamma = 0`` and ``alpha = None`` (i.e. 1) give the cross-entropy. Per-sample losses are reduced
    by :func:`~lightning_lt.losses.base.weighted_reduce` (``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``).

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        gamma: focusing parameter ``>= 0``.
        alpha: constant scale ``> 0`` (``None`` means 1).
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: on bad shapes, ``gamma < 0``, ``alpha <= 0`` or an unknown ``reduction``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> print(f"{focal_loss(logits, torch.tensor([0, 1]), gamma=2.0).item():.4f}")
        0.0122
    """
    check_reduction(reduction)
    _check_focal_args(gamma, alpha, "focal_loss")
    check_logits_target(logits, target, owner="focal_loss")
    check_class_vector(weight, logits.shape[1], "weight", "focal_loss")
    target = target.long()
    log_pt = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -log_pt
    if gamma != 0:
        # 1 - p_t via expm1 is exact near p_t = 1; the clamp keeps the gradient finite for gamma < 1.
        one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
        loss = one_minus_pt.pow(gamma) * loss
    if alpha is not None:
        loss = alpha * loss
    return weighted_reduce(loss, target, weight, reduction)


class FocalLoss(LongTailLoss):
    """Softmax focal loss ``-alpha (1 - p_t)^gamma log p_t`` (``alpha = None`` means 1).

    Down-weights well-classified samples; reduced as ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` with the
    per-class weights of :meth:`set_class_weights`. See :func:`focal_loss`.

    Args:
        class_counts: optional training samples per class (only checks the number of classes).
        gamma: focusing parameter ``>= 0`` (``0`` gives cross-entropy).
        alpha: constant scale ``> 0`` or ``None``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``gamma < 0``, ``alpha <= 0``, ``reduction`` is unknown or a class count is ``<= 0``.

    Example:
        >>> loss = FocalLoss(gamma=2.0, alpha=0.25)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> print(f"{loss(logits, torch.tensor([0, 1])).item():.5f}")
        0.00306
    """

    def __init__(
        self,
        class_counts: Optional[Sequence[int]] = None,
        gamma: float = 2.0,
        alpha: Optional[float] = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(class_counts, reduction)
        _check_focal_args(gamma, alpha, type(self).__name__)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, self.gamma, self.alpha, self.weight, self.reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, alpha={self.alpha}"
