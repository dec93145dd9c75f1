"""Label-aware smoothing (MiSLAS, Zhong et al., CVPR 2021): a per-class label-smoothing factor from the class counts."""

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
    check_reduction,
    weighted_reduce,
)

SmoothingShape = Literal["concave", "linear", "convex", "exp"]
_SHAPES = ("concave", "linear", "convex", "exp")


def _check_unit_interval(value: float, name: str, owner: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected `{name}` of {owner} to be in [0, 1], got {value!r}.")


def label_aware_smoothing_epsilons(
    class_counts: Sequence[int],
    smooth_head: float = 0.4,
    smooth_tail: float = 0.1,
    shape: SmoothingShape = "concave",
    power: Optional[float] = None,
) -> Tensor:
    r"""Per-class smoothing factors ``eps_c`` of label-aware smoothing, ``smooth_tail`` (rarest) to ``smooth_head``.

    With ``n_1 = max_c n_c``, ``n_K = min_c n_c`` and ``t_c = (n_c - n_K) / (n_1 - n_K) \in [0, 1]``:

    * ``"concave"``: ``eps_c = s_tail + (s_head - s_tail) sin(pi t_c / 2)``;
    * ``"linear"``:  ``eps_c = s_tail + (s_head - s_tail) t_c``;
    * ``"convex"``:  ``eps_c = s_head + (s_head - s_tail) sin(3 pi / 2 + pi t_c / 2)``;
    * ``"exp"``:     ``eps_c = s_tail + (s_head - s_tail) t_c^power``.

    Every shape gives the most frequent class ``s_head`` and the rarest ``s_tail``: MiSLAS smooths the head classes
    more (its CIFAR-100-LT setting is ``s_head = 0.4``, ``s_tail = 0.1``). This is ``LabelAwareSmoothing.__init__`` of
    github:dvlab-research/MiSLAS (``methods.py``), computed in float64 and returned in the default dtype.

    Args:
        class_counts: training samples per class (all ``> 0``, not all equal).
        smooth_head: ``eps`` of the most frequent class, in ``[0, 1]``.
        smooth_tail: ``eps`` of the rarest class, in ``[0, 1]``.
        shape: ``"concave"`` (MiSLAS's default), ``"linear"``, ``"convex"`` or ``"exp"``.
        power: exponent of ``"exp"`` (required there, ``> 0``); unused otherwise.

    Raises:
        ValueError: bad counts, all counts equal (``n_1 = n_K`` leaves ``t_c`` undefined), a factor outside
            ``[0, 1]``, an unknown ``shape``, or ``"exp"`` without a positive ``power``.

    Example:
        >>> [round(e, 4) for e in label_aware_smoothing_epsilons([100, 55, 10], 0.4, 0.1, "linear").tolist()]
        [0.4, 0.25, 0.1]
    """
    owner = "label_aware_smoothing_epsilons"
    _check_unit_interval(smooth_head, "smooth_head", owner)
    _check_unit_interval(smooth_tail, "smooth_tail", owner)
    if shape not in _SHAPES:
        raise ValueError(f"Expected `shape` of {owner} to be one of {_SHAPES}, got {shape!r}.")
    if shape == "exp":
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
            raise ValueError(
                f"`shape='exp'` of {owner} needs a finite `power` > 0 (eps_c = s_tail + (s_head - s_tail) t_c^power), "
                f"got {power!r}. HINT: e.g. `power=2.0`, or another `shape`."
            )
    counts = as_class_counts(class_counts, owner)
    n_1, n_k = counts.max(), counts.min()
    if n_1 == n_k:
        raise ValueError(
            f"{owner}: every class has {int(n_1)} training samples, so the position of a class between the rarest and "
            "the most frequent one, (n_c - n_K) / (n_1 - n_K), is undefined. HINT: on balanced data use "
            "`CrossEntropyLoss(label_smoothing=eps)`."
        )
    t = (counts - n_k) / (n_1 - n_k)
    head, tail = float(smooth_head), float(smooth_tail)
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(t * math.pi / 2)
    elif shape == "linear":
        eps = tail + (head - tail) * t
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + t * math.pi / 2)
    else:
        eps = tail + (head - tail) * t.pow(float(power))
    return eps.to(torch.get_default_dtype())


