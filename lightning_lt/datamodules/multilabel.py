"""Multi-label DataModules (COCO, Pascal VOC) with out-of-distribution (OOD) and outlier-exposure (OE) images.

Image-level multi-label classification under label imbalance, evaluated together with OOD detection
(JointEnergy, NeurIPS 2021; EDGE, AAAI 2025). The in-distribution (ID) labels of an image are the classes
of its annotated objects; OOD images come from sub-folders of a separate image folder (e.g. DTD textures):
``oe_classes`` are shown during training as outlier exposure, ``ood_classes`` form the OOD evaluation set,
and the two must be disjoint (test OOD images are never seen in training).

Batches:

- training without OE: ``(images, targets)``, ``float32 [B, 3, S, S]`` and multi-hot ``float32 [B, C]``;
- training with OE: a dict ``{"id": (images, targets), "oe": (oe_images, zeros [B_oe, C])}`` from
  Lightning's :class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader` (``"min_size"``, an
  epoch being one pass over the ID images);
- validation / test / predict: ``(images, targets, is_ood)`` over the ID evaluation split followed by the
  OOD images (``targets`` all zero and ``is_ood`` = 1 for those; ``is_ood`` is ``int64``).

``class_counts`` is the number of training images with each label (a label counts once per image however
many objects it has there), read from the annotation files only.
"""

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.folder import IMG_EXTENSIONS, pil_loader
from lightning_lt.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from lightning_lt.metrics.multilabel import label_tail_groups

__all__ = [
    "COCOMultiLabel",
    "MultiLabelDataset",
    "MultiLabelOODDataModule",
    "OODEvalDataset",
    "OODImageFolder",
    "VOCMultiLabel",
    "VOC_CLASSES",
    "multilabel_eval_transform",
    "multilabel_train_transform",
]

#: The 20 Pascal VOC classes in the standard (alphabetical) label order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- transforms
def multilabel_train_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Training augmentation: ``RandomResizedCrop(size, scale=(0.5, 1))``, horizontal flip, normalisation.

    A milder crop than ImageNet's ``scale=(0.08, 1)``, so that the small objects behind an image's labels
    mostly stay in the crop.

    Example:
        >>> from PIL import Image
        >>> x = multilabel_train_transform(32)(Image.new("RGB", (64, 48)))
        >>> type(x).__name__, x.dtype, tuple(x.shape)
        ('Tensor', torch.float32, (3, 32, 32))
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor(),
        ]
    )


def multilabel_eval_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Evaluation transform: ``Resize(size)`` (shorter side), ``CenterCrop(size)``, normalisation.

    Example:
        >>> from PIL import Image
        >>> transform = multilabel_eval_transform(32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        >>> x = transform(Image.new("RGB", (64, 48), "white"))
        >>> tuple(x.shape), float(x.min())
        ((3, 32, 32), 1.0)
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor(),
        ]
    )


