"""DetectionModule: sampling-free bias initialisation, guided loss scaling, BCE head, training, resume, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_lt.tasks import DetectionModule
from lightning_lt.tasks.detection import guided_loss_scaling, optimal_bias
from lightning_lt.tasks.base import safe_metric_key
from tests.helpers import DDP_STRATEGY, shared_data_dir

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
    "ignore:DetectionMAP:UserWarning",  # tiny evaluation sets: empty size buckets and frequency groups
)

K = 3
SIZE = 64


class Squares(Dataset):
    """``n`` 64x64 images, each with 1-2 filled squares whose colour channel is the class; one image without
    boxes."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = torch.full((3, SIZE, SIZE), 0.1)
            boxes, labels = [], []
            for _ in range(0 if i == n - 1 else 1 + i % 2):
                side = int(torch.randint(14, 30, (1,), generator=g))
                x, y = torch.randint(0, SIZE - side, (2,), generator=g).tolist()
                c = int(torch.randint(0, K, (1,), generator=g))
                image[c, y : y + side, x : x + side] = 0.9
                boxes.append([x, y, x + side, y + side])
                labels.append(c)
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": torch.tensor(i),
            }
            self.items.append((image, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class SquaresData(LightningDataModule):
    num_classes = K
    class_names = ["r", "g", "b"]

    def __init__(self, n: int = 8, batch_size: int = 2) -> None:
        super().__init__()
        self.dataset, self.batch_size = Squares(n), batch_size

    @property
    def class_counts(self) -> list[int]:
        counts = [0] * K
        for _, t in self.dataset.items:
            for c in t["labels"].tolist():
                counts[c] += 1
        return counts

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate)


def make_module(arch="retinanet", **kwargs) -> DetectionModule:
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.005, momentum=0.9))
    kwargs.setdefault("backbone", "resnet18")
    return DetectionModule(arch, num_classes=K, min_size=SIZE, max_size=SIZE, **kwargs)


def make_trainer(tmp_path, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", max_epochs=kwargs.pop("max_epochs", 1), enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


# ------------------------------------------------------------------------------ formulas


def test_optimal_bias_formula():
    pi, bias = optimal_bias(foreground=30, background=9970, num_classes=80)
    assert pi == pytest.approx(30 / 10000 / 80)
    assert bias == pytest.approx(-math.log((1 - pi) / pi))
    assert 1 / (1 + math.exp(-bias)) == pytest.approx(pi)  # sigmoid(bias) = pi
    with pytest.raises(ValueError, match="at least one box"):
        optimal_bias(0, 100, 3)


def test_guided_scaling_keeps_the_direction_and_takes_the_regression_value():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    cls = (w**2).sum() * 7.0
    reg = torch.tensor(0.3)
    scaled = guided_loss_scaling(cls, reg)
    assert scaled.item() == pytest.approx(0.3, rel=1e-6)
    (g_scaled,) = torch.autograd.grad(scaled, w, retain_graph=True)
    (g_plain,) = torch.autograd.grad(cls, w)
    assert F.cosine_similarity(g_scaled, g_plain, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(g_scaled, g_plain * 0.3 / cls.item())


# ------------------------------------------------------------------------------ bias initialisation


def brute_force_retinanet_counts(module: DetectionModule, dataset: Squares) -> tuple[int, int]:
    """RetinaNet's assignment written out with Python loops: IoU >= 0.5 foreground, < 0.4 background, and each
    box's best anchors (ties included) foreground too (allow_low_quality_matches)."""
    model = module.model
    fg = bg = 0
    for image, target in dataset:
        images, targets = model.transform([image], [target])
        features = list(model.backbone(images.tensors).values())
        anchors = model.anchor_generator(images, features)[0].tolist()
        boxes = targets[0]["boxes"].tolist()

        def iou(a, b):
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            return inter / union

        if not boxes:
            bg += len(anchors)
            continue
        ious = [[iou(b, a) for a in anchors] for b in boxes]
        best_per_box = [max(row) for row in ious]
        for j in range(len(anchors)):
            best = max(ious[i][j] for i in range(len(boxes)))
            low_quality = any(ious[i][j] == best_per_box[i] for i in range(len(boxes)))
            if best >= 0.5 or low_quality:
                fg += 1
            elif best < 0.4:
                bg += 1
    return fg, bg


def test_bias_initialisation_counts_the_detectors_assignment(tmp_path):
    data = SquaresData(n=6)
    module = make_module(sampling_free=True)
    module.eval()
    with torch.no_grad():
        expected_fg, expected_bg = brute_force_retinanet_counts(module, data.dataset)
    fg, bg = module.count_assignments(data.train_dataloader())
    assert (fg, bg) == (expected_fg, expected_bg)
    assert fg > 0 and bg > fg
    pi = module.initialise_bias(data.train_dataloader())
    assert pi == pytest.approx(expected_fg / (expected_fg + expected_bg) / K)
    bias = module.model.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log((1 - pi) / pi)))
    assert module.model.score_thresh == pytest.approx(pi * K)  # adaptive inference threshold
    # counting left the batch-norm statistics alone
    bn = module.model.backbone.body.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_fcos_counts_points_with_its_own_rule():
    data = SquaresData(n=4)
    module = make_module("fcos", sampling_free=True)
    fg, bg = module.count_assignments(data.train_dataloader())
    total_points = 0
    for image, target in data.dataset:
        images, _ = module.model.transform([image], [target])
        features = list(module.model.backbone(images.tensors).values())
        total_points += len(module.model.anchor_generator(images, features)[0])
    assert fg > 0 and fg + bg == total_points  # FCOS ignores no point


