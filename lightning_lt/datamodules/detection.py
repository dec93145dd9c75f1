"""Object-detection DataModules (COCO, Pascal VOC) in the torchvision detection convention.

A batch is ``(images, targets)``, two lists of the same length (images differ in size, so nothing is stacked):

- ``images[i]``: ``float32 [3, H_i, W_i]`` with values in ``[0, 1]``, *not* normalised (torchvision's
  detectors normalise and resize inside the model, in ``GeneralizedRCNNTransform``);
- ``targets[i]``: ``{"boxes": float32 [N_i, 4], "labels": int64 [N_i], "image_id": int64 [], "orig_size":
  int64 [2]}``, boxes ``(x1, y1, x2, y2)`` in absolute pixels of ``images[i]``, labels in ``[0, K)``, and
  ``orig_size`` the ``(H, W)`` of the image file before any resizing. An image without boxes has ``[0, 4]``
  boxes and ``[0]`` labels (RetinaNet, FCOS and Faster R-CNN accept that). The evaluation loaders' targets
  also hold ``"ground_truth"``: every box of the annotation file as annotated (native pixels, crowd /
  difficult ones with ``iscrowd=1``, the annotated ``area``), what COCOeval compares detections with once
  they are mapped back to native pixels (:class:`~lightning_lt.tasks.DetectionModule` does).

The long tail is over boxes: ``class_counts[c]`` is the number of training boxes of class ``c`` (the boxes the
training targets hold, after the bad-box handling below), read from the annotation files only.

Bad boxes are repaired once, when a split's annotations are read: every box is clipped to its image and a box
with non-positive width or height after clipping is dropped (a zero-width box, a box entirely outside the
image) from the loaders' ``boxes``. ``box_report`` counts both per split and a warning names the dropped
ones. A box annotated with a negative width or height is an error in the annotation file: it is dropped from
training and evaluation, with a warning naming it (COCO: its annotation id) and the fix. The evaluation
ground truth is otherwise the annotation file's (COCOeval on the data set's own json scores boxes outside the
image as they are). COCO crowd boxes (``iscrowd=1``) and VOC objects marked difficult (unless
``use_difficult``) are *ignored*: not in the loader's ``boxes`` nor in ``class_counts``, kept as ``iscrowd=1``
regions of the evaluation ground truth so that COCOeval neither rewards nor penalises detections on them.
"""

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.folder import pil_loader
from lightning_lt.datamodules.multilabel import (
    VOC_CLASSES,
    VOCFolder,
    coco_categories,
    parse_voc_objects,
    read_coco_instances,
    read_voc_image_set,
    voc_annotation_path,
)

__all__ = [
    "COCODetection",
    "DetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "VOCDetection",
    "detection_collate",
    "detection_transform",
    "resized_size",
]

_ROLES = ("train", "val")


