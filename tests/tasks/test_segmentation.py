"""SegmentationModule: losses against direct computations, logging, ignore index, tail classes, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_lt.losses import PixelAUCLoss
from lightning_lt.nets import TorchvisionSegmentation
from lightning_lt.tasks import SegmentationModule
from lightning_lt.tasks.segmentation import segmentation_class_weights
from tests.helpers import DDP_STRATEGY
from tests.tasks.seg_toy import IGNORE, NUM_CLASSES, TAIL, ToySegData, TinySegNet, toy_segmentation

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:SegmentationModule has no tail classes:UserWarning",
)


def trainer(tmp_path, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(
        accelerator="cpu",
        max_epochs=kwargs.pop("max_epochs", 1),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------ losses


def test_ce_loss_ignores_the_ignore_index():
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    images, masks = toy_segmentation(4)
    logits = module(images)
    losses = module.compute_losses(logits, masks)
    keep = masks != IGNORE
    manual = -logits.log_softmax(1).gather(1, masks.clamp(max=NUM_CLASSES - 1)[:, None])[:, 0][keep].mean()
    torch.testing.assert_close(losses["loss_ce"], manual)
    assert torch.equal(losses["loss"], losses["loss_ce"]) and "loss_auc" not in losses


def test_ce_plus_lambda_auc():
    auc = PixelAUCLoss()
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE, auc_loss=auc, auc_weight=4.0)
    assert auc.ignore_index == IGNORE  # the loss takes the task's ignore index
    images, masks = toy_segmentation(4)
    logits = module(images)
    losses = module.compute_losses(logits, masks)
    ce = F.cross_entropy(logits, masks, ignore_index=IGNORE)
    torch.testing.assert_close(losses["loss_auc"], PixelAUCLoss(ignore_index=IGNORE)(logits, masks))
    torch.testing.assert_close(losses["loss"], ce + 4.0 * losses["loss_auc"])


def test_class_weighted_ce():
    counts = [300, 100, 10, 0]
    weights = segmentation_class_weights(counts, "inverse")
    expected = torch.tensor([1 / 0.73171, 1 / 0.24390, 1 / 0.02439, 1 / 0.02439])  # shares of 410; absent -> max
    torch.testing.assert_close(weights, expected / expected.mean(), rtol=1e-4, atol=0)
    module = SegmentationModule(TinySegNet, num_classes=4, class_counts=counts, class_weights="inverse", ignore_index=IGNORE)
    images, masks = toy_segmentation(4)
    logits = module(images)
    torch.testing.assert_close(
        module.compute_losses(logits, masks)["loss"], F.cross_entropy(logits, masks, weight=weights, ignore_index=IGNORE)
    )
    sqrt = segmentation_class_weights([400, 100], "sqrt_inverse")
    torch.testing.assert_close(sqrt, torch.tensor([2 / 3, 4 / 3]))
    median = segmentation_class_weights([600, 300, 100], "median_frequency")
    torch.testing.assert_close(median, torch.tensor([0.5, 1.0, 3.0]))


def test_logits_are_resized_to_the_label_size():
    class HalfRes(torch.nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, num_classes, 3, stride=2, padding=1)

        def forward(self, x):
            return {"out": self.conv(x)}  # torchvision-style dict output

    module = SegmentationModule(HalfRes, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    images, masks = toy_segmentation(2)
    logits = module._logits(images, masks)
    assert logits.shape == (2, NUM_CLASSES, 16, 16)
    torch.testing.assert_close(
        logits, F.interpolate(module(images), size=(16, 16), mode="bilinear", align_corners=False)
    )


def test_all_pixels_ignored_gives_zero_loss_not_nan():
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE, auc_loss=PixelAUCLoss())
    images = torch.rand(2, 3, 8, 8)
    masks = torch.full((2, 8, 8), IGNORE)
    losses = module.compute_losses(module(images), masks)
    assert losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"class_counts": [1, 2]}, "class_counts"),
        ({"class_names": ["a"]}, "class_names"),
        ({"auc_weight": -1.0}, "auc_weight"),
        ({"auc_loss": PixelAUCLoss(), "auc_weight": 0.0}, "auc_weight"),
        ({"class_weights": "inverse"}, "class_counts"),
        ({"class_weights": [1.0, 2.0]}, "4 non-negative weights"),
        ({"tail_classes": []}, "empty"),
        ({"tail_classes": [9]}, "9"),
        ({"auc_loss": PixelAUCLoss(ignore_index=0), "ignore_index": 255}, "ignores label 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("num_classes", NUM_CLASSES)
    with pytest.raises(ValueError, match=match):
        SegmentationModule(TinySegNet, **kwargs)


def test_ignore_index_comes_from_the_data_module_and_conflicts_are_errors(tmp_path):
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, auc_loss=PixelAUCLoss())
    trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=ToySegData())
    assert module.ignore_index == IGNORE and module.auc_loss.ignore_index == IGNORE
    assert module.val_metric.ignore_index == IGNORE
    wrong = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=254)
    with pytest.raises(ValueError, match="labels unlabelled pixels 255"):
        trainer(tmp_path, fast_dev_run=True).fit(wrong, datamodule=ToySegData())


def test_wrong_number_of_output_channels(tmp_path):
    module = SegmentationModule(torch.nn.Conv2d(3, 2, 1), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="returns 2 channels"):
        trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=ToySegData())


# ------------------------------------------------------------------------------------ training run


def test_fit_logs_miou_head_tail_and_the_iou_figure(tmp_path):
    data = ToySegData()
    module = SegmentationModule(
        TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts, class_names=data.class_names,
        auc_loss=PixelAUCLoss(), optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
    )
    assert module.tail_classes == TAIL  # automatic rule on the pixel counts
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, logger=logger, max_epochs=8, log_every_n_steps=1).fit(module, datamodule=data)
    metrics = trainer_metrics = {k: float(v) for k, v in module.trainer.callback_metrics.items()}
    for key in ("val/miou", "val/miou_head", "val/miou_tail", "val/pixel_acc", "val/macc", "val/iou/tail_c",
                "train/loss_ce", "train/loss_auc"):
        assert key in trainer_metrics, key
    assert metrics["val/pixel_acc"] > 0.9  # the toy problem is learnable from channel 0
    ious = torch.tensor([metrics[f"val/iou/{n}"] for n in data.class_names])
    torch.testing.assert_close(torch.tensor(metrics["val/miou"]), ious.mean())
    torch.testing.assert_close(torch.tensor(metrics["val/miou_tail"]), ious[TAIL].mean())
    figures = list(Path(logger.log_dir, "figures").glob("val_per_class_iou*.png"))
    assert len(figures) == 8


def test_test_and_predict(tmp_path):
    data = ToySegData()
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts)
    t = trainer(tmp_path)
    t.fit(module, datamodule=data)
    (result,) = t.test(module, datamodule=data, verbose=False)
    assert {"test/miou", "test/miou_tail", "test/pixel_acc"} <= set(result)
    preds = t.predict(module, dataloaders=data.val_dataloader())
    assert preds[0].shape == (4, 16, 16) and preds[0].dtype == torch.long


def test_torchvision_network_as_factory(tmp_path):
    module = SegmentationModule(TorchvisionSegmentation, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    images, masks = toy_segmentation(2)
    assert module._logits(images.expand(2, 3, 16, 16).repeat(1, 1, 2, 2), masks.repeat(1, 2, 2)).shape == (2, 4, 32, 32)


class MetricRecorder(SegmentationModule):
    def on_validation_epoch_end(self) -> None:
        values = self.val_metric.compute()
        Path(self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        Path(self.trainer.default_root_dir, f"rank{self.global_rank}.json").write_text(
            json.dumps({k: v.tolist() for k, v in values.items()})
        )
        super().on_validation_epoch_end()


@pytest.mark.ddp
def test_ddp_validation_equals_single_process(tmp_path):
    """Fixed weights, 2 CPU processes: mIoU / per-class IoU equal the one-process values."""
    data = ToySegData(n=16)
    torch.manual_seed(0)
    module = MetricRecorder(TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    trainer(tmp_path / "one", devices=1).validate(module, datamodule=data, verbose=False)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ddp_module = MetricRecorder(TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts)
    ddp_module.load_state_dict(state)
    trainer(tmp_path / "two", devices=2, strategy=DDP_STRATEGY).validate(ddp_module, datamodule=data, verbose=False)
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        for key in ("miou", "miou_head", "miou_tail", "pixel_acc"):
            assert two[key] == pytest.approx(one[key], nan_ok=True), key
        assert two["iou"] == pytest.approx(one["iou"], nan_ok=True)


def test_docstring_examples():
    import doctest

    from lightning_lt.tasks import segmentation

    assert doctest.testmod(segmentation, raise_on_error=True).attempted > 0
