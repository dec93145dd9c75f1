"""Every task family under 2-process CPU DDP (gloo, ``ddp_fork``), on the lightning_lt DataModules.

- Evaluation: one set of weights validated by 1 and by 2 processes logs the same metrics. Every evaluation
  set has an odd size, so Lightning's padding ``DistributedSampler`` would show a sample twice; the
  DataModules' unpadded sampler counts each sample once (ranks then run unequal numbers of batches).
- Training: a 2-process fit completes and its training loss falls (rank 0, first vs last epoch).
- SAM family: each callback completes a 2-process fit of ``LongTailClassifier`` with both ranks holding
  the same weights (tests/callbacks/test_sam_ddp.py checks the updates against a reference).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Subset

from lightning_lt.callbacks import SAM, SSESAM, ImbSAM, OptimizerStages
from lightning_lt.datamodules import CamVid, COCODetection, DigitsLT, VOCMultiLabel
from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.nets import MLP
from lightning_lt.optim import SAM as SAMOptimizer
from lightning_lt.tasks import DetectionModule, LongTailClassifier, MultiLabelOODModule, SegmentationModule
from tests.datamodules.test_base import DrawRecorder, RandomToy
from tests.datamodules.test_detection import write_coco
from tests.datamodules.test_multilabel import make_voc
from tests.datamodules.test_segmentation import make_camvid
from tests.datamodules.utils import ToyLT, write_image_folder
from tests.helpers import DDP_STRATEGY
from tests.tasks.seg_toy import TinySegNet

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers:UserWarning",
        "ignore:.*smaller than the logging interval:UserWarning",
        "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
        "ignore:.*has no tail classes:UserWarning",
        "ignore:.*few-shot:UserWarning",
        "ignore:.*is empty:UserWarning",
        "ignore:.*GPU available but not used:UserWarning",
        "ignore:.* are nan because the evaluated images:UserWarning",
    ),
]


def make_trainer(root: Path, devices: int = 1, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=devices, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
    )  # fmt: skip
    if devices > 1:
        defaults["strategy"] = DDP_STRATEGY
    defaults.update(kwargs)
    return Trainer(**defaults)


#: Metrics not compared between one and two processes (none: evaluation losses are exact too, see
#: ``test_logged_loss_is_sample_weighted``).
LOSS_KEYS: tuple[str, ...] = ()


def assert_same_metrics(single: dict, ddp: dict, skip: tuple[str, ...] = LOSS_KEYS) -> None:
    assert single and set(ddp) == set(single)
    for key, value in single.items():
        if key in skip:
            continue
        expected, got = float(value), float(ddp[key])
        if math.isnan(expected):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(expected, abs=1e-6, rel=0), key


def validate_one_and_two(tmp_path: Path, make_module, make_data, train: bool = False) -> tuple[dict, dict]:
    """``validate`` the same weights with 1 and with 2 processes; rank 0's logged metrics of each.

    ``train``: first fit the module for one epoch in this process, so that the metrics are not trivial.
    """
    seed_everything(0)
    module = make_module()
    if train:
        make_trainer(tmp_path / "fit", limit_val_batches=0).fit(module, datamodule=make_data())
    state = module.state_dict()
    results = []
    for devices in (1, 2):
        module = make_module()
        module.load_state_dict(state)
        trainer = make_trainer(tmp_path / f"devices{devices}", devices=devices)
        results.append(trainer.validate(module, datamodule=make_data(), verbose=False)[0])
    return results[0], results[1]


class LossHistory(Callback):
    """Mean training loss per epoch on rank 0, written to ``default_root_dir/losses.json`` at the end."""

    def __init__(self) -> None:
        self.epochs: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.epochs[-1].append(float(loss))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            means = [sum(losses) / len(losses) for losses in self.epochs]
            Path(trainer.default_root_dir, "losses.json").write_text(json.dumps(means))


def fit_two_processes(tmp_path: Path, module: LightningModule, data, **kwargs) -> list[float]:
    trainer = make_trainer(tmp_path, devices=2, callbacks=[LossHistory()], **kwargs)
    trainer.fit(module, datamodule=data)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == trainer.max_epochs and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    return losses


# ------------------------------------------------------------------------------------------ the sampler
class FakeTrainer:
    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def test_eval_loaders_shard_without_padding():
    dm = ToyLT(counts=(3, 2, 2), eval_batch_size=2)  # 12 test samples
    dm.setup("fit")
    dm.trainer = None
    assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    seen = []
    for rank in range(5):
        dm.trainer = FakeTrainer(5, rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
            assert list(loader.sampler) == list(range(rank, 12, 5))
        seen += list(dm.test_dataloader().sampler)
    assert sorted(seen) == list(range(12))  # each sample on exactly one rank, none repeated
    dm.trainer = FakeTrainer(13, 0)  # fewer samples than processes: Lightning's padded sampler, with a warning
    with pytest.warns(UserWarning, match="smaller than the 13 processes"):
        assert dm.eval_sampler(dm.test_dataset) is None


# ------------------------------------------------------------------------------------------ classification
COUNTS = [130, 100, 77, 60, 46, 36, 28, 21, 16, 13]  # DigitsLT(imbalance_factor=10)


class OddDigits(DigitsLT):
    """DigitsLT with a 29-image test split (3 per class, one left out): an odd evaluation set."""

    def setup(self, stage: str = "fit") -> None:
        super().setup(stage)
        if not isinstance(self.test_dataset, Subset):
            self.test_dataset = Subset(self.test_dataset, range(len(self.test_dataset) - 1))


def digits(**kwargs) -> OddDigits:
    return OddDigits(**{**dict(test_per_class=3, batch_size=32, eval_batch_size=2, num_workers=0), **kwargs})


def classifier(**kwargs) -> LongTailClassifier:
    defaults = dict(
        backbone=MLP(64, (32,)), num_classes=10, class_counts=COUNTS, loss=CrossEntropyLoss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), many_threshold=60, few_threshold=20,
        plot_per_class=False,
    )  # fmt: skip
    return LongTailClassifier(**{**defaults, **kwargs})


def test_classification_ddp_validation_equals_one_process(tmp_path):
    single, ddp = validate_one_and_two(tmp_path, classifier, digits, train=True)
    assert 0 < single["val/acc"] < 1 and "val/acc_few" in single
    assert_same_metrics(single, ddp)


def test_logged_loss_is_sample_weighted(tmp_path):
    """Lightning 2.6 averages the batch-size weights of `self.log(sync_dist=True)` in an integer tensor, which
    would scale a loss logged over unequal shares by N / (N - 1); the task modules accumulate evaluation losses
    in a `MeanMetric` (summed states) instead."""
    single, ddp = validate_one_and_two(tmp_path, classifier, digits)
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], abs=1e-6, rel=0)


def test_classification_ddp_training_loss_falls(tmp_path):
    seed_everything(0)
    fit_two_processes(tmp_path, classifier(), digits(), max_epochs=3, limit_train_batches=4)


class WeightsRecord(Callback):
    """Writes each rank's flattened weights and optimizer class at the end of fit."""

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        torch.save(
            {"weights": weights, "optimizer": type(trainer.optimizers[0]).__name__},
            Path(trainer.default_root_dir, f"rank{trainer.global_rank}.pt"),
        )


