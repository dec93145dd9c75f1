"""COCO box mAP with LVIS-style rare / common / frequent class groups as a torchmetrics ``Metric``."""

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_lt.metrics.groups import validate_class_counts

FREQUENCY_GROUPS = ("rare", "common", "frequent")
"""Names of the class frequency groups, in the order :func:`frequency_groups` returns them."""

_PRED_KEYS = ("boxes", "scores", "labels")
_TARGET_KEYS = ("boxes", "labels")
# torchmetrics' MeanAveragePrecision result key -> ours, for the COCO summary values.
_SUMMARY_KEYS = {
    "map": "map",
    "map_50": "ap50",
    "map_75": "ap75",
    "map_small": "ap_small",
    "map_medium": "ap_medium",
    "map_large": "ap_large",
}
# name -> (dtype, shape after the first dim). Everything is a flat "cat" state plus per-image counts, so that
# DDP gathers one tensor per state even when ranks saw different numbers of images (torchmetrics'
# MeanAveragePrecision keeps one list entry per image, which needs the same number of images on every rank).
_STATES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "det_boxes": (torch.float64, (4,)),
    "det_scores": (torch.float64, ()),
    "det_labels": (torch.long, ()),
    "det_counts": (torch.long, ()),
    "gt_boxes": (torch.float64, (4,)),
    "gt_labels": (torch.long, ()),
    "gt_iscrowd": (torch.long, ()),
    "gt_area": (torch.float64, ()),
    "gt_counts": (torch.long, ()),
}


def _validate_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, got {value!r}")
    return int(value)


def _validate_bounds(rare_max: int, common_max: int) -> tuple[int, int]:
    rare_max = _validate_int(rare_max, "rare_max", 1)
    common_max = _validate_int(common_max, "common_max", 1)
    if common_max <= rare_max:
        raise ValueError(
            f"Expected `rare_max` < `common_max`, got rare_max={rare_max} and common_max={common_max}. Rare classes "
            f"have 1..rare_max training boxes, common ones rare_max+1..common_max, frequent ones more."
        )
    return rare_max, common_max


def frequency_groups(class_counts: Sequence[int], rare_max: int = 10, common_max: int = 100) -> dict[str, list[int]]:
    r"""LVIS-style rare / common / frequent classes of a detection training set.

    With :math:`n_c` the training count of class :math:`c` (boxes for :class:`DetectionMAP`; LVIS counts the
    training images that contain the class, and this function works with either):

    .. math::
        \mathrm{rare} = \{c : 1 \le n_c \le \mathrm{rare\_max}\},\quad
        \mathrm{common} = \{c : \mathrm{rare\_max} < n_c \le \mathrm{common\_max}\},\quad
        \mathrm{frequent} = \{c : n_c > \mathrm{common\_max}\}

    A class without any training box (:math:`n_c = 0`) belongs to no group: it was never seen in training, so
    it is neither rare nor anything else. A group may come out empty (an empty list).

    Args:
        class_counts: training boxes per class, ``class_counts[c] = n_c``, for the contiguous labels ``0..K-1``.
        rare_max: the most training boxes a rare class has; an integer >= 1 (LVIS: 10).
        common_max: the most training boxes a common class has; an integer > ``rare_max`` (LVIS: 100).

    Returns:
        ``{"rare": [...], "common": [...], "frequent": [...]}``, each a sorted list of class ids.

    Raises:
        ValueError: invalid ``class_counts`` (empty, negative or non-integer values), ``rare_max`` or
            ``common_max`` not integers >= 1, or ``common_max <= rare_max``.

    Example:
        >>> frequency_groups([0, 1, 10, 11, 100, 101, 254])
        {'rare': [1, 2], 'common': [3, 4], 'frequent': [5, 6]}
    """
    counts = validate_class_counts(class_counts)
    rare_max, common_max = _validate_bounds(rare_max, common_max)
    return {
        "rare": [c for c, n in enumerate(counts) if 1 <= n <= rare_max],
        "common": [c for c, n in enumerate(counts) if rare_max < n <= common_max],
        "frequent": [c for c, n in enumerate(counts) if n > common_max],
    }


