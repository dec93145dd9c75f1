"""CIFAR-10-LT and CIFAR-100-LT (LDAM-DRW protocol)."""

import os
import pickle
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torchvision

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.folder import InMemoryImageDataset
from lightning_lt.datamodules.profiles import imbalance_counts, long_tailed_indices
from lightning_lt.datamodules.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_eval_transform,
    cifar_tensor_eval_transform,
    cifar_tensor_train_transform,
    cifar_train_transform,
)

__all__ = ["CIFAR10LT", "CIFAR100LT"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm""".split()
)


def _missing_files(dataset_cls: type[torchvision.datasets.CIFAR10], root: str) -> list[str]:
    """Missing files of the official pickle layout under ``root`` (empty when complete)."""
    folder = Path(root) / dataset_cls.base_folder
    names = [n for n, _ in dataset_cls.train_list + dataset_cls.test_list] + [dataset_cls.meta["filename"]]
    return [str(folder / n) for n in names if not (folder / n).is_file()]


class _UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader without the md5 verification on load.

    torchvision hashes all pickles (~180 MB) every time a dataset object is built; here files are only
    required to exist (a truncated or corrupt file fails when unpickled). ``download=True`` still
    verifies the md5 of the downloaded archive. This also lets the tests use generated files.
    """

    def _check_integrity(self) -> bool:
        return not _missing_files(type(self), self.root)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _UncheckedCIFAR100(_UncheckedCIFAR10):
    base_folder = torchvision.datasets.CIFAR100.base_folder
    url = torchvision.datasets.CIFAR100.url
    filename = torchvision.datasets.CIFAR100.filename
    tgz_md5 = torchvision.datasets.CIFAR100.tgz_md5
    train_list = torchvision.datasets.CIFAR100.train_list
    test_list = torchvision.datasets.CIFAR100.test_list
    meta = torchvision.datasets.CIFAR100.meta


class CIFAR10LT(LongTailDataModule):
    """CIFAR-10-LT: the LDAM-DRW long-tailed subset of CIFAR-10's training set, balanced test set.

    Class ``i`` keeps ``n_i = int(5000 * (1 / IF) ** (i / 9))`` training images ("exp") or
    5000 / ``int(5000 / IF)`` ("step"), chosen by :func:`~lightning_lt.datamodules.profiles.long_tailed_indices`
    with ``imbalance_seed`` (0 = the published protocol). IF = 100 keeps 12,406 images. The test set is
    the original balanced one (1,000 per class). Augmentation: random crop 32 with padding 4, flip,
    normalisation by :data:`~lightning_lt.datamodules.transforms.CIFAR10_MEAN` / ``CIFAR10_STD``.

    ``class_counts`` and ``class_names`` come from the formula, without disk access. ``setup()`` reads
    the official pickles ``{root}/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
    the md5 sums of these files are not checked on load (see ``_UncheckedCIFAR10``).
    ``self.train_indices`` holds the indices of the kept images in the original training set.

    With ``device_data=True`` the datasets hold the same images as
    :class:`~lightning_lt.datamodules.folder.InMemoryImageDataset` objects (``uint8 [N, 3, 32, 32]``, tensor
    transforms) and the loaders build every batch on the trainer's device
    (:class:`~lightning_lt.datamodules.device.DeviceDataLoader`): 38 MB for CIFAR-10-LT at IF = 100 and 31 MB
    for the test set (33 MB and 31 MB for CIFAR-100-LT), per process.

    Args:
        root: folder containing ``cifar-10-batches-py`` (downloaded there with ``download=True``).
        imbalance_factor: ``n_max / n_min`` >= 1 (1 = the full balanced training set).
        profile: ``"exp"`` or ``"step"``.
        download: download the archive in ``prepare_data()`` when the files are missing.
        imbalance_seed: numpy seed of the image selection (0 in LDAM-DRW).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size, device_data:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        ValueError: ``imbalance_factor < 1`` or unknown ``profile``.
        FileNotFoundError: in ``setup()``, when the pickles are missing and ``download`` is False.

    Example:
        >>> dm = CIFAR10LT(root="data", imbalance_factor=100)
        >>> dm.class_counts, sum(dm.class_counts)
        ([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], 12406)
    """

    _dataset_cls: type[torchvision.datasets.CIFAR10] = _UncheckedCIFAR10
    _n_max = 5000
    _class_names_const = CIFAR10_CLASSES
    _mean = CIFAR10_MEAN
    _std = CIFAR10_STD

    def __init__(
        self,
        root: str = "data",
        imbalance_factor: float = 100.0,
        profile: Literal["exp", "step"] = "exp",
        download: bool = False,
        imbalance_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 4,
        sampler: Optional[Literal["class_balanced", "sqrt"]] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
        device_data: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            sampler=sampler,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
            device_data=device_data,
        )
        # validates imbalance_factor and profile right away (cheap)
        imbalance_counts(self._n_max, len(self._class_names_const), imbalance_factor, profile)
        self.save_hyperparameters()
        self.root = str(root)
        self.imbalance_factor = float(imbalance_factor)
        self.profile = profile
        self.download = download
        self.imbalance_seed = imbalance_seed
        self.train_indices: Optional[np.ndarray] = None

    def _compute_class_counts(self) -> list[int]:
        return imbalance_counts(self._n_max, len(self._class_names_const), self.imbalance_factor, self.profile)

    def _compute_class_names(self) -> list[str]:
        return list(self._class_names_const)

    def _check_files(self) -> None:
        missing = _missing_files(self._dataset_cls, self.root)
        if missing:
            cls = self._dataset_cls
            expected = ", ".join(n for n, _ in cls.train_list + cls.test_list) + ", " + cls.meta["filename"]
            raise FileNotFoundError(
                f"{type(self).__name__}: the {cls.base_folder} files are missing under `root`="
                f"{os.path.abspath(self.root)!r} (e.g. {missing[0]!r}). Expected the official pickle layout "
                f"{self.root}/{cls.base_folder}/{{{expected}}}. Set `download=True` "
                f"(`--data.init_args.download=true`) to download it, or point `root` to the folder that "
                f"contains {cls.base_folder}/."
            )

    def prepare_data(self) -> None:
        if self.download and _missing_files(self._dataset_cls, self.root):
            for train in (True, False):
                self._dataset_cls(self.root, train=train, download=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is None:  # a Trainer runs prepare_data() itself, on one process per node
            self.prepare_data()
        self._check_files()
        if stage in (None, "fit") and self.train_dataset is None:
            dataset = self._dataset_cls(self.root, train=True, transform=cifar_train_transform(self._mean, self._std))
            targets = np.asarray(dataset.targets, dtype=np.int64)
            indices = long_tailed_indices(targets, self.class_counts, seed=self.imbalance_seed)
            dataset.data = dataset.data[indices]
            dataset.targets = targets[indices].tolist()
            self.train_indices = indices
            self.train_dataset = self._in_memory(dataset, train=True) if self.device_data else dataset
        if self.test_dataset is None:
            dataset = self._dataset_cls(self.root, train=False, transform=cifar_eval_transform(self._mean, self._std))
            self.test_dataset = self._in_memory(dataset, train=False) if self.device_data else dataset

    def _in_memory(self, dataset: torchvision.datasets.CIFAR10, train: bool) -> InMemoryImageDataset:
        """The images of a torchvision CIFAR dataset as a ``uint8 [N, 3, 32, 32]`` tensor dataset with the tensor
        transforms (same pixels and, for the same draws, the same augmentation as the PIL path)."""
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        transform = (cifar_tensor_train_transform if train else cifar_tensor_eval_transform)(self._mean, self._std)
        return InMemoryImageDataset(images, dataset.targets, transform)

    def train_targets(self) -> list[int]:
        if self.train_dataset is None:
            self.setup("fit")
        return list(self.train_dataset.targets)


class CIFAR100LT(CIFAR10LT):
    """CIFAR-100-LT: LDAM-DRW long-tailed CIFAR-100 (``n_max`` = 500, 100 classes; 10,847 images at IF = 100).

    Reads ``{root}/cifar-100-python/{train, test, meta}`` (fine labels) and normalises with
    :data:`~lightning_lt.datamodules.transforms.CIFAR100_MEAN` / ``CIFAR100_STD``. Otherwise as
    :class:`CIFAR10LT`.

    Example:
        >>> dm = CIFAR100LT(imbalance_factor=100)
        >>> dm.num_classes, sum(dm.class_counts), dm.class_counts[0], dm.class_counts[-1]
        (100, 10847, 500, 5)
    """

    _dataset_cls = _UncheckedCIFAR100
    _n_max = 500
    _class_names_const = CIFAR100_CLASSES
    _mean = CIFAR100_MEAN
    _std = CIFAR100_STD