def _record_head_inputs(module: DetectionModule, images, targets) -> dict:
    """What the detector hands its head's ``compute_loss`` for one batch (logits, matching, transformed targets)."""
    recorded = {}
    model = module.model

    def grab(targets_, head_outputs, anchors, matched_idxs):
        recorded.update(head_outputs=head_outputs, anchors=anchors, matched=matched_idxs, targets=targets_)
        return {"classification": torch.zeros(()), "bbox_regression": torch.zeros(())}

    model.head.compute_loss = grab
    try:
        model(images, targets)
    finally:
        del model.head.compute_loss
    return recorded


def _batch_bce(logits, matched_idxs, targets):
    """BCE summed over every anchor and class of the batch / (foreground anchors + images), by hand."""
    total, foreground = 0.0, 0
    for image_logits, matched, target in zip(logits, matched_idxs, targets):
        labels = torch.zeros_like(image_logits)
        fg = matched >= 0
        labels[fg, target["labels"][matched[fg]]] = 1.0
        total = total + F.binary_cross_entropy_with_logits(image_logits, labels, reduction="sum")
        foreground += int(fg.sum())
    return total / (foreground + len(targets))


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_sampling_free_bce_replaces_the_focal_loss(arch):
    data = SquaresData(n=3, batch_size=3)  # 1, 2 and 0 boxes: different foreground counts
    images, targets = next(iter(data.train_dataloader()))
    focal, free = make_module(arch), make_module(arch, sampling_free=True)
    free.model.load_state_dict(focal.model.state_dict())
    focal.train(), free.train()
    torch.manual_seed(0)
    l_focal = focal.model(images, targets)
    torch.manual_seed(0)
    l_free = free.model(images, targets)
    assert set(l_free) == set(l_focal)
    for key in set(l_focal) - {"classification"}:  # the box losses are the detector's own
        torch.testing.assert_close(l_focal[key], l_free[key])
    assert not torch.allclose(l_focal["classification"], l_free["classification"])
    # the BCE term by hand: every anchor (between the thresholds too), summed over the batch,
    # / (foreground anchors of the batch + images)
    recorded = _record_head_inputs(free, images, targets)
    if arch == "retinanet":
        assert any(bool((m == -2).any()) for m in recorded["matched"])  # between-threshold anchors are present
    expected = _batch_bce(recorded["head_outputs"]["cls_logits"], recorded["matched"], recorded["targets"])
    torch.testing.assert_close(l_free["classification"], expected)


