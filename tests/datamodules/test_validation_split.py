"""The held-out validation split (`val_fraction`): stratified, disjoint, seeded, the same on every DDP rank."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_lt.datamodules import DigitsLT, ImageFolderLT, LongTailDataModule
from lightning_lt.datamodules.base import collate_images
from lightning_lt.datamodules.device import DeviceDataLoader
from lightning_lt.datamodules.profiles import held_out_counts, stratified_holdout
from tests.datamodules.utils import ToyLT, write_digit_folder
from tests.helpers import DDP_STRATEGY

TRAIN_COUNTS = [20, 13, 9, 5, 2, 1]  # unequal classes, down to a single image


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("own_data")
    write_digit_folder(str(folder), TRAIN_COUNTS, test_per_class=2, size=12)
    return str(folder)


def label_of(path: str) -> int:
    return int(os.path.basename(os.path.dirname(path)))


def test_held_out_counts_round_half_up():
    assert held_out_counts(TRAIN_COUNTS, 0.1) == [2, 1, 1, 1, 0, 0]  # 2.0, 1.3, 0.9, 0.5, 0.2, 0.1
    assert held_out_counts(TRAIN_COUNTS, 0.25) == [5, 3, 2, 1, 1, 0]  # 5.0, 3.25, 2.25, 1.25, 0.5, 0.25
    assert held_out_counts([0, 7], 0.0) == [0, 0]


def test_stratified_holdout_against_a_reference():
    """Per class in ascending order, a permutation by one RandomState(seed) picks the held-out positions."""
    targets = np.random.default_rng(0).integers(0, 4, size=60)
    held = [3, 0, 5, 1]
    kept, out = stratified_holdout(targets, held, seed=7)
    rng, expected = np.random.RandomState(7), []
    for c, n in enumerate(held):
        positions = np.flatnonzero(targets == c)
        order = rng.permutation(positions.size)
        expected += positions[order[:n]].tolist()
    assert out.tolist() == sorted(expected)
    assert kept.tolist() == sorted(set(range(60)) - set(expected))
    with pytest.raises(ValueError, match="Cannot hold out"):
        stratified_holdout(targets, [100, 0, 0, 0], seed=0)


def test_the_split_is_stratified_disjoint_and_counted(root):
    dm = ImageFolderLT(root, val_fraction=0.25, num_workers=0)
    held = held_out_counts(TRAIN_COUNTS, 0.25)
    assert dm.class_counts == [n - h for n, h in zip(TRAIN_COUNTS, held)]  # before setup, by listing only
    dm.setup("fit")
    train, (val, val_labels) = dm.train_dataset.files, dm.val_files()
    assert Counter(label_of(f) for f in val) == Counter({c: h for c, h in enumerate(held) if h})
    assert val_labels == [label_of(f) for f in val] == dm.val_dataset.targets
    assert not set(train) & set(val)  # disjoint
    everything = sorted(os.path.join(root, "train", c, f) for c in "012345" for f in os.listdir(f"{root}/train/{c}"))
    assert sorted(train + val) == everything  # together the training folder
    assert np.bincount(dm.train_dataset.targets).tolist() == dm.class_counts
    assert dm.train_targets() == dm.train_dataset.targets
    assert type(dm.val_dataset.transform) is type(dm.test_dataset.transform)  # the evaluation transform:
    torch.testing.assert_close(dm.val_dataset[0][0], dm.val_dataset[0][0], rtol=0, atol=0)  # no augmentation
    assert dm.validates_on_test_split is False
    assert len(next(iter(dm.val_dataloader()))[0]) == min(sum(held), dm.eval_batch_size)


def test_the_split_depends_on_the_seed_only(root):
    def split(seed: int, sampler=None) -> list[str]:
        torch.manual_seed(seed + 100)  # the global random state plays no part
        np.random.seed(seed + 200)
        return ImageFolderLT(root, val_fraction=0.3, seed=seed, sampler=sampler).val_files()[0]

    assert split(0) == split(0) == split(0, sampler="class_balanced")
    assert split(0) != split(1)
    dm = ImageFolderLT(root, val_fraction=0.3, seed=0)
    assert dm.split_positions()[1].tolist() == sorted(dm.split_positions()[1].tolist())


def test_a_class_left_without_training_images_is_named(root):
    dm = ImageFolderLT(root, val_fraction=0.5)  # the class of 1 image: round(0.5) = 1 held out
    with pytest.raises(ValueError) as info:
        dm.class_counts
    message = str(info.value)
    for part in ("`val_fraction`=0.5", "all 1 training image(s) of class 5 ('5')", "HINT", "`val_fraction` < 0.5"):
        assert part in message, part
    assert ImageFolderLT(root, val_fraction=0.49).class_counts[5] == 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True])
def test_bad_val_fraction(root, bad):
    with pytest.raises(ValueError, match=r"`val_fraction` in \[0, 1\)"):
        ImageFolderLT(root, val_fraction=bad)


def test_subclasses_without_a_held_out_split_refuse_it():
    with pytest.raises(ValueError, match=r"ToyLT has no held-out validation split.*HINT"):
        LongTailDataModule.__init__(ToyLT.__new__(ToyLT), val_fraction=0.1)


def test_device_data_path_serves_the_held_out_images(root):
    files = ImageFolderLT(root, val_fraction=0.25, image_size=12, num_workers=0, eval_batch_size=50)
    device = ImageFolderLT(root, val_fraction=0.25, image_size=12, device_data=True, eval_batch_size=50)
    for dm in (files, device):
        dm.setup("fit")
    loader = device.val_dataloader()
    assert isinstance(loader, DeviceDataLoader) and isinstance(device.train_eval_dataloader(), DeviceDataLoader)
    (x, y), (xf, yf) = next(iter(loader)), next(iter(files.val_dataloader()))
    assert y.tolist() == yf.tolist() and x.shape == xf.shape == (sum(held_out_counts(TRAIN_COUNTS, 0.25)), 3, 12, 12)
    torch.testing.assert_close(x, xf, rtol=0, atol=1e-6)
    assert len(device.train_dataset) == sum(device.class_counts)


def test_train_eval_dataloader_before_setup_and_where_not_provided():
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        ToyLT().train_eval_dataloader()
    dm = ToyLT()
    dm.setup("fit")
    with pytest.raises(NotImplementedError, match=r"ToyLT does not provide .*\(`train_eval_dataset`\)"):
        dm.train_eval_dataloader()
    digits = DigitsLT()
    digits.setup("fit")
    x, y = next(iter(digits.train_eval_dataloader()))
    assert y.tolist() == digits.train_targets()[: len(y)]


def test_collate_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"different sizes \[\(3, 4, 4\), \(3, 5, 5\)\].*HINT.*Resize"):
        collate_images([(torch.zeros(3, 4, 4), 0), (torch.zeros(3, 5, 5), 1)])
    from PIL import Image

    with pytest.raises(ValueError, match=r"not tensors.*HINT.*ToImage"):
        collate_images([(Image.new("RGB", (2, 2)), 0), (Image.new("RGB", (2, 2)), 1)])


# ------------------------------------------------------------------ 2-process DDP
class RecordSplit(LightningModule):
    """Writes, on each rank, the data module's training and validation files and its validation shard."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(3 * 12 * 12, 6)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        record = {
            "world_size": self.trainer.world_size,
            "train": dm.train_dataset.files,
            "val": dm.val_dataset.files,
            "class_counts": dm.class_counts,
            "shard": list(dm.val_dataloader().sampler),
        }
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.json"), "w") as f:
            json.dump(record, f)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*smaller than the logging interval")
