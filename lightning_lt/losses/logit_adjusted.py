"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021) and Balanced Softmax (Ren et al., NeurIPS 2020)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from lightning_lt.losses.base import (
    LongTailLoss,
    Reduction,
    check_class_vector,
    check_logits_target,
    check_reduction,
    weighted_reduce,
)


def _check_tau(tau: float, owner: str) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau):
        raise ValueError(f"Expected `tau` of {owner} to be a finite number (usually 1.0), got {tau!r}.")


def logit_adjusted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    log_prior: Tensor,
    tau: float = 1.0,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Logit-adjusted cross-entropy ``CE(f + tau * log pi, y)``.

    ``pi`` is the training class prior (``log_prior = log(n_c / N)``). At test time use the raw
    logits ``f`` (equivalently, the post-hoc rule ``argmax f - tau log pi`` on a plain CE model).
    Reduced by :func:`~lightning_lt.losses.base.weighted_reduce`
    (``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``).

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        log_prior: ``[C]`` log class priors.
        tau: adjustment strength (``1`` is Fisher-consistent for the balanced error).
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: on bad shapes, a non-finite ``tau`` or an unknown ``reduction``.

    Example:
        >>> import math, torch
        >>> log_prior = torch.tensor([math.log(0.9), math.log(0.1)])
        >>> logits = torch.tensor([[1.0, 1.0]])
        >>> print(f"{logit_adjusted_cross_entropy(logits, torch.tensor([1]), log_prior).item():.4f}")
        2.3026
    """
    check_reduction(reduction)
    _check_tau(tau, "logit_adjusted_cross_entropy")
    check_logits_target(logits, target, owner="logit_adjusted_cross_entropy")
    check_class_vector(log_prior, logits.shape[1], "log_prior", "logit_adjusted_cross_entropy")
    check_class_vector(weight, logits.shape[1], "weight", "logit_adjusted_cross_entropy")
    target = target.long()
    adjusted = logits + tau * log_prior
    loss = F.cross_entropy(adjusted, target, reduction="none")
    return weighted_reduce(loss, target, weight, reduction)


def balanced_softmax_loss(
    logits: Tensor,
    target: Tensor,
    log_prior: Tensor,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Balanced Softmax ``CE(f + log pi, y)``, i.e. :func:`logit_adjusted_cross_entropy` with ``tau = 1``.

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        log_prior: ``[C]`` log class priors.
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import math, torch
        >>> log_prior = torch.tensor([math.log(0.9), math.log(0.1)])
        >>> logits = torch.tensor([[1.0, 1.0]])
        >>> print(f"{balanced_softmax_loss(logits, torch.tensor([0]), log_prior).item():.4f}")
        0.1054
    """
    return logit_adjusted_cross_entropy(logits, target, log_prior, 1.0, weight, reduction)


class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted loss ``CE(f + tau * log pi, y)`` with ``pi_c = n_c / N``.

    The log prior is the ``log_prior`` buffer. Predict with the raw logits. See
    :func:`logit_adjusted_cross_entropy`.

    Args:
        class_counts: training samples per class (required, all ``> 0``).
        tau: adjustment strength (finite; ``1`` in the paper).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``class_counts`` is missing or has a count ``<= 0``, ``tau`` is not finite or
            ``reduction`` is unknown.

    Example:
        >>> import torch
        >>> loss = LogitAdjustedLoss([90, 10], tau=1.0)
        >>> print(f"{loss(torch.tensor([[1.0, 1.0]]), torch.tensor([1])).item():.4f}")
        2.3026
    """

    requires_class_counts = True

    def __init__(self, class_counts: Optional[Sequence[int]], tau: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(class_counts, reduction)
        _check_tau(tau, type(self).__name__)
        self.tau = float(tau)

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return logit_adjusted_cross_entropy(logits, target, self.log_prior, self.tau, self.weight, self.reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced Softmax ``CE(f + log pi, y)`` with ``pi_c = n_c / N`` (logit adjustment with ``tau = 1``).

    See :func:`balanced_softmax_loss`.

    Args:
        class_counts: training samples per class (required, all ``> 0``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``class_counts`` is missing or has a count ``<= 0`` or ``reduction`` is unknown.

    Example:
        >>> import torch
        >>> loss = BalancedSoftmaxLoss([90, 10])
        >>> print(f"{loss(torch.tensor([[1.0, 1.0]]), torch.tensor([0])).item():.4f}")
        0.1054
    """

    requires_class_counts = True

    def __init__(self, class_counts: Optional[Sequence[int]], reduction: Reduction = "mean") -> None:
        super().__init__(class_counts, reduction)

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return balanced_softmax_loss(logits, target, self.log_prior, self.weight, self.reduction)