SAM_CALLBACKS = {
    "sam": lambda: SAM(rho=0.05),
    "imbsam": lambda: ImbSAM(rho=0.05, tail_threshold=30),
    "ssesam": lambda: SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=30, gamma=0.5),
    "optimizer_stages": lambda: OptimizerStages({0: None, 1: functools.partial(SAMOptimizer, rho=0.05)}),
}


@pytest.mark.parametrize("name", list(SAM_CALLBACKS))
def test_sam_family_ddp_fit_completes(tmp_path, name):
    seed_everything(0)
    trainer = make_trainer(
        tmp_path, devices=2, max_epochs=2, limit_train_batches=2, callbacks=[SAM_CALLBACKS[name](), WeightsRecord()]
    )
    trainer.fit(classifier(), datamodule=digits())
    assert trainer.state.finished
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(records[0]["weights"], records[1]["weights"])  # the updates were all-reduced
    assert torch.isfinite(records[0]["weights"]).all()
    assert math.isfinite(float(trainer.callback_metrics["val/acc"]))


# ------------------------------------------------------------------------------------------ random draws per rank
@pytest.mark.filterwarnings("ignore:.*no `validation_step`")
@pytest.mark.parametrize(("num_workers", "seed_workers"), [(0, False), (2, False), (2, True)])
def test_ranks_draw_their_own_augmentation_and_dropout(tmp_path, num_workers, seed_workers):
    """Each rank draws its own data augmentation (in the main process or in its workers) and dropout masks; rank 0
    draws what a single process draws. Before, every rank reseeded with the same seed each epoch and the workers of
    every rank got the same base seed, so rank r's i-th sample had rank 0's crop, flip and dropout mask (only
    Lightning's `worker_init_fn`, with `seed_everything(workers=True)`, separated the workers)."""
    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        root.mkdir()
        seed_everything(0, workers=seed_workers)
        trainer = make_trainer(root, devices=devices, max_epochs=2, limit_val_batches=0)
        trainer.fit(DrawRecorder(str(root)), datamodule=RandomToy(num_workers=num_workers, batch_size=4))
        runs[devices] = [json.loads((root / f"rank{r}.json").read_text()) for r in range(devices)]
    (single,), (rank0, rank1) = runs[1], runs[2]
    assert len(rank0) == len(rank1) == 6 and len(single) == 12  # 24 samples, batches of 4, 2 epochs
    for (epoch, _, draws0, mask0), (_, _, draws1, mask1) in zip(rank0, rank1):
        assert draws0 != draws1 and mask0 != mask1, epoch
    for epoch in (0, 1):
        # a step runs after the next batch was fetched, so the shorter epoch's last step draws at another point
        expected = [d[2:] for d in single if d[0] == epoch][:2]
        assert [d[2:] for d in rank0 if d[0] == epoch][:2] == expected


