"""Multi-label average precision (per label, macro mAP, head / tail mAP) as a torchmetrics ``Metric``."""

import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.utilities import dim_zero_cat

from lightning_lt.metrics.groups import validate_class_counts
from lightning_lt.metrics.ood import _dense_rank


def label_tail_groups(class_counts: Sequence[int], tail_threshold: int) -> list[int]:
    r"""Tail labels of a multi-label training set: the labels with fewer than ``tail_threshold`` positive images.

    With :math:`n_c` the number of training images on which label :math:`c` is present:

    .. math::
        \mathrm{tail} = \{c : n_c < \mathrm{tail\_threshold}\},\qquad \mathrm{head} = \{c : n_c \ge
        \mathrm{tail\_threshold}\}

    Args:
        class_counts: positive training images per label, ``class_counts[c] = n_c``.
        tail_threshold: a label with fewer positive training images than this is tail; an integer >= 1.

    Returns:
        The sorted tail label ids.

    Raises:
        ValueError: invalid ``class_counts`` or ``tail_threshold``, no label below the threshold (raise it), or
            every label below it (lower it).

    Example:
        >>> label_tail_groups([1200, 45, 300, 8, 99], tail_threshold=100)
        [1, 3, 4]
    """
    counts = validate_class_counts(class_counts)
    if isinstance(tail_threshold, bool) or not isinstance(tail_threshold, numbers.Integral) or tail_threshold < 1:
        raise ValueError(f"Expected `tail_threshold` to be an integer >= 1, got {tail_threshold!r}")
    tail = [c for c, n in enumerate(counts) if n < tail_threshold]
    if not tail:
        raise ValueError(
            f"No tail label: every label has at least tail_threshold={tail_threshold} positive training images (the "
            f"rarest has {min(counts)}). Raise `tail_threshold` above {min(counts)} or give `tail_labels` explicitly."
        )
    if len(tail) == len(counts):
        raise ValueError(
            f"Every label has fewer than tail_threshold={tail_threshold} positive training images (the most frequent "
            f"has {max(counts)}), so there would be no head label. Lower `tail_threshold` to at most {max(counts)} or "
            f"give `tail_labels` explicitly."
        )
    return tail


def _validate_num_labels(num_labels: int) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ValueError(f"Expected `num_labels` to be an integer >= 1, got {num_labels!r}")
    return int(num_labels)


def _validate_tail_labels(tail_labels: Sequence[int], num_labels: int) -> list[int]:
    if isinstance(tail_labels, Tensor):
        if tail_labels.ndim != 1:
            raise ValueError(f"Expected `tail_labels` to be 1-D, got shape {tuple(tail_labels.shape)}")
        tail_labels = tail_labels.tolist()
    if isinstance(tail_labels, (str, bytes)) or not hasattr(tail_labels, "__iter__"):
        raise ValueError(f"Expected `tail_labels` to be a sequence of label ids, got {tail_labels!r}")
    ids = list(tail_labels)
    if not ids:
        raise ValueError(
            "Expected `tail_labels` to be non-empty. HINT: leave it None to skip the head / tail split, or derive it "
            "from the positive training images per label with `label_tail_groups`."
        )
    out: list[int] = []
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise ValueError(f"Expected `tail_labels` to hold integer label ids, got {c!r}")
        if not 0 <= c < num_labels:
            raise ValueError(f"Tail label id {c} in `tail_labels` is out of range: valid ids are [0, {num_labels})")
        if int(c) in out:
            raise ValueError(f"Tail label id {c} appears more than once in `tail_labels`")
        out.append(int(c))
    return sorted(out)


