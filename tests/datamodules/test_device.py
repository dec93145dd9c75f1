"""The device-resident data path (`device_data=True`): the samples, order, shards and pixels of the worker loaders."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DistributedSampler

from lightning_lt.datamodules import CIFAR10LT, CIFAR100LT, ImageFolderLT, LongTailDataModule, ResampledSampler
from lightning_lt.datamodules import transforms as tf
from lightning_lt.datamodules.base import EpochSeededDataLoader
from lightning_lt.datamodules.device import DeviceDataLoader, check_device_dataset, check_device_memory
from lightning_lt.datamodules.folder import InMemoryImageDataset, pil_loader
from lightning_lt.datamodules.samplers import derive_seed
from lightning_lt.nets import CIFARResNet
from lightning_lt.tasks import LongTailClassifier
from tests.datamodules.test_cifar import make_cifar10, make_cifar100
from tests.datamodules.test_transforms import pil_transform_with_draws
from tests.datamodules.utils import IndexedDataset, write_image_folder
from tests.helpers import DDP_STRATEGY
from tests.host_syncs import HostSyncCounter

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:.*smaller than the logging interval",
)

SIZE, PAD = 8, 1  # the stamped images: 8 x 8, crop 8 with padding 1
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # x = pixel / 255


def stamped(n: int) -> torch.Tensor:
    """``n`` constant ``uint8`` images; image ``i`` holds ``i % 256`` in channel 0 and ``i // 256`` in channel 1."""
    index = torch.arange(n)
    images = torch.full((n, 3, SIZE, SIZE), 255, dtype=torch.uint8)
    images[:, 0] = (index % 256).to(torch.uint8)[:, None, None]
    images[:, 1] = (index // 256).to(torch.uint8)[:, None, None]
    return images


def read_stamps(x: torch.Tensor) -> list[int]:
    """The image indices of a batch of :func:`stamped` images (the centre pixel survives every crop)."""
    centre = (x[:, :2, SIZE // 2, SIZE // 2] * 255).round().long()
    return (centre[:, 0] + 256 * centre[:, 1]).tolist()


class StampedLT(LongTailDataModule):
    """``counts[c]`` training images of class ``c`` (grouped by class), 5 test images per class, all stamped with
    their index, in memory with the CIFAR tensor transforms (crop 8, padding 1, no normalisation)."""

    def __init__(self, counts=(40, 15, 8), batch_size=8, num_workers=0, sampler=None, seed=0, eval_batch_size=None,
                 device_data=True) -> None:  # fmt: skip
        super().__init__(batch_size=batch_size, num_workers=num_workers, sampler=sampler, seed=seed,
                         eval_batch_size=eval_batch_size, device_data=device_data)  # fmt: skip
        self.counts = list(counts)

    def _compute_class_counts(self) -> list[int]:
        return list(self.counts)

    def train_targets(self) -> list[int]:
        return [c for c, n in enumerate(self.counts) for _ in range(n)]

    def test_targets(self) -> list[int]:
        return [c for c in range(len(self.counts)) for _ in range(5)]

    def setup(self, stage=None) -> None:
        train = tf.cifar_tensor_train_transform(UNIT_MEAN, UNIT_STD, size=SIZE, padding=PAD)
        self.train_dataset = InMemoryImageDataset(stamped(len(self.train_targets())), self.train_targets(), train)
        evaluation = tf.cifar_tensor_eval_transform(UNIT_MEAN, UNIT_STD)
        self.test_dataset = InMemoryImageDataset(stamped(len(self.test_targets())), self.test_targets(), evaluation)


def served(loader, epoch=None) -> list[tuple[list[int], list[int]]]:
    """``(image indices, labels)`` of every batch of ``loader`` (at ``epoch``)."""
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return [(read_stamps(x), y.tolist()) for x, y in loader]


# ------------------------------------------------------------------ epoch plan and shards
@pytest.mark.parametrize("mode", [None, "class_balanced", "sqrt"])
def test_device_loaders_serve_the_worker_loaders_samples(mode):
    """Per rank (2 simulated processes) and epoch, the device loaders serve the samples of the worker loaders, in
    the same batches, which are this rank's share of the sampler's plan (shuffling or re-sampling); the
    evaluation loaders serve the same unpadded shards."""
    targets = StampedLT().train_targets()
    for rank in (0, 1):
        modules = {}
        for device_data in (False, True):
            dm = StampedLT(sampler=mode, seed=5, device_data=device_data, eval_batch_size=4)
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            dm.setup("fit")
            modules[device_data] = dm
        loaders = {d: dm.train_dataloader() for d, dm in modules.items()}
        assert isinstance(loaders[True], DeviceDataLoader) and isinstance(loaders[False], EpochSeededDataLoader)
        for epoch in (0, 1, 4):
            batches = served(loaders[True], epoch)
            assert batches == served(loaders[False], epoch), (rank, epoch)
            if mode is None:
                sampler = DistributedSampler(range(len(targets)), num_replicas=2, rank=rank, shuffle=True, seed=5)
            else:
                sampler = ResampledSampler(targets, mode=mode, num_replicas=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            indices = [i for batch, _ in batches for i in batch]
            assert indices == list(sampler) and [len(b) for b, _ in batches] == [8, 8, 8, 8]
            assert [y for _, labels in batches for y in labels] == [targets[i] for i in indices]
        for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
            device, workers = getattr(modules[True], name)(), getattr(modules[False], name)()
            assert isinstance(device, DeviceDataLoader)
            assert served(device) == served(workers)
            assert [i for batch, _ in served(device) for i in batch] == list(range(rank, 15, 2))


def test_the_draws_depend_only_on_global_seed_rank_and_epoch(monkeypatch):
    """The augmentation of epoch e on rank r comes from `derive_seed(worker_seed, e)` with `worker_seed =
    derive_seed(PL_GLOBAL_SEED, r)`: the same epoch gives the same batches whatever the global random state,
    another epoch, rank or global seed other ones."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")

    def epoch_images(rank: int, epoch: int, global_state: int = 0) -> torch.Tensor:
        dm = StampedLT()
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(global_state)
        return torch.cat([x for x, _ in loader]), dm, list(loader.sampler)

    x, dm, order = epoch_images(1, 3)
    augment = dm.train_dataset.transform
    generator = torch.Generator().manual_seed(derive_seed(derive_seed(3, 1), 3))
    draws = augment.draw(len(order), SIZE, SIZE, generator)
    assert torch.equal(x, augment.apply_batch(dm.train_dataset.images, torch.tensor(order), draws))
    assert torch.equal(x, epoch_images(1, 3, global_state=99)[0])
    assert not torch.equal(x, epoch_images(1, 4)[0])
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not torch.equal(x, epoch_images(1, 3)[0])
    # rank 0 serves other samples; with the same samples its crops would still differ: compare the draws
    rank0 = StampedLT()
    rank0.trainer = SimpleNamespace(world_size=2, global_rank=0)
    rank0.setup("fit")
    assert not torch.equal(rank0.train_dataloader().epoch_draws(3, 32), dm.train_dataloader().epoch_draws(3, 32))


def test_the_batches_stay_on_the_device_without_host_syncs():
    """Every batch is built from tensors on the loader's device (the meta device: an operation mixing in a CPU
    tensor would raise) and, after the epoch's first, without host syncs."""
    dm = StampedLT()
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.device == torch.device("meta")
        batches = list(loader)
        assert all(x.device.type == y.device.type == "meta" for x, y in batches)
        assert [tuple(x.shape) for x, _ in batches][0] == (8, 3, SIZE, SIZE)
    dm.trainer = None
    iterator = iter(dm.train_dataloader())
    next(iterator)
    with HostSyncCounter() as syncs:
        assert len(list(iterator)) == 7
    assert syncs.calls == [], syncs.report()


def test_num_workers_play_no_part():
    dm = StampedLT(num_workers=4, device_data=True)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader, DeviceDataLoader) and loader.num_workers == 0 and not loader.pin_memory


# ------------------------------------------------------------------ pixels: the PIL path for the same draws
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    make_cifar100(root)
    return str(root)


@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_cifar_device_batches_equal_the_pil_path(cifar_root, cls):
    """CIFAR-LT with `device_data=True` holds the PIL path's images, serves its sampler's order, and crops, flips and
    normalises (with the data set's mean / std) exactly like torchvision's RandomCrop(32, padding=4) +
    RandomHorizontalFlip + ToTensor + Normalize given the same offsets and flips; evaluation batches too."""
    pil = cls(root=cifar_root, batch_size=16, eval_batch_size=50, num_workers=0)
    device = cls(root=cifar_root, batch_size=16, eval_batch_size=50, device_data=True)
    pil.setup("fit")
    device.setup("fit")
    for split in ("train_dataset", "test_dataset"):
        data = torch.from_numpy(getattr(pil, split).data).permute(0, 3, 1, 2)
        assert torch.equal(getattr(device, split).images, data) and getattr(device, split).targets == getattr(pil, split).targets
    # random pixels, so that every crop offset and flip shows (the generated pickles are black but for 3 pixels)
    pixels = np.random.default_rng(0).integers(0, 256, pil.train_dataset.data.shape, dtype=np.uint8)
    device.train_dataset.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    loader, pil_loader_ = device.train_dataloader(), pil.train_dataloader()
    loader.sampler.set_epoch(2)
    pil_loader_.sampler.set_epoch(2)
    order = list(pil_loader_.sampler)
    draws = loader.epoch_draws(2, len(order))
    for b, (x, y) in zip(range(3), loader):
        for k in range(16):
            i = order[16 * b + k]
            expected = pil_transform_with_draws(pil.train_dataset.transform, Image.fromarray(pixels[i]), *draws[:, 16 * b + k].tolist())
            torch.testing.assert_close(x[k], expected, rtol=0, atol=0)
            assert y[k] == pil.train_dataset.targets[i]
    for _, (x, y), (xp, yp) in zip(range(2), device.val_dataloader(), pil.val_dataloader()):
        torch.testing.assert_close(x, xp, rtol=0, atol=0)
        assert torch.equal(y, yp)


@pytest.fixture(scope="module")
def odd_size_root(tmp_path_factory):
    """PNG folder of 40x36 images (resized to image_size when decoded)."""
    root = tmp_path_factory.mktemp("odd")
    write_image_folder(str(root / "train"), {"a": 9, "b": 5}, size=(40, 36), seed=2, ext=".png")
    write_image_folder(str(root / "test"), {"a": 3, "b": 3}, size=(40, 36), seed=3, ext=".png")
    return str(root)


def test_folder_device_batches_equal_the_file_path(odd_size_root):
    """ImageFolderLT with `device_data=True` against the file path (decode + Resize + RandomCrop + flip per image)."""
    files = ImageFolderLT(odd_size_root, batch_size=4, num_workers=0, sampler="sqrt")
    device = ImageFolderLT(odd_size_root, batch_size=4, device_data=True, sampler="sqrt")
    files.setup("fit")
    device.setup("fit")
    loader = device.train_dataloader()
    order = list(files.train_dataloader().sampler)
    draws = loader.epoch_draws(0, len(order))
    position = 0
    for x, y in loader:
        for k in range(len(y)):
            i = order[position]
            image = pil_loader(files.train_dataset.files[i])
            expected = pil_transform_with_draws(files.train_dataset.transform, image, *draws[:, position].tolist())
            torch.testing.assert_close(x[k], expected, rtol=0, atol=0)
            assert y[k] == files.train_dataset.targets[i]
            position += 1
    assert position == 14
    x = torch.cat([x for x, _ in device.test_dataloader()])
    expected = torch.stack([files.test_dataset[i][0] for i in range(6)])
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ fit, resume, evaluate
class BatchLog(Callback):
    """Records, per training batch, the epoch, the labels and the sum of the images."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        self.batches.append((trainer.current_epoch, y.tolist(), float(x.double().sum())))


def fit_tiny(root, out, ckpt_path=None, max_epochs=3):
    seed_everything(0)
    dm = ImageFolderLT(root, image_size=16, batch_size=4, eval_batch_size=5, device_data=True, sampler="class_balanced")
    model = LongTailClassifier(
        backbone=CIFARResNet(depth=8, width=4), num_classes=dm.num_classes, class_counts=dm.class_counts,
        log_per_class=False, plot_per_class=False,
    )  # fmt: skip
    log = BatchLog()
    checkpoint = ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoint, log], default_root_dir=out, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dm, log.batches


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:.*group.*is empty")
def test_fit_with_device_data_resumes_exactly(odd_size_root, tmp_path):
    """A tiny ResNet trains end to end on the device path (CPU), validates, tests and predicts through it; resumed
    from the epoch-0 checkpoint it sees the same batches (order and augmentation) and ends with the same weights."""
    trainer, model, dm, full = fit_tiny(odd_size_root, tmp_path / "full")
    assert isinstance(trainer.train_dataloader, DeviceDataLoader)
    assert {"val/acc", "val/balanced_acc", "train/loss_epoch"} <= set(trainer.callback_metrics)
    assert len(full) == 3 * 4 and len({b[2] for b in full}) == len(full)  # 14 images in batches of 4; all differ
    resumed_trainer, resumed, _, batches = fit_tiny(odd_size_root, tmp_path / "resumed", tmp_path / "full" / "epoch=0.ckpt")
    assert batches == [b for b in full if b[0] > 0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed_trainer.test(resumed, datamodule=dm, verbose=False)[0]["test/acc"] >= 0
    predictions = resumed_trainer.predict(resumed, datamodule=dm)
    assert sum(len(p["preds"]) for p in predictions) == 6


class RecordStamps(LightningModule):
    """Writes the image indices and labels each rank trains on, per epoch, and those it validates on."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir, self.layer, self.seen = out_dir, torch.nn.Linear(3, 3), {"train": [], "val": []}

    def on_train_epoch_start(self) -> None:
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen["train"].append([read_stamps(x), y.tolist()])
        return torch.nn.functional.cross_entropy(self.layer(x.mean(dim=(2, 3))), y)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].extend(read_stamps(batch[0]))

    def on_train_epoch_end(self) -> None:
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}_epoch{self.current_epoch}.json"), "w") as f:
            json.dump({**self.seen, "world_size": self.trainer.world_size}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
@pytest.mark.parametrize("mode", [None, "class_balanced"])
def test_ddp_device_path_serves_each_rank_its_shard(tmp_path, mode):
    """2-process CPU DDP with `device_data=True`: rank r trains on its share of the epoch plan (the shards of the
    worker loaders) with the right labels, and validates on samples r, r + 2, ... of the test split."""
    dm = StampedLT(sampler=mode, seed=3, batch_size=8)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDP_STRATEGY, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(RecordStamps(str(tmp_path)), datamodule=dm)
    targets = dm.train_targets()
    for epoch in range(2):
        for rank in range(2):
            record = json.loads((tmp_path / f"rank{rank}_epoch{epoch}.json").read_text())
            assert record["world_size"] == 2
            if mode is None:
                sampler = DistributedSampler(range(len(targets)), num_replicas=2, rank=rank, shuffle=True, seed=3)
            else:
                sampler = ResampledSampler(targets, mode=mode, num_replicas=2, rank=rank, seed=3)
            sampler.set_epoch(epoch)
            indices = [i for batch, _ in record["train"] for i in batch]
            assert indices == list(sampler), (epoch, rank)
            assert [y for _, labels in record["train"] for y in labels] == [targets[i] for i in indices]
            assert record["val"] == list(range(rank, 15, 2))


# ------------------------------------------------------------------ refusals
def test_data_modules_without_in_memory_images_are_refused_with_the_fix():
    class Plain(StampedLT):
        def setup(self, stage=None) -> None:
            self.train_dataset = IndexedDataset(self.train_targets())

    dm = Plain()
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"cannot serve IndexedDataset: it has no `images` tensor.*device_data=False"):
        dm.train_dataloader()
    transform = tf.cifar_tensor_train_transform()
    sizes = SimpleNamespace(images=[torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(3, 40, 30, dtype=torch.uint8)],
                            targets=[0, 1], transform=transform)  # fmt: skip
    with pytest.raises(ValueError, match=r"several sizes \(\[\(3, 32, 32\), \(3, 40, 30\)\]\).*decode every image to one size"):
        check_device_dataset(sizes)
    floats = SimpleNamespace(images=torch.zeros(2, 3, 32, 32), targets=[0, 1], transform=transform)
    with pytest.raises(ValueError, match=r"dtype torch.float32.*uint8 tensor `images` \[N, C, H, W\]"):
        check_device_dataset(floats)
    with pytest.raises(ValueError, match=r"2 images but 1 `targets`"):
        check_device_dataset(SimpleNamespace(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), targets=[0], transform=transform))
    untransformed = InMemoryImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1], transform=None)
    with pytest.raises(ValueError, match=r"the transform NoneType, not a TensorCIFARAugment.*device_data=False"):
        DeviceDataLoader(untransformed, batch_size=2)


def test_device_memory_is_checked_before_the_copy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 80 * 2**30))
    with pytest.raises(RuntimeError, match=r"needs 2\.00 GiB on cuda:0.*only 1\.00 GiB of 80\.0 GiB.*device_data=False"):
        check_device_memory(2 * 2**30, torch.device("cuda", 0))
    check_device_memory(2**29, torch.device("cuda", 0))  # fits
    check_device_memory(2**40, torch.device("cpu"))  # nothing to check on the CPU