# ------------------------------------------------------------------------------------------ segmentation
@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("camvid")
    make_camvid(root, counts=(4, 5, 1))  # 5 validation images
    return str(root)


def camvid(root: str, **kwargs) -> CamVid:
    defaults = dict(crop_size=(16, 20), scale_range=(1.0, 1.0), hflip=0.0, batch_size=2, eval_batch_size=1,
                    num_workers=0, seed=0)  # fmt: skip
    return CamVid(root, **{**defaults, **kwargs})


def segmenter(root: str) -> SegmentationModule:
    dm = camvid(root)
    return SegmentationModule(
        TinySegNet, num_classes=dm.num_classes, class_counts=dm.class_counts, class_names=dm.class_names,
        ignore_index=dm.ignore_index, tail_classes=[9, 10], optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        plot_per_class=False,
    )  # fmt: skip


def test_segmentation_ddp_validation_equals_one_process(tmp_path, camvid_root):
    # eval_batch_size=1: the logged loss (mean over an image's labelled pixels) does not depend on batching
    single, ddp = validate_one_and_two(tmp_path, lambda: segmenter(camvid_root), lambda: camvid(camvid_root))
    assert 0 < single["val/miou"] < 1 and "val/miou_tail" in single
    assert_same_metrics(single, ddp)


def test_segmentation_ddp_training_loss_falls(tmp_path, camvid_root):
    seed_everything(0)
    fit_two_processes(tmp_path, segmenter(camvid_root), camvid(camvid_root), max_epochs=3)


