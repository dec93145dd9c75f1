"""Class-balanced loss (Cui et al., CVPR 2019): re-weighting by the effective number of samples."""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lt.losses.base import (
    LongTailLoss,
    Reduction,
    as_class_counts,
    check_class_vector,
    check_logits_target,
    check_non_negative,
    check_reduction,
    weighted_reduce,
)

LossType = Literal["softmax", "focal", "sigmoid"]
_LOSS_TYPES = ("softmax", "focal", "sigmoid")


def _check_beta(beta: float, owner: str) -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
        raise ValueError(
            f"Expected `beta` of {owner} to be in [0, 1), got {beta!r}. Typical values are 0.9, 0.99, 0.999, "
            "0.9999 (beta = 0 gives uniform weights; beta -> 1 approaches inverse class frequency)."
        )


def _check_loss_type(loss_type: str, owner: str) -> None:
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"Expected `loss_type` of {owner} to be one of {_LOSS_TYPES}, got {loss_type!r}.")


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.9999) -> Tensor:
    """Class-balanced weights ``w_c = (1 - beta) / (1 - beta^n_c)``, normalised to ``sum_c w_c = C``.

    ``(1 - beta^n) / (1 - beta)`` is the effective number of samples of a class with ``n`` samples;
    the weight is its inverse. Used by :class:`ClassBalancedLoss` and by
    :class:`~lightning_lt.callbacks.DeferredReweighting` (DRW). Computed in float64.

    Args:
        class_counts: training samples per class (all ``> 0``).
        beta: in ``[0, 1)``; ``0`` gives all-ones weights.

    Returns:
        Float tensor ``[C]`` (default dtype) summing to ``C``.

    Raises:
        ValueError: if ``beta`` is outside ``[0, 1)`` or a count is missing or ``<= 0``.

    Example:
        >>> print([round(w, 4) for w in class_balanced_weights([100, 10], beta=0.9).tolist()])
        [0.7889, 1.2111]
    """
    _check_beta(beta, "class_balanced_weights")
    counts = as_class_counts(class_counts, "class_balanced_weights")
    if beta == 0.0:
        weights = torch.ones_like(counts)
    else:
        # 1 - beta^n = -expm1(n log beta), accurate for beta close to 1.
        effective_num = -torch.expm1(counts * math.log(beta))
        weights = (1.0 - beta) / effective_num
    weights = weights / weights.sum() * counts.numel()
    return weights.to(torch.get_default_dtype())


