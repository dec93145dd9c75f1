"""Long-tailed DataModule over list files (ImageNet-LT, Places-LT, iNaturalist-2018)."""

import os
from collections.abc import Callable
from typing import Literal, Optional, Union

import numpy as np

from lightning_lt.datamodules.base import LongTailDataModule, collate_images
from lightning_lt.datamodules.folder import ImageFileDataset
from lightning_lt.datamodules.profiles import check_imbalance_arguments, check_n_max, long_tailed_indices, profile_counts
from lightning_lt.datamodules.transforms import check_transform_output, imagenet_eval_transform, imagenet_train_transform

__all__ = ["ListFileDataModule", "read_list_file"]


def read_list_file(path: str, num_classes: Optional[int] = None) -> tuple[list[str], list[int]]:
    """Parse a list file of ``relative/path label`` lines (blank lines ignored).

    The label is the last whitespace-separated field, so paths may contain spaces.

    Args:
        path: the list file.
        num_classes: if given, every label must lie in ``[0, num_classes)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line without a path and an integer label >= 0, or a label ``>= num_classes``
            (names the file, line number and text).

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "train.txt")
        ...     _ = open(path, "w").write("train/a/1.jpg 0\\ntrain/b/2.jpg 1\\n")
        ...     read_list_file(path)
        (['train/a/1.jpg', 'train/b/2.jpg'], [0, 1])
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"List file {path!r} not found (absolute: {os.path.abspath(path)!r})")
    files, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            label: Optional[int] = None
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                except ValueError:
                    label = None
            if label is None or label < 0:
                raise ValueError(
                    f"{path}:{lineno}: expected '<relative/path> <label>' with an integer label >= 0, got {text!r}"
                )
            if num_classes is not None and label >= num_classes:
                raise ValueError(
                    f"{path}:{lineno}: label {label} is outside [0, {num_classes}) in {text!r}; "
                    f"set `num_classes` (now {num_classes}) or fix the list file"
                )
            files.append(parts[0])
            labels.append(label)
    return files, labels


class ListFileDataModule(LongTailDataModule):
    """Long-tailed classification from list files of ``relative/path label`` lines.

    The layout of ImageNet-LT (``ImageNet_LT_{train,val,test}.txt``), Places-LT and iNaturalist-2018:
    every line is an image path relative to ``root`` and its integer label, e.g.
    ``train/n01440764/n01440764_762.JPEG 0``. ``class_counts`` counts the labels of ``train_list``
    (lazily, reading only the list file) that are trained on.

    Splits: ``val_dataloader`` uses ``val_list`` (ImageNet-LT's and Places-LT's ``*_val.txt``: 20 / 20 images per
    class), or, without it, ``val_fraction`` of the training list held out per class (see
    :class:`~lightning_lt.datamodules.base.LongTailDataModule`), or else the test list. ``test_dataloader`` uses
    ``test_list`` (or ``val_list`` when it is not given, for data sets whose test labels are not public).

    A training list whose classes differ slightly in size can be cut to a long-tailed profile as
    :class:`~lightning_lt.datamodules.folder.ImageFolderLT` cuts a folder (``imbalance_factor``, ``profile``,
    ``n_max``, ``cap_to_available``, ``imbalance_seed``); by default (``imbalance_factor=1``, no ``n_max``) the
    list is used as it is.

    Transforms (default): ``RandomResizedCrop(image_size)`` + flip for training, ``Resize`` + ``CenterCrop`` for
    evaluation, ImageNet normalisation; ``train_transform`` / ``eval_transform`` replace them (callables of a PIL
    image in ``image_mode`` returning a tensor; checked in ``setup()`` on the first and last image of each split).

    A list-file path (and ``class_names_file``) is used as given when it exists, otherwise it is looked
    up relative to ``root``.

    Args:
        root: folder the image paths are relative to.
        train_list: training list file.
        val_list: validation list file (``None``: ``val_fraction``, or the test list).
        test_list: test list file (default: ``val_list``).
        num_classes: number of classes (default: largest training label + 1).
        class_names_file: optional file with one class name per line, in label order.
        image_size: network input side (224) of the default transforms.
        imbalance_factor: ``n_max / n_min`` >= 1 of a long-tailed cut of the training list (1: no cut).
        profile: ``"exp"`` or ``"step"``.
        imbalance_seed: numpy seed of the cut.
        n_max: largest count of the cut: ``None`` (the largest class), ``"min"``, ``"mean"`` or a number.
        cap_to_available: a class with fewer images than the cut asks keeps the ones it has (instead of an error).
        val_fraction: per-class share of the training list held out for validation (0: none).
        image_mode: ``"RGB"`` (3 channels, the default) or ``"L"`` (1 channel).
        train_transform: training transform (``None``: the ImageNet recipe at ``image_size``).
        eval_transform: evaluation transform (``None``: the ImageNet recipe at ``image_size``).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        FileNotFoundError: ``root``, a list file or the first image of a list is missing.
        ValueError: a malformed line (file and line number), a label outside ``[0, num_classes)``, a class
            without training images, a ``class_names_file`` with the wrong number of names, neither ``val_list``
            nor ``test_list``, ``val_list`` with ``val_fraction``, a class too small for the cut or the hold-out,
            a transform that does not return tensors of one size.
    """

    batch_collate = staticmethod(collate_images)

    def __init__(
        self,
        root: str,
        train_list: str,
        val_list: Optional[str] = None,
        test_list: Optional[str] = None,
        num_classes: Optional[int] = None,
        class_names_file: Optional[str] = None,
        image_size: int = 224,
        imbalance_factor: float = 1.0,
        profile: Literal["exp", "step"] = "exp",
        imbalance_seed: int = 0,
        n_max: Optional[Union[int, Literal["min", "mean"]]] = None,
        cap_to_available: bool = False,
        val_fraction: float = 0.0,
        image_mode: Literal["RGB", "L"] = "RGB",
        train_transform: Optional[Callable] = None,
        eval_transform: Optional[Callable] = None,
        batch_size: int = 128,
        num_workers: int = 4,
        sampler: Optional[Literal["class_balanced", "sqrt"]] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            sampler=sampler,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
        )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"Expected `num_classes` >= 1 or None (inferred from `train_list`), got {num_classes}")
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        if image_mode not in ("RGB", "L"):
            raise ValueError(f"Expected `image_mode` to be 'RGB' or 'L' (3 or 1 channels), got {image_mode!r}")
        check_imbalance_arguments(imbalance_factor, profile)
        check_n_max(n_max)
        if val_list is None and test_list is None:
            raise ValueError(
                f"{type(self).__name__} needs a list to evaluate on: got neither `val_list` nor `test_list`. HINT: set "
                "`test_list` (and `val_list`, or `val_fraction` to hold out part of the training list)."
            )
        if val_list is not None and self.val_fraction > 0:
            raise ValueError(
                f"Expected one validation source, got `val_list`={val_list!r} and `val_fraction`={val_fraction}. "
                "HINT: keep `val_list` (ImageNet-LT / Places-LT ship one) or `val_fraction` (held out of `train_list`)."
            )
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        self.root = str(root)
        self.train_list = train_list
        self.val_list = val_list
        self.test_list = test_list
        self._num_classes_arg = num_classes
        self.class_names_file = class_names_file
        self.image_size = image_size
        self.imbalance_factor = float(imbalance_factor)
        self.profile = profile
        self.imbalance_seed = imbalance_seed
        self.n_max = n_max
        self.cap_to_available = bool(cap_to_available)
        self.image_mode = image_mode
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._train: Optional[tuple[list[str], list[int]]] = None

    def _resolve(self, path: str, arg: str) -> str:
        if os.path.isfile(path):
            return path
        candidate = os.path.join(self.root, path)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(
            f"{type(self).__name__}: `{arg}`={path!r} not found, neither as given nor relative to `root` "
            f"({candidate!r})"
        )

    def _read(self, path: str, arg: str, num_classes: Optional[int]) -> tuple[list[str], list[int]]:
        resolved = self._resolve(path, arg)
        files, labels = read_list_file(resolved, num_classes)
        if not files:
            raise ValueError(f"{type(self).__name__}: `{arg}` {resolved!r} has no entries")
        return files, labels

    def _train_entries(self) -> tuple[list[str], list[int]]:
        """The training list, checked (every class has an image) and cut to the profile: the pool of the hold-out."""
        if self._train is None:
            files, labels = self._read(self.train_list, "train_list", self._num_classes_arg)
            num_classes = self._num_classes_arg if self._num_classes_arg is not None else max(labels) + 1
            counts = np.bincount(labels, minlength=num_classes).tolist()
            empty = [c for c, n in enumerate(counts) if n == 0]
            if empty:
                shown = empty[:20]
                raise ValueError(
                    f"{type(self).__name__}: {len(empty)} class(es) have no training images in `train_list` "
                    f"{self.train_list!r}: {shown}{' ...' if len(empty) > 20 else ''}. Every class in "
                    f"[0, {num_classes}) needs at least one training image; fix the list or `num_classes`."
                )
            if self.imbalance_factor != 1.0 or self.n_max is not None:
                wanted = profile_counts(counts, self.imbalance_factor, self.profile, self.n_max, self.cap_to_available)
                keep = long_tailed_indices(labels, wanted, seed=self.imbalance_seed)
                files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            self._train = (files, labels)
        return self._train

    def _pool_targets(self) -> list[int]:
        return list(self._train_entries()[1])

    def _compute_class_names(self) -> list[str]:
        if self.class_names_file is None:
            return [str(i) for i in range(self.num_classes)]
        path = self._resolve(self.class_names_file, "class_names_file")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: `class_names_file` {path!r} has {len(names)} names, expected one per "
                f"class ({self.num_classes})"
            )
        return names

    def train_files(self) -> list[str]:
        """Paths (relative to ``root``) of the training images, without held-out ones."""
        files = self._train_entries()[0]
        return [files[i] for i in self.split_positions()[0]]

    def _dataset(self, files: list[str], labels: list[int], transform: Callable, arg: str) -> ImageFileDataset:
        paths = [os.path.join(self.root, f) for f in files]
        if not os.path.isfile(paths[0]):
            raise FileNotFoundError(
                f"{type(self).__name__}: image {paths[0]!r} (first entry of `{arg}`) not found. Paths in list "
                f"files are relative to `root`={self.root!r}: expected {self.root}/{files[0]}"
            )
        return ImageFileDataset(paths, labels, transform, mode=self.image_mode)

    def setup(self, stage: Optional[str] = None) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory (absolute: "
                f"{os.path.abspath(self.root)!r}); the list-file paths are relative to it"
            )
        num_classes = self.num_classes  # validates the training list
        train_transform, eval_transform = self.train_transform, self.eval_transform
        if train_transform is None:
            train_transform = imagenet_train_transform(self.image_size)
        if eval_transform is None:
            eval_transform = imagenet_eval_transform(self.image_size)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_files(), self.train_targets(), train_transform, "train_list")
            self.train_eval_dataset = ImageFileDataset(
                self.train_dataset.files, self.train_dataset.targets, eval_transform, mode=self.image_mode
            )
            if self.train_transform is not None:
                check_transform_output(self.train_dataset, "train_transform", self.train_transform)
        if self.val_dataset is None:
            if self.val_list is not None:
                files, labels = self._read(self.val_list, "val_list", num_classes)
                self.val_dataset = self._dataset(files, labels, eval_transform, "val_list")
            elif self.val_fraction > 0 and stage in (None, "fit", "validate"):
                pool_files, pool_labels = self._train_entries()
                held = self.split_positions()[1]
                files, labels = [pool_files[i] for i in held], [pool_labels[i] for i in held]
                self.val_dataset = self._dataset(files, labels, eval_transform, "train_list")
        if self.test_dataset is None:
            if self.test_list is None:
                self.test_dataset = self.val_dataset
            else:
                files, labels = self._read(self.test_list, "test_list", num_classes)
                self.test_dataset = self._dataset(files, labels, eval_transform, "test_list")
        if self.eval_transform is not None:
            for dataset in {id(d): d for d in (self.val_dataset, self.test_dataset) if d is not None}.values():
                check_transform_output(dataset, "eval_transform", self.eval_transform)