# ---------------------------------------------------------------------------------------------- sizes, transforms
def resized_size(height: int, width: int, image_size: Optional[int], max_size: int) -> tuple[int, int]:
    """The ``(H, W)`` after the resize of :func:`detection_transform` (torchvision's ``Resize(size, max_size)``).

    The shorter side becomes ``image_size`` and the longer one ``int(image_size * long / short)``, unless that
    exceeds ``max_size``: then the longer side becomes ``max_size`` and the shorter one
    ``int(max_size * image_size / new_long)``. ``image_size=None`` keeps the native size.

    Example:
        >>> resized_size(480, 640, 256, 1333), resized_size(100, 1000, 256, 1333), resized_size(480, 640, None, 1333)
        ((256, 341), (133, 1333), (480, 640))
    """
    if image_size is None:
        return height, width
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = image_size, int(image_size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def detection_transform(image_size: Optional[int] = None, max_size: int = 1333, hflip: float = 0.0) -> v2.Compose:
    """Joint image / target transform: resize (shorter side ``image_size``, longer side at most ``max_size``),
    horizontal flip with probability ``hflip``, ``uint8`` -> ``float32`` in ``[0, 1]``, plain tensors.

    Called as ``transform(image, target)`` with a :class:`~torchvision.tv_tensors.Image` and a target dict
    whose ``"boxes"`` is a :class:`~torchvision.tv_tensors.BoundingBoxes`: the boxes are rescaled by
    ``(W' / W, H' / H)`` and mirrored (``x1' = W' - x2``) with the image; other entries pass through. No
    normalisation (the detectors do it) and no ``SanitizeBoundingBoxes``: resizing and flipping keep every
    (already clipped, positive) box valid, and torchvision's sanitiser would silently drop boxes under one pixel
    after down-scaling, so the targets would no longer match ``class_counts``.

    Example:
        >>> image = tv_tensors.Image(torch.zeros(3, 20, 40, dtype=torch.uint8))
        >>> boxes = tv_tensors.BoundingBoxes([[0.0, 0.0, 10.0, 10.0]], format="XYXY", canvas_size=(20, 40))
        >>> image, target = detection_transform(10, hflip=1.0)(image, {"boxes": boxes})
        >>> tuple(image.shape), image.dtype, target["boxes"].tolist()
        ((3, 10, 20), torch.float32, [[15.0, 0.0, 20.0, 5.0]])
    """
    steps: list[Any] = []
    if image_size is not None:
        steps.append(v2.Resize(image_size, max_size=max_size, antialias=True))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    return v2.Compose(steps)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``(images, targets)`` as two lists (torchvision's detection convention).

    Example:
        >>> images, targets = detection_collate([(torch.zeros(3, 2, 3), {"a": 1}), (torch.zeros(3, 4, 1), {"a": 2})])
        >>> [tuple(x.shape) for x in images], targets
        ([(3, 2, 3), (3, 4, 1)], [{'a': 1}, {'a': 2}])
    """
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------- records and dataset
class DetectionRecord(NamedTuple):
    """One annotated image: boxes ``float64 [N, 4]`` xyxy in pixels of the image file, labels ``int64 [N]``,
    areas ``float64 [N]`` (COCO's ``area``, else the box area), ``ignore`` ``bool [N]`` (crowd / difficult) and
    ``ann_ids`` ``object [N]``, how the annotation file names each box (COCO: the annotation ``id``; VOC:
    ``"<image id>.xml object <k>"``), for messages."""

    file: str
    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    ignore: np.ndarray
    ann_ids: np.ndarray


def _select(record: DetectionRecord, keep: np.ndarray, boxes: Optional[np.ndarray] = None) -> DetectionRecord:
    """``record`` with only the boxes where ``keep`` is true (``boxes`` replaces the box array first)."""
    boxes = record.boxes if boxes is None else boxes
    return record._replace(
        boxes=boxes[keep], labels=record.labels[keep], areas=record.areas[keep], ignore=record.ignore[keep],
        ann_ids=record.ann_ids[keep],
    )


def _negative_size(record: DetectionRecord) -> np.ndarray:
    """``bool [N]``: boxes annotated with a negative width or height (``x2 < x1`` or ``y2 < y1``)."""
    return (record.boxes[:, 2] < record.boxes[:, 0]) | (record.boxes[:, 3] < record.boxes[:, 1])


def _clip_record(record: DetectionRecord) -> tuple[DetectionRecord, int, list]:
    """Clip the boxes to the image and drop those with non-positive size; ``(record, clipped, dropped ids)``.

    ``clipped`` counts kept boxes that clipping changed, ``dropped`` lists the ``ann_ids`` of the removed ones;
    both cover only the boxes that are not ignored (ignored ones are clipped and dropped silently).
    """
    boxes = record.boxes
    if len(boxes) == 0:
        return record, 0, []
    limits = np.array([record.width, record.height, record.width, record.height], dtype=np.float64)
    clipped_boxes = np.clip(boxes, 0.0, limits)
    keep = (clipped_boxes[:, 2] > clipped_boxes[:, 0]) & (clipped_boxes[:, 3] > clipped_boxes[:, 1])
    changed = np.any(clipped_boxes != boxes, axis=1)
    counted = ~record.ignore
    clipped, dropped = int(np.sum(keep & changed & counted)), record.ann_ids[~keep & counted].tolist()
    return _select(record, keep, clipped_boxes), clipped, dropped


def _ground_truth(record: DetectionRecord) -> dict[str, torch.Tensor]:
    """The evaluation ground truth of ``record`` as :class:`~lightning_lt.metrics.DetectionMAP` takes it: boxes as
    annotated (native pixels, ``float64``), labels, ``iscrowd`` (the ignored boxes) and ``area``."""
    return {
        "boxes": torch.as_tensor(record.boxes, dtype=torch.float64).reshape(-1, 4),
        "labels": torch.as_tensor(record.labels, dtype=torch.int64).reshape(-1),
        "iscrowd": torch.as_tensor(record.ignore, dtype=torch.int64).reshape(-1),
        "area": torch.as_tensor(record.areas, dtype=torch.float64).reshape(-1),
    }


class DetectionDataset(Dataset):
    """``transform(image, target)`` of every :class:`DetectionRecord`, decoded at every access.

    The target handed to ``transform`` is ``{"boxes": BoundingBoxes (XYXY, canvas (H, W)), "labels": int64,
    "image_id": int64 [], "orig_size": int64 [(H, W)]}`` with the ignored (crowd / difficult) boxes left out,
    and the image a ``uint8`` :class:`~torchvision.tv_tensors.Image`. Without ``transform`` these are returned
    as they are. With ``ground_truth`` (one record per image, the boxes as annotated) the target also holds
    ``"ground_truth"``: ``{"boxes": float64 [M, 4] (xyxy, native pixels, not clipped), "labels", "iscrowd",
    "area"}``, every box of the annotation file (crowd / difficult ones with ``iscrowd=1``), which no transform
    changes: what COCOeval compares detections mapped back to native pixels with.

    Raises:
        ValueError: (on access) an image file whose size differs from the annotation's (the boxes were clipped
            to the annotated size).
    """

    def __init__(
        self, records: Sequence[DetectionRecord], transform: Optional[Callable] = None,
        ground_truth: Optional[Sequence[DetectionRecord]] = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.ground_truth = None if ground_truth is None else list(ground_truth)
        if self.ground_truth is not None and len(self.ground_truth) != len(self.records):
            raise ValueError(
                f"Expected one `ground_truth` record per image, got {len(self.ground_truth)} for {len(self.records)}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def target(self, index: int) -> dict:
        """The target of ``index`` before the transform (no decoding); ``"boxes"`` a plain ``float32`` tensor."""
        record = self.records[index]
        keep = ~record.ignore
        target = {
            "boxes": torch.as_tensor(record.boxes[keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(record.labels[keep], dtype=torch.int64).reshape(-1),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([record.height, record.width], dtype=torch.int64),
        }
        if self.ground_truth is not None:
            target["ground_truth"] = _ground_truth(self.ground_truth[index])
        return target

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        record = self.records[index]
        image = pil_loader(record.file)
        if (image.height, image.width) != (record.height, record.width):
            raise ValueError(
                f"Image {record.file!r} is {image.width}x{image.height} (W x H) but its annotation says "
                f"{record.width}x{record.height}: fix the annotated size (boxes are clipped to it)"
            )
        target = self.target(index)
        target["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=(record.height, record.width)
        )
        image = tv_tensors.Image(pil_to_tensor(image))
        if self.transform is None:
            return image, target
        return self.transform(image, target)


def _first(ids: Sequence, limit: int = 10) -> str:
    """``ids`` for a message: the first ``limit`` of them and how many more."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# ---------------------------------------------------------------------------------------------- base
class DetectionDataModule(LongTailDataModule):
    """Base of the detection DataModules: lazy box ``class_counts``, joint transforms, list batches.

    ``class_counts`` (training boxes per class), ``num_classes``, ``class_names`` and ``category_ids`` come from
    the annotation files only (no image decoding) and are valid right after ``__init__``. Labels are contiguous
    ``0 .. K-1``; ``category_ids[label]`` is the data set's own category id (what COCO-format results need).

    A split's annotations are read once, on first use (``class_counts``, ``setup``, ``box_report``): boxes are
    clipped to the image and those with non-positive size after clipping dropped, with one ``rank_zero_warn``
    per split when any box was clipped or dropped (``box_report`` holds the counts); an annotation file that
    lists images missing from the image folder raises at that point (not at the first ``__getitem__``).

    Transforms (:func:`detection_transform`): training resizes (when ``image_size`` is set) and flips with
    probability ``hflip``; evaluation resizes only. Validation, test and predict all use the evaluation split.
    Boxes move with the image, so targets are in the coordinates of the (resized) image the loader yields;
    ``orig_size`` in the target maps them back (``x * W / W'``, ``y * H / H'``). The evaluation targets'
    ``"ground_truth"`` and :meth:`coco_ground_truth` are in native pixels, so COCO's small / medium / large area
    ranges refer to the annotated areas whatever ``image_size`` is.

    Under DDP, Lightning replaces the shuffling with its ``DistributedSampler`` (nothing custom). Image-level
    class re-sampling is not defined for detection (an image holds boxes of many classes), so there is no
    ``sampler`` argument and :meth:`train_targets` raises.

    Subclasses set ``train_split`` / ``val_split`` and implement ``_read_split(split)`` (raw
    :class:`DetectionRecord` s with unclipped boxes, checking that the image files exist, and the annotation
    source named in messages), ``_compute_categories()`` and ``_layout()``.

    Args:
        root: data set folder.
        image_size: shorter side of the images after resizing; ``None`` keeps the native size (the detectors
            resize anyway; a smaller size here saves decoding and transfer).
        max_size: upper bound of the longer side after resizing (only with ``image_size``).
        hflip: probability of a horizontal flip in training.
        batch_size: training batch size per process.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the training loader's shuffling; under DDP Lightning's ``DistributedSampler`` shuffles
            instead (seeded by ``seed_everything``).
        pin_memory: ``DataLoader(pin_memory=...)``.
        persistent_workers: keep workers alive between epochs; only applied when ``num_workers > 0``.
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).

    Raises:
        ValueError: ``image_size < 1``, ``max_size <= image_size``, ``hflip`` outside ``[0, 1]``, plus the checks
            of :class:`~lightning_lt.datamodules.base.LongTailDataModule`.
    """

    train_split: str = "train"
    val_split: str = "val"

    batch_collate = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        image_size: Optional[int] = None,
        max_size: int = 1333,
        hflip: float = 0.5,
        batch_size: int = 4,
        num_workers: int = 4,
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
        if image_size is not None and image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1 or None (native size), got {image_size}")
        if image_size is not None and max_size <= image_size:
            raise ValueError(
                f"Expected `max_size` > `image_size` (the longer side's bound must exceed the shorter side's "
                f"size), got max_size={max_size} and image_size={image_size}"
            )
        if max_size < 1:
            raise ValueError(f"Expected `max_size` >= 1, got {max_size}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"Expected `hflip` (a flip probability) in [0, 1], got {hflip}")
        self.root = str(root)
        self.image_size = image_size
        self.max_size = max_size
        self.hflip = float(hflip)
        self._records: dict[str, list[DetectionRecord]] = {}
        self._ground_truth: dict[str, list[DetectionRecord]] = {}
        self._reports: dict[str, dict[str, int]] = {}
        self._categories: Optional[list[tuple[int, str]]] = None

    # ------------------------------------------------------------------ facts of the data (lazy, no decoding)
    def categories(self) -> list[tuple[int, str]]:
        """``(category id, name)`` of every label, in label order."""
        if self._categories is None:
            self._categories = [(int(i), str(n)) for i, n in self._compute_categories()]
        return list(self._categories)

    @property
    def category_ids(self) -> list[int]:
        """``category_ids[label]``: the data set's category id of each label (for COCO-format results)."""
        return [i for i, _ in self.categories()]

    def _compute_class_names(self) -> list[str]:
        return [name for _, name in self.categories()]

    def _compute_class_counts(self) -> list[int]:
        counts = np.zeros(len(self.categories()), dtype=np.int64)
        for record in self.split_records("train"):
            np.add.at(counts, record.labels[~record.ignore], 1)
        return [int(c) for c in counts]

    @property
    def box_report(self) -> dict[str, dict[str, int]]:
        """Per split (``"train"``, ``"val"``): ``{"clipped", "dropped", "ignored", "boxes"}`` box counts.

        ``clipped``: boxes partly outside the image, clipped to it and kept; ``dropped``: boxes with
        non-positive width or height after clipping, removed; ``ignored``: COCO crowd boxes / VOC difficult
        objects left out of the targets; ``boxes``: boxes in the targets. Reads both splits' annotations.
        """
        return {role: dict(self._report(role)) for role in _ROLES}

    def _report(self, role: str) -> dict[str, int]:
        self.split_records(role)
        return self._reports[role]

    def train_targets(self) -> list[int]:
        raise NotImplementedError(
            f"{type(self).__name__} is a detection data set: an image holds boxes of several classes, so "
            "image-level class re-sampling (one label per image) is not defined. Use the box counts "
            "`class_counts` in the loss or the detector's bias initialisation instead."
        )

    # ------------------------------------------------------------------ reading the annotations
    def _layout(self) -> str:
        return ""

    def _compute_categories(self) -> list[tuple[int, str]]:
        raise NotImplementedError(f"{type(self).__name__} must implement `_compute_categories()`")

    def _read_split(self, split: str) -> tuple[list[DetectionRecord], str]:
        raise NotImplementedError(f"{type(self).__name__} must implement `_read_split(split)`")

    def _split_name(self, role: str) -> str:
        if role not in _ROLES:
            raise ValueError(f"Expected `split` to be one of {_ROLES}, got {role!r}")
        return self.train_split if role == "train" else self.val_split

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{type(self).__name__}: `root`={self.root!r} is not a directory (absolute: "
                f"{os.path.abspath(self.root)!r}). Expected layout: {self._layout()}"
            )

    def _check_images(self, folder: str, names: Sequence[str], source: str) -> list[str]:
        """``folder/name`` for every name, checked against one listing of ``folder`` (nested names: on disk).

        Raises:
            FileNotFoundError: names the first missing file and how many of the listed images are missing.
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{type(self).__name__}: image folder {folder!r} (of {source!r}) not found. Expected layout: "
                f"{self._layout()}"
            )
        listing = set(os.listdir(folder))
        paths = [os.path.join(folder, name) for name in names]
        missing = [
            path
            for name, path in zip(names, paths)
            if name not in listing and not (("/" in name or os.sep in name) and os.path.isfile(path))
        ]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} of the {len(names)} images listed in {source!r} are missing "
                f"from {folder!r}; the first is {missing[0]!r}. Expected layout: {self._layout()}"
            )
        return paths

    def split_records(self, split: str) -> list[DetectionRecord]:
        """The :class:`DetectionRecord` s of ``split`` (``"train"`` or ``"val"``), clipped, read once: what the
        loaders' ``boxes`` / ``labels`` hold."""
        self._read(split)
        return list(self._records[split])

    def ground_truth_records(self, split: str) -> list[DetectionRecord]:
        """The :class:`DetectionRecord` s of ``split`` with the boxes as annotated (native pixels, not clipped;
        crowd / difficult ones flagged ``ignore``), less those annotated with a negative width or height: the
        evaluation ground truth (:meth:`coco_ground_truth`, the evaluation targets' ``"ground_truth"``)."""
        self._read(split)
        return list(self._ground_truth[split])

    def _read(self, split: str) -> None:
        if split in self._records:
            return
        name = self._split_name(split)
        self._check_root()
        raw, source = self._read_split(name)
        if not raw:
            raise FileNotFoundError(
                f"{type(self).__name__}: split {name!r} of {self.root!r} has no images. Expected layout: "
                f"{self._layout()}"
            )
        records, ground_truth, clipped, dropped, negative = [], [], 0, [], []
        for record in raw:
            malformed = _negative_size(record)
            negative += record.ann_ids[malformed].tolist()
            ground_truth.append(_select(record, ~malformed))
            record, c, d = _clip_record(record)
            records.append(record)
            clipped, dropped = clipped + c, dropped + d
        ignored = sum(int(np.sum(r.ignore)) for r in raw)
        boxes = sum(int(np.sum(~r.ignore)) for r in records)
        self._reports[split] = {"clipped": clipped, "dropped": len(dropped), "ignored": ignored, "boxes": boxes}
        what = self._annotation_names()
        if negative:
            rank_zero_warn(
                f"{type(self).__name__}: {source!r}: {len(negative)} box(es) have a negative width or height "
                f"({what} {_first(negative)}); they are dropped from training and from the evaluation ground truth. "
                f"Fix them in the annotation file: {self._box_format()}."
            )
        if clipped or dropped:
            rank_zero_warn(
                f"{type(self).__name__}: {source!r}: {clipped} box(es) partly outside their image were clipped "
                f"to it and {len(dropped)} with non-positive width or height after clipping were dropped"
                + (f" ({what} {_first(dropped)})" if dropped else "")
                + f"; {boxes} boxes remain ({ignored} ignored: {self._ignored_kind()})"
            )
        self._records[split], self._ground_truth[split] = records, ground_truth

    def _ignored_kind(self) -> str:
        return "crowd / difficult"

    def _annotation_names(self) -> str:
        """What :attr:`DetectionRecord.ann_ids` are, in messages."""
        return "annotations"

    def _box_format(self) -> str:
        """How a valid box is written in the annotation files, in messages."""
        return "boxes need x2 >= x1 and y2 >= y1"

    # ------------------------------------------------------------------ ground truth for COCO evaluation
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of an image of native size ``(height, width)`` as the loaders yield it (:func:`resized_size`)."""
        return resized_size(height, width, self.image_size, self.max_size)

    def coco_ground_truth(self, split: str = "val") -> dict:
        """The evaluation ground truth of ``split`` as a COCO instances dict (``images``, ``annotations``,
        ``categories``), in native pixels: what the evaluation loaders' ``"ground_truth"`` holds.

        ``images`` carry the annotated ``width`` / ``height``; ``bbox`` is ``[x, y, w, h]`` of the box as annotated
        (not clipped) and ``area`` the annotated area (COCO's segment area; the box area for VOC). Annotation ids
        run ``1 .. N``, ``category_id`` is ``category_ids[label]``; ignored boxes (COCO crowd, VOC difficult) have
        ``iscrowd=1``, so that COCOeval ignores detections on them. Boxes annotated with a negative width or
        height are left out (see :meth:`ground_truth_records`). For a COCO data set this is its own json (up to
        annotation ids, key order and such boxes); feed it to pycocotools with ``coco = COCO(); coco.dataset =
        gt; coco.createIndex()`` and the detections in native pixels (map them back with the targets'
        ``orig_size``, as :class:`~lightning_lt.tasks.DetectionModule` does).

        Raises:
            ValueError: ``split`` not ``"train"`` or ``"val"``.
        """
        ids = self.category_ids
        images, annotations = [], []
        for record in self.ground_truth_records(split):
            images.append(
                {
                    "id": record.image_id,
                    "file_name": os.path.relpath(record.file, self.root),
                    "width": record.width,
                    "height": record.height,
                }
            )
            for box, label, area, ignore in zip(record.boxes, record.labels, record.areas, record.ignore):
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": record.image_id,
                        "category_id": ids[int(label)],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(area),
                        "iscrowd": int(ignore),
                    }
                )
        categories = [{"id": i, "name": name} for i, name in self.categories()]
        return {"images": images, "annotations": annotations, "categories": categories}

    # ------------------------------------------------------------------ datasets and loaders
    def train_transform(self) -> Callable:
        """Joint transform of the training split: resize and flip (:func:`detection_transform`)."""
        return detection_transform(self.image_size, self.max_size, self.hflip)

    def eval_transform(self) -> Callable:
        """Joint transform of the evaluation split: resize only."""
        return detection_transform(self.image_size, self.max_size, 0.0)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = DetectionDataset(self.split_records("train"), self.train_transform())
        if self.test_dataset is None:
            self.test_dataset = DetectionDataset(
                self.split_records("val"), self.eval_transform(), ground_truth=self.ground_truth_records("val")
            )
        self.val_dataset = self.test_dataset


# ---------------------------------------------------------------------------------------------- COCO
class COCODetection(DetectionDataModule):
    """MS-COCO object detection (80 classes for COCO; any COCO-format instances files).

    Layout (the official one)::

        root/{train_split,val_split}/*.jpg
        root/annotations/instances_{train_split,val_split}.json

    Label ``c`` is the ``c``-th smallest category id of the training json (``category_ids[c]`` maps it back,
    ``class_names`` are the categories' names); the validation json must list the same categories. ``bbox``
    ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``; boxes are clipped to the json's ``width`` / ``height``.
    Crowd boxes (``iscrowd=1``) are ignored: left out of the targets and of ``class_counts``, counted in
    ``box_report["ignored"]``, and kept as crowd regions in :meth:`coco_ground_truth` (COCOeval ignores
    detections matched to them). Images without any box are kept. ``image_id`` is the json's image id.

    Args:
        root: the COCO folder.
        train_split: training split (image folder and json name).
        val_split: evaluation split.
        image_size, max_size, hflip, batch_size, num_workers, seed, pin_memory, persistent_workers,
        eval_batch_size: see :class:`DetectionDataModule`.

    Raises:
        FileNotFoundError: (on first use) missing ``root``, split folder or json; images listed in the json but
            missing from the folder (names the first and how many).
        ValueError: bad arguments (see :class:`DetectionDataModule`); (on first use) a json that is not COCO
            instances, an annotation whose ``category_id`` is not among ``categories`` (names the file and the
            id) or whose ``image_id`` is not among ``images``, a ``bbox`` that is not 4 numbers, an image entry
            without ``width`` / ``height`` (names the image id and what to add), validation categories that
            differ from the training ones.

    Warns:
        UserWarning: (on first use) boxes clipped or dropped (naming the dropped annotation ids), and boxes with a
            negative width or height (naming their annotation ids and the fix).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        image_size: Optional[int] = None,
        max_size: int = 1333,
        hflip: float = 0.5,
        batch_size: int = 4,
        num_workers: int = 4,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            image_size=image_size,
            max_size=max_size,
            hflip=hflip,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.train_split = train_split
        self.val_split = val_split
        self._train_categories: list[tuple[int, str]] = []
        self.save_hyperparameters()

    def _layout(self) -> str:
        splits = f"{{{self.train_split},{self.val_split}}}"
        return (
            f"{self.root}/{splits}/<image>.jpg and {self.root}/annotations/instances_{splits}.json "
            "(the official COCO layout)"
        )

    def _ignored_kind(self) -> str:
        return "crowd boxes"

    def _annotation_names(self) -> str:
        return "annotation ids"

    def _box_format(self) -> str:
        return "'bbox' is [x, y, width, height] with width >= 0 and height >= 0"

    def _annotation_file(self, split: str) -> str:
        return os.path.join(self.root, "annotations", f"instances_{split}.json")

    def _read_json(self, split: str) -> dict:
        """The instances json of ``split``, checked for COCO's three lists."""
        return read_coco_instances(self._annotation_file(split), type(self).__name__, self._layout())

    def _compute_categories(self) -> list[tuple[int, str]]:
        self.split_records("train")  # sets `_train_categories` (one read of the training json)
        return list(self._train_categories)

    def _read_split(self, split: str) -> tuple[list[DetectionRecord], str]:
        owner = type(self).__name__
        path = self._annotation_file(split)
        content = self._read_json(split)
        categories = coco_categories(content, path, owner)
        if split == self.train_split:
            self._train_categories = categories
        elif categories != (reference := self.categories()):
            extra = sorted(set(categories) - set(reference))[:10]
            missing = sorted(set(reference) - set(categories))[:10]
            raise ValueError(
                f"{owner}: the categories of {path!r} differ from those of the training split "
                f"{self._annotation_file(self.train_split)!r} (not in train: {extra}, missing: {missing}). "
                "Both splits must share the label space (the same 'categories' ids and names)."
            )
        label_of = {cid: c for c, (cid, _) in enumerate(categories)}
        per_image: dict[int, list[tuple[list[float], int, float, bool, Any]]] = {
            int(image["id"]): [] for image in content["images"]
        }
        for ann in content["annotations"]:
            cid, image_id = int(ann["category_id"]), int(ann["image_id"])
            if cid not in label_of:
                raise ValueError(
                    f"{owner}: {path!r}: annotation {ann.get('id')!r} has category_id {cid}, which is not among the "
                    f"file's 'categories' ids {sorted(label_of)}. Fix the annotation or add the category."
                )
            if image_id not in per_image:
                raise ValueError(
                    f"{owner}: {path!r}: annotation {ann.get('id')!r} refers to image_id {image_id}, which is not "
                    "among the file's 'images'. Fix the annotation file."
                )
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(
                    f"{owner}: {path!r}: annotation {ann.get('id')!r} has bbox {bbox!r}: expected [x, y, w, h]"
                )
            x, y, w, h = (float(v) for v in bbox)
            area = float(ann["area"]) if "area" in ann else max(w, 0.0) * max(h, 0.0)
            per_image[image_id].append(
                ([x, y, x + w, y + h], label_of[cid], area, bool(ann.get("iscrowd", 0)), ann.get("id"))
            )
        images = sorted(content["images"], key=lambda im: int(im["id"]))
        unsized = [im for im in images if "width" not in im or "height" not in im]
        if unsized:
            first = unsized[0]
            raise ValueError(
                f"{owner}: {path!r}: {len(unsized)} image(s) have no 'width' / 'height', the first is image id "
                f"{first['id']!r} ({first.get('file_name')!r}). Add \"width\" and \"height\" (the image's size in "
                "pixels) to every entry of 'images': boxes are clipped to them and the loaders check them."
            )
        files = self._check_images(os.path.join(self.root, split), [str(im["file_name"]) for im in images], path)
        records = []
        for image, file in zip(images, files):
            anns = per_image[int(image["id"])]
            records.append(
                DetectionRecord(
                    file=file,
                    image_id=int(image["id"]),
                    height=int(image["height"]),
                    width=int(image["width"]),
                    boxes=np.array([a[0] for a in anns], dtype=np.float64).reshape(-1, 4),
                    labels=np.array([a[1] for a in anns], dtype=np.int64),
                    areas=np.array([a[2] for a in anns], dtype=np.float64),
                    ignore=np.array([a[3] for a in anns], dtype=bool),
                    ann_ids=np.array([a[4] for a in anns], dtype=object),
                )
            )
        return records, path


# ---------------------------------------------------------------------------------------------- VOC
class VOCDetection(VOCFolder, DetectionDataModule):
    """Pascal VOC object detection (20 classes, ``VOC_CLASSES`` order: aeroplane ... tvmonitor).

    Layout (``root`` is the ``VOCdevkit`` folder)::

        root/VOC{year}/Annotations/<id>.xml
        root/VOC{year}/ImageSets/Main/{train_set,val_set}.txt     (one image id per line)
        root/VOC{year}/JPEGImages/<id>.jpg

    ``<bndbox>`` holds 1-based pixel coordinates; they become 0-based ``(x1, y1, x2, y2)`` by subtracting 1 from
    all four, as MMDetection does (Detectron2 subtracts 1 from ``xmin`` / ``ymin`` only), then are clipped to
    the ``<size>`` of the annotation (the image header when ``<size>`` is absent). Objects marked
    ``<difficult>1</difficult>`` are ignored unless ``use_difficult``: left out of the targets and of
    ``class_counts``, counted in ``box_report["ignored"]``, and kept as ``iscrowd=1`` regions of the evaluation
    ground truth (:meth:`coco_ground_truth`): COCO-style ignore regions. As in VOC's own evaluation, a detection
    on a difficult object is neither a true nor a false positive, however many detections it has; unlike
    VOC's, which matches by IoU >= 0.5 with the best-overlapping object, COCOeval matches a detection to an
    ignore region only when no regular object is left at its IoU threshold, and then by the intersection over
    the detection's own area (the choice made here: one evaluation, COCOeval's, for COCO and VOC; the AP is
    COCO's 101-point one, ``ap50`` at IoU 0.5). ``image_id`` is the image's
    position in its image-set file; ``category_ids`` are ``1 .. 20``. Validation and test both use
    ``val_set`` (VOC2007's ``test``; use ``"val"`` for VOC2012).

    Args:
        root: the VOCdevkit folder.
        year: ``"2007"`` or ``"2012"`` (the ``VOC{year}`` sub-folder).
        train_set: training image set (``ImageSets/Main/{train_set}.txt``).
        val_set: evaluation image set.
        use_difficult: keep objects marked difficult as ordinary boxes.
        image_size, max_size, hflip, batch_size, num_workers, seed, pin_memory, persistent_workers,
        eval_batch_size: see :class:`DetectionDataModule`.

    Raises:
        FileNotFoundError: (on first use) missing ``root``, ``VOC{year}`` folder, image-set file or annotation;
            images missing from ``JPEGImages`` (names the first and how many).
        ValueError: bad arguments (see :class:`DetectionDataModule`); (on first use) an annotation that is not
            valid XML, an object without a name or a ``<bndbox>``, an object name that is not a VOC class.
    """

    def __init__(
        self,
        root: str,
        year: str = "2007",
        train_set: str = "trainval",
        val_set: str = "test",
        use_difficult: bool = False,
        image_size: Optional[int] = None,
        max_size: int = 1333,
        hflip: float = 0.5,
        batch_size: int = 4,
        num_workers: int = 4,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            root,
            image_size=image_size,
            max_size=max_size,
            hflip=hflip,
            batch_size=batch_size,
            num_workers=num_workers,
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

    def _ignored_kind(self) -> str:
        return "difficult objects"

    def _box_format(self) -> str:
        return "<bndbox> needs xmax >= xmin and ymax >= ymin"

    def _compute_categories(self) -> list[tuple[int, str]]:
        return [(i + 1, name) for i, name in enumerate(VOC_CLASSES)]

    def _read_xml(self, xml_path: str, image_path: str, position: int) -> DetectionRecord:
        owner, name = type(self).__name__, os.path.basename(xml_path)
        root, objects = parse_voc_objects(xml_path, owner)
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
        if width <= 0 or height <= 0:  # no <size>: read the image header (no decoding)
            with Image.open(image_path) as image:
                width, height = image.size
        boxes, labels, ignore = [], [], []
        for label, difficult, obj in objects:
            try:
                box = [float(obj.findtext(f"bndbox/{k}")) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{owner}: annotation {xml_path!r}: the {VOC_CLASSES[label]!r} object has no valid <bndbox> "
                    "(<xmin>, <ymin>, <xmax>, <ymax> numbers)"
                ) from err
            boxes.append(box)
            labels.append(label)
            ignore.append(difficult and not self.use_difficult)
        boxes_array = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        areas = np.clip(boxes_array[:, 2] - boxes_array[:, 0], 0, None) * np.clip(
            boxes_array[:, 3] - boxes_array[:, 1], 0, None
        )
        return DetectionRecord(
            file=image_path,
            image_id=position,
            height=height,
            width=width,
            boxes=boxes_array,
            labels=np.array(labels, dtype=np.int64),
            areas=areas,
            ignore=np.array(ignore, dtype=bool),
            ann_ids=np.array([f"{name} object {k + 1}" for k in range(len(boxes))], dtype=object).reshape(-1),
        )

    def _read_split(self, split: str) -> tuple[list[DetectionRecord], str]:
        owner, layout = type(self).__name__, self._layout()
        ids, set_file = read_voc_image_set(self.root, self.voc_dir, split, owner, layout)
        images = self._check_images(os.path.join(self.voc_dir, "JPEGImages"), [f"{i}.jpg" for i in ids], set_file)
        records = []
        for position, (image_id, image_path) in enumerate(zip(ids, images)):
            xml_path = voc_annotation_path(self.voc_dir, image_id, set_file, owner, layout)
            records.append(self._read_xml(xml_path, image_path, position))
        return records, set_file
