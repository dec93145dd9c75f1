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
        ({"aux_weight": -0.5}, "aux_weight"),
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


def test_logits_of_another_aspect_ratio_are_refused():
    class Transposed(torch.nn.Module):  # a layout bug: [B, C, W, H]
        def __init__(self, num_classes):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, num_classes, 1)

        def forward(self, x):
            return self.conv(x).transpose(2, 3)

    module = SegmentationModule(Transposed, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    images, masks = torch.rand(2, 3, 16, 8), torch.zeros(2, 16, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"SegmentationModule got `logits` of shape \(2, 4, 8, 16\).*`target` of "
                       r"shape \(2, 16, 8\).*different aspect ratios.*HINT: pass logits as \[batch, classes"):
        module._logits(images, masks)


def dict_loader(key_image: str, key_mask: str, n: int = 8) -> torch.utils.data.DataLoader:
    images, masks = toy_segmentation(n)
    samples = [{key_image: image, key_mask: mask, "id": i} for i, (image, mask) in enumerate(zip(images, masks))]
    return torch.utils.data.DataLoader(samples, batch_size=4)


def test_dict_batches_with_other_keys(tmp_path):
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE, image_key="img", mask_key="gt")
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    t.fit(module, train_dataloaders=dict_loader("img", "gt"), val_dataloaders=dict_loader("img", "gt"))
    assert "val/miou" in t.callback_metrics
    (preds,) = t.predict(module, dataloaders=dict_loader("img", "gt", n=4))
    assert preds.shape == (4, 16, 16)
    plain = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"without the key\(s\) \['image', 'mask'\]; its keys are \['img', 'gt', 'id'\]"
                       r"\. HINT: pass `image_key=...` and `mask_key=...` to SegmentationModule"):
        trainer(tmp_path, fast_dev_run=True).fit(plain, dict_loader("img", "gt"), dict_loader("img", "gt"))
    with pytest.raises(ValueError, match=r"without the key 'image'; its keys are \['img', 'gt', 'id'\]\. HINT: pass "
                       r"`image_key=...`"):
        trainer(tmp_path).predict(plain, dataloaders=dict_loader("img", "gt", n=4))


def aux_net(num_classes: int) -> TorchvisionSegmentation:
    return TorchvisionSegmentation(num_classes, arch="deeplabv3_mobilenet_v3_large", aux_loss=True)


