"""Long-tailed DataModule over an image folder ``root/{train,test}/<class>/<image>``."""

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from lightning_lt.datamodules.base import LongTailDataModule, collate_images
from lightning_lt.datamodules.profiles import (
    check_imbalance_arguments,
    check_n_max,
    long_tailed_indices,
    profile_counts,
)
from lightning_lt.datamodules.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    check_transform_output,
    cifar_eval_transform,
    cifar_tensor_eval_transform,
    cifar_tensor_train_transform,
    cifar_train_transform,
)

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFileDataset",
    "ImageFolderLT",
    "InMemoryImageDataset",
    "PILInput",
    "decode_images",
    "pil_loader",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MODES = ("RGB", "L")
#: Default normalisation of 1-channel images (``image_mode="L"``): [0, 1] to [-1, 1].
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)


def pil_loader(path: str, mode: str = "RGB") -> Image.Image:
    """Open an image file as a PIL image in ``mode`` (``"RGB"``: 3 channels, grayscale images replicated;
    ``"L"``: 1 channel, colour images converted to luminance)."""
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


class ImageFileDataset(Dataset):
    """``(transform(image), label)`` pairs read from image files, decoded at every access.

    Args:
        files: image paths.
        targets: label of each file.
        transform: applied to the PIL image.
        mode: PIL mode the images are converted to (``"RGB"`` or ``"L"``).
    """

    def __init__(
        self, files: Sequence[str], targets: Sequence[int], transform: Optional[Callable] = None, mode: str = "RGB"
    ) -> None:
        if len(files) != len(targets):
            raise ValueError(f"Expected as many `targets` as `files`, got {len(targets)} and {len(files)}")
        self.files = list(files)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple:
        image = pil_loader(self.files[index], self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class InMemoryImageDataset(Dataset):
    """``(transform(images[i]), label)`` pairs over images decoded once into a ``uint8 [N, C, H, W]`` tensor.

    Args:
        images: ``uint8`` tensor ``[N, C, H, W]`` (``C`` = 3, or 1 for grayscale).
        targets: label of each image.
        transform: applied to the ``uint8 [C, H, W]`` tensor.
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


class PILInput:
    """Gives ``transform`` the PIL image of a ``uint8 [C, H, W]`` tensor (``"L"`` for 1 channel, ``"RGB"`` for 3):
    a user's PIL transform on images decoded into memory.

    Example:
        >>> PILInput(lambda image: image.mode)(torch.zeros(1, 4, 4, dtype=torch.uint8))
        'L'
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor):
        return self.transform(to_pil_image(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def decode_images(
    files: Sequence[str], size: Optional[int] = None, num_threads: Optional[int] = None, mode: str = "RGB"
) -> torch.Tensor:
    """Decode image files into one ``uint8 [N, C, size, size]`` tensor (PIL decoding in ``mode``, ``C`` = 3 for
    ``"RGB"`` and 1 for ``"L"``, ``Resize((size, size))`` if needed).

    Uses the same PIL decoding and resizing as the file-based path, so that both give identical pixels.
    """
    resize = T.Resize((size, size), antialias=True) if size is not None else None

    def load(path: str) -> torch.Tensor:
        image = pil_loader(path, mode)
        if resize is not None and image.size != (size, size):
            image = resize(image)
        return pil_to_tensor(image)

    if not files:
        return torch.zeros(0, len(mode), size or 0, size or 0, dtype=torch.uint8)
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
    order). ``class_counts`` only lists the folders (no decoding) and counts exactly the images trained on.

    Long-tailed cut: with ``imbalance_factor > 1`` (or ``n_max`` set) the training folder is sub-sampled by the
    LDAM-DRW protocol: class ``i`` keeps :func:`~lightning_lt.datamodules.profiles.imbalance_counts` ``[i]`` of the
    profile whose largest count is ``n_max`` (``None``: the largest class; ``"min"``: the smallest class, so that no
    class is short; ``"mean"``: the mean class size, LDAM-DRW's convention; or a number), images chosen by
    :func:`~lightning_lt.datamodules.profiles.long_tailed_indices` over the sorted file lists (seed
    ``imbalance_seed``). A class with fewer images than its count is an error naming the fix, or, with
    ``cap_to_available=True``, keeps all its images (and ``class_counts`` says so). ``imbalance_factor = 1`` without
    ``n_max`` keeps the folder as it is (which may itself be long-tailed, e.g. your own data).

    Validation (one of): ``val_fraction``, a per-class share of the (long-tailed) training images held out with the
    evaluation transform (see :class:`~lightning_lt.datamodules.base.LongTailDataModule`); ``val_dir``, a folder
    ``root/<val_dir>/<class>/*`` with the training class folders; neither: the test folder (``val_dataloader`` then
    iterates over the test images, so choose checkpoints or hyper-parameters on one of the other two).

    Images: ``image_mode="RGB"`` (default) converts every image to 3 channels (grayscale PNGs are replicated, so
    RGB backbones such as ``CIFARResNet`` take them); ``"L"`` keeps 1 channel (1-value ``mean`` / ``std``, default
    0.5 / 0.5, and a backbone with one input channel).

    Augmentation (default, CIFAR style): resize to ``image_size`` if the image has another size, random
    ``image_size`` crop with zero padding ``image_size // 8`` (4 at 32), horizontal flip, normalisation
    by ``mean`` / ``std``; evaluation: resize + normalisation. ``train_transform`` / ``eval_transform`` replace them
    (any callable on a PIL image returning a tensor, e.g. ``CIFARTrainTransform(hflip=False)`` for digits or
    ``ImageNetTrainTransform`` / ``ImageNetEvalTransform`` for large images, or a ``torchvision.transforms.v2.Compose``
    given by ``class_path`` in a config); they are used as given (``image_size``, ``mean`` and ``std`` are not
    applied to them), and ``setup()`` checks on the first and last image of each split that they return tensors
    of one size.

    With ``in_memory=True`` all selected images are decoded once in ``setup()`` into ``uint8`` tensors (every image
    resized to ``image_size`` x ``image_size``) and augmented as tensors (fast CPU epochs for small images); the
    result is pixel-identical to the file-based path for the same random draws. A custom transform then receives
    the decoded, resized image as a PIL image (:class:`PILInput`). With ``device_data=True`` the images are decoded
    in the same way and the loaders build the batches on the trainer's device
    (:class:`~lightning_lt.datamodules.device.DeviceDataLoader`): ``N * C * image_size**2`` bytes per split
    and process (the selected training images, the validation and the test images) must fit in device memory. The
    device path runs only the built-in CIFAR augmentation, so a custom transform with ``device_data`` is refused.

    Args:
        root: folder holding ``train_dir`` and ``test_dir``.
        imbalance_factor: ``n_max / n_min`` >= 1 (1 = keep the folder as is, unless ``n_max`` is set).
        profile: ``"exp"`` or ``"step"``.
        imbalance_seed: numpy seed of the image selection.
        n_max: largest count of the profile: ``None`` (the largest class), ``"min"``, ``"mean"`` or a number.
        cap_to_available: a class with fewer images than the profile asks keeps the ones it has (instead of an error).
        train_dir: training sub-folder of ``root``.
        test_dir: test sub-folder of ``root`` (used for testing, and for validation without ``val_fraction`` /
            ``val_dir``).
        val_dir: validation sub-folder of ``root`` (the training class folders), or ``None``.
        val_fraction: per-class share of the training images held out for validation (0: none).
        image_size: side of the (square) network input.
        image_mode: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        in_memory: decode all images once in ``setup()`` and keep them in memory.
        mean: normalisation mean (default: CIFAR-10's; 0.5 with ``image_mode="L"``).
        std: normalisation standard deviation (default: CIFAR-10's; 0.5 with ``image_mode="L"``).
        train_transform: training transform of a PIL image (``None``: the CIFAR recipe above).
        eval_transform: evaluation transform (validation, test, :meth:`train_eval_dataloader`; ``None``: resize +
            normalisation).
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size, device_data:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Raises:
        ValueError: bad ``imbalance_factor`` / ``profile`` / ``n_max`` / ``image_size`` / ``image_mode`` / ``mean`` /
            ``std`` / ``val_fraction``; ``val_fraction`` with ``val_dir``; a custom transform with ``device_data``;
            (when the folders are first read) no class folders, a training class folder without images, a class
            with too few images for the profile, a hold-out that leaves a class without training images, test or
            validation classes that differ from training classes; (in ``setup()``) a transform that does not return
            tensors of one size.
        FileNotFoundError: ``root``, ``root/train_dir``, ``root/test_dir`` or ``root/val_dir`` missing.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for digit, n in (("0", 6), ("1", 9), ("2", 4)):  # classes of unequal size, grayscale PNG
        ...     os.makedirs(os.path.join(root, "train", digit))
        ...     for i in range(n):
        ...         Image.new("L", (28, 28)).save(os.path.join(root, "train", digit, f"{i}.png"))
        >>> ImageFolderLT(root).class_counts  # the folder as it is
        [6, 9, 4]
        >>> ImageFolderLT(root, imbalance_factor=2, n_max="min").class_counts  # cut to a profile from 4 to 2
        [4, 2, 2]
        >>> ImageFolderLT(root, imbalance_factor=2, n_max=8, cap_to_available=True).class_counts  # class 0 has 6
        [6, 5, 4]
        >>> ImageFolderLT(root, val_fraction=0.25).class_counts  # 2, 2 and 1 images held out for validation
        [4, 7, 3]
    """

    batch_collate = staticmethod(collate_images)

    def __init__(
        self,
        root: str,
        imbalance_factor: float = 1.0,
        profile: Literal["exp", "step"] = "exp",
        imbalance_seed: int = 0,
        n_max: Optional[Union[int, Literal["min", "mean"]]] = None,
        cap_to_available: bool = False,
        train_dir: str = "train",
        test_dir: str = "test",
        val_dir: Optional[str] = None,
        val_fraction: float = 0.0,
        image_size: int = 32,
        image_mode: Literal["RGB", "L"] = "RGB",
        in_memory: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
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
        check_imbalance_arguments(imbalance_factor, profile)
        check_n_max(n_max)
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        if image_mode not in _MODES:
            raise ValueError(f"Expected `image_mode` to be one of {_MODES} (3 or 1 channels), got {image_mode!r}")
        channels = len(image_mode)
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != channels:
                raise ValueError(
                    f"Expected `{name}` to have {channels} value(s), one per channel of `image_mode`={image_mode!r}, "
                    f"got {value!r}"
                )
        if std is not None and min(std) <= 0:
            raise ValueError(f"Expected `std` > 0, got {std!r}")
        if val_dir is not None and self.val_fraction > 0:
            raise ValueError(
                f"Expected one validation source, got `val_dir`={val_dir!r} and `val_fraction`={val_fraction}. HINT: "
                "keep `val_dir` (a folder of validation images) or `val_fraction` (held out of the training images)."
            )
        self._refuse_transforms_on_device(train_transform=train_transform, eval_transform=eval_transform)
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        self.root = str(root)
        self.imbalance_factor = float(imbalance_factor)
        self.profile = profile
        self.imbalance_seed = imbalance_seed
        self.n_max = n_max
        self.cap_to_available = bool(cap_to_available)
        self.train_dir = train_dir
        self.test_dir = test_dir
        self.val_dir = val_dir
        self.image_size = image_size
        self.image_mode = image_mode
        self.in_memory = in_memory
        default_mean, default_std = (CIFAR10_MEAN, CIFAR10_STD) if image_mode == "RGB" else (GRAY_MEAN, GRAY_STD)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._pool_files: Optional[list[str]] = None
        self._pool_labels: Optional[list[int]] = None
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
                f"{_layout(self.root, self.train_dir, self.test_dir)}; set `train_dir` / `test_dir` / `val_dir` if the "
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
        """List the training folder and cut it to the profile: the pool the validation hold-out is drawn from."""
        if self._pool_files is not None:
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
        if self.imbalance_factor != 1.0 or self.n_max is not None:
            available = [len(listing[name]) for name in classes]
            counts = profile_counts(
                available, self.imbalance_factor, self.profile, self.n_max, self.cap_to_available, class_names=classes
            )
            keep = long_tailed_indices(labels, counts, seed=self.imbalance_seed)
            files = [files[i] for i in keep]
            labels = [labels[i] for i in keep]
        self._classes = classes
        self._pool_files = files
        self._pool_labels = labels

    def _pool_targets(self) -> list[int]:
        self._index_train()
        return list(self._pool_labels)

    def _pool_class_names(self) -> list[str]:
        self._index_train()
        return list(self._classes)

    def _compute_class_names(self) -> list[str]:
        return self._pool_class_names()

    def train_files(self) -> list[str]:
        """Paths of the training images (the long-tailed selection, grouped by class, without held-out ones)."""
        self._index_train()
        return [self._pool_files[i] for i in self.split_positions()[0]]

    def val_files(self) -> tuple[list[str], list[int]]:
        """Paths and labels of the validation images: held out of the training images (``val_fraction``), or the
        ``val_dir`` folder; empty without either."""
        if self.val_fraction > 0:
            self._index_train()
            held = self.split_positions()[1]
            return [self._pool_files[i] for i in held], [self._pool_labels[i] for i in held]
        if self.val_dir is None:
            return [], []
        return self._split_files(self.val_dir, "validation")

    def test_files(self) -> tuple[list[str], list[int]]:
        """Paths and labels of the test images; checks that the test classes equal the training classes."""
        return self._split_files(self.test_dir, "test")

    def _split_files(self, split_dir: str, role: str) -> tuple[list[str], list[int]]:
        classes = self.class_names
        listing = self._scan(split_dir)
        if list(listing) != classes:
            missing = sorted(set(classes) - set(listing))
            extra = sorted(set(listing) - set(classes))
            raise ValueError(
                f"{type(self).__name__}: the class folders of {os.path.join(self.root, split_dir)!r} differ from "
                f"those of {os.path.join(self.root, self.train_dir)!r}: missing in {role}: {missing}, not in train: "
                f"{extra}. Both splits need the same class folders."
            )
        files = [f for name in classes for f in listing[name]]
        labels = [c for c, name in enumerate(classes) for _ in listing[name]]
        return files, labels

    # ------------------------------------------------------------------ datasets
    def _transforms(self, tensors: bool) -> tuple[Callable, Callable]:
        """Training and evaluation transforms for PIL images, or (``tensors``) for decoded ``uint8`` tensors."""
        pad = max(self.image_size // 8, 1)
        if tensors:
            train = (
                PILInput(self.train_transform) if self.train_transform is not None
                else cifar_tensor_train_transform(self.mean, self.std, size=self.image_size, padding=pad)
            )  # fmt: skip
            evaluation = (
                PILInput(self.eval_transform) if self.eval_transform is not None
                else cifar_tensor_eval_transform(self.mean, self.std)
            )  # fmt: skip
            return train, evaluation
        train = self.train_transform
        if train is None:
            train = cifar_train_transform(self.mean, self.std, size=self.image_size, padding=pad, resize=self.image_size)
        evaluation = self.eval_transform
        if evaluation is None:
            evaluation = cifar_eval_transform(self.mean, self.std, resize=self.image_size)
        return train, evaluation

    def _dataset(self, files: list[str], labels: list[int], transform: Callable) -> Dataset:
        if self.in_memory or self.device_data:
            return InMemoryImageDataset(decode_images(files, self.image_size, mode=self.image_mode), labels, transform)
        return ImageFileDataset(files, labels, transform, mode=self.image_mode)

    def setup(self, stage: Optional[str] = None) -> None:
        tensors = self.in_memory or self.device_data
        train_transform, eval_transform = self._transforms(tensors)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_files(), self.train_targets(), train_transform)
            if isinstance(self.train_dataset, InMemoryImageDataset):  # the same decoded images
                train = self.train_dataset
                self.train_eval_dataset = InMemoryImageDataset(train.images, train.targets, eval_transform)
            else:
                self.train_eval_dataset = ImageFileDataset(
                    self.train_dataset.files, self.train_dataset.targets, eval_transform, mode=self.image_mode
                )
            if self.train_transform is not None:
                check_transform_output(self.train_dataset, "train_transform", self.train_transform)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            files, labels = self.val_files()
            if files:
                self.val_dataset = self._dataset(files, labels, eval_transform)
        if self.test_dataset is None:
            files, labels = self.test_files()
            self.test_dataset = self._dataset(files, labels, eval_transform)
        if self.eval_transform is not None:
            for dataset in (self.val_dataset, self.test_dataset):
                if dataset is not None:
                    check_transform_output(dataset, "eval_transform", self.eval_transform)