def test_sampling_free_fcos_computes_no_focal_loss(monkeypatch):
    import torchvision.models.detection.fcos as fcos

    module = make_module("fcos", sampling_free=True)
    monkeypatch.setattr(fcos, "sigmoid_focal_loss", lambda *a, **k: pytest.fail("focal loss computed"))
    images, targets = next(iter(SquaresData(n=2).train_dataloader()))
    losses = module.model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_sampling_free_fit_initialises_once_and_evaluates(tmp_path, arch):
    module = make_module(arch, sampling_free=True)
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=SquaresData())
    pi = float(module.prior_pi)
    assert 0 < pi < 1 / K
    metrics = trainer.callback_metrics
    assert {"val/map", "val/ap50", "val/ap_rare", "prior/pi", "train/loss_classification_raw_epoch"} <= set(metrics)
    assert metrics["prior/pi"].item() == pytest.approx(pi, rel=1e-5)
    # guided scaling: the logged classification loss equals the regression loss
    assert metrics["train/loss_classification_epoch"].item() == pytest.approx(
        metrics["train/loss_bbox_regression_epoch"].item(), rel=1e-4)


def test_focal_training_logs_and_keeps_the_stock_threshold(tmp_path):
    module = make_module()
    make_trainer(tmp_path).fit(module, datamodule=SquaresData())
    assert float(module.prior_pi) == -1.0 and module.model.score_thresh == 0.05


def test_prior_is_restored_from_the_checkpoint_not_recomputed(tmp_path, monkeypatch):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = make_module(sampling_free=True)
    make_trainer(tmp_path, max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True, limit_val_batches=0).fit(
        first, datamodule=SquaresData())
    pi = float(first.prior_pi)
    resumed = make_module(sampling_free=True)
    monkeypatch.setattr(DetectionModule, "count_assignments", lambda *a, **k: pytest.fail("recounted"))
    make_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
        resumed, datamodule=SquaresData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert float(resumed.prior_pi) == pi
    assert resumed.model.score_thresh == pytest.approx(pi * K)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_fpn_channels_set_the_width_of_the_pyramid_and_the_head(tmp_path, arch, backbone):
    """A narrow FPN: every pyramid level and the head's convolutions have ``fpn_channels``; the ResNet FPN keeps
    its inputs (C3-C5 of the backbone); sampling-free training and evaluation run on it."""
    module = make_module(arch, backbone=backbone, fpn_channels=64, sampling_free=True)
    fpn = module.model.backbone
    assert fpn.out_channels == 64
    features = fpn(torch.zeros(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in features.values()] == [64] * 5
    head = module.model.head.classification_head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.in_channels == 64 for c in convs)
    if backbone == "resnet18":
        assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [128, 256, 512]
    make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=SquaresData())
    assert float(module.prior_pi) > 0 and "val/map" in module.trainer.callback_metrics


@pytest.mark.parametrize("kwargs, match", [({"arch": "yolo"}, "arch"), ({"backbone": "vgg"}, "backbone"),
                                           ({"class_counts": [1]}, "class_counts"),
                                           ({"fpn_channels": 0}, "fpn_channels"),
                                           ({"arch": "fcos", "fpn_channels": 48}, "multiple of 32")])
def test_bad_arguments(kwargs, match):
    arch = kwargs.pop("arch", "retinanet")
    with pytest.raises(ValueError, match=match):
        make_module(arch, **kwargs)


class Recorder(DetectionModule):
    def on_train_end(self):
        Path(self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        Path(self.trainer.default_root_dir, f"rank{self.global_rank}.json").write_text(
            json.dumps({"pi": float(self.prior_pi), "map": float(self.trainer.callback_metrics["val/map"]),
                        "bias": self.model.head.classification_head.cls_logits.bias[0].item()}))


@pytest.mark.ddp
def test_ddp_trains_and_evaluates(tmp_path):
    """2 CPU processes: the prior is counted over both shards (equal on both ranks, equal to one process's)."""
    single = make_module(sampling_free=True)
    single.initialise_bias(SquaresData(n=8).train_dataloader())
    module = Recorder("retinanet", num_classes=K, backbone="resnet18", min_size=SIZE, max_size=SIZE,
                      sampling_free=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.005))
    make_trainer(tmp_path, devices=2, strategy=DDP_STRATEGY, max_epochs=1).fit(module, datamodule=SquaresData(n=8))
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["pi"] == rank1["pi"] == pytest.approx(float(single.prior_pi))
    assert rank0["map"] == rank1["map"] and not math.isnan(rank0["map"])


