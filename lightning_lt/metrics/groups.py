"""Many / medium / few-shot class groups of a long-tailed training set."""

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

SHOT_NAMES = ("many", "medium", "few")
"""Names of the shot groups, indexed by the group ids that :func:`shot_groups` returns."""


def validate_class_counts(class_counts: Sequence[int], name: str = "class_counts") -> list[int]:
    """Check that ``class_counts`` is a non-empty sequence of non-negative integers and return it as a list.

    Accepts Python/NumPy integers, integral floats (``5000.0``) and 1-D tensors.

    Args:
        class_counts: training images per class, ``class_counts[c] = n_c``.
        name: argument name used in error messages.

    Raises:
        ValueError: if the sequence is empty, not 1-D, or holds negative or non-integer values.

    Example:
        >>> validate_class_counts((5000, 2997.0, 50))
        [5000, 2997, 50]
    """
    if isinstance(class_counts, Tensor):
        if class_counts.ndim != 1:
            raise ValueError(
                f"Expected `{name}` to be 1-D (one count per class), got shape {tuple(class_counts.shape)}"
            )
        class_counts = class_counts.tolist()
    if isinstance(class_counts, (str, bytes)) or not hasattr(class_counts, "__len__"):
        raise ValueError(f"Expected `{name}` to be a sequence of per-class training counts, got {class_counts!r}")
    counts = list(class_counts)
    if len(counts) == 0:
        raise ValueError(f"Expected `{name}` to be non-empty (one training count per class), got {counts}")
    out = []
    for c, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or float(n) != int(n):
            raise ValueError(f"Expected `{name}` to hold integers, got {n!r} for class {c}")
        if n < 0:
            raise ValueError(f"Expected `{name}` to be non-negative, got {n} for class {c}")
        out.append(int(n))
    return out


def shot_groups(class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20) -> Tensor:
    """Assign every class to the many-, medium- or few-shot group by its training count.

    With ``n_c`` the training count of class ``c`` (OLTR convention, defaults 100 and 20)::

        group(c) = 0 (many)    if n_c > many_threshold
                   1 (medium)  if few_threshold <= n_c <= many_threshold
                   2 (few)     if n_c < few_threshold

    Args:
        class_counts: training images per class.
        many_threshold: classes with more than this many images are many-shot.
        few_threshold: classes with fewer than this many images are few-shot.

    Returns:
        LongTensor of shape ``[C]`` with values in ``{0, 1, 2}``; names in :data:`SHOT_NAMES`.

    Raises:
        ValueError: invalid ``class_counts`` or thresholds (negative, or ``few_threshold > many_threshold``).

    Example:
        >>> shot_groups([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
        tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
        >>> shot_groups([500, 100, 20, 19, 1])
        tensor([0, 1, 1, 2, 2])
    """
    counts = validate_class_counts(class_counts)
    _validate_thresholds(many_threshold, few_threshold)
    n = torch.tensor(counts, dtype=torch.long)
    groups = torch.ones_like(n)
    groups[n > many_threshold] = 0
    groups[n < few_threshold] = 2
    return groups


def _validate_thresholds(many_threshold: int, few_threshold: int) -> None:
    for name, value in (("many_threshold", many_threshold), ("few_threshold", few_threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"Expected `{name}` to be a non-negative integer, got {value!r}")
    if few_threshold > many_threshold:
        raise ValueError(
            f"Expected `few_threshold` <= `many_threshold`, got few_threshold={few_threshold} > "
            f"many_threshold={many_threshold}. Few-shot classes have n_c < few_threshold, "
            f"many-shot classes n_c > many_threshold."
        )


def describe_group(group: int, many_threshold: int, few_threshold: int) -> str:
    """Human-readable definition of a shot group, e.g. ``"few-shot (n_c < 20)"``.

    Example:
        >>> describe_group(1, 100, 20)
        'medium-shot (20 <= n_c <= 100)'
    """
    if group == 0:
        return f"many-shot (n_c > {many_threshold})"
    if group == 1:
        return f"medium-shot ({few_threshold} <= n_c <= {many_threshold})"
    if group == 2:
        return f"few-shot (n_c < {few_threshold})"
    raise ValueError(f"Expected `group` in {{0, 1, 2}}, got {group!r}")
