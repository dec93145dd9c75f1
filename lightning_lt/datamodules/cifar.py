"""CIFAR-10-LT and CIFAR-100-LT (LDAM-DRW protocol)."""

import copy
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info

from lightning_lt.datamodules.base import VAL_SPLIT_KEY, LongTailDataModule, collate_images, derive_seed
from lightning_lt.datamodules.folder import InMemoryImageDataset
from lightning_lt.datamodules.profiles import imbalance_counts, long_tailed_indices
from lightning_lt.datamodules.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    check_transform_output,
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
    normalisation by :data:`~lightning_lt.datamodules.transforms.CIFAR10_MEAN` / ``CIFAR10_STD``
    (``train_transform`` / ``eval_transform`` replace them: callables of a PIL image returning a tensor).

    Validation (without these options the test set, so choose checkpoints and hyper-parameters on one of them):

    - ``val_per_class=k``: a balanced validation set of ``k`` images per class, drawn (seed
      ``derive_seed(seed, VAL_SPLIT_KEY)``) from the training images the long-tailed profile leaves unused, so
      that the long-tailed training set stays the protocol's. A class with fewer than ``k`` unused images (the
      profile keeps every image of class 0, and of the next few classes of CIFAR-100-LT when ``k`` exceeds
      ``n_max - n_i``) gives the missing ones from its own long-tailed images, drawn with the same seed; it then
      trains on that many fewer, and ``class_counts`` says so (CIFAR-10-LT IF = 100, ``k = 50``: class 0 trains on
      4,950 images, the other nine classes on the protocol's images, 12,356 in all; CIFAR-100-LT: classes 0, 1
      and 2 on 450 each, 10,765 in all). These classes are announced once (``rank_zero_info``).
    - ``val_fraction=f``: a stratified share of the long-tailed training images held out (see
      :class:`~lightning_lt.datamodules.base.LongTailDataModule`); the validation set is then long-tailed too.

    ``class_counts`` and ``class_names`` come from the formula, without disk access. ``setup()`` reads
    the official pickles ``{root}/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
    the md5 sums of these files are not checked on load (see ``_UncheckedCIFAR10``).
    ``self.train_indices`` / ``self.val_indices`` hold the indices of the training / validation images in the
    original training set.

    With ``device_data=True`` the datasets hold the same images as
    :class:`~lightning_lt.datamodules.folder.InMemoryImageDataset` objects (``uint8 [N, 3, 32, 32]``, tensor
    transforms) and the loaders build every batch on the trainer's device
    (:class:`~lightning_lt.datamodules.device.DeviceDataLoader`): 38 MB for CIFAR-10-LT at IF = 100 and 31 MB
    for the test set (33 MB and 31 MB for CIFAR-100-LT), per process. It runs the built-in augmentation only: a
    custom transform with ``device_data`` is refused.

    Args:
        root: folder containing ``cifar-10-batches-py`` (downloaded there with ``download=True``).
        imbalance_factor: ``n_max / n_min`` >= 1 (1 = the full balanced training set).
        profile: ``"exp"`` or ``"step"``.
        download: download the archive in ``prepare_data()`` when the files are missing.
        imbalance_seed: numpy seed of the image selection (0 in LDAM-DRW).
        val_per_class: balanced validation images per class (0: none; see above).
        val_fraction: per-class share of the long-tailed training images held out for validation (0: none).
        train_transform: training transform of a PIL image (``None``: crop + flip + normalisation).
        eval_transform: evaluation transform (``None``: normalisation).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size, device_data:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        ValueError: ``imbalance_factor < 1``, unknown ``profile``, ``val_per_class`` outside ``[0, n_max)``,
            ``val_per_class`` with ``val_fraction``, a custom transform with ``device_data``; (in ``setup()``) a
            transform that does not return tensors of one size.
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

    batch_collate = staticmethod(collate_images)

    def __init__(
        self,
        root: str = "data",
        imbalance_factor: float = 100.0,
        profile: Literal["exp", "step"] = "exp",
        download: bool = False,
        imbalance_seed: int = 0,
        val_per_class: int = 0,
        val_fraction: float = 0.0,
        train_transform: Optional[Callable] = None,
        eval_transform: Optional[Callable] = None,
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
            val_fraction=val_fraction,
        )
        # validates imbalance_factor and profile right away (cheap)
        imbalance_counts(self._n_max, len(self._class_names_const), imbalance_factor, profile)
        if isinstance(val_per_class, bool) or not 0 <= val_per_class < self._n_max:
            raise ValueError(
                f"Expected `val_per_class` in [0, {self._n_max}) (balanced validation images per class; every class "
                f"has {self._n_max} training images and must keep one), got {val_per_class!r}"
            )
        if val_per_class and self.val_fraction > 0:
            raise ValueError(
                f"Expected one validation split, got `val_per_class`={val_per_class} and `val_fraction`={val_fraction}. "
                "HINT: keep `val_per_class` (a balanced validation set from the images the profile leaves unused) or "
                "`val_fraction` (a share of the long-tailed training images)."
            )
        self._refuse_transforms_on_device(train_transform=train_transform, eval_transform=eval_transform)
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        self.root = str(root)
        self.imbalance_factor = float(imbalance_factor)
        self.profile = profile
        self.download = download
        self.imbalance_seed = imbalance_seed
        self.val_per_class = int(val_per_class)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.train_indices: Optional[np.ndarray] = None
        self.val_indices: Optional[np.ndarray] = None

    def _profile_counts(self) -> list[int]:
        return imbalance_counts(self._n_max, len(self._class_names_const), self.imbalance_factor, self.profile)

    def _pool_targets(self) -> np.ndarray:
        # long_tailed_indices groups the kept images by class in ascending order: no file needed
        return np.repeat(np.arange(len(self._class_names_const)), self._profile_counts())

    def _pool_class_names(self) -> list[str]:
        return list(self._class_names_const)

    def _pool_held_out_counts(self, pool_counts: Sequence[int]) -> list[int]:
        if not self.val_per_class:
            return super()._pool_held_out_counts(pool_counts)
        shortfall = [max(0, self.val_per_class - (self._n_max - n)) for n in pool_counts]
        names = self._class_names_const
        short = [f"{c} ({names[c]}): {n - k} left" for c, (n, k) in enumerate(zip(pool_counts, shortfall)) if k]
        if short:
            rank_zero_info(
                f"{type(self).__name__}: `val_per_class`={self.val_per_class}: the long-tailed profile leaves fewer "
                f"unused images than that in {len(short)} class(es), whose missing validation images come from their "
                f"long-tailed training images (training images per class: {', '.join(short[:5])}"
                f"{' ...' if len(short) > 5 else ''})."
            )
        return shortfall

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

    def _split_indices(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices in the original training set of the training and the validation images (each ascending within a
        class for the validation set, the protocol's order for the training set)."""
        selected = long_tailed_indices(targets, self._profile_counts(), seed=self.imbalance_seed)
        train_pos, held_pos = self.split_positions()
        val = [selected[held_pos]]
        if self.val_per_class:
            unused = np.ones(targets.size, dtype=bool)
            unused[selected] = False
            rng = np.random.RandomState(derive_seed(self.seed, VAL_SPLIT_KEY, 1))
            for c in range(len(self._class_names_const)):
                candidates = np.flatnonzero(unused & (targets == c))
                take = min(self.val_per_class, candidates.size)
                val.append(candidates[rng.permutation(candidates.size)[:take]])
        return selected[train_pos], np.sort(np.concatenate(val))

    def _subset(
        self,
        source: torchvision.datasets.CIFAR10,
        indices: Optional[np.ndarray],
        transform: Optional[Callable],
        train: bool,
    ) -> torch.utils.data.Dataset:
        """The images ``indices`` (``None``: all) of ``source`` with ``transform`` (``None``: the built-in one), as a
        torchvision dataset or, with ``device_data``, an in-memory tensor dataset."""
        data, targets = source.data, list(source.targets)
        if indices is not None:
            data, targets = data[indices], np.asarray(targets, dtype=np.int64)[indices].tolist()
        if self.device_data:
            return self._in_memory(data, targets, train)
        dataset = copy.copy(source)
        dataset.data, dataset.targets = data, targets
        if transform is None:
            transform = (cifar_train_transform if train else cifar_eval_transform)(self._mean, self._std)
        dataset.transform = transform
        return dataset

    def _train_eval(self, train: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The training images of ``train`` (shared, not copied) with the evaluation transform."""
        if isinstance(train, InMemoryImageDataset):
            return InMemoryImageDataset(train.images, train.targets, cifar_tensor_eval_transform(self._mean, self._std))
        dataset = copy.copy(train)
        dataset.transform = self.eval_transform
        if dataset.transform is None:
            dataset.transform = cifar_eval_transform(self._mean, self._std)
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is None:  # a Trainer runs prepare_data() itself, on one process per node
            self.prepare_data()
        self._check_files()
        holds_out = self.val_per_class > 0 or self.val_fraction > 0
        needs_val = holds_out and stage in (None, "fit", "validate") and self.val_dataset is None
        if (stage in (None, "fit") and self.train_dataset is None) or needs_val:
            source = self._dataset_cls(self.root, train=True)
            train_indices, val_indices = self._split_indices(np.asarray(source.targets, dtype=np.int64))
            self.train_indices, self.val_indices = train_indices, (val_indices if holds_out else None)
            if stage in (None, "fit") and self.train_dataset is None:
                self.train_dataset = self._subset(source, train_indices, self.train_transform, train=True)
                self.train_eval_dataset = self._train_eval(self.train_dataset)
                if self.train_transform is not None:
                    check_transform_output(self.train_dataset, "train_transform", self.train_transform)
            if needs_val:
                self.val_dataset = self._subset(source, val_indices, self.eval_transform, train=False)
        if self.test_dataset is None:
            source = self._dataset_cls(self.root, train=False)
            self.test_dataset = self._subset(source, None, self.eval_transform, train=False)
        if self.eval_transform is not None:
            for dataset in (self.val_dataset, self.test_dataset):
                if dataset is not None:
                    check_transform_output(dataset, "eval_transform", self.eval_transform)

    def _in_memory(self, data: np.ndarray, targets: list[int], train: bool) -> InMemoryImageDataset:
        """CIFAR images (``uint8 [N, 32, 32, 3]``) as a ``uint8 [N, 3, 32, 32]`` tensor dataset with the tensor
        transforms (same pixels and, for the same draws, the same augmentation as the PIL path)."""
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        transform = (cifar_tensor_train_transform if train else cifar_tensor_eval_transform)(self._mean, self._std)
        return InMemoryImageDataset(images, targets, transform)


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