def test_auxiliary_head_is_trained_with_weight_0_4(tmp_path):
    """AUCSeg's MMSegmentation configs: loss = CE(out) + 0.4 * CE(aux); the auxiliary head learns."""
    torch.manual_seed(0)
    module = SegmentationModule(aux_net, num_classes=NUM_CLASSES, ignore_index=IGNORE, auc_loss=PixelAUCLoss())
    images, masks = toy_segmentation(4)
    module.eval()  # fixed batch-norm statistics, so that the two forward passes agree
    logits, aux = module._train_logits(images, masks)
    losses = module.compute_losses(logits, masks, aux)
    out, expected_aux = module.net.forward_with_aux(images)
    ce = F.cross_entropy(out, masks, ignore_index=IGNORE)
    aux_ce = F.cross_entropy(expected_aux, masks, ignore_index=IGNORE)
    torch.testing.assert_close(losses["loss_aux"], aux_ce)
    torch.testing.assert_close(losses["loss"], ce + 1.0 * PixelAUCLoss(ignore_index=IGNORE)(out, masks) + 0.4 * aux_ce)

    module = SegmentationModule(aux_net, num_classes=NUM_CLASSES, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    head = {k: v.clone() for k, v in module.net.model.aux_classifier.state_dict().items()}
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    t.fit(module, datamodule=ToySegData())
    assert "train/loss_aux" in t.callback_metrics
    changed = [k for k, v in module.net.model.aux_classifier.state_dict().items() if not torch.equal(v, head[k])]
    assert any(k.endswith("weight") and "running" not in k for k in changed)  # trained, not just BN statistics


def test_auxiliary_head_of_a_plain_torchvision_model():
    """A torchvision model given as an instance returns {"out", "aux"}: its auxiliary logits are trained too."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    ).eval()
    module = SegmentationModule(net, num_classes=NUM_CLASSES, ignore_index=IGNORE, aux_weight=0.5)
    images, masks = toy_segmentation(2)
    logits, aux = module._train_logits(images, masks)
    losses = module.compute_losses(logits, masks, aux)
    out = net(images)
    expected_aux = F.cross_entropy(out["aux"], masks, ignore_index=IGNORE)
    torch.testing.assert_close(losses["loss_aux"], expected_aux)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(out["out"], masks, ignore_index=IGNORE) + 0.5 * expected_aux)
    with pytest.raises(ValueError, match="auxiliary head but `aux_weight` is 0"):
        SegmentationModule(net, num_classes=NUM_CLASSES, aux_weight=0.0)


def test_auxiliary_head_with_zero_weight_is_an_error():
    with pytest.raises(ValueError, match=r"auxiliary head but `aux_weight` is 0.*HINT: set `aux_weight` > 0 .*`aux_loss=False`"):
        SegmentationModule(aux_net, num_classes=NUM_CLASSES, aux_weight=0.0)
    SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, aux_weight=0.0)  # no auxiliary head: fine


# ------------------------------------------------------------------------------------ host syncs


class SyncCountingModule(SegmentationModule):
    """Records the host syncs that lightning_lt code makes inside each training step (loss, logging included)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync_calls: list = []

    def training_step(self, batch, batch_idx):
        from tests.host_syncs import HostSyncCounter

        with HostSyncCounter() as syncs:
            loss = super().training_step(batch, batch_idx)
        self.sync_calls.extend(syncs.calls)
        return loss


@pytest.mark.parametrize("variant", ["weighted_ce_auc", "aux_head"])
def test_training_step_makes_no_host_syncs(tmp_path, variant):
    """CE (class-weighted or not), pixel AUC, auxiliary head and logging: nothing copied to the host, nothing
    sized by the data, in any training step."""
    data = ToySegData()
    if variant == "weighted_ce_auc":
        module = SyncCountingModule(TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts,
                                    class_weights="inverse", auc_loss=PixelAUCLoss())
    else:
        module = SyncCountingModule(aux_net, num_classes=NUM_CLASSES, auc_loss=PixelAUCLoss())
    trainer(tmp_path, limit_train_batches=3, limit_val_batches=0).fit(module, datamodule=data)
    assert module.global_step == 3
    assert module.sync_calls == [], "\n".join(f"{what} at {where}" for what, where in module.sync_calls)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_is_the_labelled_pixels_mean_and_zero_without_any(weighted):
    counts = [300, 100, 10, 5]
    kwargs = {"class_counts": counts, "class_weights": "inverse"} if weighted else {}
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE, **kwargs)
    weight = segmentation_class_weights(counts, "inverse") if weighted else None
    images, masks = toy_segmentation(4)
    logits = module(images)
    torch.testing.assert_close(module._cross_entropy(logits, masks),
                               F.cross_entropy(logits, masks, weight=weight, ignore_index=IGNORE))
    loss = module._cross_entropy(logits, torch.full_like(masks, IGNORE))  # F.cross_entropy: nan
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_training_step_makes_no_host_syncs_on_cuda(tmp_path):
    """From the second step on (Lightning registers its logged metrics in the first, with host copies of its own),
    the training step runs with ``torch.cuda.set_sync_debug_mode("error")``."""

    class Strict(SegmentationModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                return super().training_step(batch, batch_idx)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return super().training_step(batch, batch_idx)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    data = ToySegData()
    module = Strict(TinySegNet, num_classes=NUM_CLASSES, class_counts=data.class_counts, class_weights="inverse",
                    auc_loss=PixelAUCLoss())
    Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=tmp_path).fit(module, datamodule=data)
    assert module.global_step == 3


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
