import numpy as np
import pytest
import torch

from lightning_lt.metrics import SHOT_NAMES, describe_group, shot_groups, validate_class_counts


def _cifar_lt_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    # LDAM-DRW exponential profile, written out here independently of lightning_lt.datamodules
    return [int(n_max * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


def test_shot_names():
    assert SHOT_NAMES == ("many", "medium", "few")


def test_boundaries_follow_oltr_convention():
    # many: n > 100; medium: 20 <= n <= 100; few: n < 20
    groups = shot_groups([101, 100, 50, 20, 19, 0])
    assert groups.dtype == torch.long
    assert groups.tolist() == [0, 1, 1, 1, 2, 2]


def test_custom_thresholds():
    assert shot_groups([11, 10, 5, 4], many_threshold=10, few_threshold=5).tolist() == [0, 1, 1, 2]
    # equal thresholds: medium holds exactly that count
    assert shot_groups([11, 10, 9], many_threshold=10, few_threshold=10).tolist() == [0, 1, 2]


def test_cifar10_lt_if100_has_no_few_shot_class():
    counts = _cifar_lt_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    groups = shot_groups(counts)
    assert torch.bincount(groups, minlength=3).tolist() == [8, 2, 0]


def test_cifar100_lt_if100_splits_35_35_30():
    counts = _cifar_lt_counts(500, 100, 100)
    assert sum(counts) == 10847
    groups = shot_groups(counts)
    assert torch.bincount(groups, minlength=3).tolist() == [35, 35, 30]


@pytest.mark.parametrize(
    "counts", [torch.tensor([3, 2, 1]), np.array([3, 2, 1]), (3.0, 2.0, 1.0), range(3, 0, -1), [np.int64(3), 2, 1]]
)
def test_accepts_integral_sequences(counts):
    assert validate_class_counts(counts) == [3, 2, 1]
    assert shot_groups(counts, many_threshold=2, few_threshold=2).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([], "non-empty"),
        ([10, -1], "non-negative, got -1 for class 1"),
        ([10, 2.5], "integers, got 2.5 for class 1"),
        ([10, float("nan")], "integers"),
        ([True, 3], "integers"),
        ("123", "sequence"),
        (5, "sequence"),
        ([10, "a"], "integers"),
        (torch.ones(2, 2), "1-D"),
    ],
)
def test_invalid_class_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        shot_groups(counts)


@pytest.mark.parametrize(
    ("many", "few", "match"),
    [
        (20, 100, "few_threshold` <= `many_threshold"),
        (-1, 0, "many_threshold"),
        (100, -5, "few_threshold"),
        (100.5, 20, "many_threshold"),
    ],
)
def test_invalid_thresholds(many, few, match):
    with pytest.raises(ValueError, match=match):
        shot_groups([5, 500], many_threshold=many, few_threshold=few)


def test_describe_group():
    assert describe_group(0, 100, 20) == "many-shot (n_c > 100)"
    assert describe_group(2, 100, 20) == "few-shot (n_c < 20)"
    with pytest.raises(ValueError, match="group"):
        describe_group(3, 100, 20)
