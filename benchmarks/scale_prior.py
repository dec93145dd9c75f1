"""Row ``sampling-free-prior`` of ``benchmarks/scale.py``: the sampling-free prior count against one epoch.

On COCO-128 (``../shared/data/coco128``, 128 training images, the detection benchmark's setting: RetinaNet,
ResNet-18-FPN, shorter side 160, longer side <= 240, batch 4): ``prior_s`` is
``DetectionModule.count_assignments(train_dataloader)`` (image sizes and boxes only: the detector's resize
and anchors on ``meta`` tensors, no backbone forward; the loader still decodes the images), ``epoch_s`` one
training epoch of ``Trainer.fit`` over the same loader. ``ratio`` = prior_s / epoch_s (target <= 0.1).
With ``--quick``: 16 images.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from argparse import Namespace
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import Subset

from common import default_shared_data  # noqa: E402  (benchmarks/ is on sys.path when scale.py runs)

from lightning_lt.datamodules import COCODetection
from lightning_lt.tasks import DetectionModule

ROW = "sampling-free-prior"


def run(args: Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    quick = getattr(args, "quick", False)
    seed_everything(0)
    data = COCODetection(default_shared_data("coco128"), image_size=160, max_size=240, batch_size=4, num_workers=0)
    data.setup("fit")
    if quick:
        data.train_dataset = Subset(data.train_dataset, range(16))  # type: ignore[attr-defined]
    module = DetectionModule(
        "retinanet", num_classes=data.num_classes, class_counts=data.class_counts, class_names=data.class_names,
        backbone="resnet18", min_size=160, max_size=240, sampling_free=True, log_per_class=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4),
    )
    loader = data.train_dataloader()
    start = time.perf_counter()
    fg, bg = module.count_assignments(loader)
    prior_s = time.perf_counter() - start
    module.prior_pi.fill_(fg / (fg + bg) / data.num_classes)  # counted: fit does not count again
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=0, default_root_dir=root)
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        epoch_s = time.perf_counter() - start
    row = {"name": ROW, "prior_s": prior_s, "epoch_s": epoch_s, "ratio": prior_s / epoch_s, "target_ratio": 0.1,
           "foreground": fg, "background": bg}
    setup = {"data": "COCO-128 train2017" + (" (16 images, --quick)" if quick else " (128 images)"),
             "detector": "RetinaNet, ResNet-18-FPN, shorter side 160, longer <= 240, batch 4, loader without workers",
             "prior": "count_assignments: resize / anchors from image sizes on meta tensors, no backbone forward"}
    return row, setup
