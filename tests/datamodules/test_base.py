import json
import os
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, SequentialSampler

from lightning_lt.datamodules import LongTailDataModule, ResampledSampler
from lightning_lt.datamodules.base import EpochSeededDataLoader
from lightning_lt.tasks.base import TaskModule
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


# ------------------------------------------------------------------ randomness per (seed, epoch, rank)
class RandomItems(torch.utils.data.Dataset):
    """``(x, draw, index)``: ``draw`` is drawn from torch's global generator where the item is loaded (the main
    process or a worker), like a random augmentation."""

    def __init__(self, size: int = 24) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]), torch.rand(2), index


class RandomToy(ToyLT):
    def setup(self, stage=None) -> None:
        super().setup(stage)
        self.train_dataset = RandomItems()


class DrawRecorder(TaskModule):
    """Records, per training batch, the epoch, the sample indices, the data's random draws and a dropout mask; with
    ``path`` set, writes them to ``path/rank<r>.json`` at the end of fit."""

    def __init__(self, path=None) -> None:
        super().__init__()
        self.layer, self.dropout, self.path, self.draws = torch.nn.Linear(1, 1), torch.nn.Dropout(0.5), path, []

    def training_step(self, batch, batch_idx):
        x, draw, index = batch
        mask = self.dropout(torch.ones(32))
        self.draws.append([self.current_epoch, index.tolist(), draw.flatten().tolist(), mask.tolist()])
        return self.layer(x).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        if self.path is not None:
            with open(os.path.join(self.path, f"rank{self.global_rank}.json"), "w") as f:
                json.dump(self.draws, f)


def fit_draws(root, num_workers: int, seed_workers: bool, ckpt_path=None, max_epochs: int = 3) -> list:
    seed_everything(0, workers=seed_workers)
    module = DrawRecorder()
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = Trainer(
        max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[checkpoint], default_root_dir=root, limit_val_batches=0, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, RandomToy(num_workers=num_workers, batch_size=8), ckpt_path=ckpt_path)
    return module.draws


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:.*smaller than the logging interval",
    "ignore:.*no `validation_step`", "ignore:The dirpath has changed",
)
@pytest.mark.parametrize(("num_workers", "seed_workers"), [(0, False), (2, False), (2, True)])
def test_resume_repeats_the_order_and_the_random_draws(tmp_path, num_workers, seed_workers):
    """Resumed after epoch 0, epochs 1 and 2 see the samples in the uninterrupted run's order with the same data
    and dropout draws, with data-loader workers too (with or without Lightning's `worker_init_fn`). Before, the
    first resumed epoch replayed epoch 0's order with workers (Lightning creates that iterator, prefetching
    indices, before `set_epoch`), and the workers' seeds came from the loader's generator at its epoch-0 state."""
    full = fit_draws(tmp_path / "full", num_workers, seed_workers)
    resumed = fit_draws(tmp_path / "resumed", num_workers, seed_workers, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    for epoch in (1, 2):
        expected = [d for d in full if d[0] == epoch]
        assert [d for d in resumed if d[0] == epoch] == expected, epoch
    assert len({str(d[2]) for d in full}) == len(full)  # every batch drew anew


def test_samplers_start_at_the_trainer_epoch():
    progress = SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=3)))
    for mode in (None, "sqrt"):
        dm = ToyLT(sampler=mode)
        dm.setup("fit")
        assert dm.train_dataloader().sampler.epoch == 0  # no trainer
        dm.trainer = SimpleNamespace(world_size=2, global_rank=1, fit_loop=progress)
        assert dm.train_dataloader().sampler.epoch == 3


def test_worker_seeds_depend_on_global_seed_rank_and_epoch(monkeypatch):
    dm = RandomToy(num_workers=2, batch_size=4)
    dm.setup("fit")
    seeds = {}
    for global_seed in (0, 1):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(global_seed))
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            seeds[global_seed, rank] = dm.worker_seed()
    assert len(set(seeds.values())) == 4
    dm.trainer = None
    loader = dm.train_dataloader()
    assert isinstance(loader, EpochSeededDataLoader)

    def draws(epoch: int) -> list:
        loader.sampler.set_epoch(epoch)
        return [batch[1].tolist() for batch in loader]

    assert draws(1) == draws(1) and draws(1) != draws(2)  # a function of the epoch, not of the iteration count
