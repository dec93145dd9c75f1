"""Detection DataModules (COCO, VOC): box counts, batches, resizing / flipping, bad boxes, errors, COCO ground truth."""

import contextlib
import doctest
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

import lightning_lt.datamodules.detection as detection_module
from lightning_lt.datamodules import COCODetection, VOCDetection
from lightning_lt.datamodules.detection import detection_transform, resized_size
from lightning_lt.datamodules.multilabel import VOC_CLASSES
from tests.helpers import DDP_STRATEGY, shared_data_dir

W, H = 40, 30  # size of the fake images


def write_jpeg(path: Path, seed: int, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def xywh_to_xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


# ---------------------------------------------------------------------------------------------- doctests, arguments
def test_doctests():
    result = doctest.testmod(detection_module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 0}, "`image_size` >= 1"),
        ({"image_size": 800, "max_size": 800}, "`max_size` > `image_size`"),
        ({"hflip": 1.5}, "`hflip`"),
        ({"batch_size": 0}, "`batch_size`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        COCODetection("unused", **kwargs)


def test_resized_size_matches_torchvision():
    for height, width, size, max_size in [(480, 640, 256, 1333), (640, 427, 200, 1333), (100, 1000, 256, 600),
                                          (333, 500, 800, 1333), (37, 41, 7, 9)]:  # fmt: skip
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        out = detection_transform(size, max_size)(image)
        assert tuple(out.shape[-2:]) == resized_size(height, width, size, max_size)


# ---------------------------------------------------------------------------------------------- real COCO128
@pytest.fixture(scope="module")
def coco128() -> Path:
    return shared_data_dir("coco128")


def load_json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_coco128_counts(coco128):
    dm = COCODetection(str(coco128), num_workers=0)
    train, val = load_json(coco128, "train2017"), load_json(coco128, "val2017")
    # independent count: non-crowd boxes per category, labels in sorted category-id order
    ids = sorted(c["id"] for c in train["categories"])
    per_id = Counter(a["category_id"] for a in train["annotations"] if not a["iscrowd"])
    assert dm.class_counts == [per_id[i] for i in ids]
    assert dm.num_classes == 80 and dm.category_ids == ids and dm.class_names[0] == "person"
    assert sum(dm.class_counts) == 929

    # coco128 has no crowd box and every box lies inside its image with positive size: nothing to repair
    for content in (train, val):
        sizes = {im["id"]: (im["width"], im["height"]) for im in content["images"]}
        assert not any(a["iscrowd"] for a in content["annotations"])
        for a in content["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
    empty = {"clipped": 0, "dropped": 0, "ignored": 0}
    assert dm.box_report == {"train": {**empty, "boxes": 929}, "val": {**empty, "boxes": 898}}

    dm.setup("fit")
    assert len(dm.train_dataset) == 128 and len(dm.val_dataset) == 128
    assert sum(len(r.boxes) for r in dm.train_dataset.records) == 929
    assert sum(1 for r in dm.train_dataset.records if len(r.boxes) == 0) == 2  # two images without boxes, kept
    with pytest.raises(NotImplementedError, match="image-level class re-sampling"):
        dm.train_targets()


def test_coco128_batch_structure(coco128):
    dm = COCODetection(str(coco128), batch_size=3, num_workers=0)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    for image, target in zip(images, targets):
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape[0] == 3
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(target) == {"boxes", "labels", "image_id", "orig_size"}
        boxes, labels = target["boxes"], target["labels"]
        assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 80)).all()
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert target["orig_size"].tolist() == list(image.shape[1:])  # native size: no resizing
        height, width = image.shape[1:]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_coco128_resize_and_flip(coco128):
    val = load_json(coco128, "val2017")
    resized = COCODetection(str(coco128), image_size=256, hflip=0.0, num_workers=0)
    flipped = COCODetection(str(coco128), image_size=256, hflip=1.0, num_workers=0)
    resized.setup("fit")
    flipped.setup("fit")
    ids = [c["id"] for c in sorted(val["categories"], key=lambda c: c["id"])]
    for index in (0, 5):
        image, target = resized.val_dataset[index]
        image_id = int(target["image_id"])
        info = next(im for im in val["images"] if im["id"] == image_id)
        height, width = image.shape[1:]
        assert min(height, width) == 256
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        anns = [a for a in val["annotations"] if a["image_id"] == image_id]
        scale = torch.tensor([width / info["width"], height / info["height"]] * 2, dtype=torch.float64)
        expected = torch.tensor([xywh_to_xyxy(a["bbox"]) for a in anns], dtype=torch.float64) * scale
        torch.testing.assert_close(target["boxes"].double(), expected, rtol=0, atol=1e-3)
        assert target["labels"].tolist() == [ids.index(a["category_id"]) for a in anns]

        # the same training image with and without the flip: x1' = W - x2, x2' = W - x1
        (plain, plain_target), (mirror, mirror_target) = resized.train_dataset[index], flipped.train_dataset[index]
        torch.testing.assert_close(mirror, plain.flip(-1))
        a, b = plain_target["boxes"], mirror_target["boxes"]
        width = plain.shape[-1]
        torch.testing.assert_close(b[:, [0, 2]], width - a[:, [2, 0]])
        torch.testing.assert_close(b[:, [1, 3]], a[:, [1, 3]])
        assert torch.equal(plain_target["labels"], mirror_target["labels"])


