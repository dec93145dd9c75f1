"""Long-tailed class-count profiles and the image selection of the LDAM-DRW protocol.

CIFAR-10-LT / CIFAR-100-LT (Cao et al., LDAM-DRW, 2019) keep, for class ``i`` (the original label
index), ``n_i = int(n_max * (1 / IF) ** (i / (C - 1)))`` images ("exp" profile), or ``n_max`` for the
first ``C // 2`` classes and ``int(n_max / IF)`` for the others ("step" profile). Which images are kept
is decided by seeding numpy with 0, shuffling each class's indices in ascending label order and
keeping the first ``n_i``. Both functions here reproduce that protocol exactly.

Folders and list files whose classes differ in size are cut to a profile by :func:`profile_counts` (the
largest count ``n_max``: the largest, the smallest or the mean class, or a number; short classes are an error
or keep what they have). :func:`held_out_counts` and :func:`stratified_holdout` draw the per-class validation
hold-out of :class:`~lightning_lt.datamodules.base.LongTailDataModule` (``val_fraction``).
"""

import math
from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np

__all__ = [
    "check_imbalance_arguments",
    "check_n_max",
    "held_out_counts",
    "imbalance_counts",
    "long_tailed_indices",
    "profile_counts",
    "resolve_n_max",
    "stratified_holdout",
]

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
                f"(requested counts: {counts}). Provide at least {n_c} images of class {c} or request fewer "
                "(ImageFolderLT / ListFileDataModule: HINT: `n_max: min` or `cap_to_available: true`)."
            )
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)


def resolve_n_max(available: Sequence[int], n_max: Optional[Union[int, str]] = None) -> int:
    """The largest count of a profile over classes with ``available`` images each.

    ``None``: the largest class (``max(available)``); ``"min"``: the smallest class, so that no class is
    asked for more images than it has; ``"mean"``: ``sum(available) // C``, the LDAM-DRW convention
    (``img_max = len(data) / cls_num``); an integer: itself.

    Raises:
        ValueError: an ``n_max`` that is neither ``None``, ``"min"``, ``"mean"`` nor a positive integer.

    Example:
        >>> [resolve_n_max([5923, 6742, 5421], n) for n in (None, "min", "mean", 5000)]
        [6742, 5421, 6028, 5000]
    """
    check_n_max(n_max)
    if n_max is None:
        return int(max(available))
    if n_max == "min":
        return int(min(available))
    if n_max == "mean":
        return int(sum(available)) // len(available)
    return int(n_max)


def check_n_max(n_max: object) -> None:
    """Raise ``ValueError`` unless ``n_max`` is ``None``, ``"min"``, ``"mean"`` or a positive integer."""
    if n_max is None or (isinstance(n_max, str) and n_max in ("min", "mean")):
        return
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(
            f"Expected `n_max` (the largest count of the long-tailed profile) to be a positive integer, 'min' (the "
            f"smallest class), 'mean' (the mean class size) or None (the largest class), got {n_max!r}"
        )


def profile_counts(
    available: Sequence[int],
    imbalance_factor: float,
    profile: Literal["exp", "step"] = "exp",
    n_max: Optional[Union[int, str]] = None,
    cap_to_available: bool = False,
    class_names: Optional[Sequence[str]] = None,
) -> list[int]:
    """Per-class counts of a long-tailed profile cut from classes with ``available`` images each.

    The counts are :func:`imbalance_counts` of ``resolve_n_max(available, n_max)`` (see :func:`resolve_n_max`).
    A class with fewer images than its count is an error, or, with ``cap_to_available``, keeps all of its images
    (the returned count is then what exists: the counts are always what is trained on).

    Raises:
        ValueError: a class has fewer images than the profile asks (names the class, both numbers and the
            options that fix it), or the arguments of :func:`imbalance_counts` / :func:`resolve_n_max`.

    Example:
        >>> profile_counts([5923, 6742, 5421], 10, n_max="min")
        [5421, 1714, 542]
        >>> profile_counts([5923, 6742, 5421], 10, n_max=6000, cap_to_available=True)
        [5923, 1897, 600]
    """
    largest = resolve_n_max(available, n_max)
    counts = imbalance_counts(largest, len(available), imbalance_factor, profile)
    short = [c for c, (n, have) in enumerate(zip(counts, available)) if have < n]
    if cap_to_available:
        return [min(n, int(have)) for n, have in zip(counts, available)]
    if short:
        c = short[0]
        name = f" ({class_names[c]!r})" if class_names is not None else ""
        sources = {None: "the largest class", "min": "the smallest class", "mean": "the mean class size"}
        chosen = sources.get(n_max, "given")
        raise ValueError(
            f"Class {c}{name} has {available[c]} images but the long-tailed profile ({profile!r}, imbalance_factor="
            f"{imbalance_factor}, n_max={largest}: {chosen}) asks for {counts[c]} ({len(short)} class(es) short: "
            f"{short[:10]}). HINT: set `n_max: min` (the smallest class's size, {min(available)}: no class is short), "
            f"a smaller `n_max`, or `cap_to_available: true` (a short class keeps the images it has; class_counts "
            f"reports them)."
        )
    return counts


def held_out_counts(counts: Sequence[int], fraction: float) -> list[int]:
    """Images held out per class for validation: ``floor(fraction * n_c + 0.5)`` (``fraction * n_c`` rounded half up).

    Rounding (rather than flooring) gives a tail class of 5 images one validation image at ``fraction=0.1``, so
    that few-shot accuracy can be measured on the held-out split; a class of fewer than ``0.5 / fraction`` images
    gives none.

    Example:
        >>> held_out_counts([5000, 387, 50, 5, 4], 0.1)
        [500, 39, 5, 1, 0]
    """
    return [int(math.floor(fraction * int(n) + 0.5)) for n in counts]


def stratified_holdout(targets: Sequence[int], held_out: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0 .. len(targets) - 1`` into kept and held-out ones, ``held_out[c]`` of class ``c``.

    For each class ``c`` in ascending order, its positions (ascending) are permuted by a private
    ``np.random.RandomState(seed)`` and the first ``held_out[c]`` are held out. The result depends only on
    ``targets``, ``held_out`` and ``seed`` (not on the global random state): every DDP rank computes the same split.

    Returns:
        ``(kept, held)``: int64 arrays of positions, each in ascending order, disjoint, together all positions.

    Raises:
        ValueError: ``held_out[c]`` larger than the number of class-``c`` positions, or negative.

    Example:
        >>> kept, held = stratified_holdout([0, 0, 0, 0, 1, 1], [2, 1], seed=0)
        >>> len(held), sorted(set(kept.tolist()) | set(held.tolist())) == list(range(6))
        (3, True)
    """
    targets_np = np.asarray(targets, dtype=np.int64).reshape(-1)
    rng = np.random.RandomState(seed)
    held = []
    for c, n in enumerate(held_out):
        positions = np.flatnonzero(targets_np == c)
        if not 0 <= n <= positions.size:
            raise ValueError(f"Cannot hold out {n} of the {positions.size} images of class {c}")
        held.append(positions[rng.permutation(positions.size)[:n]])
    held_np = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(targets_np.size, dtype=bool)
    mask[held_np] = False
    return np.flatnonzero(mask).astype(np.int64), held_np.astype(np.int64)
