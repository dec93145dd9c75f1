"""Test label distributions against transcriptions of SADE's and DirMixE's test-set construction.

References, read, not imported:

- github:Vanint/SADE-AgnosticLT ``data_loader/imbalance_cifar.py``, ``IMBALANCECIFAR10.__init__`` /
  ``get_img_num_per_cls`` / ``gen_imbalanced_data`` (``np.random.seed(rand_number=0)``; ``img_max = len(data) /
  cls_num``; ``int(img_max * imb_factor ** (i / (C - 1)))``, reversed exponent for ``reverse=True``; per class shuffle
  and keep the first ``n``) with ``train=False``, and ``test_training_cifar.py``'s ``distrb`` table (``forward50`` is
  ``imb_factor=0.02``, ..., ``uniform`` is ``1``, ``backward*`` the same with ``reverse=True``);
- github:scongl/DirMixE ``data_loader/imbalance_cifar.py``, ``DirichletImbalanceCIFAR10.get_img_num_per_cls``
  (perturb, rescale to ``img_max``, ``np.random.dirichlet``, ``max(int(p / max(p) * img_max), 1)``) followed by
  ``gen_imbalanced_data`` on the same global numpy generator.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lt.datamodules.test_distributions import (
    dirichlet_test_counts,
    dirichlet_test_distribution,
    distribution_name,
    sade_test_counts,
    sade_test_distributions,
    select_test_indices,
)

SADE_DISTRIBUTIONS = {  # test_training_cifar.py, `distrb`
    "uniform": (1, False), "forward50": (0.02, False), "forward25": (0.04, False), "forward10": (0.1, False),
    "forward5": (0.2, False), "forward2": (0.5, False), "backward50": (0.02, True), "backward25": (0.04, True),
    "backward10": (0.1, True), "backward5": (0.2, True), "backward2": (0.5, True),
}  # fmt: skip


def official_img_num_per_cls(data_len: int, cls_num: int, imb_factor: float, reverse: bool) -> list[int]:
    """``IMBALANCECIFAR10.get_img_num_per_cls`` (``imb_type='exp'``)."""
    img_max = data_len / cls_num
    img_num_per_cls = []
    for cls_idx in range(cls_num):
        if reverse:
            num = img_max * (imb_factor ** ((cls_num - 1 - cls_idx) / (cls_num - 1.0)))
        else:
            num = img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))
        img_num_per_cls.append(int(num))
    return img_num_per_cls


def official_gen_imbalanced_indices(targets, img_num_per_cls) -> np.ndarray:
    """``gen_imbalanced_data`` on the global numpy generator, returning the kept indices instead of the images."""
    targets_np = np.array(targets, dtype=np.int64)
    classes = np.unique(targets_np)
    kept = []
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        kept.append(idx[:the_img_num])
    return np.concatenate(kept)


def balanced_targets(num_classes: int, per_class: int, seed: int = 0) -> list[int]:
    """A balanced test set's labels in a shuffled order (as CIFAR's test batch)."""
    targets = np.repeat(np.arange(num_classes), per_class)
    np.random.RandomState(seed).shuffle(targets)
    return targets.tolist()


@pytest.mark.parametrize("num_classes", [10, 100], ids=["cifar10", "cifar100"])
@pytest.mark.parametrize("name", sorted(SADE_DISTRIBUTIONS))
def test_sade_counts_equal_official_construction(num_classes, name):
    imb_factor, reverse = SADE_DISTRIBUTIONS[name]
    expected = official_img_num_per_cls(10_000, num_classes, imb_factor, reverse)
    ratio = 1 / imb_factor if imb_factor != 1 else 1
    direction = "uniform" if ratio == 1 else ("backward" if reverse else "forward")
    assert distribution_name(direction, ratio) == name
    assert sade_test_counts(10_000 / num_classes, num_classes, ratio, direction) == expected


@pytest.mark.parametrize("num_classes", [10, 100], ids=["cifar10", "cifar100"])
def test_sade_family_selects_the_official_images(num_classes):
    targets = balanced_targets(num_classes, 10_000 // num_classes)
    family = sade_test_distributions(targets)
    assert [d.name for d in family] == [
        "forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
        "backward2", "backward5", "backward10", "backward25", "backward50",
    ]  # fmt: skip
    for dist in family:
        imb_factor, reverse = SADE_DISTRIBUTIONS[dist.name]
        np.random.seed(0)  # IMBALANCECIFAR10(rand_number=0)
        counts = official_img_num_per_cls(len(targets), num_classes, imb_factor, reverse)
        assert dist.counts == counts
        np.testing.assert_array_equal(dist.indices, official_gen_imbalanced_indices(targets, counts))


def official_dirichlet_counts(data_len: int, cls_num: int, imb_factor: float, reverse: bool) -> list[int]:
    """``DirichletImbalanceCIFAR10.get_img_num_per_cls`` (``imb_type='exp'``) on the global numpy generator."""
    img_max = data_len / cls_num
    img_num_per_cls = official_img_num_per_cls(data_len, cls_num, imb_factor, reverse)
    alpha = [float(x) for x in img_num_per_cls]
    for i in range(len(alpha)):
        alpha[i] += (np.random.random() - 0.5) * 0.1 * alpha[i]
    alpha_norm = sum(alpha)
    alpha = [x * img_max / alpha_norm for x in alpha]
    img_num_per_cls = np.random.dirichlet(alpha)
    pro_max = max(img_num_per_cls)
    return [max(int(x / pro_max * img_max), 1) for x in img_num_per_cls]


@pytest.mark.parametrize("imb_factor, reverse", [(1, False), (0.01, False), (0.01, True)], ids=["uniform", "fwd", "bwd"])
@pytest.mark.parametrize("seed", [0, 5])
def test_dirichlet_draw_follows_dirmixe(imb_factor, reverse, seed):
    targets = balanced_targets(10, 1000)
    np.random.seed(seed)
    expected_counts = official_dirichlet_counts(len(targets), 10, imb_factor, reverse)
    expected_indices = official_gen_imbalanced_indices(targets, expected_counts)

    rng = np.random.RandomState(seed)
    base = sade_test_counts(1000.0, 10, 1 / imb_factor, "backward" if reverse else "forward")
    counts = dirichlet_test_counts(base, 1000.0, rng)
    assert counts == expected_counts
    np.testing.assert_array_equal(select_test_indices(targets, counts, rng=rng), expected_indices)


def test_dirichlet_distributions_are_reproducible_from_a_seed():
    targets = balanced_targets(10, 100)
    a = dirichlet_test_distribution(targets, 100, "backward", draw=1, seed=3)
    b = dirichlet_test_distribution(targets, 100, "backward", draw=1, seed=3)
    c = dirichlet_test_distribution(targets, 100, "backward", draw=2, seed=3)
    assert a.counts == b.counts and np.array_equal(a.indices, b.indices)
    assert a.counts != c.counts
    assert a.name == "dirichlet_backward100_1" and max(a.counts) == 100 and min(a.counts) >= 1
    assert a.counts[-1] > a.counts[0]  # backward: the tail classes dominate


def test_bad_ratios_concentrations_and_unbalanced_sets():
    with pytest.raises(ValueError, match="ratio >= 1.*got 0.5.*HINT.*backward"):
        sade_test_counts(100.0, 10, 0.5)
    with pytest.raises(ValueError, match="ratio >= 1"):
        sade_test_distributions(balanced_targets(3, 4), ratios=(4, 0.2))
    with pytest.raises(ValueError, match="concentration.*> 0.*HINT"):
        dirichlet_test_distribution(balanced_targets(3, 10), 10, "forward", concentration=0.0)
    targets = [0] * 10 + [1] * 10 + [2] * 4  # m = 8 images per class, but class 2 has 4
    with pytest.raises(ValueError, match=r"asks for 8 images of class 2 \('bird'\), but the test set has only 4.*HINT"):
        sade_test_distributions(targets, ratios=(1,), class_names=["plane", "car", "bird"])
