"""Softmax cross-entropy with optional label smoothing and per-class weights."""

from __future__ import annotations

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


def _check_label_smoothing(label_smoothing: float, owner: str) -> None:
    is_number = isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
    if not is_number or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"Expected `label_smoothing` of {owner} to be in [0, 1], got {label_smoothing!r}.")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy with label smoothing; class weights scale whole samples.

    Per sample ``l_i = -(1 - eps) log p_{i, y_i} - (eps / C) sum_c log p_{i, c}`` with
    ``p = softmax(logits)``, reduced by :func:`~lightning_lt.losses.base.weighted_reduce`
    (``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``). Without label smoothing this equals
    ``F.cross_entropy(logits, target, weight)``; with both, the weight multiplies the whole
    smoothed sample loss (``F.cross_entropy`` instead weights the smoothing term per class).

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``.

    Raises:
        ValueError: on bad shapes, an unknown ``reduction`` or ``label_smoothing`` outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> print(f"{cross_entropy(logits, torch.tensor([0, 0])).item():.4f}")
        0.7201
    """
    check_reduction(reduction)
    _check_label_smoothing(label_smoothing, "cross_entropy")
    check_logits_target(logits, target, owner="cross_entropy")
    check_class_vector(weight, logits.shape[1], "weight", "cross_entropy")
    target = target.long()
    loss = F.cross_entropy(logits, target, reduction="none", label_smoothing=float(label_smoothing))
    return weighted_reduce(loss, target, weight, reduction)


class CrossEntropyLoss(LongTailLoss):
    """Softmax cross-entropy (the long-tail baseline), optionally label-smoothed and class-weighted.

    ``l_i = -(1 - eps) log p_{i, y_i} - (eps / C) sum_c log p_{i, c}``, reduced as
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (``w`` from :meth:`set_class_weights`, e.g. by
    :class:`~lightning_lt.callbacks.DeferredReweighting` for CE-DRW). See :func:`cross_entropy`.

    Args:
        class_counts: optional training samples per class (only checks the number of classes).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``.

    Raises:
        ValueError: if ``label_smoothing`` is outside ``[0, 1]``, ``reduction`` is unknown or a class
            count is ``<= 0``.

    Example:
        >>> import torch
        >>> loss = CrossEntropyLoss([100, 10])
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> print(f"{loss(logits, torch.tensor([0, 1])).item():.4f}")
        0.2201
    """

    def __init__(
        self,
        class_counts: Optional[Sequence[int]] = None,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(class_counts, reduction)
        _check_label_smoothing(label_smoothing, type(self).__name__)
        self.label_smoothing = float(label_smoothing)

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, self.weight, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing}"
