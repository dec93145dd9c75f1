"""Per-class values: scalars through ``self.log`` up to ``per_class_scalars_max`` classes, one structured
``log_metrics`` call per epoch above it (single process and 2-process DDP), values against a brute-force count."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.nets import MLP
from lightning_lt.tasks import LongTailClassifier, SegmentationModule
from tests.helpers import DDP_STRATEGY
from tests.tasks.seg_toy import IGNORE, NUM_CLASSES, ToySegData, TinySegNet

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:SegmentationModule has no tail classes:UserWarning",
    "ignore:.*LongTailAccuracy.*is empty:UserWarning",
)

C = 150  # above the default threshold of 100
PER_CLASS = 4


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call (in this process)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append(dict(metrics))


def make_model(num_classes: int = C, **kwargs) -> LongTailClassifier:
    torch.manual_seed(0)
    return LongTailClassifier(
        backbone=MLP(16, (32,)), num_classes=num_classes, class_counts=[10] * num_classes, loss=CrossEntropyLoss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), plot_per_class=False, **kwargs,
    )


def val_loader(num_classes: int = C) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    y = torch.arange(num_classes).repeat(PER_CLASS)
    x = torch.randn(len(y), 16, generator=generator) + 0.3 * torch.nn.functional.one_hot(y % 16, 16)
    return DataLoader(TensorDataset(x, y), batch_size=100)


def brute_force_class_acc(model: LongTailClassifier, loader: DataLoader) -> list[float]:
    x, y = loader.dataset.tensors
    with torch.no_grad():
        preds = model.eval()(x).argmax(dim=1)
    return [float((preds[y == c] == c).float().mean()) for c in range(model.num_classes)]


def make_trainer(tmp_path: Path, logger, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=kwargs.pop("devices", 1), logger=logger, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), **kwargs)


def class_keys(metrics, stage: str = "val", kind: str = "class_acc") -> list[str]:
    return [k for k in metrics if k.startswith(f"{stage}/{kind}/")]


def test_many_classes_go_out_as_one_structured_call(tmp_path):
    model, loader, logger = make_model(), val_loader(), RecordingLogger()
    trainer = make_trainer(tmp_path, logger)
    trainer.validate(model, loader, verbose=False)
    expected = brute_force_class_acc(model, loader)
    per_class_calls = [call for call in logger.calls if class_keys(call)]
    assert len(per_class_calls) == 1  # one call holding every class
    call = per_class_calls[0]
    assert class_keys(call) == [f"val/class_acc/{i}" for i in range(C)]
    assert [call[f"val/class_acc/{i}"] for i in range(C)] == pytest.approx(expected, abs=1e-6)
    assert not class_keys(trainer.callback_metrics)  # not C keys through self.log
    assert "val/acc" in trainer.callback_metrics  # the headline metrics are unchanged
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(sum(expected) / C, abs=1e-6)
    assert list(model.per_class_values["val"].values()) == pytest.approx(expected, abs=1e-6)


def test_few_classes_stay_scalars(tmp_path):
    model, loader, logger = make_model(num_classes=8), val_loader(8), RecordingLogger()
    trainer = make_trainer(tmp_path, logger)
    trainer.validate(model, loader, verbose=False)
    expected = brute_force_class_acc(model, loader)
    assert [float(trainer.callback_metrics[f"val/class_acc/{i}"]) for i in range(8)] == pytest.approx(expected, abs=1e-6)
    assert list(model.per_class_values["val"].values()) == pytest.approx(expected, abs=1e-6)


def test_threshold_is_an_argument_and_is_checked(tmp_path):
    model, loader, logger = make_model(num_classes=8, per_class_scalars_max=5), val_loader(8), RecordingLogger()
    trainer = make_trainer(tmp_path, logger)
    trainer.validate(model, loader, verbose=False)
    assert not class_keys(trainer.callback_metrics)
    assert sum(bool(class_keys(call)) for call in logger.calls) == 1
    model = make_model(num_classes=8, log_per_class=False)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, logger)
    trainer.validate(model, loader, verbose=False)
    assert not any(class_keys(call) for call in logger.calls) and not class_keys(trainer.callback_metrics)
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=r"`per_class_scalars_max` to be an integer >= 0"):
            make_model(num_classes=8, per_class_scalars_max=bad)


def _csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.rglob("metrics.csv")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_structured_values_reach_the_csv_logger(tmp_path):
    model, loader = make_model(), val_loader()
    make_trainer(tmp_path, CSVLogger(str(tmp_path))).validate(model, loader, verbose=False)
    expected = brute_force_class_acc(model, loader)
    rows = [row for row in _csv_rows(tmp_path) if row.get("val/class_acc/0")]
    assert len(rows) == 1
    assert [float(rows[0][f"val/class_acc/{i}"]) for i in range(C)] == pytest.approx(expected, abs=1e-6)


@pytest.mark.ddp
def test_ddp_structured_values_are_the_global_ones(tmp_path):
    """Each of 2 processes validates half of the set; rank zero writes one row with the global per-class values."""
    model, loader = make_model(), val_loader()
    make_trainer(tmp_path, CSVLogger(str(tmp_path)), devices=2, strategy=DDP_STRATEGY).validate(
        model, loader, verbose=False
    )
    expected = brute_force_class_acc(model, loader)
    rows = [row for row in _csv_rows(tmp_path) if row.get("val/class_acc/0")]
    assert len(rows) == 1
    assert [float(rows[0][f"val/class_acc/{i}"]) for i in range(C)] == pytest.approx(expected, abs=1e-6)


def test_segmentation_uses_the_same_switch(tmp_path):
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, ignore_index=IGNORE, per_class_scalars_max=0,
                                plot_per_class=False)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, logger, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=ToySegData())
    assert not class_keys(trainer.callback_metrics, kind="iou")
    calls = [call for call in logger.calls if class_keys(call, kind="iou")]
    assert len(calls) == 1 and len(class_keys(calls[0], kind="iou")) == NUM_CLASSES
    assert "val/miou" in trainer.callback_metrics
    values = [calls[0][key] for key in class_keys(calls[0], kind="iou")]
    assert values == pytest.approx(list(module.per_class_values["val"].values()), nan_ok=True)
    present = [v for v in values if v == v]  # a class absent from prediction and target has no IoU (nan)
    assert present and float(trainer.callback_metrics["val/miou"]) == pytest.approx(sum(present) / len(present), abs=1e-6)
