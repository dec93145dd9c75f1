"""Targets of mixed batches (mixup, CutMix) and the loss of a mixed batch."""

from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor


class MixedTarget(NamedTuple):
    """The target of a mixed batch: ``x = lam * x_a + (1 - lam) * x_b`` (mixup) or a patch of ``x_b`` pasted into
    ``x_a`` covering ``1 - lam`` of the image (CutMix), with labels ``y_a`` and ``y_b = y_a[perm]``.

    Batch transforms (:class:`~lightning_lt.callbacks.Mixup`, :class:`~lightning_lt.callbacks.CutMix`) return it in
    place of the label tensor; :func:`mixed_loss` scores logits against it.
    """

    y_a: Tensor
    y_b: Tensor
    lam: float


def mixed_loss(criterion: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: MixedTarget) -> Tensor:
    """``lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b)``: ``mixup_criterion`` of MiSLAS
    (``methods.py``) and of the mixup / CutMix reference code.

    The criterion is applied twice, so a weighted ``"mean"`` reduction normalises each term by its own labels'
    weights, as the reference does.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> logits = torch.tensor([[2.0, 0.0]])
        >>> target = MixedTarget(torch.tensor([0]), torch.tensor([1]), 0.75)
        >>> print(f"{mixed_loss(F.cross_entropy, logits, target).item():.4f}")  # 0.75 * 0.1269 + 0.25 * 2.1269
        0.6269
    """
    return target.lam * criterion(logits, target.y_a) + (1.0 - target.lam) * criterion(logits, target.y_b)


__all__ = ["MixedTarget", "mixed_loss"]
