"""Long-tailed DataModule over list files (ImageNet-LT, Places-LT, iNaturalist-2018)."""

import os
from typing import Literal, Optional

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.folder import ImageFileDataset
from lightning_lt.datamodules.transforms import imagenet_eval_transform, imagenet_train_transform

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
    (lazily, reading only the list file). ``val_dataloader`` uses ``val_list``; ``test_dataloader``
    uses ``test_list`` (or ``val_list`` when it is not given). Transforms: ``RandomResizedCrop`` + flip
    for training, ``Resize`` + ``CenterCrop`` for evaluation, ImageNet normalisation.

    A list-file path (and ``class_names_file``) is used as given when it exists, otherwise it is looked
    up relative to ``root``.

    Args:
        root: folder the image paths are relative to.
        train_list: training list file.
        val_list: validation list file.
        test_list: test list file (default: ``val_list``).
        num_classes: number of classes (default: largest training label + 1).
        class_names_file: optional file with one class name per line, in label order.
        image_size: network input side (224).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        FileNotFoundError: ``root``, a list file or the first image of a list is missing.
        ValueError: a malformed line (file and line number), a label outside ``[0, num_classes)``, a class
            without training images, a ``class_names_file`` with the wrong number of names.
    """

    def __init__(
        self,
        root: str,
        train_list: str,
        val_list: str,
        test_list: Optional[str] = None,
        num_classes: Optional[int] = None,
        class_names_file: Optional[str] = None,
        image_size: int = 224,
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
        )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"Expected `num_classes` >= 1 or None (inferred from `train_list`), got {num_classes}")
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        self.save_hyperparameters()
        self.root = str(root)
        self.train_list = train_list
        self.val_list = val_list
        self.test_list = test_list
        self._num_classes_arg = num_classes
        self.class_names_file = class_names_file
        self.image_size = image_size
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
        if self._train is None:
            self._train = self._read(self.train_list, "train_list", self._num_classes_arg)
        return self._train

    def _compute_class_counts(self) -> list[int]:
        _, labels = self._train_entries()
        num_classes = self._num_classes_arg if self._num_classes_arg is not None else max(labels) + 1
        counts = [0] * num_classes
        for label in labels:
            counts[label] += 1
        empty = [c for c, n in enumerate(counts) if n == 0]
        if empty:
            shown = empty[:20]
            raise ValueError(
                f"{type(self).__name__}: {len(empty)} class(es) have no training images in `train_list` "
                f"{self.train_list!r}: {shown}{' ...' if len(empty) > 20 else ''}. Every class in "
                f"[0, {num_classes}) needs at least one training image; fix the list or `num_classes`."
            )
        return counts

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

    def train_targets(self) -> list[int]:
        return list(self._train_entries()[1])

    def _dataset(self, files: list[str], labels: list[int], train: bool, arg: str) -> ImageFileDataset:
        paths = [os.path.join(self.root, f) for f in files]
        if not os.path.isfile(paths[0]):
            raise FileNotFoundError(
                f"{type(self).__name__}: image {paths[0]!r} (first entry of `{arg}`) not found. Paths in list "
                f"files are relative to `root`={self.root!r}: expected {self.root}/{files[0]}"
            )
        transform = imagenet_train_transform(self.image_size) if train else imagenet_eval_transform(self.image_size)
        return ImageFileDataset(paths, labels, transform)

    def setup(self, stage: Optional[str] = None) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory (absolute: "
                f"{os.path.abspath(self.root)!r}); the list-file paths are relative to it"
            )
        num_classes = self.num_classes  # validates the training list
        if stage in (None, "fit") and self.train_dataset is None:
            files, labels = self._train_entries()
            self.train_dataset = self._dataset(files, labels, True, "train_list")
        if self.val_dataset is None:
            files, labels = self._read(self.val_list, "val_list", num_classes)
            self.val_dataset = self._dataset(files, labels, False, "val_list")
        if self.test_dataset is None:
            if self.test_list is None:
                self.test_dataset = self.val_dataset
            else:
                files, labels = self._read(self.test_list, "test_list", num_classes)
                self.test_dataset = self._dataset(files, labels, False, "test_list")
