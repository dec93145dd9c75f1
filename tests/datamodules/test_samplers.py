from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from lightning_lt.datamodules import ResampledSampler

COUNTS = [1000, 300, 100, 30, 10]
TARGETS = [c for c, n in enumerate(COUNTS) for _ in range(n)]


def class_frequencies(indices, targets=TARGETS, num_classes=len(COUNTS)):
    labels = np.asarray(targets)[np.asarray(indices)]
    return np.bincount(labels, minlength=num_classes) / len(labels)


def test_is_a_distributed_sampler():
    # Lightning neither wraps nor replaces a DistributedSampler and calls its set_epoch each epoch.
    assert isinstance(ResampledSampler(TARGETS), DistributedSampler)


def test_class_balanced_gives_uniform_classes():
    sampler = ResampledSampler(TARGETS, mode="class_balanced", seed=0, num_samples=200_000)
    indices = list(sampler)
    assert len(indices) == 200_000
    freq = class_frequencies(indices)
    # binomial std is sqrt(0.2 * 0.8 / 2e5) ~ 0.0009: 0.005 is > 5 sigma
    np.testing.assert_allclose(freq, np.full(5, 0.2), atol=0.005)
    np.testing.assert_allclose(sampler.class_probabilities().numpy(), np.full(5, 0.2))
    # inside a class, every sample is equally likely: class 4 has 10 samples, ~4000 draws each
    draws = Counter(i for i in indices if TARGETS[i] == 4)
    assert sorted(draws) == list(range(1430, 1440))
    assert max(draws.values()) / min(draws.values()) < 1.15


def test_sqrt_gives_frequencies_proportional_to_sqrt_counts():
    sampler = ResampledSampler(TARGETS, mode="sqrt", seed=1, num_samples=200_000)
    freq = class_frequencies(list(sampler))
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
    np.testing.assert_allclose(freq, expected, atol=0.005)
    np.testing.assert_allclose(sampler.class_probabilities().numpy(), expected)


def test_default_epoch_size_is_the_dataset_size():
    sampler = ResampledSampler(TARGETS)
    assert len(sampler) == len(TARGETS) == len(list(sampler))


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("num_samples", [None, 1001])
def test_ranks_take_disjoint_positions_covering_the_plan(num_replicas, num_samples):
    single = ResampledSampler(TARGETS, "sqrt", num_replicas=1, rank=0, seed=7, num_samples=num_samples)
    single.set_epoch(3)
    plan = list(single)
    shards = []
    for rank in range(num_replicas):
        sampler = ResampledSampler(TARGETS, "sqrt", num_replicas=num_replicas, rank=rank, seed=7, num_samples=num_samples)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == sampler.num_samples
    # all ranks have the same length; re-interleaving the shards gives back the global plan
    assert len({len(s) for s in shards}) == 1
    total = len(shards[0]) * num_replicas
    interleaved = [shards[p % num_replicas][p // num_replicas] for p in range(total)]
    assert interleaved[: len(plan)] == plan  # same plan as a single process
    padding = interleaved[len(plan) :]
    assert len(padding) < num_replicas and padding == plan[: len(padding)]  # padded by repeating the start
    # as positions of the plan, rank r owns {r, r + R, ...}: pairwise disjoint, union = all positions
    positions = [set(range(r, total, num_replicas)) for r in range(num_replicas)]
    assert set().union(*positions) == set(range(total))
    assert sum(len(p) for p in positions) == total
    assert Counter(i for s in shards for i in s) == Counter(plan + padding)


def test_drop_last_truncates_the_plan():
    plan = ResampledSampler(TARGETS, num_samples=1001).epoch_plan(0)
    shards = [list(ResampledSampler(TARGETS, num_replicas=4, rank=r, num_samples=1001, drop_last=True)) for r in range(4)]
    assert [len(s) for s in shards] == [250] * 4
    assert [shards[p % 4][p // 4] for p in range(1000)] == plan[:1000]


def test_set_epoch_changes_the_plan_and_seed_reproduces_it():
    a = ResampledSampler(TARGETS, seed=5)
    b = ResampledSampler(TARGETS, seed=5)
    epoch0 = list(a)
    assert list(b) == epoch0  # same seed, same epoch: same plan
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    b.set_epoch(1)
    assert list(b) == epoch1
    assert list(ResampledSampler(TARGETS, seed=6)) != epoch0
    assert a.epoch_plan(0) == epoch0 and a.epoch_plan() == epoch1


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        ResampledSampler(TARGETS, mode="inverse")
    with pytest.raises(ValueError, match="rank"):
        ResampledSampler(TARGETS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        ResampledSampler(TARGETS, num_replicas=0)
    with pytest.raises(ValueError, match="num_samples"):
        ResampledSampler(TARGETS, num_samples=0)
    with pytest.raises(ValueError, match="targets"):
        ResampledSampler([])
    with pytest.raises(ValueError, match="non-negative"):
        ResampledSampler([0, -1])