def test_box_report_of_the_data_module_is_logged(tmp_path):
    class Reporting(SquaresData):
        box_report = {"train": {"clipped": 2, "dropped": 1, "ignored": 0, "boxes": 11}}

    module = make_module()
    trainer = make_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=Reporting())
    assert trainer.callback_metrics["data/train_clipped"].item() == 2
    assert trainer.callback_metrics["data/train_dropped"].item() == 1


# ------------------------------------------------------------------------------ evaluation = COCOeval on the json
# A COCO-format data set whose evaluation must match COCOeval on its own json: native sizes 320x240 ... 640x480
# (the loader resizes them to a shorter side of 128), boxes small / medium / large in native pixels, annotated
# areas that differ from the box areas (and move boxes between size ranges), crowd boxes with detections on them,
# a box partly outside its image, a category whose only box is a crowd one, and an image without boxes.
EVAL_CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 11, "name": "fire hydrant"}]
EVAL_IMAGES = [  # id, file, width, height
    (21, "a.jpg", 320, 240), (4, "b.jpg", 640, 480), (9, "c.jpg", 300, 200), (15, "d.jpg", 500, 400),
]
EVAL_ANNOTATIONS = [  # image id, category id, [x, y, w, h], area, iscrowd
    (21, 3, [10, 12, 20, 18], 290.0, 0),  # small
    (21, 3, [100, 40, 40, 40], 900.0, 0),  # medium box, small annotated area
    (21, 7, [150, 100, 160, 130], 15000.0, 0),  # large
    (21, 3, [280, 200, 60, 50], 3000.0, 0),  # partly outside the image (clipped for training only)
    (4, 7, [20, 30, 300, 200], 52000.0, 0),  # large
    (4, 3, [400, 300, 64, 64], 4096.0, 0),  # medium
    (4, 3, [350, 50, 200, 150], 25000.0, 1),  # crowd: detections on it are ignored
    (4, 11, [10, 400, 100, 60], 5000.0, 1),  # the only fire hydrant is a crowd box
    (15, 7, [60, 80, 120, 90], 9000.0, 0),  # medium by its area, large by its box
    (15, 3, [300, 200, 25, 25], 500.0, 0),  # small
    (15, 3, [200, 10, 280, 150], 38000.0, 1),  # crowd
]  # image 9 has no box


def write_eval_coco(root: Path, split: str = "val") -> Path:
    """The data set above (the same for train and val) as COCO json plus random JPEG images."""
    import numpy as np
    from PIL import Image

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    for k, (_, name, width, height) in enumerate(EVAL_IMAGES):
        pixels = np.random.default_rng(k).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name)
    content = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in EVAL_IMAGES],
        "annotations": [
            {"id": 100 + k, "image_id": i, "category_id": c, "bbox": box, "area": area, "iscrowd": crowd}
            for k, (i, c, box, area, crowd) in enumerate(EVAL_ANNOTATIONS)
        ],
        "categories": EVAL_CATEGORIES,
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root / "annotations" / f"instances_{split}.json"