def class_balanced_loss(
    logits: Tensor,
    target: Tensor,
    class_weights: Tensor,
    loss_type: LossType = "softmax",
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Class-balanced loss ``l_i = cb_{y_i} * L(logits_i, y_i)`` as in the authors' code.

    ``L`` is, by ``loss_type``:

    * ``"softmax"``: softmax cross-entropy ``-log p_{y}``;
    * ``"sigmoid"``: binary cross-entropy with logits on the one-hot target, summed over classes;
    * ``"focal"``: the sigmoid focal loss of the paper, summed over classes,
      ``sum_c (1 - q_c)^gamma BCE(z_c, 1[c = y])`` with ``q_c = sigmoid(z_c)`` if ``c = y`` else
      ``1 - sigmoid(z_c)``.

    ``cb = class_weights`` (see :func:`class_balanced_weights`) are part of the per-sample loss, so
    with no extra ``weight`` ``"mean"`` is ``sum_i cb_{y_i} L_i / B`` (the authors' normalisation).
    An extra per-class ``weight`` reduces as everywhere in the package:
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}``.

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        class_weights: class-balanced weights ``[C]``.
        loss_type: ``"softmax"``, ``"focal"`` or ``"sigmoid"``.
        gamma: focusing parameter ``>= 0`` of ``"focal"``.
        weight: optional extra per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: on bad shapes, an unknown ``loss_type`` / ``reduction`` or ``gamma < 0``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> cb = class_balanced_weights([100, 10], beta=0.9)
        >>> print(f"{class_balanced_loss(logits, torch.tensor([0, 1]), cb).item():.4f}")
        0.2398
    """
    check_reduction(reduction)
    _check_loss_type(loss_type, "class_balanced_loss")
    check_non_negative(gamma, "gamma", "class_balanced_loss")
    check_logits_target(logits, target, owner="class_balanced_loss")
    check_class_vector(class_weights, logits.shape[1], "class_weights", "class_balanced_loss")
    check_class_vector(weight, logits.shape[1], "weight", "class_balanced_loss")
    target = target.long()
    if loss_type == "softmax":
        loss = F.cross_entropy(logits, target, reduction="none")
    else:
        # z = +logit for the target class, -logit otherwise: BCE = softplus(-z), (1 - q)^gamma = sigmoid(-z)^gamma.
        sign = 2.0 * F.one_hot(target, logits.shape[1]).to(logits.dtype) - 1.0
        z = sign * logits
        elementwise = F.softplus(-z)
        if loss_type == "focal" and gamma != 0:
            elementwise = torch.exp(gamma * F.logsigmoid(-z)) * elementwise
        loss = elementwise.sum(dim=1)
    loss = loss * class_weights.to(loss.dtype)[target]
    return weighted_reduce(loss, target, weight, reduction)


class ClassBalancedLoss(LongTailLoss):
    """Class-balanced loss: per-sample loss scaled by ``(1 - beta) / (1 - beta^n_y)`` (normalised to sum C).

    ``l_i = cb_{y_i} L(logits_i, y_i)`` with ``L`` the softmax cross-entropy, the sigmoid
    cross-entropy or the sigmoid focal loss (``loss_type``), see :func:`class_balanced_loss`. The
    class-balanced weights are the ``cb_weight`` buffer; ``"mean"`` divides by the batch size as the
    authors' code does. Weights from :meth:`set_class_weights` multiply on top (and then
    ``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``).

    For ``"sigmoid"`` and ``"focal"`` the authors start the classifier's bias at ``-log(C - 1)``, so that
    every sigmoid starts at ``1 / C`` (:attr:`sigmoid_outputs` is ``True``; ``LongTailClassifier`` does it with
    ``head_bias_init="auto"`` or ``"sigmoid_prior"``). With a bias near 0 the initial loss is about
    ``C log 2`` (69 for ``C = 100``) instead of about ``log C + 1``.

    Args:
        class_counts: training samples per class (required, all ``> 0``).
        beta: in ``[0, 1)``; ``0`` gives the unweighted loss.
        loss_type: ``"softmax"``, ``"focal"`` or ``"sigmoid"``.
        gamma: focusing parameter ``>= 0`` of ``"focal"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``class_counts`` is missing or has a count ``<= 0``, ``beta`` is outside
            ``[0, 1)``, ``gamma < 0`` or ``loss_type`` / ``reduction`` is unknown.

    Example:
        >>> loss = ClassBalancedLoss([100, 10], beta=0.9, loss_type="sigmoid")
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> print(f"{loss(logits, torch.tensor([0, 1])).item():.4f}")
        0.9329
    """

    requires_class_counts = True
    cb_weight: Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[int]],
        beta: float = 0.9999,
        loss_type: LossType = "softmax",
        gamma: float = 2.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(class_counts, reduction)
        owner = type(self).__name__
        _check_beta(beta, owner)
        _check_loss_type(loss_type, owner)
        check_non_negative(gamma, "gamma", owner)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.gamma = float(gamma)
        self.register_buffer("cb_weight", class_balanced_weights(class_counts, self.beta))

    @property
    def sigmoid_outputs(self) -> bool:  # type: ignore[override]
        """``True`` for ``loss_type`` ``"sigmoid"`` and ``"focal"`` (one sigmoid per class)."""
        return self.loss_type in ("sigmoid", "focal")

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return class_balanced_loss(
            logits, target, self.cb_weight, self.loss_type, self.gamma, self.weight, self.reduction
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, loss_type={self.loss_type!r}, gamma={self.gamma}"