def test_coco128_ground_truth_is_the_json_and_scores_perfect_detections(coco128):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from lightning_lt.tasks.detection import to_native_pixels

    dm = COCODetection(str(coco128), image_size=128, max_size=1333, eval_batch_size=16, num_workers=0)
    dm.setup("validate")
    val = load_json(coco128, "val2017")
    # the evaluation ground truth is the json's: native sizes, boxes, areas, crowd flags (ids renumbered)
    gt = dm.coco_ground_truth("val")
    assert sorted((im["id"], im["width"], im["height"]) for im in gt["images"]) == sorted(
        (im["id"], im["width"], im["height"]) for im in val["images"]
    )

    def rows(annotations):  # bbox to 1e-9 pixels: (x, y, w, h) -> xyxy -> (x, y, w, h) rounds
        return sorted((a["image_id"], a["category_id"], tuple(round(v, 9) for v in a["bbox"]), a["area"], a["iscrowd"])
                      for a in annotations)

    assert rows(gt["annotations"]) == rows(val["annotations"])
    by_image = {}
    for a in val["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    results = []
    for images, targets in dm.val_dataloader():
        for image, target in zip(images, targets):
            image_id = int(target["image_id"])
            anns = by_image.get(image_id, [])
            truth = target["ground_truth"]
            assert set(truth) == {"boxes", "labels", "iscrowd", "area"} and truth["boxes"].dtype == torch.float64
            torch.testing.assert_close(truth["boxes"], torch.tensor([xywh_to_xyxy(a["bbox"]) for a in anns],
                                                                    dtype=torch.float64).reshape(-1, 4))
            assert truth["area"].tolist() == [a["area"] for a in anns]
            assert truth["labels"].tolist() == [dm.category_ids.index(a["category_id"]) for a in anns]
            assert min(image.shape[1:]) == 128  # resized, while the ground truth stays in native pixels
            native = to_native_pixels(target["boxes"], image, target["orig_size"])
            for (x1, y1, x2, y2), label in zip(native.tolist(), target["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": dm.category_ids[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})  # fmt: skip
    assert len(results) == 898
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco128 / "annotations" / "instances_val2017.json"))
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # AP@[.5:.95] and the size APs (native areas: large objects exist at any image_size)
    assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[5] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- fake COCO
CATEGORIES = [(90, "toothbrush"), (1, "person"), (18, "dog")]  # unsorted ids: labels follow the sorted ids


