from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from lightning_lt.datamodules import LongTailDataModule, ResampledSampler
from tests.datamodules.utils import ToyLT


def test_class_statistics_are_lazy_and_cached():
    dm = ToyLT(counts=(5, 3, 1))
    assert dm.compute_calls == 0  # nothing computed in __init__
    assert dm.class_counts == [5, 3, 1]
    assert dm.num_classes == 3
    assert dm.class_names == ["0", "1", "2"]
    dm.class_counts.append(99)  # a copy: the cache cannot be changed from outside
    assert dm.class_counts == [5, 3, 1]
    assert dm.compute_calls == 1


def test_train_loader_shuffles_without_sampler():
    """Shuffling depends only on (seed, epoch): the same epoch gives the same order, another epoch another one,
    whatever the global random state (a resumed run draws the same order as an uninterrupted one)."""
    dm = ToyLT(batch_size=6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
    assert loader.batch_size == 6

    def order(epoch):
        torch.manual_seed(epoch * 7 + 1)  # the global state must not matter
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(3) == order(3) and order(3) != order(4)
    assert sorted(order(0)) == list(range(len(dm.train_dataset)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_arguments(num_workers):
    dm = ToyLT(batch_size=6, eval_batch_size=10, num_workers=num_workers, pin_memory=True, persistent_workers=True)
    dm.setup("fit")
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()]
    for loader in loaders:
        assert loader.num_workers == num_workers
        assert loader.pin_memory is True
        assert loader.persistent_workers is (num_workers > 0)  # torch refuses persistent workers without workers
    assert [loader.batch_size for loader in loaders] == [6, 10, 10, 10]
    for loader in loaders[1:]:
        assert isinstance(loader.sampler, SequentialSampler)
        assert loader.dataset is dm.test_dataset


def test_eval_batch_size_defaults_to_batch_size():
    dm = ToyLT(batch_size=6)
    dm.setup("test")
    assert dm.test_dataloader().batch_size == 6


@pytest.mark.parametrize("mode", ["class_balanced", "sqrt"])
def test_sampler_follows_the_trainer(mode):
    dm = ToyLT(sampler=mode, seed=11)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ResampledSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.mode) == (1, 0, 11, mode)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=2)
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank) == (4, 2)
    assert sampler.targets.tolist() == dm.train_targets()


def test_loaders_before_setup():
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        ToyLT().train_dataloader()


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ToyLT(batch_size=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        ToyLT(eval_batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        ToyLT(num_workers=-1)
    with pytest.raises(ValueError, match="sampler"):
        ToyLT(sampler="balanced")


def test_subclass_must_provide_counts():
    with pytest.raises(NotImplementedError, match="_compute_class_counts"):
        LongTailDataModule().class_counts
