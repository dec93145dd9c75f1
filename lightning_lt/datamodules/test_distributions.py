"""Test label distributions of the test-agnostic long-tail protocol (SADE, NeurIPS 2022; DirMixE, ICML 2024).

A deployed model does not know the test label prior, so these papers score one model on a family of test sets
built from the balanced test set:

* **SADE** (``data_loader/imbalance_cifar.py``, ``IMBALANCECIFAR10.get_img_num_per_cls`` with ``train=False``):
  forward long-tailed at ratio ``r`` keeps ``int(m * (1 / r) ** (i / (C - 1)))`` images of class ``i`` (``m``: the
  balanced test set's images per class, ``len / C`` as a float), backward long-tailed
  ``int(m * (1 / r) ** ((C - 1 - i) / (C - 1)))``, uniform (``r = 1``) all ``m``. The images are chosen as in
  LDAM-DRW: ``np.random.seed(0)``, then per class in label order shuffle its indices and keep the first ``n_i``
  (:func:`~lightning_lt.datamodules.profiles.long_tailed_indices`). Ratios ``50, 25, 10, 5, 2`` each way plus
  uniform (``test_training_cifar.py``: ``forward50`` ... ``backward50``).
* **DirMixE** (``data_loader/imbalance_cifar.py``, ``DirichletImbalanceCIFAR10.get_img_num_per_cls``): starting
  from SADE's counts ``n`` (forward / backward at ratio 100, or uniform), perturb each by ``+-5%`` (``n_i += (U - 0.5)
  * 0.1 * n_i``), rescale to sum ``m``, draw ``p ~ Dir(n)`` and keep ``max(int(p_i / max(p) * m), 1)`` images of class
  ``i``; the images are then picked by shuffling each class with the same generator. The official script never
  reseeds between draws and builds the adaptation set and the scored set as two separate draws; here each draw comes
  from its own seeded generator (:func:`dirichlet_test_distribution`), and one :class:`TestDistribution` holds the
  indices that both test-time adaptation and scoring use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from lightning_lt.datamodules.profiles import long_tailed_indices
from lightning_lt.datamodules.samplers import derive_seed

__all__ = [
    "DEFAULT_TEST_RATIOS",
    "TestDistribution",
    "check_test_ratio",
    "dirichlet_test_counts",
    "dirichlet_test_distribution",
    "distribution_name",
    "sade_test_counts",
    "sade_test_distributions",
    "select_test_indices",
]

#: SADE's test imbalance ratios (each forward and backward; 1 is the uniform test set).
DEFAULT_TEST_RATIOS: tuple[float, ...] = (50, 25, 10, 5, 2, 1)

Direction = Literal["forward", "backward", "uniform"]
_DIRECTIONS = ("forward", "backward", "uniform")


@dataclass
class TestDistribution:
    """One test label distribution over a balanced test set.

    Attributes:
        name: ``"forward50"``, ``"uniform"``, ``"backward10"``, ``"dirichlet_forward100_0"``, ...
        direction: ``"forward"`` (head classes most frequent), ``"backward"`` or ``"uniform"``.
        ratio: the test imbalance ratio ``n_max / n_min`` of the base profile (1 for uniform).
        counts: images kept per class.
        indices: indices into the balanced test set (grouped by class), ``sum(counts)`` of them.
        kind: ``"sade"`` or ``"dirichlet"``.
    """

    __test__ = False  # not a pytest test class

    name: str
    direction: str
    ratio: float
    counts: list[int]
    indices: np.ndarray = field(repr=False)
    kind: str = "sade"

    @property
    def signed_log_ratio(self) -> float:
        """``log(ratio)`` for forward, ``-log(ratio)`` for backward, 0 for uniform: the x position in plots."""
        sign = {"forward": 1.0, "backward": -1.0}.get(self.direction, 0.0)
        return sign * math.log(self.ratio)


def check_test_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise unless it is a finite number ``>= 1``.

    Example:
        >>> check_test_ratio(0.5)
        Traceback (most recent call last):
        ...
        ValueError: Expected a test imbalance ratio >= 1 (n_max / n_min), got 0.5. HINT: a ratio below 1 is the reversed profile: use direction='backward' with ratio 2 instead.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) or not math.isfinite(ratio):
        raise ValueError(f"Expected a test imbalance ratio >= 1 (n_max / n_min), got {ratio!r}.")
    if ratio < 1:
        raise ValueError(
            f"Expected a test imbalance ratio >= 1 (n_max / n_min), got {ratio!r}. HINT: a ratio below 1 is the "
            f"reversed profile: use direction='backward' with ratio {1 / ratio:g} instead."
        )
    return float(ratio)


def distribution_name(direction: str, ratio: float) -> str:
    """SADE's names: ``"forward50"``, ``"backward2"``, ``"uniform"`` (ratio 1 is uniform either way).

    Example:
        >>> distribution_name("forward", 50), distribution_name("backward", 2.5), distribution_name("backward", 1)
        ('forward50', 'backward2.5', 'uniform')
    """
    ratio = check_test_ratio(ratio)
    if ratio == 1 or direction == "uniform":
        return "uniform"
    return f"{direction}{ratio:g}"


def sade_test_counts(num_per_class: float, num_classes: int, ratio: float, direction: Direction = "forward") -> list[int]:
    """Images per class of SADE's forward / backward long-tailed (or uniform) test set.

    ``n_i = int(m * (1 / r) ** (i / (C - 1)))`` forward, ``int(m * (1 / r) ** ((C - 1 - i) / (C - 1)))`` backward,
    ``int(m)`` uniform, with ``m = num_per_class`` (SADE: ``len(test set) / C``, a float) and ``r = ratio``.

    Args:
        num_per_class: images per class of the balanced test set.
        num_classes: ``C >= 2``.
        ratio: test imbalance ratio ``>= 1``.
        direction: ``"forward"``, ``"backward"`` or ``"uniform"`` (ignores ``ratio``).

    Raises:
        ValueError: ``ratio < 1`` (HINT: the reversed profile is ``direction="backward"``), unknown ``direction``,
            ``num_classes < 2`` or ``num_per_class <= 0``.

    Example:
        >>> sade_test_counts(1000.0, 10, 50, "forward")
        [1000, 647, 419, 271, 175, 113, 73, 47, 30, 20]
        >>> sade_test_counts(1000.0, 10, 50, "backward")[:3]
        [20, 30, 47]
    """
    ratio = check_test_ratio(ratio)
    if direction not in _DIRECTIONS:
        raise ValueError(f"Expected `direction` to be one of {_DIRECTIONS}, got {direction!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2, got {num_classes!r}.")
    if not num_per_class > 0:
        raise ValueError(f"Expected `num_per_class` > 0 (the balanced test set's images per class), got {num_per_class!r}.")
    imb_factor = 1.0 / ratio  # SADE passes 0.02, 0.04, 0.1, 0.2, 0.5: the same doubles as 1 / 50, ... , 1 / 2
    counts = []
    for i in range(num_classes):
        if direction == "uniform":
            exponent = 0.0
        elif direction == "backward":
            exponent = (num_classes - 1 - i) / (num_classes - 1.0)
        else:
            exponent = i / (num_classes - 1.0)
        counts.append(int(num_per_class * imb_factor**exponent))
    return counts


def select_test_indices(
    targets: Sequence[int],
    counts: Sequence[int],
    name: str = "the test distribution",
    rng: Optional[np.random.RandomState] = None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Indices of ``counts[c]`` images of every class ``c``: per class in label order, shuffle its indices and keep
    the first ``counts[c]`` (with ``rng``, else a ``RandomState(seed)``: SADE's ``np.random.seed(0)``).

    Raises:
        ValueError: a class has fewer images than asked for (naming the class, the request and what there is), or a
            label outside ``[0, len(counts))``.

    Example:
        >>> select_test_indices([0, 0, 1, 1], [2, 1], seed=0).tolist()
        [1, 0, 2]
    """
    targets_np = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets_np.size and (targets_np.min() < 0 or targets_np.max() >= len(counts)):
        raise ValueError(
            f"The test set has labels in [{targets_np.min()}, {targets_np.max()}] but {name} has {len(counts)} classes."
        )
    available = np.bincount(targets_np, minlength=len(counts))
    for c, n in enumerate(counts):
        if n > available[c]:
            label = f"class {c}" + (f" ({class_names[c]!r})" if class_names is not None else "")
            raise ValueError(
                f"{name} asks for {n} images of {label}, but the test set has only {int(available[c])} of it. HINT: "
                "build test distributions from a balanced test set (SADE uses m = len(test set) / C images per class), "
                "or use smaller ratios."
            )
    if rng is None:
        return long_tailed_indices(targets_np, counts, seed=seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.where(targets_np == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept).astype(np.int64)


def _balanced_size(targets: Sequence[int], num_classes: Optional[int]) -> tuple[np.ndarray, int, float]:
    targets_np = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets_np.size == 0:
        raise ValueError("The test set is empty: test distributions need a balanced test set.")
    classes = int(num_classes) if num_classes is not None else int(targets_np.max()) + 1
    return targets_np, classes, targets_np.size / classes  # SADE: img_max = len(self.data) / cls_num


def sade_test_distributions(
    targets: Sequence[int],
    ratios: Sequence[float] = DEFAULT_TEST_RATIOS,
    num_classes: Optional[int] = None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> list[TestDistribution]:
    """SADE's family of test sets over a balanced test set with labels ``targets``.

    Ordered forward (largest ratio first), uniform, backward (smallest ratio first): ``forward50 ... forward2,
    uniform, backward2 ... backward50`` for the default ratios. Each set's images are chosen with a fresh
    ``RandomState(seed)`` (SADE seeds 0 for every set).

    Raises:
        ValueError: a ratio ``< 1``, no ratios, or a class without enough test images (naming it).

    Example:
        >>> targets = [c for c in range(3) for _ in range(4)]
        >>> [(d.name, d.counts) for d in sade_test_distributions(targets, ratios=(4, 1))]
        [('forward4', [4, 2, 1]), ('uniform', [4, 4, 4]), ('backward4', [1, 2, 4])]
    """
    ratios = sorted({check_test_ratio(r) for r in ratios}, reverse=True)
    if not ratios:
        raise ValueError("Expected at least one test imbalance ratio, got none.")
    targets_np, classes, per_class = _balanced_size(targets, num_classes)
    plan = [("forward", r) for r in ratios if r > 1] + [("uniform", 1.0)]
    plan += [("backward", r) for r in reversed(ratios) if r > 1]
    out = []
    for direction, ratio in plan:
        name = distribution_name(direction, ratio)
        counts = sade_test_counts(per_class, classes, ratio, direction)  # type: ignore[arg-type]
        indices = select_test_indices(targets_np, counts, f"test distribution {name!r}", seed=seed, class_names=class_names)
        out.append(TestDistribution(name, direction, ratio, counts, indices, "sade"))
    return out


def dirichlet_test_counts(
    base_counts: Sequence[int], num_per_class: float, rng: np.random.RandomState, concentration: Optional[float] = None
) -> list[int]:
    """DirMixE's Dirichlet test-set counts around ``base_counts`` (step for step as
    ``DirichletImbalanceCIFAR10.get_img_num_per_cls``).

    ``alpha_i = n_i + (U_i - 0.5) * 0.1 * n_i`` (``U_i = rng.random_sample()``, one per class in order), rescaled to
    sum ``concentration`` (DirMixE: ``m = num_per_class``); ``p = rng.dirichlet(alpha)``; counts
    ``max(int(p_i / max(p) * m), 1)``: the most likely class keeps ``m`` images.

    Raises:
        ValueError: ``concentration <= 0`` (a Dirichlet concentration must be positive) or empty ``base_counts``.

    Example:
        >>> dirichlet_test_counts([100, 10], 100.0, np.random.RandomState(0))
        [100, 17]
    """
    if concentration is None:
        concentration = float(num_per_class)
    if isinstance(concentration, bool) or not isinstance(concentration, (int, float)) or not 0 < concentration < math.inf:
        raise ValueError(
            f"Expected the Dirichlet concentration to be a finite number > 0, got {concentration!r}. HINT: DirMixE uses "
            "the balanced test set's images per class (leave `concentration=None`); smaller values give draws further "
            "from the base profile."
        )
    alpha = [float(n) for n in base_counts]
    if not alpha:
        raise ValueError("Expected at least one class in `base_counts`.")
    for i in range(len(alpha)):
        alpha[i] += (rng.random_sample() - 0.5) * 0.1 * alpha[i]
    total = sum(alpha)
    alpha = [a * concentration / total for a in alpha]
    probs = rng.dirichlet(alpha)
    top = max(probs)
    return [max(int(p / top * num_per_class), 1) for p in probs]


def dirichlet_test_distribution(
    targets: Sequence[int],
    ratio: float = 100.0,
    direction: Direction = "forward",
    draw: int = 0,
    seed: int = 0,
    concentration: Optional[float] = None,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> TestDistribution:
    """One DirMixE Dirichlet test set around SADE's ``direction`` profile at ``ratio`` (DirMixE: 100, or uniform).

    Draw ``draw`` uses ``np.random.RandomState(derive_seed(seed, d, draw))`` (``d`` = 0 uniform, 1 forward, 2
    backward) for the counts (:func:`dirichlet_test_counts`) and then, continuing the same generator, for the
    image selection, so each draw is reproducible and independent of the others.

    Raises:
        ValueError: ``ratio < 1``, ``concentration <= 0``, or a class without enough test images.

    Example:
        >>> targets = [c for c in range(3) for _ in range(10)]
        >>> d = dirichlet_test_distribution(targets, ratio=10, direction="backward", draw=0, seed=0)
        >>> d.name, d.counts == dirichlet_test_distribution(targets, 10, "backward", 0, 0).counts
        ('dirichlet_backward10_0', True)
    """
    ratio = check_test_ratio(ratio)
    if direction not in _DIRECTIONS:
        raise ValueError(f"Expected `direction` to be one of {_DIRECTIONS}, got {direction!r}.")
    targets_np, classes, per_class = _balanced_size(targets, num_classes)
    base = sade_test_counts(per_class, classes, ratio, direction)
    rng = np.random.RandomState(derive_seed(seed, {"uniform": 0, "forward": 1, "backward": 2}[direction], draw))
    counts = dirichlet_test_counts(base, per_class, rng, concentration)
    name = f"dirichlet_{distribution_name(direction, ratio)}_{draw}"
    indices = select_test_indices(targets_np, counts, f"test distribution {name!r}", rng=rng, class_names=class_names)
    direction = "uniform" if name.startswith("dirichlet_uniform") else direction
    return TestDistribution(name, direction, ratio, counts, indices, "dirichlet")
