"""Per-class and many/medium/few-shot top-1 accuracy as torchmetrics ``Metric``s."""

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_lt.metrics.groups import SHOT_NAMES, describe_group, shot_groups, validate_class_counts


class PerClassAccuracy(Metric):
    r"""Top-1 accuracy (recall) of every class, accumulated over batches and synced across processes.

    .. math::
        \mathrm{acc}_c = \frac{\#\{i : y_i = c,\ \hat y_i = c\}}{\#\{i : y_i = c\}}

    States ``correct`` and ``total`` (``LongTensor[C]``) are summed across processes (``dist_reduce_fx="sum"``),
    so the DDP result equals the single-process result on the union of the data.

    Args:
        num_classes: number of classes ``C``.
        validate_args: check shapes, dtypes and label ranges in :meth:`update` (costs a device sync per batch).
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``dist_sync_on_step``, ...).

    Raises:
        ValueError: if ``num_classes`` is not a positive integer.

    Example:
        >>> import torch
        >>> metric = PerClassAccuracy(num_classes=3)
        >>> metric.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
        >>> metric.compute()
        tensor([0.6667, 1.0000,    nan])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.validate_args = validate_args
        self.add_state("correct", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: logits / scores ``[B, C]`` (the prediction is their argmax) or predicted class indices ``[B]``.
            target: true class indices ``[B]``.

        Raises:
            ValueError: (with ``validate_args``) wrong shapes or dtypes, or labels outside ``[0, C)``.
        """
        if self.validate_args:
            self._check_inputs(preds, target)
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        target = target.long()
        # Out of place on purpose: Lightning's CPU ``ddp_spawn`` passes the module through ``mp.spawn``, which puts
        # every tensor in shared memory, and un-shares only parameters and buffers, not metric states. ``+=`` would
        # then add every rank's counts into one tensor (double counting after the sync); ``x = x + y`` gives each
        # process its own tensor.
        self.correct = self.correct + torch.bincount(target[preds.long() == target], minlength=self.num_classes)
        self.total = self.total + torch.bincount(target, minlength=self.num_classes)

    def _check_inputs(self, preds: Tensor, target: Tensor) -> None:
        C = self.num_classes
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise ValueError(
                f"Expected `preds` and `target` to be tensors, got {type(preds).__name__} and {type(target).__name__}"
            )
        if target.ndim != 1 or target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(
                f"Expected `target` to be a 1-D tensor of integer class indices, got shape {tuple(target.shape)} "
                f"and dtype {target.dtype}"
            )
        if preds.ndim == 2:
            if preds.shape[1] != C:
                raise ValueError(
                    f"Expected logits `preds` of shape [B, num_classes={C}], got {tuple(preds.shape)}. "
                    f"Does the model's head have {C} outputs?"
                )
        elif preds.ndim == 1:
            if preds.dtype.is_floating_point or preds.dtype.is_complex or preds.dtype == torch.bool:
                raise ValueError(
                    f"Expected 1-D `preds` to hold integer class indices, got dtype {preds.dtype}; "
                    f"pass logits of shape [B, {C}] instead"
                )
        else:
            raise ValueError(
                f"Expected `preds` to be logits [B, {C}] or class indices [B], got shape {tuple(preds.shape)}"
            )
        if preds.shape[0] != target.shape[0]:
            raise ValueError(
                f"Expected `preds` and `target` to have the same batch size, got {preds.shape[0]} and {target.shape[0]}"
            )
        if target.numel() == 0:
            return
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"Expected `target` labels in [0, {C}), found min {lo} and max {hi}")
        if preds.ndim == 1:
            lo, hi = int(preds.min()), int(preds.max())
            if lo < 0 or hi >= C:
                raise ValueError(f"Expected predicted class indices `preds` in [0, {C}), found min {lo} and max {hi}")

    def compute(self) -> Tensor:
        """Per-class accuracy ``[C]`` (float); ``nan`` for classes without evaluation samples."""
        return _per_class_accuracy(self.correct, self.total)

    def per_class(self) -> Tensor:
        """Per-class accuracy ``[C]`` from the (synced) states; ``nan`` for classes without evaluation samples."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=getattr(self, "_to_sync", True),
            should_unsync=getattr(self, "_should_unsync", True),
        ):
            return _per_class_accuracy(self.correct, self.total).clone()


def _per_class_accuracy(correct: Tensor, total: Tensor) -> Tensor:
    acc = correct.double() / total.double()  # 0 / 0 -> nan
    return acc.float()


class LongTailAccuracy(PerClassAccuracy):
    r"""Overall, balanced and many/medium/few-shot top-1 accuracy for long-tailed classification.

    With per-class accuracy :math:`a_c` (see :class:`PerClassAccuracy`), :math:`E` the classes that occur in the
    evaluated data and :math:`G_g` the classes of shot group :math:`g` (from the *training* counts, see
    :func:`~lightning_lt.metrics.groups.shot_groups`):

    .. math::
        \mathrm{acc} = \frac{\sum_c \mathrm{correct}_c}{\sum_c \mathrm{total}_c},\quad
        \mathrm{balanced\_acc} = \operatorname{mean}_{c \in E} a_c,\quad
        \mathrm{acc}_g = \operatorname{mean}_{c \in G_g \cap E} a_c

    (OLTR convention). A group with no classes in :math:`G_g \cap E` gives ``nan`` and a warning, never 0:
    e.g. CIFAR-10-LT with imbalance factor 100 has no few-shot class.

    Args:
        class_counts: training images per class (defines ``C`` and the groups).
        many_threshold: classes with ``n_c > many_threshold`` are many-shot.
        few_threshold: classes with ``n_c < few_threshold`` are few-shot; the rest are medium-shot.
        validate_args: check inputs in :meth:`update`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: invalid ``class_counts`` (empty, negative, non-integer) or thresholds.

    Example:
        >>> import torch
        >>> metric = LongTailAccuracy(class_counts=[500, 50, 5])
        >>> logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
        >>> metric.update(logits, torch.tensor([0, 1, 2, 2]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'acc': 0.75, 'balanced_acc': 0.8333, 'acc_many': 1.0, 'acc_medium': 1.0, 'acc_few': 0.5}
    """

    groups: Tensor

    def __init__(
        self,
        class_counts: Sequence[int],
        many_threshold: int = 100,
        few_threshold: int = 20,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        counts = validate_class_counts(class_counts)
        super().__init__(num_classes=len(counts), validate_args=validate_args, **kwargs)
        self.class_counts = counts
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.register_buffer("groups", shot_groups(counts, many_threshold, few_threshold), persistent=False)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Dict of 0-dim float tensors: ``acc``, ``balanced_acc``, ``acc_many``, ``acc_medium``, ``acc_few``."""
        per_class = _per_class_accuracy(self.correct, self.total)
        seen = self.total > 0
        nan = torch.tensor(float("nan"), device=per_class.device)
        out = {
            "acc": (self.correct.sum().double() / self.total.sum().double()).float(),  # 0 / 0 -> nan
            "balanced_acc": per_class[seen].mean() if seen.any() else nan,
        }
        groups = self.groups.to(per_class.device)
        for g, name in enumerate(SHOT_NAMES):
            in_group = groups == g
            mask = in_group & seen
            if mask.any():
                out[f"acc_{name}"] = per_class[mask].mean()
                continue
            reason = (
                "the training counts have no such class"
                if not in_group.any()
                else "none of its classes occurs in the evaluated data"
            )
            group = describe_group(g, self.many_threshold, self.few_threshold)
            warnings.warn(
                f"{type(self).__name__}: the '{name}' group, i.e. {group} "
                f"with many_threshold={self.many_threshold} and few_threshold={self.few_threshold}, is empty because "
                f"{reason}; `acc_{name}` is nan.",
                UserWarning,
                stacklevel=3,
            )
            out[f"acc_{name}"] = nan.clone()
        return out
