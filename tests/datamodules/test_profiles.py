import numpy as np
import pytest

from lightning_lt.datamodules import imbalance_counts, long_tailed_indices

# Totals reported in the long-tailed literature for the LDAM-DRW protocol.
PUBLISHED_TOTALS = {
    (5000, 10): {10: 20431, 50: 13996, 100: 12406, 200: 11203},
    (500, 100): {10: 19573, 50: 12608, 100: 10847, 200: 9502},
}


def test_cifar10_if100_table():
    # hand table: int(5000 * 0.01 ** (i / 9))
    assert imbalance_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(("n_max", "num_classes"), [(5000, 10), (500, 100)])
@pytest.mark.parametrize("imbalance_factor", [10, 50, 100, 200])
def test_exp_profile_formula_and_totals(n_max, num_classes, imbalance_factor):
    counts = imbalance_counts(n_max, num_classes, imbalance_factor)
    ratio = 1.0 / imbalance_factor
    assert counts == [int(n_max * ratio ** (i / (num_classes - 1))) for i in range(num_classes)]
    assert counts[0] == n_max
    assert counts[-1] == int(n_max / imbalance_factor)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) == PUBLISHED_TOTALS[(n_max, num_classes)][imbalance_factor]


def test_step_profile():
    assert imbalance_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert imbalance_counts(500, 100, 10, "step") == [500] * 50 + [50] * 50
    # odd number of classes: C // 2 head classes, the rest tail (still C counts)
    assert imbalance_counts(100, 5, 4, "step") == [100, 100, 25, 25, 25]


def test_balanced_and_single_class():
    assert imbalance_counts(7, 4, 1) == [7, 7, 7, 7]
    assert imbalance_counts(7, 4, 1, "step") == [7, 7, 7, 7]
    assert imbalance_counts(7, 1, 100) == [7]


@pytest.mark.parametrize("bad", [0.5, 0, -3, float("nan"), float("inf")])
def test_imbalance_factor_below_one_raises(bad):
    with pytest.raises(ValueError, match="imbalance_factor"):
        imbalance_counts(5000, 10, bad)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="profile"):
        imbalance_counts(5000, 10, 100, "linear")
    with pytest.raises(ValueError, match="n_max"):
        imbalance_counts(0, 10, 100)
    with pytest.raises(ValueError, match="num_classes"):
        imbalance_counts(10, 0, 100)
    with pytest.raises(ValueError, match="too large"):
        imbalance_counts(50, 10, 100)  # the last class would get int(0.5) = 0 images


def ldam_reference(targets, counts, seed=0):
    """The LDAM-DRW selection written with numpy's global RNG, as in the original protocol."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        targets_np = np.array(targets, dtype=np.int64)
        kept = []
        for c, n in zip(np.unique(targets_np), counts):
            idx = np.where(targets_np == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("seed", [0, 3])
def test_long_tailed_indices_match_the_global_rng_protocol(seed):
    rng = np.random.default_rng(1)
    targets = rng.permutation(np.repeat(np.arange(5), 40))
    counts = imbalance_counts(40, 5, 10)
    idx = long_tailed_indices(targets.tolist(), counts, seed=seed)
    np.testing.assert_array_equal(idx, ldam_reference(targets, counts, seed))
    assert idx.dtype == np.int64
    assert np.bincount(targets[idx]).tolist() == counts
    assert len(set(idx.tolist())) == len(idx)


def test_long_tailed_indices_leaves_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    long_tailed_indices([0, 1, 0, 1], [2, 1])
    assert np.random.rand() == expected


def test_long_tailed_indices_errors():
    with pytest.raises(ValueError, match=r"Class 1 has 2 images .* asks for 3"):
        long_tailed_indices([0, 0, 0, 1, 1], [3, 3])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        long_tailed_indices([0, 1, 2], [1, 1])