def test_the_split_is_identical_on_two_ddp_processes(root, tmp_path):
    """Each process computes the split from the listing and the seed: the same files on both ranks, equal to the
    single-process split, and the validation loader shards it without repeating an image."""
    def make() -> ImageFolderLT:
        return ImageFolderLT(root, val_fraction=0.3, seed=5, image_size=12, batch_size=4, num_workers=0)

    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDP_STRATEGY, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(RecordSplit(str(tmp_path)), datamodule=make())
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = make()
    single.setup("fit")
    for record in records:
        assert record["world_size"] == 2
        assert record["val"] == single.val_dataset.files and record["train"] == single.train_dataset.files
        assert record["class_counts"] == single.class_counts
    shards = [record["shard"] for record in records]
    assert sorted(shards[0] + shards[1]) == list(range(len(single.val_dataset)))  # each image on one rank


def test_digits_hold_out_a_share_of_their_long_tailed_images():
    """DigitsLT (the quickstart): the held-out images are those of the long-tailed subset, per class
    ``floor(0.1 n_c + 0.5)`` of them; training + validation images are exactly the images it trains on with no
    hold-out, in the same order, and none of them is a test image."""
    full, held = DigitsLT(imbalance_factor=10), DigitsLT(imbalance_factor=10, val_fraction=0.1)
    full.setup("fit")
    held.setup("fit")
    assert held.class_counts == [n - h for n, h in zip(full.class_counts, held_out_counts(full.class_counts, 0.1))]
    assert held.validates_on_test_split is False and full.validates_on_test_split is True
    assert Counter(held.val_dataset.tensors[1].tolist()) == dict(enumerate(held_out_counts(full.class_counts, 0.1)))
    assert held.train_targets() == held.train_dataset.tensors[1].tolist()
    rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
    train, val = held.train_dataset.tensors[0], held.val_dataset.tensors[0]
    assert rows(train) | rows(val) == rows(full.train_dataset.tensors[0])
    assert not rows(val) & rows(held.test_dataset.tensors[0])
    train_pos, _ = held.split_positions()
    torch.testing.assert_close(train, full.train_dataset.tensors[0][torch.from_numpy(train_pos)])
    with pytest.raises(ValueError, match=r"holds out all 16 training image\(s\) of class 8"):
        DigitsLT(imbalance_factor=10, val_fraction=0.97).split_positions()