def label_aware_smoothing(
    logits: Tensor,
    target: Tensor,
    epsilons: Tensor,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Cross-entropy with a per-class label-smoothing factor: the MiSLAS loss.

    .. math::
        l_i = (1 - \epsilon_{y_i}) \, (-\log p_{i, y_i}) + \epsilon_{y_i} \, \Big(-\frac{1}{C} \sum_c \log p_{i, c}\Big)

    with ``p = softmax(logits)``: ordinary label smoothing whose ``eps`` depends on the sample's class. Reduced by
    :func:`~lightning_lt.losses.base.weighted_reduce` (``mean`` = the plain batch mean without weights, as MiSLAS).

    Args:
        logits: ``[B, C]`` unnormalised scores.
        target: ``[B]`` class indices.
        epsilons: ``[C]`` smoothing factor of each class (:func:`label_aware_smoothing_epsilons`).
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: on bad shapes or an unknown ``reduction``.

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> print(f"{label_aware_smoothing(logits, target, torch.tensor([0.0, 0.5])).item():.4f}")  # plain CE
        0.1269
    """
    check_reduction(reduction)
    check_logits_target(logits, target, owner="label_aware_smoothing")
    check_class_vector(epsilons, logits.shape[1], "epsilons", "label_aware_smoothing")
    check_class_vector(weight, logits.shape[1], "weight", "label_aware_smoothing")
    target = target.long()
    log_p = F.log_softmax(logits, dim=-1)
    eps = epsilons.to(log_p.dtype)[target]
    nll = -log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    uniform = -log_p.mean(dim=-1)
    return weighted_reduce((1.0 - eps) * nll + eps * uniform, target, weight, reduction)


class LabelAwareSmoothingLoss(LongTailLoss):
    r"""Label-aware smoothing (MiSLAS): cross-entropy smoothed by ``eps_c``, more for frequent classes.

    ``l_i = (1 - eps_{y_i}) (-log p_{y_i}) + eps_{y_i} (-(1/C) sum_c log p_c)`` with ``eps_c`` from the training
    counts between ``smooth_tail`` (rarest class) and ``smooth_head`` (most frequent), by ``shape``
    (:func:`label_aware_smoothing_epsilons`; stored as the ``epsilons`` buffer). MiSLAS uses it in its second
    stage (classifier re-training with class-balanced sampling), e.g. ``smooth_head=0.3, smooth_tail=0.0`` on
    CIFAR-10-LT and ``0.4, 0.1`` on CIFAR-100-LT (imbalance factor 100). See :func:`label_aware_smoothing`.

    Args:
        class_counts: training samples per class (required, all ``> 0``, not all equal).
        smooth_head: ``eps`` of the most frequent class, in ``[0, 1]``.
        smooth_tail: ``eps`` of the rarest class, in ``[0, 1]``.
        shape: ``"concave"`` (MiSLAS's default), ``"linear"``, ``"convex"`` or ``"exp"``.
        power: exponent of ``"exp"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: see :func:`label_aware_smoothing_epsilons`; an unknown ``reduction``.

    Example:
        >>> loss = LabelAwareSmoothingLoss([100, 10], smooth_head=0.4, smooth_tail=0.1)
        >>> [round(e, 4) for e in loss.epsilons.tolist()]
        [0.4, 0.1]
        >>> print(f"{loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item():.4f}")
        0.5269
    """

    requires_class_counts = True

    epsilons: Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[int]],
        smooth_head: float = 0.4,
        smooth_tail: float = 0.1,
        shape: SmoothingShape = "concave",
        power: Optional[float] = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(class_counts, reduction)
        eps = label_aware_smoothing_epsilons(self.class_counts.tolist(), smooth_head, smooth_tail, shape, power)
        self.smooth_head, self.smooth_tail = float(smooth_head), float(smooth_tail)
        self.shape, self.power = shape, power
        self.register_buffer("epsilons", eps)

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return label_aware_smoothing(logits, target, self.epsilons, self.weight, self.reduction)

    def extra_repr(self) -> str:
        power = f", power={self.power}" if self.shape == "exp" else ""
        return (
            f"{super().extra_repr()}, smooth_head={self.smooth_head}, smooth_tail={self.smooth_tail}, "
            f"shape={self.shape!r}{power}"
        )
