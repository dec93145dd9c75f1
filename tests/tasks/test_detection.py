"""DetectionModule: sampling-free bias initialisation, guided loss scaling, BCE head, training, resume, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_lt.tasks import DetectionModule
from lightning_lt.tasks.detection import guided_loss_scaling, optimal_bias
from tests.helpers import DDP_STRATEGY

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


def test_sampling_free_bce_replaces_the_focal_loss():
    data = SquaresData(n=2)
    images, targets = next(iter(data.train_dataloader()))
    focal, free = make_module(), make_module(sampling_free=True)
    free.model.load_state_dict(focal.model.state_dict())
    focal.train(), free.train()
    l_focal, l_free = focal.model(images, targets), free.model(images, targets)
    torch.testing.assert_close(l_focal["bbox_regression"], l_free["bbox_regression"])
    assert not torch.allclose(l_focal["classification"], l_free["classification"])
    # the BCE term by hand: every anchor not between the thresholds, summed, / foreground anchors, image mean
    recorded = {}
    model = free.model

    def grab(targets_, head_outputs, anchors, matched_idxs):
        recorded.update(cls_logits=head_outputs["cls_logits"], matched=matched_idxs)
        return {"classification": torch.zeros(()), "bbox_regression": torch.zeros(())}

    model.head.compute_loss = grab
    model(images, targets)
    del model.head.compute_loss
    per_image = []
    transformed = model.transform(images, targets)[1]
    for logits, matched, target in zip(recorded["cls_logits"], recorded["matched"], transformed):
        labels = torch.zeros_like(logits)
        fg = matched >= 0
        labels[fg, target["labels"][matched[fg]]] = 1.0
        keep = matched != -2
        per_image.append(F.binary_cross_entropy_with_logits(logits[keep], labels[keep], reduction="sum") / max(1, int(fg.sum())))
    torch.testing.assert_close(l_free["classification"], torch.stack(per_image).mean())


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


@pytest.mark.parametrize("kwargs, match", [({"arch": "yolo"}, "arch"), ({"backbone": "vgg"}, "backbone"),
                                           ({"class_counts": [1]}, "class_counts")])
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
