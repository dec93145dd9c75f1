import contextlib
import copy
import doctest
import functools
import io
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lt.metrics.detection as detection_module
from lightning_lt.metrics import DetectionMAP, frequency_groups
from tests.helpers import DDP_STRATEGY, shared_data_dir

SCALARS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
GROUPS = ("ap_rare", "ap_common", "ap_frequent")
EXTRA_FP_IMAGE, EXTRA_EMPTY_IMAGE = 10**9, 10**9 + 1  # images added to coco128's val set without ground truth


# ---------------------------------------------------------------------------------------------- coco128 data


@functools.lru_cache(maxsize=None)
def _load(split):
    with open(shared_data_dir("coco128") / "annotations" / f"instances_{split}.json") as f:
        return json.load(f)


def _coco128(split):
    return copy.deepcopy(_load(split))


def _cat_ids(dataset):
    """Contiguous label ``k`` <-> COCO category id ``cat_ids[k]`` (the sorted ids of the json's categories)."""
    return sorted(c["id"] for c in dataset["categories"])


def _train_counts():
    train = _coco128("train2017")
    cat_ids = _cat_ids(train)
    counts = [0] * len(cat_ids)
    for ann in train["annotations"]:
        counts[cat_ids.index(ann["category_id"])] += 1
    return counts


def _val_with_extra_images():
    """coco128 val plus an image that will only get false positives and one with neither boxes nor detections."""
    val = _coco128("val2017")
    val["images"] += [
        {"id": EXTRA_FP_IMAGE, "file_name": "fp.jpg", "width": 640, "height": 480},
        {"id": EXTRA_EMPTY_IMAGE, "file_name": "empty.jpg", "width": 640, "height": 480},
    ]
    return val


def _perturbed_detections(gt, seed):
    """Detections per image id, ``(xyxy boxes [N, 4] float64, scores [N] float64, labels [N] long)``.

    Every ground-truth box is dropped (15 %) or kept with jittered corners (its label wrong 5 % of the time, a second,
    looser duplicate 10 % of the time); each image gets a few false positives with random boxes and labels. Scores
    are random, a little higher for the kept boxes, so that the APs are neither 0 nor 1.
    """
    rng = np.random.default_rng(seed)
    cat_ids = _cat_ids(gt)
    K = len(cat_ids)
    anns_by_image = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    out = {}
    for img in gt["images"]:
        boxes, scores, labels = [], [], []
        if img["id"] == EXTRA_EMPTY_IMAGE:
            out[img["id"]] = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
            continue
        for ann in anns_by_image[img["id"]]:
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            label = cat_ids.index(ann["category_id"])
            for spread in (0.08, 0.3)[: 1 + (rng.random() < 0.1)]:
                x1, x2 = np.sort([x, x + w] + rng.normal(0, spread * w, 2))
                y1, y2 = np.sort([y, y + h] + rng.normal(0, spread * h, 2))
                boxes.append([x1, y1, x2 + 0.5, y2 + 0.5])
                labels.append(int(rng.integers(K)) if rng.random() < 0.05 else label)
                scores.append(rng.uniform(0.2, 1.0))
        for _ in range(rng.poisson(2.0) + (img["id"] == EXTRA_FP_IMAGE)):
            x1, y1 = rng.uniform(0, img["width"] - 10), rng.uniform(0, img["height"] - 10)
            boxes.append([x1, y1, x1 + rng.uniform(5, img["width"] - x1), y1 + rng.uniform(5, img["height"] - y1)])
            labels.append(int(rng.integers(K)))
            scores.append(rng.uniform(0.0, 0.8))
        out[img["id"]] = (np.array(boxes).reshape(-1, 4), np.array(scores), np.array(labels, dtype=np.int64))
    return out


def _metric_inputs(gt, detections):
    """Per-image ``preds`` / ``target`` dicts for DetectionMAP, in the order of ``gt["images"]``."""
    cat_ids = _cat_ids(gt)
    anns_by_image = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    preds, target = [], []
    for img in gt["images"]:
        boxes, scores, labels = detections[img["id"]]
        preds.append(
            {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores), "labels": torch.from_numpy(labels)}
        )
        anns = anns_by_image[img["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        item = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.long),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.long),
            # COCOeval sizes ground truth by the json's `area` (the segment area for real COCO), not the box area
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float64),
        }
        target.append(item)
    return preds, target


