"""Base class and shared helpers of the long-tail losses.

Every loss of :mod:`lightning_lt.losses` computes an *unweighted* per-sample loss ``l_i`` and
reduces it with optional per-class weights ``w`` exactly like
``torch.nn.functional.cross_entropy(weight=w)`` does:

* ``"none"``: ``w_{y_i} * l_i`` for every sample, shape ``[B]``;
* ``"sum"``:  ``sum_i w_{y_i} * l_i``;
* ``"mean"``: ``sum_i w_{y_i} * l_i / sum_i w_{y_i}`` (the plain mean when ``w`` is ``None``).

The per-class weights are what :class:`~lightning_lt.callbacks.DeferredReweighting` switches on
with :meth:`LongTailLoss.set_class_weights`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raise a ``ValueError`` unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Expected `reduction` to be one of {_REDUCTIONS}, got {reduction!r}.")


def as_class_counts(class_counts: Any, owner: str = "the loss", required: bool = True) -> Optional[Tensor]:
    """Validate per-class training counts and return them as a float64 tensor ``[C]``.

    Args:
        class_counts: number of training samples of each class (list, tuple, numpy array or
            tensor), or ``None``.
        owner: name used in error messages (e.g. ``"LDAMLoss"``).
        required: raise when ``class_counts`` is ``None`` (otherwise return ``None``).

    Raises:
        ValueError: if the counts are required but missing, not a non-empty 1-D sequence, not
            finite, or some class has a count ``<= 0``.

    Example:
        >>> print(as_class_counts([10, 5, 1]).tolist())
        [10.0, 5.0, 1.0]
    """
    if class_counts is None:
        if required:
            raise ValueError(
                f"`class_counts` is required for {owner} (it defines the class priors), got None. "
                "Pass the number of training samples per class, e.g. `datamodule.class_counts` "
                "(LightningCLI links `data.class_counts` to the model automatically)."
            )
        return None
    if isinstance(class_counts, (str, bytes)):
        raise ValueError(
            f"Expected `class_counts` to be a sequence of per-class sample counts for {owner}, got {class_counts!r}."
        )
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"Expected `class_counts` to be a sequence of per-class sample counts for {owner}, "
            f"got {class_counts!r} ({err})."
        ) from err
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"Expected `class_counts` to be a non-empty 1-D sequence (one count per class) for {owner}, "
            f"got shape {tuple(counts.shape)}."
        )
    if not torch.isfinite(counts).all():
        bad = torch.nonzero(~torch.isfinite(counts)).flatten().tolist()
        raise ValueError(f"`class_counts` must be finite for {owner}; classes {bad} have non-finite counts.")
    bad = torch.nonzero(counts <= 0).flatten().tolist()
    if bad:
        shown = ", ".join(f"class {c} has {counts[c].item():g}" for c in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ValueError(
            f"`class_counts` must be > 0 for every class of {owner}: {shown}{more}. Every class needs at "
            "least one training sample; remove the empty classes from the label set or pass the counts "
            "of the training split."
        )
    return counts


def check_target_range(target: Tensor, num_classes: int, owner: str = "loss") -> None:
    """Raise a ``ValueError`` naming the offending labels unless every ``target`` value is in ``[0, num_classes)``.

    Out-of-range labels otherwise fail far from their cause (an index error, a CUDA device-side assert) or, for
    negative values, not at all: ``weight[-1]`` reads the last class's weight and ``F.cross_entropy`` skips
    ``-100``. Costs one device synchronisation.

    Example:
        >>> check_target_range(torch.tensor([0, 3, -1]), 3, "MyLoss")
        Traceback (most recent call last):
        ...
        ValueError: MyLoss got target value(s) -1, 3 outside [0, 3) for 3 classes (2 of 3 samples). HINT: labels must be class indices 0 .. 2; check the data's labels and that the model's `num_classes` (or the length of `class_counts`) is the data module's.
    """
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        values = torch.unique(target[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:5]) + (f" (and {len(values) - 5} more)" if len(values) > 5 else "")
        raise ValueError(
            f"{owner} got target value(s) {shown} outside [0, {num_classes}) for {num_classes} classes "
            f"({int(bad.sum())} of {target.numel()} samples). HINT: labels must be class indices 0 .. "
            f"{num_classes - 1}; check the data's labels and that the model's `num_classes` (or the length of "
            "`class_counts`) is the data module's."
        )


def check_logits_target(logits: Tensor, target: Tensor, num_classes: Optional[int] = None, owner: str = "loss") -> None:
    """Check that ``logits`` is ``[B, C]``, ``target`` is an integer ``[B]`` with values in ``[0, C)`` and
    (optionally) ``C == num_classes``."""
    if logits.ndim != 2:
        raise ValueError(
            f"{owner} expects `logits` of shape [batch_size, num_classes], got shape {tuple(logits.shape)}. "
            "Flatten extra dimensions first (e.g. `logits.flatten(0, -2)` with `target.flatten()`)."
        )
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{owner} expects `target` of shape [batch_size] = [{logits.shape[0]}] (class indices), "
            f"got shape {tuple(target.shape)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"{owner} expects `target` to hold integer class indices, got dtype {target.dtype}; "
            "use `target.long()` (one-hot or soft targets are not supported)."
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"{owner} got `logits` with {logits.shape[1]} classes (shape {tuple(logits.shape)}) but "
            f"`class_counts` has {num_classes} entries. The classifier's output size must equal "
            "len(class_counts)."
        )
    check_target_range(target, logits.shape[1], owner)


def check_class_vector(vector: Optional[Tensor], num_classes: int, name: str, owner: str = "loss") -> None:
    """Check that a per-class vector (``weight``, ``log_prior``, ``margins``) is 1-D with ``num_classes`` entries."""
    if vector is not None and (vector.ndim != 1 or vector.shape[0] != num_classes):
        raise ValueError(
            f"{owner}: `{name}` must have one entry per class ({num_classes}, the size of the logits' last "
            f"dimension), got shape {tuple(vector.shape)}."
        )


def weighted_reduce(
    loss: Tensor, target: Tensor, weight: Optional[Tensor] = None, reduction: Reduction = "mean"
) -> Tensor:
    """Reduce per-sample losses with optional per-class weights, as ``F.cross_entropy(weight=...)`` does.

    ``"none"`` returns ``w_{y_i} l_i``, ``"sum"`` returns ``sum_i w_{y_i} l_i`` and ``"mean"`` returns
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (``w = 1`` when ``weight`` is ``None``).

    Args:
        loss: unweighted per-sample losses ``[B]``.
        target: class indices ``[B]``.
        weight: optional per-class weights ``[C]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> loss = torch.tensor([1.0, 2.0, 3.0])
        >>> target = torch.tensor([0, 1, 1])
        >>> print(weighted_reduce(loss, target, torch.tensor([2.0, 1.0])).item())  # (2*1 + 2 + 3) / (2 + 1 + 1)
        1.75
    """
    check_reduction(reduction)
    if weight is not None:
        sample_weight = weight.to(dtype=loss.dtype)[target]
        loss = loss * sample_weight
        if reduction == "mean":
            return loss.sum() / sample_weight.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class LongTailLoss(nn.Module):
    """Base class of the long-tail losses: class priors as buffers plus optional per-class weights.

    With ``n_c`` the training count of class ``c`` and ``N = sum_c n_c`` it stores the buffers

    * ``class_counts``: ``n_c`` as float tensor ``[C]`` (empty when no counts were given),
    * ``log_prior``: ``log(n_c / N)`` ``[C]`` (empty when no counts were given),
    * ``weight``: per-class weights ``w_c`` ``[C]`` or ``None`` (unweighted),

    so ``.to(device)`` / ``.to(dtype)`` move them and they are saved in ``state_dict`` (``weight``
    only while it is set). Subclasses implement :meth:`_compute` and reduce with
    :func:`weighted_reduce` (``mean = sum_i w_{y_i} l_i / sum_i w_{y_i}``, as
    ``F.cross_entropy(weight=w)``).

    Args:
        class_counts: training samples per class, or ``None`` for losses that do not need priors.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: if ``class_counts`` is missing where :attr:`requires_class_counts` is true, or
            has a class with count ``<= 0``; if ``reduction`` is unknown.

    Example:
        >>> loss = LongTailLoss([30, 10])
        >>> print([round(v, 4) for v in loss.log_prior.tolist()])
        [-0.2877, -1.3863]
    """

    #: Whether ``class_counts=None`` is an error (losses that use the class priors).
    requires_class_counts: bool = False
    #: Whether the loss scores each class with its own sigmoid (one-vs-rest) rather than a softmax: a linear
    #: classifier then starts best from the bias ``-log(C - 1)`` (``LongTailClassifier(head_bias_init="auto")``).
    sigmoid_outputs: bool = False

    class_counts: Tensor
    log_prior: Tensor
    weight: Optional[Tensor]

    def __init__(self, class_counts: Optional[Sequence[int]] = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        counts = as_class_counts(class_counts, type(self).__name__, required=self.requires_class_counts)
        if counts is None:
            empty = torch.zeros(0, dtype=torch.get_default_dtype())
            self.register_buffer("class_counts", empty)
            self.register_buffer("log_prior", empty.clone())
        else:
            self.register_buffer("class_counts", counts.to(torch.get_default_dtype()))
            self.register_buffer("log_prior", (counts / counts.sum()).log().to(torch.get_default_dtype()))
        self.register_buffer("weight", None, persistent=True)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes given by ``class_counts`` (``None`` when the loss was built without counts)."""
        return self.class_counts.numel() or None

    def set_class_weights(self, weight: Optional[Union[Tensor, Sequence[float]]]) -> None:
        """Set (or clear with ``None``) the per-class weights ``w_c`` used in the reduction.

        The weights are stored as the ``weight`` buffer on the loss's device and floating dtype.

        Args:
            weight: ``C`` non-negative finite weights, or ``None`` for an unweighted loss.

        Raises:
            ValueError: if ``weight`` is not 1-D, its length differs from ``len(class_counts)``, or it
                holds negative or non-finite values.

        Example:
            >>> loss = LongTailLoss([30, 10])
            >>> loss.set_class_weights([0.5, 1.5])
            >>> print(loss.weight.tolist())
            [0.5, 1.5]
        """
        if weight is None:
            self.weight = None
            return
        w = torch.as_tensor(weight).detach()
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(
                f"Expected `weight` of {type(self).__name__}.set_class_weights to be a 1-D sequence with one "
                f"weight per class, got shape {tuple(w.shape)}."
            )
        num_classes = self.num_classes
        if num_classes is not None and w.numel() != num_classes:
            raise ValueError(
                f"Expected `weight` of {type(self).__name__}.set_class_weights to have {num_classes} entries "
                f"(len(class_counts)), got {w.numel()}. Compute the weights from the same `class_counts`."
            )
        if w.device.type != "meta":
            values = w.to(device="cpu", dtype=torch.float64)
            if not torch.isfinite(values).all() or (values < 0).any():
                raise ValueError(
                    f"Expected `weight` of {type(self).__name__}.set_class_weights to be finite and >= 0, got "
                    f"{values.tolist()}."
                )
        self.weight = w.to(device=self.log_prior.device, dtype=self.log_prior.dtype)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the loss of ``logits`` ``[B, C]`` for class indices ``target`` ``[B]``."""
        check_logits_target(logits, target, self.num_classes, owner=type(self).__name__)
        return self._compute(logits, target)

    def per_sample_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample losses ``[B]`` whose mean is the ``"mean"`` reduction of this loss.

        Unweighted: ``l_i``. With class weights: ``w_{y_i} l_i * B / sum_j w_{y_j}``, so that the mean is
        ``sum_i w_{y_i} l_i / sum_j w_{y_j}``. Used by ImbSAM / SSE-SAM, which split the batch loss into
        head-class and tail-class sums.

        Example:
            >>> loss = LongTailLoss([30, 10])
            >>> loss._compute = lambda logits, target: weighted_reduce(logits[:, 0], target, loss.weight, loss.reduction)
            >>> loss.set_class_weights([1.0, 3.0])
            >>> per_sample = loss.per_sample_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))
            >>> print(per_sample.tolist(), per_sample.mean().item())
            [0.5, 3.0] 1.75
        """
        check_logits_target(logits, target, self.num_classes, owner=type(self).__name__)
        reduction = self.reduction
        self.reduction = "none"
        try:
            per_sample = self._compute(logits, target)
        finally:
            self.reduction = reduction
        if self.weight is not None:
            per_sample = per_sample * (per_sample.shape[0] / self.weight.to(per_sample.dtype)[target].sum())
        return per_sample

    def _compute(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement `_compute(logits, target)`.")

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # `weight` is a buffer only while it is set. Follow the saved state so that a checkpoint saved
        # with weights (e.g. after DeferredReweighting switched them on) loads into a fresh loss and
        # vice versa. A state dict without this loss's entries (partial, strict=False) leaves it alone.
        key = prefix + "weight"
        if key in state_dict:
            saved = state_dict[key]
            if self.weight is None or self.weight.shape != saved.shape:
                self.weight = torch.empty(saved.shape, dtype=self.log_prior.dtype, device=self.log_prior.device)
        elif prefix + "class_counts" in state_dict:
            self.weight = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}", f"reduction={self.reduction!r}"]
        if self.weight is not None:
            parts.append("weighted=True")
        return ", ".join(parts)


def check_non_negative(value: float, name: str, owner: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number ``>= 0``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` of {owner} to be a finite number >= 0, got {value!r}.")


def check_positive(value: float, name: str, owner: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number ``> 0``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Expected `{name}` of {owner} to be a finite number > 0, got {value!r}.")
