"""Label-distribution-aware margin (LDAM) loss (Cao et al., NeurIPS 2019)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lt.losses.base import (
    LongTailLoss,
    Reduction,
    as_class_counts,
    check_class_vector,
    check_logits_target,
    check_positive,
    check_reduction,
    weighted_reduce,
)


def ldam_margins(class_counts: Sequence[int], max_m: float = 0.5) -> Tensor:
    """Per-class LDAM margins ``Delta_c = max_m * n_c^(-1/4) / max_k n_k^(-1/4)``.

    The rarest class gets ``max_m``; margins shrink as ``n_c^(-1/4)``. Computed in float64.

    Args:
        class_counts: training samples per class (all ``> 0``).
        max_m: the largest margin, ``> 0``.

    Returns:
        Float tensor ``[C]`` (default dtype).

    Raises:
        ValueError: if ``max_m <= 0`` or a count is missing or ``<= 0``.

    Example:
        >>> print([round(m, 4) for m in ldam_margins([10000, 1], max_m=0.5).tolist()])
        [0.05, 0.5]
    """
    check_positive(max_m, "max_m", "ldam_margins")
    counts = as_class_counts(class_counts, "ldam_margins")
    margins = counts.pow(-0.25)
    return (margins * (max_m / margins.max())).to(torch.get_default_dtype())


def ldam_loss(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    s: float = 30.0,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """LDAM loss ``CE(s * (f - Delta_y e_y), y)``: subtract the target class's margin, scale, softmax CE.

    Meant for cosine logits ``f`` in ``[-1, 1]`` (a normalised classifier), hence the scale ``s``.
    Reduced by :func:`~lightning_lt.losses.base.weighted_reduce`
    (``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``), which is how LDAM-DRW applies its class weights.

    Args:
        logits: ``[B, C]`` scores (cosine similarities for the published setting).
        target: ``[B]`` class indices.
        margins: per-class margins ``[C]`` (see :func:`ldam_margins`).
        s: logit scale ``> 0``.
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: on bad shapes, ``s <= 0`` or an unknown ``reduction``.

    Example:
        >>> logits = torch.tensor([[0.5, -0.5], [0.0, 0.2]])
        >>> margins = ldam_margins([100, 10], max_m=0.5)
        >>> print(f"{ldam_loss(logits, torch.tensor([0, 1]), margins, s=10.0).item():.4f}")
        1.5247
    """
    check_reduction(reduction)
    check_positive(s, "s", "ldam_loss")
    check_logits_target(logits, target, owner="ldam_loss")
    check_class_vector(margins, logits.shape[1], "margins", "ldam_loss")
    check_class_vector(weight, logits.shape[1], "weight", "ldam_loss")
    target = target.long()
    target_margin = margins.to(logits.dtype)[target]
    adjusted = logits.scatter_add(1, target[:, None], -target_margin[:, None])
    loss = F.cross_entropy(s * adjusted, target, reduction="none")
    return weighted_reduce(loss, target, weight, reduction)


class LDAMLoss(LongTailLoss):
    """Label-distribution-aware margin loss ``CE(s * (f - Delta_y e_y), y)``, ``Delta_c ∝ n_c^(-1/4)``.

    The margins, scaled so the largest is ``max_m``, are the ``margins`` buffer. Pair it with a
    cosine classifier (:class:`~lightning_lt.nets.CosineClassifier`) and, for LDAM-DRW, with
    :class:`~lightning_lt.callbacks.DeferredReweighting`. See :func:`ldam_loss`.

    Args:
        class_counts: training samples per class (required, all ``> 0``).
        max_m: the largest margin (of the rarest class), ``> 0``.
        s: logit scale, ``> 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``class_counts`` is missing or has a count ``<= 0``, ``max_m <= 0``, ``s <= 0`` or
            ``reduction`` is unknown.

    Example:
        >>> loss = LDAMLoss([100, 10], max_m=0.5, s=10.0)
        >>> logits = torch.tensor([[0.5, -0.5], [0.0, 0.2]])
        >>> print(f"{loss(logits, torch.tensor([0, 1])).item():.4f}")
        1.5247
    """

    requires_class_counts = True
    margins: Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[int]],
        max_m: float = 0.5,
        s: float = 30.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(class_counts, reduction)
        owner = type(self).__name__
        check_positive(max_m, "max_m", owner)
        check_positive(s, "s", owner)
        self.max_m = float(max_m)
        self.s = float(s)
        self.register_buffer("margins", ldam_margins(class_counts, self.max_m))

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return ldam_loss(logits, target, self.margins, self.s, self.weight, self.reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_m={self.max_m}, s={self.s}"