# ------------------------------------------------------------------------------------------ multi-label OOD
NAMES = ["dog", "cat", "person", "car", "bus", "sheep", "sofa", "train"]


@pytest.fixture(scope="module")
def voc_ood(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("voc_ood")
    # "person" in 7 of the 8 training images (head), every other label in at most 1 (tail)
    annotations = {f"{i:06d}": [(NAMES[i % 8], 0)] + [("person", 0)] * (i < 7) for i in range(11)}
    ids = list(annotations)
    devkit = make_voc(tmp / "VOCdevkit", annotations, {"trainval": ids[:8], "test": ids[8:]})  # 3 ID test images
    write_image_folder(str(tmp / "ood"), {"oe_a": 4, "oe_b": 4, "test_c": 2}, size=(36, 28))  # + 2 OOD: 5
    return str(devkit), str(tmp / "ood")


def voc(paths, **kwargs) -> VOCMultiLabel:
    devkit, ood = paths
    defaults = dict(ood_root=ood, oe_classes=["oe_a", "oe_b"], ood_classes=["test_c"], image_size=16,
                    batch_size=4, oe_batch_size=4, eval_batch_size=2, num_workers=0, tail_threshold=3)  # fmt: skip
    return VOCMultiLabel(devkit, **{**defaults, **kwargs})


def multilabel(paths) -> MultiLabelOODModule:
    dm = voc(paths)
    return MultiLabelOODModule(
        MLP(3 * 16 * 16, (16,)), num_classes=dm.num_classes, class_counts=dm.class_counts,
        class_names=dm.class_names, tail_threshold=3, gap_start_epoch=100,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), plot_histogram=False,
    )  # fmt: skip


def test_multilabel_ood_ddp_validation_equals_one_process(tmp_path, voc_ood):
    single, ddp = validate_one_and_two(tmp_path, lambda: multilabel(voc_ood), lambda: voc(voc_ood))
    assert "val/map" in single
    assert_same_metrics(single, ddp)


def test_multilabel_ood_ddp_training_loss_falls(tmp_path, voc_ood):
    seed_everything(0)
    fit_two_processes(tmp_path, multilabel(voc_ood), voc(voc_ood), max_epochs=3)


# ------------------------------------------------------------------------------------------ detection
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("coco")
    boxes = lambda ids: [(i, [1, 18, 90][i % 3], [2 + i, 3, 14, 12], 0) for i in ids]  # noqa: E731
    write_coco(root, "train", [(i, f"{i}.jpg") for i in range(1, 5)], boxes(range(1, 5)))
    write_coco(root, "val", [(i, f"{i}.jpg") for i in range(11, 16)], boxes(range(11, 16)))  # 5 images
    return str(root)


def coco(root: str, **kwargs) -> COCODetection:
    defaults = dict(train_split="train", val_split="val", hflip=0.0, batch_size=2, eval_batch_size=2,
                    num_workers=0)  # fmt: skip
    return COCODetection(root, **{**defaults, **kwargs})


def detector(root: str) -> DetectionModule:
    dm = coco(root)
    return DetectionModule(
        num_classes=dm.num_classes, class_counts=dm.class_counts, class_names=dm.class_names, backbone="resnet18",
        min_size=64, max_size=64, score_thresh=0.0, optimizer=functools.partial(torch.optim.SGD, lr=0.01),
    )  # fmt: skip


def test_detection_ddp_validation_equals_one_process(tmp_path, coco_root):
    single, ddp = validate_one_and_two(tmp_path, lambda: detector(coco_root), lambda: coco(coco_root))
    assert "val/map" in single
    assert_same_metrics(single, ddp)


def test_detection_ddp_training_loss_falls(tmp_path, coco_root):
    seed_everything(0)
    fit_two_processes(tmp_path, detector(coco_root), coco(coco_root), max_epochs=3, limit_val_batches=1)
