"""Semantic segmentation IoU with head / tail class groups (AUCSeg protocol) as a torchmetrics ``Metric``."""

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_lt.metrics.groups import validate_class_counts


def _validate_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` to be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def validate_tail_classes(tail_classes: Sequence[int], num_classes: int) -> list[int]:
    """Check a list of tail class ids and return it sorted, as plain ints.

    Args:
        tail_classes: class ids in ``[0, num_classes)``: non-empty, without duplicates (a 1-D tensor works too).
        num_classes: number of classes ``C``.

    Raises:
        ValueError: ``num_classes`` < 2, an empty or non-sequence ``tail_classes``, a non-integer or
            out-of-range id, or a duplicated id (the message names it and the valid range).

    Example:
        >>> validate_tail_classes([10, 9], num_classes=11)
        [9, 10]
    """
    num_classes = _validate_num_classes(num_classes)
    if isinstance(tail_classes, Tensor):
        if tail_classes.ndim != 1:
            raise ValueError(f"Expected `tail_classes` to be 1-D, got shape {tuple(tail_classes.shape)}")
        tail_classes = tail_classes.tolist()
    if isinstance(tail_classes, (str, bytes)) or not hasattr(tail_classes, "__iter__"):
        raise ValueError(f"Expected `tail_classes` to be a sequence of class ids, got {tail_classes!r}")
    ids = list(tail_classes)
    if not ids:
        raise ValueError(
            "Expected `tail_classes` to be non-empty. HINT: leave it None to skip the head / tail split, or derive "
            "it from the training pixel counts with `pixel_tail_classes`."
        )
    out: list[int] = []
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise ValueError(f"Expected `tail_classes` to hold integer class ids, got {c!r}")
        if not 0 <= c < num_classes:
            raise ValueError(f"Tail class id {c} in `tail_classes` is out of range: valid ids are [0, {num_classes})")
        if int(c) in out:
            raise ValueError(f"Tail class id {c} appears more than once in `tail_classes`")
        out.append(int(c))
    return sorted(out)


def pixel_tail_classes(class_counts: Sequence[int], tail_share: float = 0.1) -> list[int]:
    r"""Tail classes of a segmentation training set, from its labelled pixels per class.

    With :math:`n_c` the labelled training pixels of class :math:`c` (``ignore_index`` pixels left out) and
    :math:`C` the number of classes, class :math:`c` is a tail class when its pixel share is below
    ``tail_share`` times the uniform share:

    .. math::
        \frac{n_c}{\sum_k n_k} < \frac{\mathrm{tail\_share}}{C}

    i.e. at least ``1 / tail_share`` times rarer than if all classes had the same number of pixels (ten times
    rarer with the default 0.1). The comparison is exact (rational arithmetic on the decimal value of
    ``tail_share``): a class exactly at the threshold is not tail.

    Args:
        class_counts: labelled training pixels per class.
        tail_share: fraction of the uniform share below which a class is tail; > 0.

    Returns:
        The sorted tail class ids.

    Raises:
        ValueError: invalid counts (empty, negative, non-integer, all zero), ``tail_share`` not a finite
            number > 0, no class below the threshold, or every class below it.

    Example:
        >>> camvid = [10682767, 14750079, 623349, 20076880, 2845085, 6166762, 743859, 714595, 3719877, 405385, 184967]
        >>> pixel_tail_classes(camvid)
        [9, 10]
        >>> pixel_tail_classes(camvid, tail_share=0.5)
        [2, 6, 7, 9, 10]
    """
    counts = validate_class_counts(class_counts)
    total = sum(counts)
    if total == 0:
        raise ValueError("Expected `class_counts` to hold some labelled pixels, got all zeros")
    if (
        isinstance(tail_share, bool)
        or not isinstance(tail_share, numbers.Real)
        or not math.isfinite(tail_share)
        or tail_share <= 0
    ):
        raise ValueError(f"Expected `tail_share` to be a finite number > 0, got {tail_share!r}")
    num_classes = len(counts)
    # The decimal the user wrote (0.2, not the binary float just above it), so that boundaries are exact.
    share = Fraction(tail_share) if isinstance(tail_share, numbers.Rational) else Fraction(str(float(tail_share)))
    # n_c / total < tail_share / C  <=>  n_c * C < tail_share * total
    tail = [c for c, n in enumerate(counts) if n * num_classes < share * total]
    threshold = float(share) / num_classes
    if not tail:
        raise ValueError(
            f"No tail class: no class has a pixel share below tail_share / C = {tail_share} / {num_classes} = "
            f"{threshold:.4g} (the rarest has {min(counts) / total:.4g}). Raise `tail_share` or give "
            f"`tail_classes` explicitly."
        )
    if len(tail) == num_classes:
        raise ValueError(
            f"Every class has a pixel share below tail_share / C = {tail_share} / {num_classes} = {threshold:.4g}, "
            f"so there would be no head class. Lower `tail_share` or give `tail_classes` explicitly."
        )
    return tail


class SegmentationIoU(Metric):
    r"""Per-class IoU, mIoU, head / tail mIoU, pixel accuracy and mean class accuracy for semantic segmentation.

    A ``[C, C]`` confusion matrix :math:`M` (rows: target, columns: prediction) is accumulated over the labelled
    pixels (``target != ignore_index``) and summed across processes. With :math:`TP_c = M_{cc}`,
    :math:`FP_c = \sum_k M_{kc} - TP_c`, :math:`FN_c = \sum_k M_{ck} - TP_c`:

    .. math::
        \mathrm{IoU}_c = \frac{TP_c}{TP_c + FP_c + FN_c},\quad
        \mathrm{mIoU} = \operatorname{nanmean}_c \mathrm{IoU}_c,\quad
        \mathrm{pixel\_acc} = \frac{\sum_c TP_c}{\sum_{c,k} M_{ck}},\quad
        \mathrm{mAcc} = \operatorname{nanmean}_c \frac{TP_c}{TP_c + FN_c}

    A class absent from both prediction and target (union 0) has IoU ``nan`` and is left out of every mean
    (MMSegmentation convention); a class that is predicted but absent from the target has IoU 0 and counts.
    ``miou_tail`` / ``miou_head`` are the nanmeans over ``tail_classes`` and over the other classes. A group
    without any class with a defined IoU, or ``tail_classes=None``, gives ``nan`` and a warning, never 0.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        ignore_index: target value of unlabelled pixels, left out everywhere; ``None`` if every pixel is labelled.
            Must not be a class id in ``[0, C)``.
        tail_classes: tail class ids (e.g. from :func:`pixel_tail_classes`); can be set later through the
            :attr:`tail_classes` attribute, e.g. once a data module has counted the training pixels.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``num_classes`` < 2, ``ignore_index`` in ``[0, C)``, or invalid ``tail_classes``
            (see :func:`validate_tail_classes`).

    Example:
        >>> import torch
        >>> metric = SegmentationIoU(num_classes=3, tail_classes=[2])
        >>> preds = torch.tensor([[[0, 0, 1], [1, 2, 0], [2, 0, 2]]])
        >>> target = torch.tensor([[[0, 0, 1], [1, 2, 255], [1, 0, 255]]])  # 255: unlabelled
        >>> metric.update(preds, target)
        >>> result = metric.compute()
        >>> result["iou"]
        tensor([1.0000, 0.6667, 0.5000])
        >>> {k: round(v.item(), 4) for k, v in result.items() if k != "iou"}
        {'miou': 0.7222, 'miou_head': 0.8333, 'miou_tail': 0.5, 'pixel_acc': 0.8571, 'macc': 0.8889}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: Optional[int] = 255,
        tail_classes: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = _validate_num_classes(num_classes)
        if ignore_index is not None:
            if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
                raise ValueError(f"Expected `ignore_index` to be an integer or None, got {ignore_index!r}")
            if 0 <= ignore_index < self.num_classes:
                raise ValueError(
                    f"Expected `ignore_index` outside the class ids [0, {self.num_classes}), got {ignore_index}. "
                    f"HINT: map unlabelled pixels to a value such as 255 in the data module."
                )
            ignore_index = int(ignore_index)
        self.ignore_index = ignore_index
        self._tail_classes: Optional[list[int]] = None
        self.tail_classes = tail_classes
        self._warned_no_tail = False
        C = self.num_classes
        self.add_state("confmat", default=torch.zeros(C, C, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def tail_classes(self) -> Optional[list[int]]:
        """Sorted tail class ids, or ``None``; assigning validates (see :func:`validate_tail_classes`)."""
        return self._tail_classes

    @tail_classes.setter
    def tail_classes(self, value: Optional[Sequence[int]]) -> None:
        self._tail_classes = None if value is None else validate_tail_classes(value, self.num_classes)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: logits / scores ``[B, C, H, W]`` (the prediction is their argmax over dim 1) or predicted
                labels ``[B, H, W]``, at the target's resolution.
            target: labels ``[B, H, W]`` in ``[0, C)`` or ``ignore_index``.

        Raises:
            ValueError: wrong types, shapes or dtypes (logits of another spatial size than the target: resize
                them first), or labels outside ``[0, C)`` other than ``ignore_index`` (the message names them).
        """
        preds = self._check_and_argmax(preds, target)
        C = self.num_classes
        target = target.long()
        if self.ignore_index is None:
            labelled = torch.ones_like(target, dtype=torch.bool)
        else:
            labelled = target != self.ignore_index
        bad_target = labelled & ((target < 0) | (target >= C))
        bad_preds = labelled & ((preds < 0) | (preds >= C))
        if bool((bad_target | bad_preds).any()):
            if bool(bad_target.any()):
                values = torch.unique(target[bad_target])[:5].tolist()
                ignore = f" other than ignore_index={self.ignore_index}" if self.ignore_index is not None else ""
                raise ValueError(
                    f"Expected `target` labels in [0, {C}){ignore}, found {values}. "
                    f"HINT: check `num_classes` and the data module's label mapping / `ignore_index`."
                )
            values = torch.unique(preds[bad_preds])[:5].tolist()
            raise ValueError(f"Expected predicted labels `preds` in [0, {C}), found {values}")
        # One bincount over the flattened (target, prediction) pairs; unlabelled pixels go to an extra bin C*C.
        index = torch.where(labelled, target * C + preds, torch.full_like(target, C * C))
        counts = torch.bincount(index.flatten(), minlength=C * C + 1)[: C * C].reshape(C, C)
        # Out of place on purpose (see PerClassAccuracy.update): states may sit in memory shared by all ranks.
        self.confmat = self.confmat + counts

    def _check_and_argmax(self, preds: Tensor, target: Tensor) -> Tensor:
        C = self.num_classes
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise ValueError(
                f"Expected `preds` and `target` to be tensors, got {type(preds).__name__} and {type(target).__name__}"
            )
        if target.ndim != 3 or not _is_integer(target):
            raise ValueError(
                f"Expected `target` to be an integer label map [B, H, W], got shape {tuple(target.shape)} and "
                f"dtype {target.dtype}"
            )
        if preds.ndim == 4:
            if preds.shape[1] != C:
                raise ValueError(
                    f"Expected logits `preds` of shape [B, num_classes={C}, H, W], got {tuple(preds.shape)}. "
                    f"Does the model's head have {C} outputs?"
                )
            if preds.shape[0] != target.shape[0] or preds.shape[2:] != target.shape[1:]:
                raise ValueError(
                    f"Expected logits `preds` [B, C, H, W] to match `target` [B, H, W] = {tuple(target.shape)} in "
                    f"batch and spatial size, got {tuple(preds.shape)}. HINT: resize the logits to the label size "
                    f"first, e.g. `F.interpolate(logits, size=target.shape[-2:], mode='bilinear')`."
                )
            return preds.argmax(dim=1)
        if preds.ndim == 3:
            if not _is_integer(preds):
                raise ValueError(
                    f"Expected 3-D `preds` to hold integer labels, got dtype {preds.dtype}; "
                    f"pass logits of shape [B, {C}, H, W] instead"
                )
            if preds.shape != target.shape:
                raise ValueError(
                    f"Expected label maps `preds` and `target` of the same shape, got {tuple(preds.shape)} and "
                    f"{tuple(target.shape)}"
                )
            return preds.long()
        raise ValueError(
            f"Expected `preds` to be logits [B, {C}, H, W] or labels [B, H, W], got shape {tuple(preds.shape)}"
        )

    def compute(self) -> dict[str, Tensor]:
        """``iou`` (``[C]``) and 0-dim ``miou``, ``miou_head``, ``miou_tail``, ``pixel_acc``, ``macc`` (float)."""
        cm = self.confmat.double()
        tp = cm.diagonal()
        target_pixels = cm.sum(dim=1)  # TP + FN
        union = target_pixels + cm.sum(dim=0) - tp  # TP + FN + FP
        iou = tp / union  # 0 / 0 -> nan: class neither predicted nor in the target
        class_acc = tp / target_pixels  # nan: class not in the target
        out = {
            "iou": iou.float(),
            "miou": iou.nanmean().float(),
            "miou_head": self._group_miou(iou, head=True),
            "miou_tail": self._group_miou(iou, head=False),
            "pixel_acc": (tp.sum() / target_pixels.sum()).float(),
            "macc": class_acc.nanmean().float(),
        }
        return out

    def _group_miou(self, iou: Tensor, head: bool) -> Tensor:
        nan = torch.tensor(float("nan"), device=iou.device)
        name = "head" if head else "tail"
        if self.tail_classes is None:
            if not head and not self._warned_no_tail:
                self._warned_no_tail = True
                rank_zero_warn(
                    f"{type(self).__name__}: `tail_classes` is None, so `miou_head` and `miou_tail` are nan. HINT: "
                    f"set `tail_classes` (e.g. from `pixel_tail_classes(training pixel counts)`).",
                    category=UserWarning,
                )
            return nan
        in_tail = torch.zeros(self.num_classes, dtype=torch.bool, device=iou.device)
        in_tail[self.tail_classes] = True
        in_group = ~in_tail if head else in_tail
        defined = in_group & ~torch.isnan(iou)
        if bool(defined.any()):
            return iou[defined].mean().float()
        reason = (
            "every class is a tail class"
            if not bool(in_group.any())
            else "none of its classes occurs in the predictions or targets"
        )
        rank_zero_warn(
            f"{type(self).__name__}: the {name} group (tail_classes={self.tail_classes}) is empty because {reason}; "
            f"`miou_{name}` is nan.",
            category=UserWarning,
        )
        return nan


def _is_integer(x: Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
