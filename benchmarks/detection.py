"""Sampling-free vs focal-loss detection on real COCO-128, reduced image size, CPU.

RetinaNet and FCOS (torchvision, ResNet-18-FPN from scratch: no pretrained weights can be downloaded here),
trained on the 128 train2017 images of ``../shared/data/coco128`` and evaluated (COCO mAP) on its 128 val2017
images, images resized to a shorter side of ``--image-size`` (default 160). One schedule for every row:
SGD lr ``--lr`` with momentum 0.9, ``--epochs`` epochs, batch 4. Rows:

* ``RetinaNet-focal`` / ``FCOS-focal``: the stock focal loss (alpha 0.25, gamma 2, prior 0.01 bias);
* ``RetinaNet-SF`` / ``FCOS-SF``: sampling-free: optimal bias initialisation from one pass over the
  training set, plain BCE over all anchors (points) of the batch divided by its foreground anchors plus its
  images, with guided loss scaling, adaptive score threshold ``pi * K``.

The mAP is the module's ``val/map``: COCOeval of the detections mapped back to native pixels against the
val2017 json's own boxes and areas.

Keys: ``map`` (AP@[.5:.95]), ``ap50``, ``ap_rare`` / ``ap_common`` / ``ap_frequent`` (classes with 1-10 /
11-100 / >100 training boxes; coco128 has no class with more than 100 boxes except person), and
``images_per_s`` (training throughput from the second epoch on). The sampling-free rows also record ``pi``.

    python benchmarks/detection.py                    # about 20 minutes on 2 CPU cores
    python benchmarks/detection.py --epochs 1 --name detection-smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, TrainThroughput, default_shared_data, environment, set_threads, write_results  # noqa: E402

from lightning_lt.datamodules import COCODetection  # noqa: E402
from lightning_lt.tasks import DetectionModule  # noqa: E402

METHODS = ("RetinaNet-focal", "RetinaNet-SF", "FCOS-focal", "FCOS-SF")
COLUMNS = ("map", "ap50", "ap_rare", "ap_common", "ap_frequent", "images_per_s", "pi", "train_minutes")


class ListThroughput(TrainThroughput):
    """TrainThroughput for list-of-images batches."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        else:
            self._count += len(batch[0])
        self._last = now


def run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed, workers=True)
    arch = "retinanet" if method.startswith("RetinaNet") else "fcos"
    sampling_free = method.endswith("SF")
    data = COCODetection(args.root, image_size=args.image_size, max_size=args.max_size, batch_size=args.batch_size,
                         num_workers=args.num_workers, seed=args.seed)
    module = DetectionModule(
        arch, num_classes=data.num_classes, class_counts=data.class_counts, class_names=data.class_names,
        backbone=args.backbone, min_size=args.image_size, max_size=args.max_size, sampling_free=sampling_free,
        optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=1e-4),
        log_per_class=False,
    )
    throughput = ListThroughput(skip_epochs=1)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[throughput],
        check_val_every_n_epoch=args.epochs, gradient_clip_val=args.clip, default_root_dir=args.work_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    row = {
        "name": method,
        "map": metrics["val/map"],
        "ap50": metrics["val/ap50"],
        "ap_rare": metrics["val/ap_rare"],
        "ap_common": metrics["val/ap_common"],
        "ap_frequent": metrics["val/ap_frequent"],
        "images_per_s": throughput.images_per_s,
        "pi": float(module.prior_pi) if sampling_free else None,
        "train_minutes": minutes,
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_shared_data("coco128"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=240)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/lightning_lt_detection_bench")
    parser.add_argument("--name", default="detection")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the results note (what changed since the last run and why); repeatable")
    args = parser.parse_args()
    if not Path(args.root).exists():
        parser.error(f"COCO-128 not found at {args.root}; pass --root (COCO layout)")
    set_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    rows = [run(method, args) for method in args.methods]
    setup = {
        "data": "COCO-128: train2017 (128 images, 929 boxes) -> val2017 (128 images, 898 boxes), 80 classes",
        "image_size": f"shorter side {args.image_size}, longer side <= {args.max_size}",
        "backbone": f"{args.backbone}-FPN (random init, trainable batch norm)",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"SGD lr {args.lr} momentum 0.9 wd 1e-4, gradient clipping {args.clip}",
        "seed": args.seed,
        **environment(),
    }
    notes = ["All rows train from scratch on 128 images, so absolute AP is tiny; the comparison is focal vs "
             "sampling-free under the same schedule. images_per_s: training images per second from the second "
             "epoch on (data loading included). map: COCOeval of the detections in native pixels against "
             "the val2017 json's boxes and areas.", *args.note]
    print(write_results(args.name, setup, rows, COLUMNS, notes, results_dir=RESULTS_DIR))


if __name__ == "__main__":
    main()
