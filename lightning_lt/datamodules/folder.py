"""Long-tailed DataModule over an image folder ``root/{train,test}/<class>/<image>``."""

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.profiles import check_imbalance_arguments, imbalance_counts, long_tailed_indices
from lightning_lt.datamodules.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar_eval_transform,
    cifar_tensor_eval_transform,
    cifar_tensor_train_transform,
    cifar_train_transform,
)

__all__ = ["IMG_EXTENSIONS", "ImageFileDataset", "ImageFolderLT", "InMemoryImageDataset", "decode_images", "pil_loader"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(path: str) -> Image.Image:
    """Open an image file as an RGB PIL image."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ImageFileDataset(Dataset):
    """``(transform(image), label)`` pairs read from image files, decoded at every access.

    Args:
        files: image paths.
        targets: label of each file.
        transform: applied to the RGB PIL image.
    """

    def __init__(self, files: Sequence[str], targets: Sequence[int], transform: Optional[Callable] = None) -> None:
        if len(files) != len(targets):
            raise ValueError(f"Expected as many `targets` as `files`, got {len(targets)} and {len(files)}")
        self.files = list(files)
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple:
        image = pil_loader(self.files[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class InMemoryImageDataset(Dataset):
    """``(transform(images[i]), label)`` pairs over images decoded once into a ``uint8 [N, 3, H, W]`` tensor.

    Args:
        images: ``uint8`` tensor ``[N, 3, H, W]``.
        targets: label of each image.
        transform: applied to the ``uint8 [3, H, W]`` tensor.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform: Optional[Callable] = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"Expected `images` as a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != len(targets):
            raise ValueError(f"Expected as many `targets` as images, got {len(targets)} and {images.shape[0]}")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def decode_images(files: Sequence[str], size: Optional[int] = None, num_threads: Optional[int] = None) -> torch.Tensor:
    """Decode image files into one ``uint8 [N, 3, size, size]`` tensor (PIL decoding, ``Resize((size, size))`` if needed).

    Uses the same PIL decoding and resizing as the file-based path, so that both give identical pixels.
    """
    resize = T.Resize((size, size), antialias=True) if size is not None else None

    def load(path: str) -> torch.Tensor:
        image = pil_loader(path)
        if resize is not None and image.size != (size, size):
            image = resize(image)
        return pil_to_tensor(image)

    if not files:
        return torch.zeros(0, 3, size or 0, size or 0, dtype=torch.uint8)
    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(pool.map(load, files, chunksize=256))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"Images have different shapes {sorted(shapes)[:4]}...; pass `size` to resize them")
    return torch.stack(tensors)


def _layout(root: str, train_dir: str, test_dir: str) -> str:
    return (
        f"{root}/{train_dir}/<class>/<image>.jpg and {root}/{test_dir}/<class>/<image>.jpg "
        f"(one sub-folder per class, the same class folders in both; extensions {', '.join(IMG_EXTENSIONS)})"
    )