def native_detections(gt: dict, seed: int, per_box: int = 2, extra: int = 3) -> list[dict]:
    """COCO results (native pixels): ``per_box`` jittered detections of every ground-truth box (crowd ones too,
    with the right or a wrong category), ``extra`` random false positives per image (the image without boxes
    too); random scores."""
    g = torch.Generator().manual_seed(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    category_ids = [c["id"] for c in gt["categories"]]

    def rand(n=1):
        return torch.rand(n, generator=g, dtype=torch.float64).tolist()

    results = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(per_box):
            dx, dy, dw, dh = (v - 0.5 for v in rand(4))
            category = ann["category_id"] if rand()[0] < 0.8 else category_ids[int(rand()[0] * len(category_ids))]
            box = [x + 0.3 * dx * w, y + 0.3 * dy * h, w * (1 + 0.4 * dw), h * (1 + 0.4 * dh)]
            results.append({"image_id": ann["image_id"], "category_id": category, "bbox": box, "score": rand()[0]})
    for image_id, (width, height) in sizes.items():
        for _ in range(extra):
            fx, fy, fw, fh = rand(4)
            w, h = 4 + fw * width / 2, 4 + fh * height / 2
            box = [fx * (width - w), fy * (height - h), w, h]
            category = category_ids[int(rand()[0] * len(category_ids))]
            results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": rand()[0]})
    return results


def tag_images(datamodule):
    """Make ``datamodule``'s evaluation images carry their ``image_id`` in pixel ``[0, 0, 0]`` (exact in float32),
    so that :class:`FixedDetector` knows which image it is given (everything else is the data module's own)."""
    transform = datamodule.eval_transform()

    def tagged(image, target):
        image, target = transform(image, target)
        image[0, 0, 0] = float(target["image_id"])
        return image, target

    datamodule.eval_transform = lambda: tagged
    return datamodule


class FixedDetector(torch.nn.Module):
    """A stand-in for the torchvision detector whose detections are given: it reads each image's id (see
    :func:`tag_images`) and returns that image's detections (native pixels) scaled to the image it is given,
    in float32, as the detector returns them."""

    def __init__(self, datamodule, results: list[dict]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        label_of = {c: k for k, c in enumerate(datamodule.category_ids)}
        self.native_size = {r.image_id: (r.height, r.width) for r in datamodule.split_records("val")}
        self.by_id = {}
        for image_id in self.native_size:
            mine = [r for r in results if r["image_id"] == image_id]
            boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            scores = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
            labels = torch.tensor([label_of[r["category_id"]] for r in mine], dtype=torch.int64)
            self.by_id[image_id] = (boxes, scores, labels)

    def forward(self, images):
        out = []
        for image in images:
            image_id = int(image[0, 0, 0])
            (boxes, scores, labels), (height, width) = self.by_id[image_id], self.native_size[image_id]
            h, w = image.shape[-2:]
            scale = torch.tensor([w / width, h / height] * 2, dtype=torch.float64)
            out.append({"boxes": (boxes * scale).float(), "scores": scores, "labels": labels})
        return out


def cocoeval(annotation_file_or_dict, results: list[dict]):
    """pycocotools on its own: ``stats`` and the AP of each category id (nan without ground truth)."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(annotation_file_or_dict, dict):
            coco = COCO()
            coco.dataset = annotation_file_or_dict
            coco.createIndex()
        else:
            coco = COCO(str(annotation_file_or_dict))
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_category = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        defined = precision[:, :, k][precision[:, :, k] > -1]
        per_category[category_id] = float(defined.mean()) if defined.size else float("nan")
    return np.asarray(evaluator.stats), per_category


def assert_module_equals_cocoeval(metrics: dict, datamodule, stats, per_category) -> None:
    keys = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    logged = [float(metrics[f"val/{k}"]) for k in keys]
    expected = [float(v) if v > -1 else float("nan") for v in stats[:6]]
    assert logged == pytest.approx(expected, abs=1e-6, nan_ok=True)
    for category_id, name in datamodule.categories():
        assert float(metrics[f"val/ap/{safe_metric_key(name)}"]) == pytest.approx(
            per_category[category_id], abs=1e-6, nan_ok=True)


def validate_with(datamodule, results, tmp_path, **trainer_kwargs) -> dict:
    module = DetectionModule("retinanet", num_classes=datamodule.num_classes, class_counts=datamodule.class_counts,
                             class_names=datamodule.class_names, backbone="resnet18", min_size=64, max_size=64)
    module.model = FixedDetector(tag_images(datamodule), results)
    trainer = make_trainer(tmp_path, **trainer_kwargs)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("eval_batch_size", [1, 3])
def test_module_map_equals_cocoeval_on_the_json(tmp_path, eval_batch_size):
    """Acceptance: the module's val/map (and every COCO summary AP and per-class AP) equals COCOeval on the data
    set's own json for the same detections: crowd boxes, annotated areas, native sizes, an image without boxes."""
    from lightning_lt.datamodules import COCODetection

    annotation_file = write_eval_coco(tmp_path / "data", "val")
    write_eval_coco(tmp_path / "data", "train")
    gt = json.loads(annotation_file.read_text())
    results = native_detections(gt, seed=eval_batch_size)
    data = COCODetection(str(tmp_path / "data"), train_split="train", val_split="val", image_size=128,
                         max_size=1333, eval_batch_size=eval_batch_size, num_workers=0)
    with pytest.warns(UserWarning, match="clipped"):  # the box partly outside its image
        metrics = validate_with(data, results, tmp_path)
    stats, per_category = cocoeval(annotation_file, results)
    assert 0.05 < stats[0] < 0.95 and min(stats[3:6]) > -1  # a non-trivial score; every size range has boxes
    assert math.isnan(per_category[11])  # crowd-only category: no AP, as in COCOeval
    assert_module_equals_cocoeval(metrics, data, stats, per_category)


class WriteMetrics(Callback):
    def on_validation_end(self, trainer, pl_module):
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        Path(trainer.default_root_dir, f"metrics{trainer.global_rank}.json").write_text(json.dumps(values))


@pytest.mark.ddp
def test_ddp_module_map_equals_cocoeval_on_the_json(tmp_path):
    """The same under 2-process DDP: each rank evaluates its shard, the metric gathers them."""
    from lightning_lt.datamodules import COCODetection

    annotation_file = write_eval_coco(tmp_path / "data", "val")
    write_eval_coco(tmp_path / "data", "train")
    results = native_detections(json.loads(annotation_file.read_text()), seed=0)
    data = COCODetection(str(tmp_path / "data"), train_split="train", val_split="val", image_size=128,
                         max_size=1333, eval_batch_size=1, num_workers=0)
    with pytest.warns(UserWarning, match="clipped"):
        validate_with(data, results, tmp_path, devices=2, strategy=DDP_STRATEGY, callbacks=[WriteMetrics()])
    stats, per_category = cocoeval(annotation_file, results)
    for rank in range(2):
        metrics = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert_module_equals_cocoeval(metrics, data, stats, per_category)


def test_module_map_equals_cocoeval_on_coco128(tmp_path):
    """Real COCO-128 val2017 at a shorter side of 128: 128 images, 898 boxes, 36 categories with boxes."""
    from lightning_lt.datamodules import COCODetection

    root = shared_data_dir("coco128")
    annotation_file = root / "annotations" / "instances_val2017.json"
    results = native_detections(json.loads(annotation_file.read_text()), seed=1, per_box=1, extra=1)
    data = COCODetection(str(root), image_size=128, max_size=1333, eval_batch_size=16, num_workers=0)
    metrics = validate_with(data, results, tmp_path)
    stats, per_category = cocoeval(annotation_file, results)
    assert 0.05 < stats[0] < 0.95 and min(stats[3:6]) > -1
    assert_module_equals_cocoeval(metrics, data, stats, per_category)


def test_module_ignores_detections_on_voc_difficult_objects(tmp_path):
    """VOC: difficult objects are COCO-style ignore regions; a detection on one is neither a true nor a false
    positive, and val/map equals COCOeval on the data module's ground truth."""
    import numpy as np
    from PIL import Image

    from lightning_lt.datamodules import VOCDetection
    from lightning_lt.datamodules.multilabel import VOC_CLASSES

    voc = tmp_path / "VOCdevkit" / "VOC2007"
    objects = {"000001": [("dog", 0, (11, 21, 90, 80)), ("dog", 1, (120, 30, 190, 110))],
               "000002": [("cat", 0, (5, 5, 60, 40))]}
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for k, (name, objs) in enumerate(objects.items()):
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                       f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objs)
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>200</width><height>120</height></size>{body}</annotation>")
        pixels = np.random.default_rng(k).integers(0, 256, size=(120, 200, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
    for split in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("000001\n000002\n")
    data = VOCDetection(str(tmp_path / "VOCdevkit"), image_size=64, max_size=1333, num_workers=0)
    gt = data.coco_ground_truth("val")
    dog, cat = VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1
    hits = [{"image_id": 0, "category_id": dog, "bbox": [10, 20, 79, 59], "score": 0.5},
            {"image_id": 1, "category_id": cat, "bbox": [4, 4, 55, 35], "score": 0.4}]
    on_difficult = [{"image_id": 0, "category_id": dog, "bbox": [119, 29, 70, 80], "score": s} for s in (0.9, 0.8)]
    for results in (hits, hits + on_difficult):
        metrics = validate_with(data, results, tmp_path)
        stats, per_category = cocoeval(gt, results)
        assert_module_equals_cocoeval(metrics, data, stats, per_category)
        assert metrics["val/map"] == pytest.approx(1.0)  # the two higher-scored detections are not false positives


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_sampling_free_training_step_makes_no_host_sync(arch):
    """Issue 13: no `.item()` / `int()` / boolean-mask indexing in lightning_lt's part of the sampling-free
    training step (torchvision's matcher has its own); the gradients stay finite (background targets masked)."""
    from tests.host_syncs import HostSyncCounter

    torch.manual_seed(0)
    module = DetectionModule(arch, num_classes=3, backbone="resnet18", min_size=64, max_size=96, sampling_free=True)
    module.prior_pi.fill_(0.01)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer here
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 70), torch.rand(3, 60, 60)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [20.0, 20.0, 50.0, 50.0]]), "labels": torch.tensor([2, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without boxes
    with HostSyncCounter() as syncs:
        loss = module.training_step((images, targets), 0)
    assert syncs.calls == [], syncs.report()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def _forward_counts(module: DetectionModule, batches) -> tuple[int, int]:
    """The count as the detector's training forward assigns (the library's former method, kept here as the
    reference): the whole model runs, its head's ``compute_loss`` records ``matched_idxs``."""
    recorded = []

    def record(targets, head_outputs, *args):
        recorded.extend(args[-1])
        return {"classification": torch.zeros(()), "bbox_regression": torch.zeros(())}

    model, head = module.model, module.model.head
    fg = bg = 0
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    head.compute_loss = record
    try:
        with torch.no_grad():
            for images, targets in batches:
                model(images, targets)
                for matched in recorded:
                    fg += int((matched >= 0).sum())
                    bg += int((matched == -1).sum())
                recorded.clear()
    finally:
        del head.compute_loss
    return fg, bg


def _varied_batches(seed: int = 0):
    """Images of different sizes and aspect ratios (so resizing and batch padding differ), boxes of every scale,
    and an image without boxes."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for sizes in (((70, 90), (48, 130), (64, 64)), ((100, 60), (33, 47)), ((120, 200),)):
        images, targets = [], []
        for h, w in sizes:
            images.append(torch.rand(3, h, w, generator=generator))
            n = int(torch.randint(0, 4, (1,), generator=generator))
            xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.7, h * 0.7])
            wh = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.5, h * 0.5]) + 2
            boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], dim=1)
            targets.append({"boxes": boxes, "labels": torch.randint(0, K, (n,), generator=generator)})
        batches.append((images, targets))
    return batches


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_prior_count_from_sizes_equals_the_detectors_forward(arch, backbone):
    """Issue 13: the sampling-free prior is counted without the detector's forward, and the count is exactly the
    forward's, with resizing, batch padding, images without boxes and both backbones' feature-map sizes."""
    torch.manual_seed(0)
    module = DetectionModule(arch, num_classes=K, backbone=backbone, min_size=96, max_size=160, sampling_free=True)
    batches = _varied_batches()
    expected = _forward_counts(module, batches)
    assert expected[0] > 0 and expected[1] > expected[0]

    devices = []
    hook = module.model.backbone.register_forward_pre_hook(lambda m, inputs: devices.append(inputs[0].device.type))
    assert module.count_assignments(batches) == expected
    hook.remove()
    assert module.model.backbone._forward_pre_hooks == {} and set(devices) <= {"meta"}  # no pixel went through