class MultilabelAP(Metric):
    r"""Average precision of every label, macro mAP and head / tail mAP for multi-label classification.

    The scores and targets are kept (list states gathered across processes, ``dist_reduce_fx="cat"``) and every
    label's AP is computed exactly over all its distinct scores (no binning; tied scores form one threshold), as
    scikit-learn's ``average_precision_score``. For label :math:`c` with precision :math:`P_n` and recall
    :math:`R_n` at the :math:`n`-th highest distinct score:

    .. math::
        \mathrm{AP}_c = \sum_n (R_n - R_{n-1})\, P_n,\qquad
        \mathrm{mAP} = \frac{1}{|\mathcal{L}|} \sum_{c \in \mathcal{L}} \mathrm{AP}_c

    with :math:`\mathcal{L}` the labels with at least one positive in the evaluation data. A label without a
    positive has AP ``nan`` and is left out of every mean (the VOC / COCO convention: its AP is undefined, not 0).
    ``map_head`` / ``map_tail`` average over the labels with an AP outside / inside ``tail_labels``. An empty group,
    or ``tail_labels=None``, gives ``nan`` and a warning, never 0. AP depends only on the ranking of each label's
    scores, so logits and probabilities give the same result.

    Args:
        num_labels: number of labels ``C`` (>= 1).
        tail_labels: tail label ids (e.g. from :func:`label_tail_groups`); can be set later through the
            :attr:`tail_labels` attribute.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``num_labels`` not an integer >= 1, or ``tail_labels`` empty, with duplicates or ids outside
            ``[0, C)``.

    Example:
        >>> metric = MultilabelAP(num_labels=3, tail_labels=[2])
        >>> preds = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.7, 0.4], [0.3, 0.6, 0.2], [0.1, 0.1, 0.3]])
        >>> target = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
        >>> metric.update(preds, target)
        >>> result = metric.compute()
        >>> result["ap"]
        tensor([0.8333, 1.0000, 0.5000])
        >>> {k: round(v.item(), 4) for k, v in result.items() if k != "ap"}
        {'map': 0.7778, 'map_head': 0.9167, 'map_tail': 0.5}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    preds: list[Tensor]
    target: list[Tensor]

    def __init__(self, num_labels: int, tail_labels: Optional[Sequence[int]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = _validate_num_labels(num_labels)
        self._tail_labels: Optional[list[int]] = None
        self.tail_labels = tail_labels
        self._warned_no_tail = False
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    @property
    def tail_labels(self) -> Optional[list[int]]:
        """Sorted tail label ids, or ``None``; assigning validates (ids in ``[0, C)``, no duplicates, non-empty)."""
        return self._tail_labels

    @tail_labels.setter
    def tail_labels(self, value: Optional[Sequence[int]]) -> None:
        self._tail_labels = None if value is None else _validate_tail_labels(value, self.num_labels)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: scores ``[N, C]``: logits or probabilities (AP only uses their order within each label).
            target: multi-hot labels ``[N, C]`` in ``{0, 1}`` (bool, integer or float).

        Raises:
            ValueError: wrong types or shapes, non-floating ``preds``, ``nan`` scores, or target values other than
                0 / 1 (the message names them).
        """
        C = self.num_labels
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise ValueError(
                f"Expected `preds` and `target` to be tensors, got {type(preds).__name__} and {type(target).__name__}"
            )
        if preds.ndim != 2 or preds.shape[1] != C:
            raise ValueError(
                f"Expected `preds` of shape [N, num_labels={C}], got {tuple(preds.shape)}. Does the model's head have "
                f"{C} outputs?"
            )
        if target.shape != preds.shape:
            raise ValueError(
                f"Expected `target` of the same shape as `preds` {tuple(preds.shape)} (multi-hot [N, {C}]), got "
                f"{tuple(target.shape)}"
            )
        if not preds.is_floating_point():
            raise ValueError(f"Expected floating-point scores `preds` (logits or probabilities), got {preds.dtype}")
        if target.dtype != torch.bool:
            bad = (target != 0) & (target != 1)
            if bool(bad.any()):
                values = torch.unique(target[bad])[:5].tolist()
                raise ValueError(
                    f"Expected binary `target` (multi-hot, 0 / 1), found {values}. HINT: multi-label targets are "
                    f"[N, C] indicator matrices, not lists of label ids."
                )
        if bool(torch.isnan(preds).any()):
            labels = torch.nonzero(torch.isnan(preds).any(dim=0)).flatten()[:5].tolist()
            raise ValueError(f"Found nan in `preds` for labels {labels}. HINT: check the model's logits.")
        # float32 at least; float64 stays float64 so that its ties are the caller's ties
        self.preds.append(preds.to(torch.promote_types(preds.dtype, torch.float32)))
        self.target.append(target.to(torch.uint8))

    def compute(self) -> dict[str, Tensor]:
        """``ap`` (``[C]`` float32, ``nan`` for labels without a positive) and 0-dim ``map``, ``map_head``,
        ``map_tail``."""
        C = self.num_labels
        if not isinstance(self.preds, list) or self.preds:  # after a DDP sync the states are tensors
            preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target).long()
        else:
            preds = torch.zeros(0, C, device=self.device)
            target = torch.zeros(0, C, dtype=torch.long, device=self.device)
        ap = torch.full((C,), float("nan"), dtype=torch.float64, device=preds.device)
        has_positive = (target.sum(dim=0) > 0).tolist()
        for c in range(C):
            if has_positive[c]:
                # ranks: same order and ties, in [0, 1], so torchmetrics applies no sigmoid (which could add ties)
                ap[c] = binary_average_precision(
                    _dense_rank(preds[:, c]), target[:, c], thresholds=None, validate_args=False
                )
        defined = ~torch.isnan(ap)
        if bool(defined.any()):
            mean_ap = ap[defined].mean().float()
        else:
            rank_zero_warn(
                f"{type(self).__name__}: no label has a positive in the evaluation data, so `map` is nan.",
                category=UserWarning,
            )
            mean_ap = torch.tensor(float("nan"), device=ap.device)
        return {
            "ap": ap.float(),
            "map": mean_ap,
            "map_head": self._group_map(ap, head=True),
            "map_tail": self._group_map(ap, head=False),
        }

    def _group_map(self, ap: Tensor, head: bool) -> Tensor:
        nan = torch.tensor(float("nan"), device=ap.device)
        name = "head" if head else "tail"
        if self.tail_labels is None:
            if not head and not self._warned_no_tail:
                self._warned_no_tail = True
                rank_zero_warn(
                    f"{type(self).__name__}: `tail_labels` is None, so `map_head` and `map_tail` are nan. HINT: set "
                    f"`tail_labels` (e.g. from `label_tail_groups(positive training images per label, threshold)`).",
                    category=UserWarning,
                )
            return nan
        in_tail = torch.zeros(self.num_labels, dtype=torch.bool, device=ap.device)
        in_tail[self.tail_labels] = True
        in_group = ~in_tail if head else in_tail
        defined = in_group & ~torch.isnan(ap)
        if bool(defined.any()):
            return ap[defined].mean().float()
        reason = (
            "every label is a tail label"
            if not bool(in_group.any())
            else "none of its labels has a positive in the evaluation data"
        )
        rank_zero_warn(
            f"{type(self).__name__}: the {name} group (tail_labels={self.tail_labels}) is empty because {reason}; "
            f"`map_{name}` is nan.",
            category=UserWarning,
        )
        return nan