def write_coco(root: Path, split: str, images: list, annotations: list, on_disk=None) -> Path:
    """``images`` = [(id, file name)], ``annotations`` = [(image id, category id, [x, y, w, h], iscrowd)]."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for i, (_, name) in enumerate(images):
        if on_disk is None or name in on_disk:
            write_jpeg(root / split / name, seed=i)
    (root / split).mkdir(parents=True, exist_ok=True)
    content = {
        "images": [{"id": i, "file_name": name, "width": W, "height": H} for i, name in images],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": 10.0, "iscrowd": crowd}
            for k, (i, c, box, crowd) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": n, "supercategory": ""} for c, n in CATEGORIES],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


TRAIN_IMAGES = [(7, "a.jpg"), (3, "b.jpg"), (5, "c.jpg")]
TRAIN_BOXES = [
    (7, 1, [1, 1, 5, 5], 0),  # fine
    (7, 1, [10, 10, 0, 5], 0),  # zero width: dropped
    (7, 18, [30, 20, 20, 20], 0),  # partly outside (right, bottom): clipped to [30, 20, 40, 30]
    (7, 90, [50, 5, 5, 5], 0),  # entirely outside: dropped
    (7, 18, [2, 2, 10, 10], 1),  # crowd: ignored
    (5, 1, [-5, 2, 10, 10], 0),  # partly outside (left): clipped to [0, 2, 5, 12]
]  # image 3 ("b.jpg") has no box


@pytest.fixture
def fake_coco(tmp_path) -> Path:
    write_coco(tmp_path, "train", TRAIN_IMAGES, TRAIN_BOXES)
    write_coco(tmp_path, "val", [(11, "d.jpg")], [(11, 90, [35, 0, 10, 10], 0)])  # one clipped box
    return tmp_path


def fake_dm(root, **kwargs) -> COCODetection:
    return COCODetection(str(root), train_split="train", val_split="val", num_workers=0, **kwargs)


def test_fake_coco_bad_boxes_counted_and_repaired(fake_coco):
    dm = fake_dm(fake_coco, hflip=0.0, batch_size=3)
    # the dropped boxes are named by their annotation ids (2: zero width, 4: outside the image)
    with pytest.warns(UserWarning, match=r"instances_train.json.*2 box\(es\).*clipped.*2 .*dropped \(annotation ids 2, 4\)"):
        counts = dm.class_counts
    # labels: 0 = person (id 1), 1 = dog (id 18), 2 = toothbrush (id 90); the crowd dog and the dropped boxes
    # are not counted
    assert counts == [2, 1, 0] and dm.category_ids == [1, 18, 90] and dm.class_names == ["person", "dog", "toothbrush"]
    with pytest.warns(UserWarning, match=r"instances_val.json.*1 box\(es\).*clipped.*0 .*dropped"):
        report = dm.box_report
    assert report == {
        "train": {"clipped": 2, "dropped": 2, "ignored": 1, "boxes": 3},
        "val": {"clipped": 1, "dropped": 0, "ignored": 0, "boxes": 1},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warnings come once per split, when it is read
        assert dm.box_report == report

    dm.setup("fit")
    by_id = {int(t["image_id"]): (image, t) for image, t in (dm.train_dataset[i] for i in range(3))}
    image, target = by_id[7]
    assert target["boxes"].tolist() == [[1, 1, 6, 6], [30, 20, 40, 30]] and target["labels"].tolist() == [0, 1]
    assert by_id[5][1]["boxes"].tolist() == [[0, 2, 5, 12]]
    assert "ground_truth" not in target  # training targets carry only what the detector trains on
    # an image without boxes is kept, with empty targets of the right shapes and dtypes
    empty = by_id[3][1]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert tuple(by_id[3][0].shape) == (3, H, W)

    # a whole batch (with the empty image) trains a torchvision RetinaNet
    from torchvision.models.detection import retinanet_resnet50_fpn

    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 3 and sorted(int(t["image_id"]) for t in targets) == [3, 5, 7]
    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=32, max_size=64)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())

    # the evaluation ground truth is the json's: boxes as annotated (not clipped, none dropped), the crowd box
    # flagged, the annotated areas, ids 1..N
    gt = dm.coco_ground_truth("train")
    assert [im["id"] for im in gt["images"]] == [3, 5, 7]
    rows = [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in gt["annotations"]]
    assert rows == [
        (1, 5, 1, [-5, 2, 10, 10], 10.0, 0),
        (2, 7, 1, [1, 1, 5, 5], 10.0, 0),
        (3, 7, 1, [10, 10, 0, 5], 10.0, 0),
        (4, 7, 18, [30, 20, 20, 20], 10.0, 0),
        (5, 7, 90, [50, 5, 5, 5], 10.0, 0),
        (6, 7, 18, [2, 2, 10, 10], 10.0, 1),
    ]
    with pytest.raises(ValueError, match="`split`"):
        dm.coco_ground_truth("test")


def test_fake_coco_evaluation_targets_keep_native_ground_truth(fake_coco):
    dm = fake_dm(fake_coco, image_size=15, max_size=100)  # 40x30 -> 20x15: every coordinate halves
    with pytest.warns(UserWarning, match="clipped"):
        gt = dm.coco_ground_truth("val")
    assert gt["images"] == [{"id": 11, "file_name": "val/d.jpg", "width": W, "height": H}]
    assert gt["annotations"][0]["bbox"] == [35, 0, 10, 10] and gt["annotations"][0]["area"] == 10.0
    dm.setup("validate")
    image, target = dm.val_dataset[0]
    assert tuple(image.shape) == (3, 15, 20) and target["orig_size"].tolist() == [H, W]
    assert target["boxes"].tolist() == [[17.5, 0.0, 20.0, 5.0]]  # clipped, resized: what the detector sees
    truth = target["ground_truth"]  # as annotated, native pixels: what COCOeval compares with
    assert truth["boxes"].tolist() == [[35, 0, 45, 10]] and truth["boxes"].dtype == torch.float64
    assert truth["labels"].tolist() == [2] and truth["iscrowd"].tolist() == [0] and truth["area"].tolist() == [10.0]
    images, targets = next(iter(dm.val_dataloader()))  # the collated batch keeps the nested dict
    assert torch.equal(targets[0]["ground_truth"]["boxes"], truth["boxes"])


def test_fake_coco_negative_box_size_is_named_with_the_fix(tmp_path):
    boxes = [(1, 1, [1, 1, 5, 5], 0), (1, 18, [20, 5, -4, 6], 0), (1, 18, [2, 9, 3, -1], 1)]
    write_coco(tmp_path, "train", [(1, "a.jpg")], boxes)
    write_coco(tmp_path, "val", [(1, "a.jpg")], boxes)
    dm = fake_dm(tmp_path)
    with pytest.warns(UserWarning) as record:
        counts = dm.class_counts
    messages = [str(w.message) for w in record]
    negative = [m for m in messages if "have a negative" in m]
    assert len(negative) == 1
    # the problem (which annotations, what is wrong) and the fix
    assert "2 box(es) have a negative width or height (annotation ids 2, 3)" in negative[0]
    assert "Fix them in the annotation file: 'bbox' is [x, y, width, height] with width >= 0 and height >= 0" in negative[0]
    assert counts == [1, 0, 0]
    with pytest.warns(UserWarning) as record:
        gt = dm.coco_ground_truth("val")
    assert any("instances_val.json': 2 box(es) have a negative width or height (annotation ids 2, 3)" in str(w.message)
               for w in record)
    assert [a["bbox"] for a in gt["annotations"]] == [[1, 1, 5, 5]]  # not evaluated either


def test_fake_coco_image_without_size_names_the_image_and_the_fix(tmp_path):
    write_coco(tmp_path, "train", [(1, "a.jpg"), (2, "b.jpg")], [(1, 1, [1, 1, 5, 5], 0)])
    content = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    del content["images"][1]["height"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"instances_train.json.*1 image\(s\) have no 'width' / 'height', the first is "
                       r"image id 2 \('b.jpg'\)\. Add \"width\" and \"height\""):
        fake_dm(tmp_path).class_counts


def test_fake_coco_unknown_category(tmp_path):
    write_coco(tmp_path, "train", [(1, "a.jpg")], [(1, 1, [1, 1, 5, 5], 0), (1, 44, [1, 1, 5, 5], 0)])
    with pytest.raises(ValueError, match=r"instances_train.json.*category_id 44"):
        fake_dm(tmp_path).class_counts


def test_fake_coco_val_categories_must_match(fake_coco):
    content = json.loads((fake_coco / "annotations" / "instances_val.json").read_text())
    content["categories"] = content["categories"][:2]
    (fake_coco / "annotations" / "instances_val.json").write_text(json.dumps(content))
    dm = fake_dm(fake_coco)
    with pytest.warns(UserWarning, match="clipped"), pytest.raises(ValueError, match=r"instances_val.json.*differ"):
        dm.setup("validate")


def test_fake_coco_missing_images(tmp_path):
    images = [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")]
    write_coco(tmp_path, "train", images, [(1, 1, [1, 1, 5, 5], 0)], on_disk={"b.jpg"})
    write_coco(tmp_path, "val", [(4, "d.jpg")], [])
    dm = fake_dm(tmp_path)
    missing = str(tmp_path / "train" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=rf"2 of the 3 images .*first is '{missing}'"):
        dm.setup("fit")  # at setup, not at the first __getitem__


# ---------------------------------------------------------------------------------------------- fake VOC
def voc_xml(objects, size=True) -> str:
    """``objects`` = [(name, difficult, (xmin, ymin, xmax, ymax))], 1-based pixel coordinates."""
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, difficult, b in objects
    )
    header = f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder>{header}{body}</annotation>"


VOC_OBJECTS = {
    "000001": [("dog", 0, (1, 1, 10, 10)), ("person", 1, (5, 5, 20, 20)), ("cat", 0, (21, 11, W, H))],
    "000002": [("person", 0, (3, 4, 8, 9))],
    "000003": [],
}


def make_voc(devkit: Path, objects: dict, sets: dict, no_size=()) -> Path:
    voc = devkit / "VOC2007"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for i, (image_id, objs) in enumerate(objects.items()):
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objs, size=image_id not in no_size))
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed=i)
    for name, ids in sets.items():
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return devkit


@pytest.fixture
def voc_root(tmp_path) -> str:
    sets = {"trainval": ["000001", "000002", "000003"], "test": ["000002"]}
    return str(make_voc(tmp_path / "VOCdevkit", VOC_OBJECTS, sets, no_size={"000002"}))


def test_voc_boxes_zero_based_and_difficult(voc_root):
    dm = VOCDetection(voc_root, hflip=0.0, num_workers=0)
    assert dm.num_classes == 20 and dm.class_names == list(VOC_CLASSES) and dm.category_ids == list(range(1, 21))
    counts = dm.class_counts
    expected = [0] * 20
    expected[VOC_CLASSES.index("dog")] = expected[VOC_CLASSES.index("cat")] = 1
    expected[VOC_CLASSES.index("person")] = 1  # the difficult person is ignored
    assert counts == expected
    assert dm.box_report["train"] == {"clipped": 0, "dropped": 0, "ignored": 1, "boxes": 3}

    dm.setup("fit")
    image, target = dm.train_dataset[0]
    # 1-based (1, 1, 10, 10) -> 0-based (0, 0, 9, 9); a box touching the border (xmax = W) stays inside
    assert target["boxes"].tolist() == [[0, 0, 9, 9], [20, 10, W - 1, H - 1]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert int(target["image_id"]) == 0  # the position in the image-set file
    # an annotation without <size> takes the size from the image header
    assert dm.train_dataset.records[1][2:4] == (H, W) and dm.train_dataset[1][1]["boxes"].tolist() == [[2, 3, 7, 8]]
    assert dm.train_dataset[2][1]["boxes"].shape == (0, 4)
    # the difficult object is an ignored (crowd) region of the ground truth
    gt = dm.coco_ground_truth("train")
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [4, 4, 15, 15]
    assert crowd[0]["category_id"] == VOC_CLASSES.index("person") + 1

    with_difficult = VOCDetection(voc_root, use_difficult=True, num_workers=0)
    assert with_difficult.class_counts[VOC_CLASSES.index("person")] == 2
    assert with_difficult.box_report["train"]["ignored"] == 0


def test_voc_bad_class_name(tmp_path):
    devkit = make_voc(tmp_path / "VOCdevkit", {"000001": [("doggo", 0, (1, 1, 5, 5))]}, {"trainval": ["000001"]})
    with pytest.raises(ValueError, match=r"000001.xml.*'doggo'.*not a VOC class"):
        VOCDetection(str(devkit)).class_counts


# ---------------------------------------------------------------------------------------------- DDP
class RecordImageIds(LightningModule):
    """Writes the image ids (and whether targets arrived as lists of dicts) each rank sees to ``rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 1)
        self.seen = {"train": [], "val": [], "lists": True}

    def _record(self, key, batch):
        images, targets = batch
        self.seen["lists"] &= isinstance(images, list) and isinstance(targets, list)
        self.seen[key].extend(int(t["image_id"]) for t in targets)
        return self.layer(torch.stack([image.mean() for image in images])[:, None]).mean()

    def training_step(self, batch, batch_idx):
        return self._record("train", batch)

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def on_fit_end(self) -> None:
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.json"), "w") as f:
            json.dump({**self.seen, "world_size": self.trainer.world_size}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
def test_ddp_shards_images_with_lightnings_sampler(tmp_path):
    # 4 training and 2 validation images: even sizes, so DistributedSampler needs no padding
    images = [(i, f"{i}.jpg") for i in range(1, 5)]
    write_coco(tmp_path, "train", images, [(i, 1, [1, 1, 5, 5], 0) for i in range(1, 5)])
    write_coco(tmp_path, "val", [(8, "8.jpg"), (9, "9.jpg")], [(8, 18, [2, 2, 5, 5], 0)])
    dm = fake_dm(tmp_path, batch_size=2, eval_batch_size=1)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDP_STRATEGY, max_epochs=1, logger=False, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(RecordImageIds(str(tmp_path)), datamodule=dm)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(run["world_size"] == 2 and run["lists"] for run in runs)
    assert [len(run["train"]) for run in runs] == [2, 2] and sorted(runs[0]["train"] + runs[1]["train"]) == [1, 2, 3, 4]
    assert sorted(runs[0]["val"] + runs[1]["val"]) == [8, 9]