def _cocoeval_reference(gt, detections):
    """pycocotools on its own: ``stats`` and the standard per-class AP (indexed by contiguous label, nan if none)."""
    cat_ids = _cat_ids(gt)
    results = [
        {"image_id": image_id, "category_id": cat_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for image_id, (boxes, scores, labels) in detections.items()
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = np.full(len(cat_ids), np.nan)
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            ap[cat_ids.index(cat_id)] = p[p > -1].mean()
    return evaluator.stats, ap


def _assert_matches_reference(result, stats, ap):
    for i, key in enumerate(SCALARS):
        assert result[key].item() == pytest.approx(stats[i], abs=1e-6), key
    np.testing.assert_allclose(result["ap_per_class"].numpy(), ap, rtol=0, atol=1e-6)  # nan where nan


@pytest.fixture(scope="module")
def coco128_eval():
    """(val ground truth with two extra images, detections, pycocotools stats, per-class AP, train counts)."""
    gt = _val_with_extra_images()
    detections = _perturbed_detections(gt, seed=0)
    stats, ap = _cocoeval_reference(gt, detections)
    return gt, detections, stats, ap, _train_counts()


# ---------------------------------------------------------------------------------------------- against COCOeval


def test_matches_cocoeval_on_coco128(coco128_eval):
    gt, detections, stats, ap, train_counts = coco128_eval
    K = len(_cat_ids(gt))
    assert K == 80 and len(detections[EXTRA_FP_IMAGE][0]) > 0  # the extra image holds only false positives
    metric = DetectionMAP(K, class_counts=train_counts)
    preds, target = _metric_inputs(gt, detections)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.update(preds, target)
        result = metric.compute()
    assert list(result) == [*SCALARS, "ap_per_class", *GROUPS]
    assert all(v.dtype == torch.float32 for v in result.values())
    assert result["ap_per_class"].shape == (K,) and all(result[k].ndim == 0 for k in SCALARS + GROUPS)
    _assert_matches_reference(result, stats, ap)
    # a real test: APs strictly between 0 and 1, and the 7 categories without a val box are nan
    assert 0.2 < result["map"].item() < 0.9 and result["ap50"] > result["ap75"] > 0
    assert int(np.isnan(ap).sum()) == 7
    # map is the mean AP over the classes with ground truth
    assert result["map"].item() == pytest.approx(np.nanmean(ap), abs=1e-6)
    # frequency groups from the training box counts: nanmean of the reference per-class AP over each group
    groups = frequency_groups(train_counts)
    for name in ("rare", "common", "frequent"):
        assert result[f"ap_{name}"].item() == pytest.approx(np.nanmean(ap[groups[name]]), abs=1e-6), name


def test_images_without_ground_truth_count_as_on_cocoeval(coco128_eval):
    """Dropping the image that holds only false positives changes both sides alike."""
    gt, detections, stats, _, _ = coco128_eval
    gt = copy.deepcopy(gt)
    gt["images"] = [img for img in gt["images"] if img["id"] != EXTRA_FP_IMAGE]
    detections = {k: v for k, v in detections.items() if k != EXTRA_FP_IMAGE}
    stats_without, ap_without = _cocoeval_reference(gt, detections)
    assert stats_without[0] > stats[0]  # its false positives cost AP
    metric = DetectionMAP(len(_cat_ids(gt)), class_counts=_train_counts())
    metric.update(*_metric_inputs(gt, detections))
    _assert_matches_reference(metric.compute(), stats_without, ap_without)


def test_crowd_boxes_and_uneven_batches_match_cocoeval():
    """Some ground truth marked ``iscrowd`` (ignored by COCOeval) and the images fed in batches of varying size."""
    gt = _val_with_extra_images()
    for ann in gt["annotations"][::6]:
        ann["iscrowd"] = 1
    detections = _perturbed_detections(gt, seed=1)
    stats, ap = _cocoeval_reference(gt, detections)
    preds, target = _metric_inputs(gt, detections)
    assert sum(int(t["iscrowd"].sum()) for t in target) == len(gt["annotations"][::6])
    metric = DetectionMAP(len(_cat_ids(gt)), class_counts=_train_counts())
    bounds = [0, 1, 17, 17, 60, 61, len(preds)]  # includes an empty batch
    for start, stop in zip(bounds[:-1], bounds[1:]):
        metric.update(preds[start:stop], target[start:stop])
    _assert_matches_reference(metric.compute(), stats, ap)
    # without `iscrowd` the crowd boxes become ordinary ground truth: other numbers
    plain = DetectionMAP(len(_cat_ids(gt)), class_counts=_train_counts())
    plain.update(preds, [{k: v for k, v in t.items() if k != "iscrowd"} for t in target])
    assert plain.compute()["map"].item() != pytest.approx(stats[0], abs=1e-4)
    metric.reset()
    assert metric.det_counts == [] and metric.gt_boxes == []


# ---------------------------------------------------------------------------------------------- by hand


def _box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _target(boxes, labels, **extra):
    item = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    item.update({k: torch.tensor(v) for k, v in extra.items()})
    return item


def _no_size(*sizes):
    names = ", ".join(f"'ap_{size}'" for size in sizes)
    return rf"\[{names}\] are nan because the evaluated images have no \(non-crowd\) ground-truth box of that size"


def _compute_warning(metric, *expected):
    """``metric.compute()``, checking that every pattern matches one of its warnings and every warning one pattern."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = metric.compute()
    messages = [str(w.message) for w in record]
    for pattern in expected:
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)
    assert all(any(re.search(p, m) for p in expected) for m in messages), messages
    return result


def test_hand_computed_false_positive_on_an_image_without_ground_truth():
    metric = DetectionMAP(2, class_counts=[3, 500])
    # image 0: both classes found exactly; image 1: no ground truth, one class-0 box scored above the true one
    metric.update(
        [
            _pred([_box(0, 0, 40, 40), _box(50, 50, 90, 90)], [0.5, 0.7], [0, 1]),
            _pred([_box(0, 0, 20, 20)], [0.9], [0]),
        ],
        [_target([_box(0, 0, 40, 40), _box(50, 50, 90, 90)], [0, 1]), _target([], [])],
    )
    result = _compute_warning(
        metric, _no_size("small", "large"), r"common group \(11..100 training boxes\) is empty because no class has"
    )
    # class 0: ranking FP, TP -> interpolated precision 1/2 at every recall -> AP 0.5; class 1: AP 1
    torch.testing.assert_close(result["ap_per_class"], torch.tensor([0.5, 1.0]))
    assert result["map"].item() == pytest.approx(0.75)
    assert result["ap_medium"].item() == 1.0  # the false positive is small: outside the medium range, not counted
    assert result["ap_rare"].item() == pytest.approx(0.5) and result["ap_frequent"].item() == pytest.approx(1.0)


def test_class_without_ground_truth_is_nan_and_left_out():
    metric = DetectionMAP(3, class_counts=[3, 50, 500])
    metric.update(
        [_pred([_box(0, 0, 40, 40), _box(50, 50, 90, 90)], [0.9, 0.9], [0, 2])],  # class 2: no ground truth
        [_target([_box(0, 0, 40, 40)], [0])],
    )
    result = _compute_warning(
        metric,
        _no_size("small", "large"),
        r"common group \(11..100 training boxes\) is empty because none of its 1 classes has ground truth in the ",
        r"frequent group \(more than 100 training boxes\) is empty because none of its 1 classes",
    )
    assert torch.isnan(result["ap_per_class"][1:]).all() and result["ap_per_class"][0] == 1.0
    assert result["map"].item() == 1.0  # class 2's detections are not evaluated: no ground truth to miss
    assert result["ap_rare"].item() == 1.0 and torch.isnan(result["ap_common"]) and torch.isnan(result["ap_frequent"])


def test_crowd_ground_truth_absorbs_detections():
    metric = DetectionMAP(1)
    metric.class_counts = [20]
    target = _target([_box(0, 0, 40, 40), _box(100, 100, 300, 300)], [0, 0], iscrowd=[0, 1])
    # a high-scoring detection inside the crowd region is neither a hit nor a false positive
    metric.update([_pred([_box(110, 110, 200, 200), _box(0, 0, 40, 40)], [0.9, 0.5], [0, 0])], [target])
    result = _compute_warning(metric, _no_size("small", "large"), "rare group", "frequent group")  # large: crowd only
    assert result["ap_per_class"].item() == 1.0 and result["ap_common"].item() == 1.0  # [1] squeezed by torchmetrics
    assert torch.isnan(result["ap_large"])


def test_area_key_decides_the_size_group():
    pred, box = _pred([_box(0, 0, 40, 40)], [0.9], [0]), _box(0, 0, 40, 40)  # box area 1600: medium
    metric = DetectionMAP(1, class_counts=[1])
    metric.update([pred], [_target([box], [0])])
    result = _compute_warning(metric, _no_size("small", "large"), "common group", "frequent group")
    assert result["ap_medium"].item() == 1.0
    metric = DetectionMAP(1, class_counts=[1])
    metric.update([pred], [_target([box], [0], area=[500.0])])  # a segment of 500 pixels: small
    result = _compute_warning(metric, _no_size("medium", "large"), "common group", "frequent group")
    assert result["ap_small"].item() == 1.0


def test_no_ground_truth_or_no_update_gives_nan_never_zero():
    metric = DetectionMAP(2, class_counts=[1, 200])
    metric.update([_pred([_box(0, 0, 9, 9)], [0.3], [1])], [_target([], [])])
    result = _compute_warning(
        metric,
        r"\['map', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large'\] are nan because the evaluated images have "
        r"no \(non-crowd\) ground-truth box\.",
        "rare group .* none of its 1 classes",
        "common group .* no class has",
        "frequent group .* none of its 1 classes",
    )
    assert all(torch.isnan(v).all() for v in result.values())
    metric = DetectionMAP(2, class_counts=[1, 200])
    result = _compute_warning(
        metric, "called before the ``update``", "are nan because no image was evaluated", "rare", "common", "frequent"
    )
    assert all(torch.isnan(v).all() for v in result.values()) and result["ap_per_class"].shape == (2,)


def test_missing_predictions_give_zero_ap():
    metric = DetectionMAP(2, class_counts=[1, 200])
    metric.update([_pred([], [], [])], [_target([_box(0, 0, 40, 40)], [1])])
    result = _compute_warning(metric, _no_size("small", "large"), "rare group", "common group")
    assert result["map"].item() == 0.0 and result["ap_frequent"].item() == 0.0  # missed: 0, not nan


def test_without_class_counts_the_groups_are_nan_with_one_warning():
    metric = DetectionMAP(1)
    metric.update([_pred([_box(0, 0, 40, 40)], [0.9], [0])], [_target([_box(0, 0, 40, 40)], [0], area=[2000.0])])
    no_counts = r"`class_counts` is None, so `ap_rare`, `ap_common` and `ap_frequent` are nan\. HINT: set"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = metric.compute()
    assert sum(bool(re.search(no_counts, str(w.message))) for w in record) == 1
    assert all(torch.isnan(result[k]) for k in GROUPS) and result["map"].item() == 1.0
    metric.update([_pred([], [], [])], [_target([], [])])  # so that compute() does not return its cached result
    _compute_warning(metric, _no_size("small", "large"))  # once per metric


# ---------------------------------------------------------------------------------------------- frequency groups


def test_frequency_groups_by_hand():
    counts = [0, 1, 10, 11, 100, 101, 254, 3]
    assert frequency_groups(counts) == {"rare": [1, 2, 7], "common": [3, 4], "frequent": [5, 6]}
    assert frequency_groups(counts, rare_max=1, common_max=10) == {
        "rare": [1],
        "common": [2, 7],
        "frequent": [3, 4, 5, 6],
    }
    assert frequency_groups(torch.tensor([5, 5])) == {"rare": [0, 1], "common": [], "frequent": []}
    assert frequency_groups(np.array([0, 0])) == {"rare": [], "common": [], "frequent": []}


def test_frequency_groups_of_coco128_train():
    counts = _train_counts()
    groups = frequency_groups(counts)
    assert len(counts) == 80 and counts[0] == 254  # person
    assert sum(n > 0 for n in counts) == 71  # 9 categories without a training box belong to no group
    assert sorted(groups["rare"] + groups["common"] + groups["frequent"]) == [c for c in range(80) if counts[c] > 0]
    assert groups["rare"] == [c for c in range(80) if 1 <= counts[c] <= 10]
    assert groups["common"] == [c for c in range(80) if 10 < counts[c] <= 100]
    assert groups["frequent"] == [0]  # only person has more than 100 boxes
    assert sum(counts[c] <= 2 for c in groups["rare"]) == 12  # the data README: 12 classes with <= 2 boxes
    metric = DetectionMAP(80, class_counts=counts)
    assert metric.groups == groups


@pytest.mark.parametrize(
    ("counts", "rare_max", "common_max", "match"),
    [
        ([1, 2], 10, 10, "`rare_max` < `common_max`, got rare_max=10 and common_max=10"),
        ([1, 2], 0, 100, "`rare_max` to be an integer >= 1, got 0"),
        ([1, 2], 10, 5.0, "`common_max` to be an integer >= 1, got 5.0"),
        ([1, 2], True, 100, "`rare_max` to be an integer"),
        ([], 10, 100, "non-empty"),
        ([1, -2], 10, 100, "non-negative"),
        ([1, 2.5], 10, 100, "integers"),
    ],
)
def test_frequency_groups_errors(counts, rare_max, common_max, match):
    with pytest.raises(ValueError, match=match):
        frequency_groups(counts, rare_max, common_max)


# ---------------------------------------------------------------------------------------------- validation


def _valid_pair():
    return [_pred([_box(0, 0, 4, 4)], [0.5], [1])], [_target([_box(0, 0, 4, 4)], [1])]


def _with(item, **changes):
    item = dict(item)
    for key, value in changes.items():
        if value is None:
            del item[key]
        else:
            item[key] = value
    return item


@pytest.mark.parametrize(
    ("side", "changes", "match"),
    [
        ("preds", {"labels": torch.tensor([3])}, r"preds\[1\]\['labels'\] in \[0, 3\), found \[3\]\. HINT: use contig"),
        ("target", {"labels": torch.tensor([-1])}, r"target\[1\]\['labels'\] in \[0, 3\), found \[-1\]"),
        ("preds", {"scores": None}, r"preds\[1\] has no key 'scores': every dict in `preds` needs 'boxes', 'scores'"),
        ("preds", {"boxes": None}, r"preds\[1\] has no key 'boxes'"),
        ("target", {"labels": None}, r"target\[1\] has no key 'labels'"),
        ("target", {"boxes": None}, r"target\[1\] has no key 'boxes'"),
        ("preds", {"labels": [1]}, r"preds\[1\]\['labels'\] to be a tensor, got list"),
        ("preds", {"labels": torch.tensor([1.0])}, r"1-D integer tensor, got shape \(1,\) and dtype torch.float32"),
        ("preds", {"boxes": torch.zeros(1, 5)}, r"preds\[1\]\['boxes'\] of shape \[1, 4\] .*got \(1, 5\)"),
        ("preds", {"boxes": torch.zeros(1, 4, dtype=torch.long)}, "floating-point preds.1..'boxes'"),
        ("preds", {"boxes": torch.tensor([[0.0, 0.0, math.nan, 4.0]])}, "non-finite values in preds.1..'boxes'"),
        ("target", {"boxes": torch.tensor([[5.0, 5.0, 4.0, 9.0]])}, r"x2 < x1 or y2 < y1 .*HINT: .*box_convert"),
        ("preds", {"scores": torch.tensor([0.5, 0.4])}, r"preds\[1\]\['scores'\] of shape \[1\] .*got \(2,\)"),
        ("preds", {"scores": torch.tensor([1])}, r"floating-point preds\[1\]\['scores'\], got torch.int64"),
        ("preds", {"scores": torch.tensor([math.nan])}, r"non-finite values in preds\[1\]\['scores'\]"),
        ("target", {"iscrowd": torch.tensor([2])}, r"target\[1\]\['iscrowd'\] to be 0 / 1, found \[2\]"),
        ("target", {"iscrowd": torch.tensor([0.0])}, r"integer or bool target\[1\]\['iscrowd'\]"),
        ("target", {"area": torch.tensor([1.0, 2.0])}, r"target\[1\]\['area'\] of shape \[1\]"),
    ],
)
def test_update_validation(side, changes, match):
    preds, target = _valid_pair()
    if side == "preds":
        preds = [_with(preds[0], **changes)]
    else:
        target = [_with(target[0], **changes)]
    metric = DetectionMAP(3)
    good_preds, good_target = _valid_pair()
    with pytest.raises(ValueError, match=match):
        metric.update(good_preds + preds, good_target + target)  # the bad image is the second one ...
    assert metric.det_counts == [] and metric.gt_labels == []  # ... and nothing of the batch was kept


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (_valid_pair()[0][0], _valid_pair()[1], "`preds` to be a list of per-image dicts, got one dict. HINT"),
        (_valid_pair()[0], torch.zeros(1, 4), "`target` to be a list of per-image dicts, got Tensor"),
        (_valid_pair()[0] * 2, _valid_pair()[1], "same images, got 2 and 1 dicts"),
        ([torch.zeros(4)], _valid_pair()[1], r"one dict per image, got Tensor at preds\[0\]"),
    ],
)
def test_update_structure_validation(preds, target, match):
    with pytest.raises(ValueError, match=match):
        DetectionMAP(3).update(preds, target)


def test_empty_images_accept_flat_empty_boxes():
    metric = DetectionMAP(2, class_counts=[1, 200])
    empty = {"boxes": torch.zeros(0), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    metric.update([empty, _pred([_box(0, 0, 4, 4)], [0.5], [1])], [_target([], []), _target([_box(0, 0, 4, 4)], [1])])
    result = _compute_warning(metric, _no_size("medium", "large"), "rare group", "common group")
    assert result["ap_per_class"][1].item() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "`num_classes` to be an integer >= 1, got 0"),
        ({"num_classes": 2.0}, "`num_classes` to be an integer >= 1"),
        ({"num_classes": 3, "class_counts": [1, 2]}, "num_classes=3 values .*got 2"),
        ({"num_classes": 2, "class_counts": [1, -2]}, "non-negative"),
        ({"num_classes": 2, "rare_max": 100, "common_max": 100}, "`rare_max` < `common_max`"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectionMAP(**kwargs)


def test_class_counts_setter_validates():
    metric = DetectionMAP(2, class_counts=[5, 500])
    with pytest.raises(ValueError, match="num_classes=2 values"):
        metric.class_counts = [1, 2, 3]
    assert metric.class_counts == [5, 500]
    metric.class_counts = torch.tensor([50, 0])
    assert metric.groups == {"rare": [], "common": [0], "frequent": []}
    metric.class_counts = None
    assert metric.groups is None


def test_docstring_examples():
    result = doctest.testmod(detection_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


# ---------------------------------------------------------------------------------------------- DDP

RANK0_IMAGES = 77  # of 130: uneven, rank-dependent shards


class _ShardedEval(LightningModule):
    def __init__(self, out_dir, preds, target, class_counts):
        super().__init__()
        self.out_dir = out_dir
        self.preds, self.target = preds, target
        self.dummy = nn.Linear(1, 1)  # DDP needs a parameter
        self.metric = DetectionMAP(len(class_counts), class_counts=class_counts)
        self.rank0_only = DetectionMAP(len(class_counts), class_counts=class_counts)  # never updated on rank 1
        self.seen = []

    def val_dataloader(self):
        idx = torch.arange(len(self.preds))
        shard = idx[:RANK0_IMAGES] if self.global_rank == 0 else idx[RANK0_IMAGES:]
        return DataLoader(TensorDataset(shard), batch_size=16)

    def validation_step(self, batch, batch_idx):
        (idx,) = batch
        self.seen += idx.tolist()
        self.metric.update([self.preds[i] for i in idx], [self.target[i] for i in idx])
        if self.global_rank == 0:
            self.rank0_only.update([self.preds[i] for i in idx], [self.target[i] for i in idx])

    def on_validation_epoch_end(self):
        local = int(sum(len(c) for c in self.metric.gt_counts))  # images on this rank, before compute() syncs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 1's "compute before update" for rank0_only
            results = {
                name: {k: v.tolist() for k, v in getattr(self, name).compute().items()}
                for name in ("metric", "rank0_only")
            }
        record = {"world_size": self.trainer.world_size, "seen": self.seen, "local": local, "results": results}
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_ddp_sync_equals_single_process(tmp_path, coco128_eval):
    gt, detections, _, _, train_counts = coco128_eval
    preds, target = _metric_inputs(gt, detections)
    n = len(preds)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDP_STRATEGY,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_ShardedEval(str(tmp_path), preds, target, train_counts))

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["seen"] == list(range(RANK0_IMAGES)) and records[1]["seen"] == list(range(RANK0_IMAGES, n))
    assert [r["local"] for r in records] == [RANK0_IMAGES, n - RANK0_IMAGES]

    def single(stop):
        metric = DetectionMAP(80, class_counts=train_counts)
        metric.update(preds[:stop], target[:stop])
        return metric.compute()

    expected = {"metric": single(n), "rank0_only": single(RANK0_IMAGES)}
    for record in records:  # every rank sees the synced (global) value
        for name, want in expected.items():
            got = {k: torch.tensor(v) for k, v in record["results"][name].items()}
            for key, value in want.items():
                torch.testing.assert_close(got[key], value, equal_nan=True, rtol=0, atol=0)
    # the shards alone give different numbers, so the equality above comes from syncing
    assert expected["rank0_only"]["map"].item() != pytest.approx(expected["metric"]["map"].item())
