"""Long-tailed class-count profiles and the image selection of the LDAM-DRW protocol.

CIFAR-10-LT / CIFAR-100-LT (Cao et al., LDAM-DRW, 2019) keep, for class ``i`` (the original label
index), ``n_i = int(n_max * (1 / IF) ** (i / (C - 1)))`` images ("exp" profile), or ``n_max`` for the
first ``C // 2`` classes and ``int(n_max / IF)`` for the others ("step" profile). Which images are kept
is decided by seeding numpy with 0, shuffling each class's indices in ascending label order and
keeping the first ``n_i``. Both functions here reproduce that protocol exactly.
"""

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["check_imbalance_arguments", "imbalance_counts", "long_tailed_indices"]

_PROFILES = ("exp", "step")


def check_imbalance_arguments(imbalance_factor: float, profile: str = "exp") -> None:
    """Raise ``ValueError`` unless ``imbalance_factor`` >= 1 (finite) and ``profile`` is ``"exp"`` or ``"step"``."""
    if not math.isfinite(float(imbalance_factor)) or imbalance_factor < 1:
        raise ValueError(
            f"Expected `imbalance_factor` >= 1 (n_max / n_min, e.g. 100; 1 = balanced), got {imbalance_factor!r}"
        )
    if profile not in _PROFILES:
        raise ValueError(f"Expected `profile` to be one of {_PROFILES}, got {profile!r}")


def imbalance_counts(
    n_max: int,
    num_classes: int,
    imbalance_factor: float,
    profile: Literal["exp", "step"] = "exp",
) -> list[int]:
    """Per-class training counts of a long-tailed profile (LDAM-DRW protocol).

    ``exp``: ``n_i = int(n_max * (1 / IF) ** (i / (C - 1)))`` for ``i = 0 .. C - 1``, so class 0 keeps
    ``n_max`` images and class ``C - 1`` keeps ``int(n_max / IF)``.
    ``step``: the first ``C // 2`` classes keep ``n_max``, the remaining ``C - C // 2`` keep
    ``int(n_max * (1 / IF))``.
    ``IF = 1`` gives the balanced profile ``[n_max] * C``.

    Args:
        n_max: images of the largest (first) class, e.g. 5000 for CIFAR-10, 500 for CIFAR-100.
        num_classes: number of classes ``C``.
        imbalance_factor: ``IF = n_max / n_min`` (>= 1), e.g. 100.
        profile: ``"exp"`` (exponential decay) or ``"step"``.

    Returns:
        ``C`` integer counts in class-index order.

    Raises:
        ValueError: if ``imbalance_factor < 1`` (or not finite), ``n_max < 1``, ``num_classes < 1``,
            an unknown ``profile``, or if the profile would leave a class with zero images
            (``imbalance_factor`` too large for ``n_max``).

    Example:
        >>> imbalance_counts(5000, 10, 100)
        [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        >>> sum(imbalance_counts(500, 100, 100))
        10847
        >>> imbalance_counts(5000, 10, 100, profile="step")
        [5000, 5000, 5000, 5000, 5000, 50, 50, 50, 50, 50]
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"Expected `n_max` to be a positive integer, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive integer, got {num_classes!r}")
    check_imbalance_arguments(imbalance_factor, profile)
    ratio = 1.0 / float(imbalance_factor)  # LDAM-DRW's `imb_factor` (0.01 for IF=100)
    if profile == "exp":
        if num_classes == 1:
            counts = [int(n_max)]
        else:
            counts = [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    else:
        head = num_classes // 2
        counts = [int(n_max)] * head + [int(n_max * ratio)] * (num_classes - head)
    if min(counts) < 1:
        raise ValueError(
            f"`imbalance_factor`={imbalance_factor} is too large for `n_max`={n_max}: the {profile!r} profile "
            f"leaves class {counts.index(min(counts))} with 0 images. Use `imbalance_factor` <= {n_max}."
        )
    return counts


def long_tailed_indices(targets: Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices of the images kept by the LDAM-DRW long-tailed sub-sampling.

    Equivalent to ``np.random.seed(seed)`` followed by, for each class ``c`` in ascending order,
    ``idx = np.where(targets == c)[0]; np.random.shuffle(idx); keep idx[:counts[c]]``. It uses a private
    ``np.random.RandomState(seed)`` (the same stream as the global seeding) so the global numpy RNG
    is left untouched.

    Args:
        targets: label of every image of the (balanced) source set, in ``[0, len(counts))``.
        counts: images to keep per class, e.g. from :func:`imbalance_counts`.
        seed: numpy seed of the protocol (0 in LDAM-DRW).

    Returns:
        int64 array of the kept indices, grouped by class in ascending label order (within a class,
        in shuffled order), of length ``sum(counts)``.

    Raises:
        ValueError: if a label lies outside ``[0, len(counts))``, a count is negative, or a class has fewer
            images than requested.

    Example:
        >>> targets = [0, 1, 0, 1, 0, 1, 0, 1]
        >>> idx = long_tailed_indices(targets, [4, 2], seed=0)
        >>> sorted(idx[:4].tolist()), len(idx)
        ([0, 2, 4, 6], 6)
    """
    targets_np = np.asarray(targets, dtype=np.int64).reshape(-1)
    counts = [int(c) for c in counts]
    num_classes = len(counts)
    if any(c < 0 for c in counts):
        raise ValueError(f"Expected non-negative `counts`, got {counts}")
    if targets_np.size and (targets_np.min() < 0 or targets_np.max() >= num_classes):
        raise ValueError(
            f"Expected every label in `targets` to lie in [0, {num_classes}) (one count per class), "
            f"got labels in [{targets_np.min()}, {targets_np.max()}]"
        )
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets_np == c)[0]
        if idx.size < n_c:
            raise ValueError(
                f"Class {c} has {idx.size} images but the long-tailed profile asks for {n_c} "
                f"(requested counts: {counts}). Provide at least {n_c} images of class {c} or request fewer."
            )
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)