# ---------------------------------------------------------------------------------------------- datasets
class MultiLabelDataset(Dataset):
    """``(transform(image), target)`` with ``target`` the ``float32 [num_classes]`` multi-hot vector of the labels.

    Args:
        samples: ``(image path, labels)`` pairs; ``labels`` are label indices (an empty list: all-negative).
        num_classes: number of labels ``C``.
        transform: applied to the RGB PIL image.

    Raises:
        ValueError: ``num_classes < 1``, a label outside ``[0, num_classes)``.
    """

    def __init__(
        self, samples: Sequence[tuple[str, Sequence[int]]], num_classes: int, transform: Optional[Callable] = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"Expected `num_classes` >= 1, got {num_classes}")
        self.files = [str(path) for path, _ in samples]
        self.labels = [tuple(sorted({int(c) for c in labels})) for _, labels in samples]
        for path, labels in zip(self.files, self.labels):
            if labels and (labels[0] < 0 or labels[-1] >= num_classes):
                raise ValueError(
                    f"Image {path!r} has labels {list(labels)}: expected label indices in [0, {num_classes})"
                )
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def target(self, index: int) -> torch.Tensor:
        """The multi-hot ``float32 [C]`` target of ``index`` (no image decoding)."""
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[list(self.labels[index])] = 1.0
        return target

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image = pil_loader(self.files[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(index)


class OODImageFolder(Dataset):
    """Images of the sub-folders ``classes`` of ``root`` as ``(transform(image), zeros [num_classes])``.

    Out-of-distribution images carry an all-zero ``float32`` target of the in-distribution label space, so
    they batch and concatenate with multi-label ID data. Files are listed once, sorted, folder by folder
    (extensions ``IMG_EXTENSIONS``); ``folders[i]`` is the sub-folder of item ``i``.

    Args:
        root: folder holding one sub-folder per OOD class (e.g. ``dtd10/<texture>/*.jpg``).
        classes: the sub-folders to use.
        num_classes: size ``C`` of the (ID) target vector.
        transform: applied to the RGB PIL image.

    Raises:
        ValueError: empty or duplicated ``classes``, ``num_classes < 1``, a sub-folder without images.
        FileNotFoundError: ``root`` or one of the sub-folders missing (lists the available sub-folders).
    """

    def __init__(
        self, root: str, classes: Sequence[str], num_classes: int, transform: Optional[Callable] = None
    ) -> None:
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError(f"OODImageFolder: `classes` is empty: name at least one sub-folder of {str(root)!r}")
        duplicated = sorted({c for c in classes if classes.count(c) > 1})
        if duplicated:
            raise ValueError(f"OODImageFolder: `classes` lists {duplicated} more than once")
        if num_classes < 1:
            raise ValueError(f"Expected `num_classes` >= 1, got {num_classes}")
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"OODImageFolder: `root`={self.root!r} is not a directory (absolute: {os.path.abspath(self.root)!r}). "
                "Expected layout: <root>/<class>/<image>.jpg, one sub-folder per OOD class"
            )
        available = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        missing = [c for c in classes if c not in available]
        if missing:
            raise FileNotFoundError(
                f"OODImageFolder: sub-folder(s) {missing} not found in {self.root!r}; available sub-folders: "
                f"{available}. Fix the class names or `root`."
            )
        self.classes = classes
        self.files: list[str] = []
        self.folders: list[str] = []
        for name in classes:
            folder = os.path.join(self.root, name)
            files = sorted(
                e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
            )
            if not files:
                raise ValueError(
                    f"OODImageFolder: {folder!r} holds no images (extensions {', '.join(IMG_EXTENSIONS)}); remove "
                    f"{name!r} from the classes or add images"
                )
            self.files.extend(os.path.join(folder, f) for f in files)
            self.folders.extend([name] * len(files))
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image = pil_loader(self.files[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.zeros(self.num_classes, dtype=torch.float32)


class OODEvalDataset(ConcatDataset):
    """In-distribution items followed by OOD items, each as ``(image, target, is_ood)``.

    A :class:`~torch.utils.data.ConcatDataset` of ``id_dataset`` and ``ood_dataset`` (both returning
    ``(image, target)``) whose items get a third entry, ``is_ood``: an ``int64`` scalar tensor, 0 for the
    first ``len(id_dataset)`` items and 1 after. One dataset (rather than two loaders) keeps DDP sharding
    and the OOD metrics simple.

    Args:
        id_dataset: the in-distribution evaluation split.
        ood_dataset: the OOD images (``None``: none, every ``is_ood`` is 0).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> id_set = TensorDataset(torch.zeros(2, 3), torch.ones(2, 4))
        >>> ood_set = TensorDataset(torch.zeros(3, 3), torch.zeros(3, 4))
        >>> data = OODEvalDataset(id_set, ood_set)
        >>> len(data), data.is_ood.tolist(), data[2][2]
        (5, [0, 0, 1, 1, 1], tensor(1))
    """

    def __init__(self, id_dataset: Dataset, ood_dataset: Optional[Dataset] = None) -> None:
        super().__init__([id_dataset] if ood_dataset is None else [id_dataset, ood_dataset])
        self.num_id = len(id_dataset)
        self.num_ood = 0 if ood_dataset is None else len(ood_dataset)

    @property
    def is_ood(self) -> torch.Tensor:
        """``int64 [N]``: the ``is_ood`` flag of every item, in order (no decoding)."""
        return torch.cat([torch.zeros(self.num_id, dtype=torch.int64), torch.ones(self.num_ood, dtype=torch.int64)])

    def __getitem__(self, index: int) -> tuple[Any, Any, torch.Tensor]:
        if index < 0:
            index += len(self)
        image, target = super().__getitem__(index)[:2]
        return image, target, torch.tensor(int(index >= self.num_id), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- base
class MultiLabelOODDataModule(LongTailDataModule):
    """Base of the multi-label DataModules with OOD evaluation images and optional outlier exposure.

    ``class_counts`` (training images per label), ``num_classes`` and ``class_names`` come from the annotation
    files only (no image decoding) and are valid right after ``__init__``. ``tail_labels`` are the labels with
    fewer than ``tail_threshold`` positive training images.

    Transforms (``torchvision.transforms.v2``): training :func:`multilabel_train_transform` (random resized
    crop with scale ``(0.5, 1)``, flip), evaluation :func:`multilabel_eval_transform` (resize of the shorter
    side, centre crop); both normalise with the ImageNet mean and standard deviation. OE images get the
    training transform, OOD evaluation images the evaluation one.

    Loaders:

    - ``train_dataloader``: without OE, the shuffled ID loader with batches ``(images, targets)``; with OE, a
      :class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader`
      ``{"id": id_loader, "oe": oe_loader}`` in ``"min_size"`` mode, so a batch is
      ``{"id": (images, targets), "oe": (oe_images, zeros)}`` and an epoch is one pass over the ID images,
      as outlier exposure is usually trained: an OE set with fewer batches is repeated to cover the epoch,
      a larger one is shuffled, so that each epoch draws another subset of it. Under DDP, Lightning gives each inner loader its
      own ``DistributedSampler``: the ranks see disjoint shares of the ID set and of the OE set.
    - ``val_dataloader`` / ``test_dataloader`` / ``predict_dataloader``: one ordered loader over
      :class:`OODEvalDataset` (ID evaluation split, then the ``ood_classes`` images), batches
      ``(images, targets, is_ood)``.

    Image-level re-sampling by class needs one label per image, so there is no ``sampler`` argument and
    :meth:`train_targets` raises; re-weight labels by ``class_counts`` in the loss instead.

    Subclasses set ``train_split`` / ``val_split`` and implement ``_list_split(split)`` (``(image path,
    label indices)`` pairs, checking the files exist), ``_compute_class_names()`` and ``_layout()``.

    Args:
        root: data set folder.
        ood_root: folder of OOD images with one sub-folder per OOD class (e.g. DTD textures).
        oe_classes: sub-folders of ``ood_root`` used as outlier exposure in training.
        ood_classes: sub-folders of ``ood_root`` forming the OOD evaluation set (disjoint from ``oe_classes``).
        image_size: side of the square network input.
        batch_size: ID training batch size per process.
        oe_batch_size: OE batch size per process (default: ``batch_size``).
        num_workers: ``DataLoader`` worker processes (per loader).
        tail_threshold: labels with fewer positive training images than this are ``tail_labels``.
        seed: seed of the training loaders' shuffling (the OE loader uses ``seed + 1``); under DDP Lightning's
            ``DistributedSampler`` shuffles instead (seeded by ``seed_everything``).
        pin_memory: ``DataLoader(pin_memory=...)``.
        persistent_workers: keep workers alive between epochs; only applied when ``num_workers > 0``.
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).

    Raises:
        ValueError: ``image_size``, ``oe_batch_size`` or ``tail_threshold`` < 1; ``oe_classes`` / ``ood_classes``
            empty, given without ``ood_root``, or overlapping; ``ood_root`` without either; plus the
            checks of :class:`~lightning_lt.datamodules.base.LongTailDataModule`.
        FileNotFoundError: (on first use) a missing root, annotation file, image or OOD sub-folder.
    """

    train_split: str = "train"
    val_split: str = "val"

    def __init__(
        self,
        root: str,
        ood_root: Optional[str] = None,
        oe_classes: Optional[list[str]] = None,
        ood_classes: Optional[list[str]] = None,
        image_size: int = 224,
        batch_size: int = 32,
        oe_batch_size: Optional[int] = None,
        num_workers: int = 4,
        tail_threshold: int = 20,
        seed: int = 0,
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
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        if oe_batch_size is not None and oe_batch_size < 1:
            raise ValueError(f"Expected `oe_batch_size` >= 1 or None (= `batch_size`), got {oe_batch_size}")
        if tail_threshold < 1:
            raise ValueError(
                f"Expected `tail_threshold` >= 1 (a number of positive training images), got {tail_threshold}"
            )
        for name, value in (("oe_classes", oe_classes), ("ood_classes", ood_classes)):
            if isinstance(value, str):
                raise ValueError(f"Expected `{name}` to be a list of sub-folder names, got the string {value!r}")
            if value is not None and len(value) == 0:
                raise ValueError(f"`{name}` is an empty list: name sub-folders of `ood_root`, or leave it None")
            if value is not None and ood_root is None:
                raise ValueError(
                    f"`{name}`={list(value)} is given without `ood_root`: set `ood_root` to the folder holding these "
                    "sub-folders"
                )
        if ood_root is not None and oe_classes is None and ood_classes is None:
            raise ValueError(
                f"`ood_root`={ood_root!r} is set but neither `oe_classes` nor `ood_classes`: name its sub-folders used "
                "as outlier exposure (`oe_classes`) and / or as the OOD evaluation set (`ood_classes`)"
            )
        overlap = sorted(set(oe_classes or ()) & set(ood_classes or ()))
        if overlap:
            raise ValueError(
                f"`oe_classes` and `ood_classes` share {overlap}: images used as outlier exposure in training must "
                "never be test OOD images. Remove them from one of the two lists."
            )
        self.root = str(root)
        self.ood_root = str(ood_root) if ood_root is not None else None
        self.oe_classes = [str(c) for c in oe_classes] if oe_classes is not None else None
        self.ood_classes = [str(c) for c in ood_classes] if ood_classes is not None else None
        self.image_size = image_size
        self.oe_batch_size = oe_batch_size if oe_batch_size is not None else batch_size
        self.tail_threshold = tail_threshold
        self.oe_dataset: Optional[OODImageFolder] = None
        self._samples: dict[str, list[tuple[str, list[int]]]] = {}

    # ------------------------------------------------------------------ facts of the data
    @property
    def has_outlier_exposure(self) -> bool:
        """Whether training uses outlier-exposure images (``oe_classes`` given)."""
        return bool(self.oe_classes)

    @property
    def tail_labels(self) -> Optional[list[int]]:
        """Labels with fewer than ``tail_threshold`` positive training images.

        ``None`` (with a warning) when there is no head / tail split: no label, or every label, is below the
        threshold.
        """
        try:
            return list(label_tail_groups(self.class_counts, self.tail_threshold))
        except ValueError as err:
            rank_zero_warn(f"{type(self).__name__}: no head / tail split of the labels ({err}); `tail_labels` is None")
            return None

    def _compute_class_counts(self) -> list[int]:
        counts = [0] * len(self._compute_class_names())
        for _, labels in self.split_samples(self.train_split):
            for c in set(labels):
                counts[c] += 1
        return counts

    def train_targets(self) -> list[int]:
        raise NotImplementedError(
            f"{type(self).__name__} is multi-label: an image has several labels, so single-label class-balanced "
            "re-sampling is not defined. Re-weight the labels by `class_counts` in the loss instead."
        )

    # ------------------------------------------------------------------ listing (no decoding)
    def _layout(self) -> str:
        return ""

    def _list_split(self, split: str) -> list[tuple[str, list[int]]]:
        raise NotImplementedError(f"{type(self).__name__} must implement `_list_split(split)`")

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory (absolute: "
                f"{os.path.abspath(self.root)!r}). Expected layout: {self._layout()}"
            )

    def split_samples(self, split: str) -> list[tuple[str, list[int]]]:
        """``(image path, label indices)`` of every image of ``split``, read once from the annotations."""
        if split not in self._samples:
            self._check_root()
            samples = self._list_split(split)
            if not samples:
                raise FileNotFoundError(
                    f"{type(self).__name__}: split {split!r} of {self.root!r} has no images. Expected layout: "
                    f"{self._layout()}"
                )
            self._samples[split] = samples
        return list(self._samples[split])

    def _check_image(self, folder: str, name: str, listing: set) -> str:
        """``folder/name``, checked against ``listing`` (the names in ``folder``) or, for nested names, the disk."""
        path = os.path.join(folder, name)
        if name in listing or (("/" in name or os.sep in name) and os.path.isfile(path)):
            return path
        raise FileNotFoundError(f"{type(self).__name__}: image {path!r} not found. Expected layout: {self._layout()}")

    # ------------------------------------------------------------------ datasets and loaders
    def train_transform(self) -> Callable:
        """Transform of the ID training and OE images."""
        return multilabel_train_transform(self.image_size)

    def eval_transform(self) -> Callable:
        """Transform of the ID evaluation and OOD images."""
        return multilabel_eval_transform(self.image_size)

    def _ood_folder(self, classes: Optional[list[str]], transform: Callable) -> Optional[OODImageFolder]:
        if not classes:
            return None
        return OODImageFolder(self.ood_root, classes, self.num_classes, transform)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = MultiLabelDataset(
                self.split_samples(self.train_split), self.num_classes, self.train_transform()
            )
            self.oe_dataset = self._ood_folder(self.oe_classes, self.train_transform())
        if self.test_dataset is None:
            id_dataset = MultiLabelDataset(self.split_samples(self.val_split), self.num_classes, self.eval_transform())
            self.test_dataset = OODEvalDataset(id_dataset, self._ood_folder(self.ood_classes, self.eval_transform()))
        self.val_dataset = self.test_dataset

    def _train_loader(self, dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=self.shuffle_sampler(dataset, seed=seed), **self.train_loader_kwargs()
        )

    def train_dataloader(self) -> Union[DataLoader, CombinedLoader]:
        id_loader = self._train_loader(self._require("train_dataset"), self.batch_size, self.seed)
        if not self.has_outlier_exposure:
            return id_loader
        oe_dataset = self._require("oe_dataset")
        id_size = len(self._require("train_dataset"))
        # An epoch is one pass over the ID images (as outlier exposure is usually trained): the OE set is
        # repeated until it has at least as many batches, and the combined loader stops with the ID loader;
        # a larger OE set is shuffled, so each epoch sees another subset of it.
        repeats = max(1, math.ceil(id_size * self.oe_batch_size / (self.batch_size * len(oe_dataset))))
        if repeats > 1:
            oe_dataset = ConcatDataset([oe_dataset] * repeats)
        oe_loader = self._train_loader(oe_dataset, self.oe_batch_size, self.seed + 1)
        return CombinedLoader({"id": id_loader, "oe": oe_loader}, mode="min_size")


def voc_layout(voc_dir: str, splits: Sequence[str]) -> str:
    """The expected PASCAL VOC layout under ``voc_dir`` (for error messages)."""
    return (
        f"{voc_dir}/Annotations/<id>.xml, {voc_dir}/ImageSets/Main/{{{','.join(splits)}}}.txt (one id "
        f"per line) and {voc_dir}/JPEGImages/<id>.jpg, with `root` the VOCdevkit folder"
    )


def read_voc_image_set(root: str, voc_dir: str, split: str, owner: str, layout: str) -> tuple[list[str], str]:
    """The image ids of ``ImageSets/Main/<split>.txt`` (first token of each line) and that file's path.

    Raises:
        FileNotFoundError: ``voc_dir`` or the image-set file is missing.
    """
    if not os.path.isdir(voc_dir):
        found = sorted(os.listdir(root))[:10] if os.path.isdir(root) else []
        raise FileNotFoundError(
            f"{owner}: {voc_dir!r} not found (check `year`; found in root: {found}). Expected layout: {layout}"
        )
    set_file = os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(set_file):
        raise FileNotFoundError(f"{owner}: image set {set_file!r} not found. Expected layout: {layout}")
    with open(set_file, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()], set_file


def voc_annotation_path(voc_dir: str, image_id: str, set_file: str, owner: str, layout: str) -> str:
    """``Annotations/<image_id>.xml``, which must exist."""
    xml_path = os.path.join(voc_dir, "Annotations", f"{image_id}.xml")
    if not os.path.isfile(xml_path):
        raise FileNotFoundError(
            f"{owner}: annotation {xml_path!r} (listed in {set_file!r}) not found. Expected layout: {layout}"
        )
    return xml_path


def parse_voc_objects(xml_path: str, owner: str) -> tuple[ET.Element, list[tuple[int, bool, ET.Element]]]:
    """The root of a VOC annotation and its objects as ``(class index, difficult, <object> element)``.

    Raises:
        ValueError: invalid XML, an ``<object>`` without ``<name>``, or a name that is not a VOC class.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{owner}: annotation {xml_path!r} is not valid XML ({err})") from err
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{owner}: annotation {xml_path!r} has an <object> without a <name>")
        if name not in VOC_CLASSES:
            raise ValueError(
                f"{owner}: annotation {xml_path!r} has an object named {name!r}, which is not a VOC class "
                f"{list(VOC_CLASSES)}. Fix the name in the file."
            )
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((VOC_CLASSES.index(name), difficult, obj))
    return root, objects


class VOCFolder:
    """The ``root/VOC{year}`` folder of a PASCAL VOC data module (``root``, ``year``, ``train_split`` and
    ``val_split`` attributes) and its expected layout."""

    root: str
    year: str
    train_split: str
    val_split: str

    @property
    def voc_dir(self) -> str:
        """The ``root/VOC{year}`` folder."""
        return os.path.join(self.root, f"VOC{self.year}")

    def _layout(self) -> str:
        return voc_layout(self.voc_dir, (self.train_split, self.val_split))


def read_coco_instances(path: str, owner: str, layout: str) -> dict:
    """A COCO ``instances_*.json`` file, checked for its ``images``, ``annotations`` and ``categories`` lists.

    Raises:
        FileNotFoundError: the file is missing (the message gives ``layout``).
        ValueError: it is not JSON or lacks one of the three lists.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: annotation file {path!r} not found. Expected layout: {layout}")
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{owner}: {path!r} is not valid JSON ({err})") from err
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(content, dict) or k not in content]
    if missing:
        raise ValueError(
            f"{owner}: {path!r} has no {missing} entries: expected a COCO instances file with "
            "'images', 'annotations' and 'categories'"
        )
    return content


def coco_categories(content: dict, path: str, owner: str) -> list[tuple[int, str]]:
    """``(category id, name)`` of a COCO json's ``categories``, sorted by id (the label order).

    Raises:
        ValueError: no category, or a category id listed twice.
    """
    categories = sorted((int(c["id"]), str(c["name"])) for c in content["categories"])
    ids = [i for i, _ in categories]
    if not ids:
        raise ValueError(f"{owner}: {path!r} lists no categories")
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{owner}: {path!r} lists category ids {repeated} more than once; fix 'categories'")
    return categories


# ---------------------------------------------------------------------------------------------- COCO
class COCOMultiLabel(MultiLabelOODDataModule):
    """MS-COCO as multi-label classification: an image's labels are the categories of its boxes.

    Layout (the official one)::

        root/{train_split,val_split}/*.jpg
        root/annotations/instances_{train_split,val_split}.json

    The label space is the ``categories`` of the training json: label ``c`` is the ``c``-th smallest category
    id (80 labels for COCO, whatever ids the images use; ``class_names`` are the categories' names). The
    validation json must list the same categories. Every box counts, ``iscrowd`` ones included (a crowd of
    people is people in the image). Images without any box are kept as all-negative ID images unless
    ``drop_unlabelled``. Validation and test both use ``val_split`` (COCO's test labels are not public).

    Args:
        root: the COCO folder.
        train_split: training split (image folder and json name).
        val_split: evaluation split.
        drop_unlabelled: leave out images without boxes (from both splits).
        ood_root, oe_classes, ood_classes, image_size, batch_size, oe_batch_size, num_workers, tail_threshold,
        seed, pin_memory, persistent_workers, eval_batch_size: see :class:`MultiLabelOODDataModule`.

    Raises:
        FileNotFoundError: (on first use) missing ``root``, split folder, json or image (names the path and the layout).
        ValueError: bad arguments (see :class:`MultiLabelOODDataModule`); (on first use) a json that is not
            COCO instances, an annotation whose ``category_id`` is not among ``categories`` or whose ``image_id``
            is not among ``images``, validation categories that differ from the training ones.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        drop_unlabelled: bool = False,
        ood_root: Optional[str] = None,
        oe_classes: Optional[list[str]] = None,
        ood_classes: Optional[list[str]] = None,
        image_size: int = 224,
        batch_size: int = 32,
        oe_batch_size: Optional[int] = None,
        num_workers: int = 4,
        tail_threshold: int = 20,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            ood_root=ood_root,
            oe_classes=oe_classes,
            ood_classes=ood_classes,
            image_size=image_size,
            batch_size=batch_size,
            oe_batch_size=oe_batch_size,
            num_workers=num_workers,
            tail_threshold=tail_threshold,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.train_split = train_split
        self.val_split = val_split
        self.drop_unlabelled = drop_unlabelled
        self._categories: dict[str, list[tuple[int, str]]] = {}
        self.save_hyperparameters()

    def _layout(self) -> str:
        splits = f"{{{self.train_split},{self.val_split}}}"
        return (
            f"{self.root}/{splits}/<image>.jpg and {self.root}/annotations/instances_{splits}.json "
            "(the official COCO layout)"
        )

    def _annotation_file(self, split: str) -> str:
        return os.path.join(self.root, "annotations", f"instances_{split}.json")

    def _read_json(self, split: str) -> dict:
        self._check_root()
        return read_coco_instances(self._annotation_file(split), type(self).__name__, self._layout())

    def categories(self) -> list[tuple[int, str]]:
        """``(category id, name)`` of every label, in label order (from the training json)."""
        if self.train_split not in self._categories:
            self.split_samples(self.train_split)
        return list(self._categories[self.train_split])

    def _compute_class_names(self) -> list[str]:
        return [name for _, name in self.categories()]

    def _list_split(self, split: str) -> list[tuple[str, list[int]]]:
        content = self._read_json(split)
        path = self._annotation_file(split)
        owner = type(self).__name__
        categories = coco_categories(content, path, owner)
        if split != self.train_split:
            reference = self.categories()
            if categories != reference:
                extra = sorted(set(categories) - set(reference))[:10]
                missing = sorted(set(reference) - set(categories))[:10]
                raise ValueError(
                    f"{owner}: the categories of {path!r} differ from those of the training split "
                    f"{self._annotation_file(self.train_split)!r} (not in train: {extra}, missing: {missing}). "
                    "Both splits must share the label space (the same 'categories' ids and names)."
                )
        self._categories[split] = categories
        label_of = {cid: c for c, (cid, _) in enumerate(categories)}
        labels: dict[int, set[int]] = {int(image["id"]): set() for image in content["images"]}
        for ann in content["annotations"]:
            cid, image_id = int(ann["category_id"]), int(ann["image_id"])
            if cid not in label_of:
                raise ValueError(
                    f"{owner}: {path!r}: annotation {ann.get('id')!r} has category_id {cid}, which is not among the "
                    f"file's 'categories' ids {sorted(label_of)}. Fix the annotation or add the category."
                )
            if image_id not in labels:
                raise ValueError(
                    f"{owner}: {path!r}: annotation {ann.get('id')!r} refers to image_id {image_id}, which is not "
                    "among the file's 'images'. Fix the annotation file."
                )
            labels[image_id].add(label_of[cid])
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{owner}: image folder {folder!r} not found. Expected layout: {self._layout()}")
        listing = set(os.listdir(folder))
        samples = []
        for image in sorted(content["images"], key=lambda im: int(im["id"])):
            image_labels = labels[int(image["id"])]
            if self.drop_unlabelled and not image_labels:
                continue
            file = self._check_image(folder, str(image["file_name"]), listing)
            samples.append((file, sorted(image_labels)))
        return samples


# ---------------------------------------------------------------------------------------------- VOC
class VOCMultiLabel(VOCFolder, MultiLabelOODDataModule):
    """Pascal VOC as multi-label classification (20 labels): an image's labels are the names of its objects.

    Layout (``root`` is the ``VOCdevkit`` folder)::

        root/VOC{year}/Annotations/<id>.xml
        root/VOC{year}/ImageSets/Main/{train_set,val_set}.txt     (one image id per line)
        root/VOC{year}/JPEGImages/<id>.jpg

    Labels follow ``VOC_CLASSES`` (aeroplane ... tvmonitor). Objects marked ``<difficult>1</difficult>`` are
    ignored unless ``use_difficult``: an image whose only object of a class is difficult is negative for
    that class (an image with only difficult objects is all-negative, and kept). Validation and test both
    use ``val_set`` (VOC2007's ``test``; use ``"val"`` for VOC2012, whose test labels are not public).

    Args:
        root: the VOCdevkit folder.
        year: ``"2007"`` or ``"2012"`` (the ``VOC{year}`` sub-folder).
        train_set: training image set (``ImageSets/Main/{train_set}.txt``).
        val_set: evaluation image set.
        use_difficult: count objects marked difficult as labels.
        ood_root, oe_classes, ood_classes, image_size, batch_size, oe_batch_size, num_workers, tail_threshold,
        seed, pin_memory, persistent_workers, eval_batch_size: see :class:`MultiLabelOODDataModule`.

    Raises:
        FileNotFoundError: (on first use) missing ``root``, ``VOC{year}`` folder, image-set file, annotation or
            image (names the path and the layout).
        ValueError: bad arguments (see :class:`MultiLabelOODDataModule`); (on first use) an annotation that is
            not valid XML, an object without a name, or an object name that is not a VOC class.
    """

    def __init__(
        self,
        root: str,
        year: str = "2007",
        train_set: str = "trainval",
        val_set: str = "test",
        use_difficult: bool = False,
        ood_root: Optional[str] = None,
        oe_classes: Optional[list[str]] = None,
        ood_classes: Optional[list[str]] = None,
        image_size: int = 224,
        batch_size: int = 32,
        oe_batch_size: Optional[int] = None,
        num_workers: int = 4,
        tail_threshold: int = 20,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            ood_root=ood_root,
            oe_classes=oe_classes,
            ood_classes=ood_classes,
            image_size=image_size,
            batch_size=batch_size,
            oe_batch_size=oe_batch_size,
            num_workers=num_workers,
            tail_threshold=tail_threshold,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.year = str(year)
        self.train_split = train_set
        self.val_split = val_set
        self.use_difficult = use_difficult
        self.save_hyperparameters()

    def _compute_class_names(self) -> list[str]:
        return list(VOC_CLASSES)

    def _read_labels(self, xml_path: str) -> list[int]:
        _, objects = parse_voc_objects(xml_path, type(self).__name__)
        return sorted({c for c, difficult, _ in objects if self.use_difficult or not difficult})

    def _list_split(self, split: str) -> list[tuple[str, list[int]]]:
        owner, layout = type(self).__name__, self._layout()
        ids, set_file = read_voc_image_set(self.root, self.voc_dir, split, owner, layout)
        image_dir = os.path.join(self.voc_dir, "JPEGImages")
        listing = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
        samples = []
        for image_id in ids:
            xml_path = voc_annotation_path(self.voc_dir, image_id, set_file, owner, layout)
            image = self._check_image(image_dir, f"{image_id}.jpg", listing)
            samples.append((image, self._read_labels(xml_path)))
        return samples