class ImageFolderLT(LongTailDataModule):
    """Long-tailed classification from ``root/<train_dir>/<class>/*`` with a balanced ``root/<test_dir>/<class>/*``.

    Classes are the sorted class-folder names (for CIFAR-10 as JPEG folders this is CIFAR-10's label
    order). With ``imbalance_factor > 1`` the training folder is sub-sampled by the LDAM-DRW protocol:
    counts :func:`~lightning_lt.datamodules.profiles.imbalance_counts` with ``n_max`` = the largest
    class's size, images chosen by :func:`~lightning_lt.datamodules.profiles.long_tailed_indices` over
    the sorted file lists (seed ``imbalance_seed``). ``imbalance_factor = 1`` keeps the folder as it is
    (which may itself be long-tailed). ``class_counts`` only lists the folders (no decoding).

    Augmentation (CIFAR style): resize to ``image_size`` if the image has another size, random
    ``image_size`` crop with zero padding ``image_size // 8`` (4 at 32), horizontal flip, normalisation
    by ``mean`` / ``std``; evaluation: resize + normalisation. With ``in_memory=True`` all selected
    training and test images are decoded once in ``setup()`` into ``uint8`` tensors and augmented as
    tensors (fast CPU epochs for small images); the result is pixel-identical to the file-based path for
    the same random draws. With ``device_data=True`` the images are decoded in the same way (every image
    resized to ``image_size`` x ``image_size``) and the loaders build the batches on the trainer's device
    (:class:`~lightning_lt.datamodules.device.DeviceDataLoader`): ``N * 3 * image_size**2`` bytes per split
    and process (the selected training images and the test images) must fit in device memory.

    Args:
        root: folder holding ``train_dir`` and ``test_dir``.
        imbalance_factor: ``n_max / n_min`` >= 1 (1 = keep the folder as is).
        profile: ``"exp"`` or ``"step"``.
        imbalance_seed: numpy seed of the image selection.
        train_dir: training sub-folder of ``root``.
        test_dir: test sub-folder of ``root`` (used for validation and test).
        image_size: side of the (square) network input.
        in_memory: decode all images once in ``setup()`` and keep them in memory.
        mean: normalisation mean (default: CIFAR-10's).
        std: normalisation standard deviation (default: CIFAR-10's).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size, device_data:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        ValueError: bad ``imbalance_factor`` / ``profile`` / ``image_size`` / ``mean`` / ``std``; (when the
            folders are first read) no class folders, a training class folder without images, a
            class with too few images for the profile, test classes that differ from training classes.
        FileNotFoundError: ``root``, ``root/train_dir`` or ``root/test_dir`` missing.
    """

    def __init__(
        self,
        root: str,
        imbalance_factor: float = 1.0,
        profile: Literal["exp", "step"] = "exp",
        imbalance_seed: int = 0,
        train_dir: str = "train",
        test_dir: str = "test",
        image_size: int = 32,
        in_memory: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
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
        check_imbalance_arguments(imbalance_factor, profile)
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != 3:
                raise ValueError(f"Expected `{name}` to have 3 values (R, G, B), got {value!r}")
        if std is not None and min(std) <= 0:
            raise ValueError(f"Expected `std` > 0, got {std!r}")
        self.save_hyperparameters()
        self.root = str(root)
        self.imbalance_factor = float(imbalance_factor)
        self.profile = profile
        self.imbalance_seed = imbalance_seed
        self.train_dir = train_dir
        self.test_dir = test_dir
        self.image_size = image_size
        self.in_memory = in_memory
        self.mean = tuple(mean) if mean is not None else CIFAR10_MEAN
        self.std = tuple(std) if std is not None else CIFAR10_STD
        self._train_files: Optional[list[str]] = None
        self._train_labels: Optional[list[int]] = None
        self._classes: Optional[list[str]] = None

    # ------------------------------------------------------------------ listing (no decoding)
    def _split_path(self, split_dir: str) -> str:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory "
                f"(absolute: {os.path.abspath(self.root)!r}). Expected layout: "
                f"{_layout(self.root, self.train_dir, self.test_dir)}"
            )
        path = os.path.join(self.root, split_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{type(self).__name__}: {path!r} does not exist. Expected layout: "
                f"{_layout(self.root, self.train_dir, self.test_dir)}; set `train_dir` / `test_dir` if the "
                f"split folders have other names (found in root: {sorted(os.listdir(self.root))[:10]})"
            )
        return path

    def _scan(self, split_dir: str) -> dict[str, list[str]]:
        """``{class name: sorted image paths}`` of one split, classes sorted, by listing only."""
        path = self._split_path(split_dir)
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(
                f"{type(self).__name__}: no class folders in {path!r}. Expected layout: "
                f"{_layout(self.root, self.train_dir, self.test_dir)}"
            )
        listing = {}
        for name in classes:
            folder = os.path.join(path, name)
            files = sorted(
                e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
            )
            listing[name] = [os.path.join(folder, f) for f in files]
        return listing

    def _index_train(self) -> None:
        if self._train_files is not None:
            return
        listing = self._scan(self.train_dir)
        empty = [name for name, files in listing.items() if not files]
        if empty:
            raise ValueError(
                f"{type(self).__name__}: training class folder(s) without images: "
                f"{[os.path.join(self.root, self.train_dir, n) for n in empty]}. Every class needs at least one "
                f"image (extensions {', '.join(IMG_EXTENSIONS)}); remove the empty folders or add images."
            )
        classes = list(listing)
        files = [f for name in classes for f in listing[name]]
        labels = [c for c, name in enumerate(classes) for _ in listing[name]]
        if self.imbalance_factor != 1.0:
            n_max = max(len(v) for v in listing.values())
            counts = imbalance_counts(n_max, len(classes), self.imbalance_factor, self.profile)
            keep = long_tailed_indices(labels, counts, seed=self.imbalance_seed)
            files = [files[i] for i in keep]
            labels = [labels[i] for i in keep]
        self._classes = classes
        self._train_files = files
        self._train_labels = labels

    def _compute_class_counts(self) -> list[int]:
        self._index_train()
        counts = [0] * len(self._classes)
        for label in self._train_labels:
            counts[label] += 1
        return counts

    def _compute_class_names(self) -> list[str]:
        self._index_train()
        return list(self._classes)

    def train_files(self) -> list[str]:
        """Paths of the selected training images (grouped by class)."""
        self._index_train()
        return list(self._train_files)

    def train_targets(self) -> list[int]:
        self._index_train()
        return list(self._train_labels)

    def test_files(self) -> tuple[list[str], list[int]]:
        """Paths and labels of the test images; checks that the test classes equal the training classes."""
        classes = self.class_names
        listing = self._scan(self.test_dir)
        if list(listing) != classes:
            missing = sorted(set(classes) - set(listing))
            extra = sorted(set(listing) - set(classes))
            raise ValueError(
                f"{type(self).__name__}: the class folders of {os.path.join(self.root, self.test_dir)!r} differ from "
                f"those of {os.path.join(self.root, self.train_dir)!r}: missing in test: {missing}, not in train: "
                f"{extra}. Both splits need the same class folders."
            )
        files = [f for name in classes for f in listing[name]]
        labels = [c for c, name in enumerate(classes) for _ in listing[name]]
        return files, labels

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: Optional[str] = None) -> None:
        pad = max(self.image_size // 8, 1)
        if stage in (None, "fit") and self.train_dataset is None:
            files, labels = self.train_files(), self.train_targets()
            if self.in_memory or self.device_data:
                images = decode_images(files, self.image_size)
                transform = cifar_tensor_train_transform(self.mean, self.std, size=self.image_size, padding=pad)
                self.train_dataset = InMemoryImageDataset(images, labels, transform)
            else:
                transform = cifar_train_transform(
                    self.mean, self.std, size=self.image_size, padding=pad, resize=self.image_size
                )
                self.train_dataset = ImageFileDataset(files, labels, transform)
        if self.test_dataset is None:
            files, labels = self.test_files()
            if self.in_memory or self.device_data:
                images = decode_images(files, self.image_size)
                self.test_dataset = InMemoryImageDataset(images, labels, cifar_tensor_eval_transform(self.mean, self.std))
            else:
                transform = cifar_eval_transform(self.mean, self.std, resize=self.image_size)
                self.test_dataset = ImageFileDataset(files, labels, transform)