class DetectionMAP(Metric):
    r"""COCO box mAP, AP per class and LVIS-style rare / common / frequent AP for object detection.

    The boxes of every image are kept (flat states gathered across processes, ``dist_reduce_fx="cat"``) and
    evaluated at :meth:`compute` by torchmetrics' :class:`~torchmetrics.detection.MeanAveragePrecision` with the
    ``pycocotools`` backend, i.e. by ``COCOeval(..., "bbox")`` itself: IoU thresholds :math:`\mathcal{T} =
    \{0.50, 0.55, \dots, 0.95\}`, 101 recall points :math:`\mathcal{R} = \{0, 0.01, \dots, 1\}`, at most 100
    detections per image and class, crowd ground truth (``iscrowd=1``) matched but neither counted nor penalised.
    With :math:`p_c(t, r)` the interpolated precision of class :math:`c` at IoU threshold :math:`t` and recall
    :math:`r`:

    .. math::
        \mathrm{AP}_c = \frac{1}{|\mathcal{T}||\mathcal{R}|} \sum_{t \in \mathcal{T}} \sum_{r \in \mathcal{R}}
        p_c(t, r),\qquad
        \mathrm{map} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}} \mathrm{AP}_c,\qquad
        \mathrm{ap}_G = \frac{1}{|G \cap \mathcal{C}|} \sum_{c \in G \cap \mathcal{C}} \mathrm{AP}_c

    with :math:`\mathcal{C}` the classes with (non-crowd) ground truth in the evaluated images. ``ap50`` / ``ap75``
    use :math:`t = 0.5` / :math:`0.75` only; ``ap_small`` / ``ap_medium`` / ``ap_large`` only the ground truth
    (and unmatched detections) of area below :math:`32^2`, between :math:`32^2` and :math:`96^2`, and above
    :math:`96^2` pixels. A class without ground truth has ``ap_per_class`` ``nan`` (its detections are not
    evaluated) and is left out of every mean, as in COCOeval. The groups :math:`G` are
    :func:`frequency_groups` of the *training* box counts ``class_counts``: ``ap_rare`` over the classes with
    ``1..rare_max`` training boxes, ``ap_common`` over ``rare_max+1..common_max``, ``ap_frequent`` over more;
    classes with 0 training boxes belong to no group (they still count in ``map``). A value that COCOeval leaves
    undefined (-1: no ground truth, or none of that size), an empty group, or ``class_counts=None`` give ``nan``
    and a warning, never 0 or -1.

    Labels are contiguous class ids ``0..K-1`` (e.g. the index of a COCO category id in the sorted category ids);
    boxes are ``(x1, y1, x2, y2)`` in pixels.

    Args:
        num_classes: number of classes ``K`` (>= 1), the length of ``ap_per_class``.
        class_counts: training boxes per class (``K`` values), for the frequency groups; can be set later through
            the :attr:`class_counts` attribute, e.g. once a data module has counted them.
        rare_max: the most training boxes a rare class has (LVIS: 10).
        common_max: the most training boxes a common class has (LVIS: 100).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``num_classes`` not an integer >= 1, invalid ``class_counts`` (see
            :func:`~lightning_lt.metrics.validate_class_counts`) or of another length than ``num_classes``, or
            invalid ``rare_max`` / ``common_max`` (see :func:`frequency_groups`).

    Example:
        >>> metric = DetectionMAP(num_classes=3, class_counts=[4, 50, 900])
        >>> preds = [{
        ...     "boxes": torch.tensor([[10.0, 10, 30, 30], [100, 100, 140, 145], [0, 0, 9, 9]]),
        ...     "scores": torch.tensor([0.9, 0.8, 0.3]),
        ...     "labels": torch.tensor([0, 1, 2]),
        ... }]
        >>> target = [{
        ...     "boxes": torch.tensor([[10.0, 10, 30, 30], [100, 100, 140, 140], [200, 200, 320, 320]]),
        ...     "labels": torch.tensor([0, 1, 2]),
        ... }]
        >>> metric.update(preds, target)
        >>> result = metric.compute()
        >>> result["ap_per_class"]  # class 1: IoU 1600 / 1800 = 0.89, a hit at 8 of the 10 IoU thresholds
        tensor([1.0000, 0.8000, 0.0000])
        >>> {k: round(v.item(), 4) for k, v in result.items() if k != "ap_per_class"}  # doctest: +NORMALIZE_WHITESPACE
        {'map': 0.6, 'ap50': 0.6667, 'ap75': 0.6667, 'ap_small': 1.0, 'ap_medium': 0.8, 'ap_large': 0.0,
         'ap_rare': 1.0, 'ap_common': 0.8, 'ap_frequent': 0.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    det_boxes: list[Tensor]
    det_scores: list[Tensor]
    det_labels: list[Tensor]
    det_counts: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_iscrowd: list[Tensor]
    gt_area: list[Tensor]
    gt_counts: list[Tensor]

    def __init__(
        self,
        num_classes: int,
        class_counts: Optional[Sequence[int]] = None,
        rare_max: int = 10,
        common_max: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = _validate_int(num_classes, "num_classes", 1)
        self.rare_max, self.common_max = _validate_bounds(rare_max, common_max)
        self._class_counts: Optional[list[int]] = None
        self.class_counts = class_counts
        self._warned_no_counts = False
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def class_counts(self) -> Optional[list[int]]:
        """Training boxes per class, or ``None``; assigning validates (``num_classes`` non-negative integers)."""
        return self._class_counts

    @class_counts.setter
    def class_counts(self, value: Optional[Sequence[int]]) -> None:
        if value is None:
            self._class_counts = None
            return
        counts = validate_class_counts(value)
        if len(counts) != self.num_classes:
            raise ValueError(
                f"Expected `class_counts` to have num_classes={self.num_classes} values (training boxes per class), "
                f"got {len(counts)}"
            )
        self._class_counts = counts

    @property
    def groups(self) -> Optional[dict[str, list[int]]]:
        """The :func:`frequency_groups` of :attr:`class_counts`, or ``None`` without counts."""
        if self.class_counts is None:
            return None
        return frequency_groups(self.class_counts, self.rare_max, self.common_max)

    def update(self, preds: Sequence[Mapping[str, Tensor]], target: Sequence[Mapping[str, Tensor]]) -> None:
        """Accumulate a batch of images: ``preds[i]`` and ``target[i]`` describe the same image.

        Images without ground truth or without detections are given as empty tensors (``boxes`` of shape
        ``[0, 4]``); they still count (their detections are false positives). Other keys in the dicts are ignored.

        Args:
            preds: one dict per image with ``boxes`` (``[N, 4]`` float, xyxy), ``scores`` (``[N]`` float) and
                ``labels`` (``[N]`` integer in ``[0, K)``).
            target: one dict per image with ``boxes`` (``[M, 4]`` float, xyxy) and ``labels`` (``[M]`` integer in
                ``[0, K)``), and optionally ``iscrowd`` (``[M]``, 0 / 1; default 0) and ``area`` (``[M]``, the
                object area in pixels that decides small / medium / large, e.g. the COCO annotations' segment
                area; values <= 0 or a missing key use the box area).

        Raises:
            ValueError: ``preds`` / ``target`` not sequences of dicts of the same length, a missing key (the
                message names it and the image), a value that is not a tensor or has the wrong shape or dtype,
                non-finite boxes / scores / areas, boxes with ``x2 < x1`` or ``y2 < y1``, ``iscrowd`` other than
                0 / 1, or labels outside ``[0, K)`` (the message names them). Nothing is accumulated then.
        """
        _check_sequence(preds, "preds")
        _check_sequence(target, "target")
        if len(preds) != len(target):
            raise ValueError(
                f"Expected `preds` and `target` to describe the same images, got {len(preds)} and {len(target)} dicts"
            )
        # Check everything before keeping anything, so that a failed update leaves the metric unchanged.
        pred_items = [self._check_item(p, "preds", i, _PRED_KEYS) for i, p in enumerate(preds)]
        target_items = [self._check_item(t, "target", i, _TARGET_KEYS) for i, t in enumerate(target)]
        if not pred_items:
            return
        device = pred_items[0]["labels"].device
        self.det_counts.append(torch.tensor([len(p["labels"]) for p in pred_items], dtype=torch.long, device=device))
        self.gt_counts.append(torch.tensor([len(t["labels"]) for t in target_items], dtype=torch.long, device=device))
        for name in ("boxes", "scores", "labels"):
            getattr(self, f"det_{name}").append(torch.cat([p[name] for p in pred_items]))
        for name in ("boxes", "labels", "iscrowd", "area"):
            getattr(self, f"gt_{name}").append(torch.cat([t[name] for t in target_items]))

    def _check_item(self, item: Any, side: str, i: int, keys: tuple[str, ...]) -> dict[str, Tensor]:
        where = f"{side}[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"Expected `{side}` to hold one dict per image, got {type(item).__name__} at {where}")
        for key in keys:
            if key not in item:
                raise ValueError(
                    f"{where} has no key '{key}': every dict in `{side}` needs " + ", ".join(f"'{k}'" for k in keys)
                )
        optional = ("iscrowd", "area") if side == "target" else ()
        for key in keys + tuple(k for k in optional if k in item):
            if not isinstance(item[key], Tensor):
                raise ValueError(f"Expected {where}['{key}'] to be a tensor, got {type(item[key]).__name__}")
        boxes, labels = item["boxes"], item["labels"]
        n = len(labels) if labels.ndim == 1 else -1
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(
                f"Expected {where}['labels'] to be a 1-D integer tensor, got shape {tuple(labels.shape)} and dtype "
                f"{labels.dtype}"
            )
        if boxes.numel() == 0 and n == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.shape != (n, 4):
            raise ValueError(
                f"Expected {where}['boxes'] of shape [{n}, 4] (one xyxy box per label), got {tuple(boxes.shape)}"
            )
        if not boxes.is_floating_point():
            raise ValueError(f"Expected floating-point {where}['boxes'] (pixels, xyxy), got {boxes.dtype}")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"Found non-finite values in {where}['boxes']")
        if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
            raise ValueError(
                f"Found boxes with x2 < x1 or y2 < y1 in {where}['boxes']. HINT: boxes are (x1, y1, x2, y2); convert "
                f"COCO's (x, y, w, h) with `torchvision.ops.box_convert(boxes, 'xywh', 'xyxy')`."
            )
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            values = torch.unique(labels[bad])[:5].tolist()
            raise ValueError(
                f"Expected {where}['labels'] in [0, {self.num_classes}), found {values}. HINT: use contiguous labels "
                f"0..num_classes-1 (e.g. the index of a COCO category id in the sorted category ids) and check "
                f"`num_classes`."
            )
        out = {"boxes": boxes.detach().to(torch.float64), "labels": labels.detach().long()}
        if side == "preds":
            out["scores"] = self._check_vector(item, "scores", where, n, floating=True)
            return out
        iscrowd = item.get("iscrowd")
        if iscrowd is None:
            out["iscrowd"] = torch.zeros_like(out["labels"])
        else:
            iscrowd = self._check_vector(item, "iscrowd", where, n, floating=False)
            if bool(((iscrowd != 0) & (iscrowd != 1)).any()):
                values = torch.unique(iscrowd[(iscrowd != 0) & (iscrowd != 1)])[:5].tolist()
                raise ValueError(f"Expected {where}['iscrowd'] to be 0 / 1, found {values}")
            out["iscrowd"] = iscrowd.long()
        area = item.get("area")
        if area is None:
            out["area"] = torch.zeros_like(out["boxes"][:, 0])  # <= 0: COCOeval uses the box area
        else:
            out["area"] = self._check_vector(item, "area", where, n, floating=None).to(torch.float64)
        return out

    @staticmethod
    def _check_vector(item: Mapping[str, Tensor], key: str, where: str, n: int, floating: Optional[bool]) -> Tensor:
        value = item[key]
        if value.shape != (n,):
            raise ValueError(f"Expected {where}['{key}'] of shape [{n}] (one per box), got {tuple(value.shape)}")
        if floating and not value.is_floating_point():
            raise ValueError(f"Expected floating-point {where}['{key}'], got {value.dtype}")
        if floating is False and value.is_floating_point():
            raise ValueError(f"Expected integer or bool {where}['{key}'] (0 / 1), got {value.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"Found non-finite values in {where}['{key}']")
        return value.detach().to(torch.float64) if floating else value.detach()

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Optional[Any] = None) -> None:
        # A rank without any update would send torchmetrics' empty float placeholder, whose dtype / shape differ
        # from the other ranks' states; send an empty state of the right dtype and shape instead.
        for name, (dtype, shape) in _STATES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, *shape, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _per_image(self) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        state = {name: _cat(getattr(self, name), dtype, shape) for name, (dtype, shape) in _STATES.items()}
        det_counts, gt_counts = state["det_counts"].tolist(), state["gt_counts"].tolist()
        preds = [
            dict(zip(_PRED_KEYS, parts))
            for parts in zip(*(torch.split(state[f"det_{k}"].cpu(), det_counts) for k in _PRED_KEYS))
        ]
        target_keys = ("boxes", "labels", "iscrowd", "area")
        target = [
            dict(zip(target_keys, parts))
            for parts in zip(*(torch.split(state[f"gt_{k}"].cpu(), gt_counts) for k in target_keys))
        ]
        return preds, target

    def compute(self) -> dict[str, Tensor]:
        """0-dim ``map``, ``ap50``, ``ap75``, ``ap_small``, ``ap_medium``, ``ap_large``, ``ap_per_class``
        (``[K]``, ``nan`` for classes without ground truth), and 0-dim ``ap_rare``, ``ap_common``, ``ap_frequent``;
        all float32 (torchmetrics squeezes every one-element result, so ``ap_per_class`` is 0-dim when ``K = 1``)."""
        K = self.num_classes
        preds, target = self._per_image()
        ap = torch.full((K,), float("nan"), dtype=torch.float64)
        summary = dict.fromkeys(_SUMMARY_KEYS.values(), float("nan"))
        if preds:
            # torchmetrics' own metric as the COCOeval driver: its states are already gathered here, so no sync.
            coco = MeanAveragePrecision(
                box_format="xyxy",
                iou_type="bbox",
                extended_summary=True,
                backend="pycocotools",
                sync_on_compute=False,
                **_cocoeval_thresholds(),
            )
            coco.warn_on_many_detections = False  # the top 100 per image and class count, as in COCOeval
            coco.update(preds, target)
            result = coco.compute()
            for theirs, ours in _SUMMARY_KEYS.items():
                value = float(result[theirs])
                summary[ours] = value if value > -1 else float("nan")
            if "precision" in result:
                # precision [T, R, K', A, M]: area "all", 100 detections; -1 where a class has no ground truth
                precision = result["precision"][:, :, :, 0, -1]
                for k, label in enumerate(result["classes"].reshape(-1).tolist()):  # 0-dim for one class
                    defined = precision[:, :, k][precision[:, :, k] > -1]
                    if defined.numel():
                        ap[label] = defined.mean()
        undefined = [key for key, value in summary.items() if value != value]
        if undefined:
            reason = (
                "no image was evaluated"
                if not preds
                else "the evaluated images have no (non-crowd) ground-truth box of that size"
                if "map" not in undefined
                else "the evaluated images have no (non-crowd) ground-truth box"
            )
            rank_zero_warn(f"{type(self).__name__}: {undefined} are nan because {reason}.", category=UserWarning)
        out = {key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in summary.items()}
        out["ap_per_class"] = ap.float().to(self.device)
        out.update(self._group_aps(ap))
        return out

    def _group_aps(self, ap: Tensor) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"), device=self.device)
        groups = self.groups
        if groups is None:
            if not self._warned_no_counts:
                self._warned_no_counts = True
                rank_zero_warn(
                    f"{type(self).__name__}: `class_counts` is None, so `ap_rare`, `ap_common` and `ap_frequent` are "
                    f"nan. HINT: set `class_counts` to the training boxes per class.",
                    category=UserWarning,
                )
            return {f"ap_{name}": nan for name in FREQUENCY_GROUPS}
        bounds = {
            "rare": f"1..{self.rare_max}",
            "common": f"{self.rare_max + 1}..{self.common_max}",
            "frequent": f"more than {self.common_max}",
        }
        out = {}
        for name in FREQUENCY_GROUPS:
            classes = groups[name]
            values = ap[classes]
            values = values[~torch.isnan(values)]
            if values.numel():
                out[f"ap_{name}"] = values.mean().float().to(self.device)
                continue
            reason = (
                f"no class has {bounds[name]} training boxes"
                if not classes
                else f"none of its {len(classes)} classes has ground truth in the evaluated images"
            )
            rank_zero_warn(
                f"{type(self).__name__}: the {name} group ({bounds[name]} training boxes) is empty because {reason}; "
                f"`ap_{name}` is nan.",
                category=UserWarning,
            )
            out[f"ap_{name}"] = nan
        return out


def _cocoeval_thresholds() -> dict[str, list[float]]:
    """COCOeval's own IoU and recall thresholds (float64). torchmetrics' defaults come from ``torch.linspace`` in
    float32 (0.2 -> 0.20000000298), so that a recall of exactly 1/5 misses the recall threshold 0.2 and the APs
    differ from COCOeval's (by 2e-4 in mAP on coco128 with the perturbed detections of the tests)."""
    from pycocotools.cocoeval import Params

    params = Params(iouType="bbox")
    return {"iou_thresholds": params.iouThrs.tolist(), "rec_thresholds": params.recThrs.tolist()}


def _check_sequence(value: Any, name: str) -> None:
    if isinstance(value, Mapping):
        raise ValueError(f"Expected `{name}` to be a list of per-image dicts, got one dict. HINT: pass [{name}].")
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Sequence):
        raise ValueError(f"Expected `{name}` to be a list of per-image dicts, got {type(value).__name__}")


def _cat(state: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if isinstance(state, list) and not state:
        return torch.zeros(0, *shape, dtype=dtype)
    return dim_zero_cat(state).to(dtype).reshape(-1, *shape)
