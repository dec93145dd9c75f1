"""AUCSeg on real CamVid, reduced resolution, CPU: CE vs CE + pixel AUC vs CE + AUC + Tail Memory Bank.

One schedule for the three rows: LR-ASPP MobileNetV3-Large from scratch (no pretrained weights can be
downloaded here), CamVid train split (367 images) resized to ``--size`` (default 120 x 160, a third of
480 x 360) with random scale 0.75-1.5, crop and flip; AdamW with a poly schedule; the final model is
evaluated on the test split (233 images) at the same size. Rows:

* ``CE``: cross-entropy;
* ``CE+AUC``: CE + 1.0 * PixelAUCLoss (square surrogate, one-vs-one, gamma 1), AUCSeg's loss;
* ``CE+AUC+TMB``: the same plus :class:`~lightning_lt.callbacks.TailMemoryBank` (5 entries per tail class,
  p_sample 1, p_resize 1, AUCSeg's road-scene setting, AUCSeg's placement: with p_resize 1 on fixed-size
  crops an object is pasted where it was in its own image).

Tail classes (head/tail mIoU and the memory bank): Pole, SignSymbol, Fence, Pedestrian, Bicyclist (ids 2,
6, 7, 9, 10), the five classes with under 1.3% of the training pixels (``pixel_tail_classes(counts, 0.5)``).

Keys: ``miou``, ``miou_head``, ``miou_tail``, ``pixel_acc`` (test split, final epoch) and ``step_s``, the
median training-step time (``on_train_batch_start`` to ``on_train_batch_end``, memory bank included). The
memory bank's overhead is reported two ways: ``tmb_overhead`` measured inside the TMB run (time spent in the
bank / the rest of the step: robust to machine noise) and ``step_ratio_to_ce_auc`` across runs.

    python benchmarks/camvid.py                      # about 25 minutes on 2 CPU cores
    python benchmarks/camvid.py --epochs 2 --name camvid-smoke
    python benchmarks/camvid.py --methods CE+AUC+TMB --keep-rows --note "why the row was re-run"

``--keep-rows`` keeps the rows of the methods not run from the existing ``results/<name>.json`` (whose
setup must be the same), so that one row can be re-run; ``--note`` adds a line to the markdown note.

**Pretrained encoder** (``--pretrained efficientnet_lite0``): :class:`~lightning_lt.nets.EfficientNetLiteSegmentation`
(LR-ASPP head on the ImageNet-pretrained EfficientNet-Lite encoder, output stride 16, ``--trainable-layers``
levels trained) replaces ``--arch``; the DataModule's ImageNet-normalised images are mapped to the encoder's
normalisation (:class:`common.InputRenormalization`). ``--seeds 0 1 2`` runs every method once per seed (seeds
outer, methods inner) and reports the mean and sample standard deviation per key (``<key>_std``), with the
effect on ``miou_tail`` of each method against CE in standard deviations in the note::

    python benchmarks/camvid.py --pretrained efficientnet_lite0 --seeds 0 1 --size 120 160 --epochs 10 \
        --lr 1e-3 --trainable-layers 3 --name camvid-pretrained     # 38 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    InputRenormalization,
    aggregate_seeds,
    describe_effect,
    default_shared_data,
    environment,
    set_threads,
    write_results,
)

from lightning_lt.callbacks import TailMemoryBank  # noqa: E402
from lightning_lt.datamodules import CamVid  # noqa: E402
from lightning_lt.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lightning_lt.losses import PixelAUCLoss  # noqa: E402
from lightning_lt.metrics.segmentation import pixel_tail_classes  # noqa: E402
from lightning_lt.nets import (  # noqa: E402
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EfficientNetLiteSegmentation,
    TorchvisionSegmentation,
    available_efficientnet_lite,
)
from lightning_lt.tasks import SegmentationModule  # noqa: E402

METHODS = ("CE", "CE+AUC", "CE+AUC+TMB")
COLUMNS = ("miou", "miou_head", "miou_tail", "pixel_acc", "step_s", "tmb_overhead", "step_ratio_to_ce_auc", "train_minutes")
TAIL_SHARE = 0.5


class StepTimer(Callback):
    """Wall time of every training step, from ``on_train_batch_start`` to ``on_train_batch_end``.

    Put it first in the callback list, so that the other callbacks' batch-start work (the memory bank) is
    inside the measured interval."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch > 0:  # the first epoch warms up (allocator, lazy initialisation)
            self.times.append(time.perf_counter() - self._start)


class TimedBank(TailMemoryBank):
    """The memory bank, with the time spent in its batch hook recorded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.current_epoch > 0:
            self.times.append(time.perf_counter() - start)


def build_net(num_classes: int, args: argparse.Namespace) -> torch.nn.Module:
    """``--arch`` from scratch, or the pretrained EfficientNet-Lite LR-ASPP net fed its own normalisation."""
    if args.pretrained is None:
        return TorchvisionSegmentation(num_classes, arch=args.arch)
    net = EfficientNetLiteSegmentation(num_classes, name=args.pretrained, head="lraspp",
                                       trainable_layers=args.trainable_layers)
    return InputRenormalization(net, IMAGENET_MEAN, IMAGENET_STD, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)


def run(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(seed, workers=True)
    size = tuple(args.size)
    data = CamVid(
        args.root, crop_size=size, base_size=size, scale_range=(0.75, 1.5), eval_size=size, val_split="val",
        batch_size=args.batch_size, num_workers=args.num_workers, seed=seed,
    )
    tail = pixel_tail_classes(data.class_counts, TAIL_SHARE)
    steps = args.epochs * -(-len(data.split_samples("train")) // args.batch_size)
    module = SegmentationModule(
        lambda num_classes: build_net(num_classes, args),
        num_classes=data.num_classes, class_counts=data.class_counts, class_names=data.class_names,
        auc_loss=PixelAUCLoss() if "AUC" in method else None, auc_weight=1.0, tail_classes=tail,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.01),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=steps, power=0.9),
        log_per_class=False, plot_per_class=False,
    )
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    bank = None
    if method.endswith("TMB"):
        bank = TimedBank(memory_size=5, p_sample=1.0, p_resize=1.0)
        callbacks.append(bank)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=max(1, args.epochs), default_root_dir=args.work_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    (result,) = trainer.test(module, datamodule=data, verbose=False)
    row = {
        "name": method,
        "seed": seed,
        "miou": result["test/miou"],
        "miou_head": result["test/miou_head"],
        "miou_tail": result["test/miou_tail"],
        "pixel_acc": result["test/pixel_acc"],
        "step_s": statistics.median(timer.times),
        "train_minutes": minutes,
        "steps": len(timer.times),
    }
    if bank is not None:
        bank_s = statistics.mean(bank.times)
        row["tmb_overhead"] = bank_s / (statistics.mean(timer.times) - bank_s)
        row["tmb_s"] = bank_s
        row["tmb_entries"] = sum(bank.num_entries().values())
    print(row, flush=True)
    return row


def effect_notes(by_name: dict[str, dict[str, Any]], n_seeds: int) -> list[str]:
    """With several seeds: each method against CE on ``miou_tail`` (AUCSeg's claim: higher), in standard deviations."""
    if n_seeds < 2 or "CE" not in by_name:
        return []
    lines = ["", f"Effect on miou_tail against CE ({n_seeds} seeds; d = mean(method) - mean(CE); pooled std = "
             "sqrt((s_CE^2 + s_method^2) / 2), sample stds; paired std = sample std of the per-seed differences, "
             "same seed = same head initialisation and data order):"]
    for name, row in by_name.items():
        if name == "CE":
            continue
        diff, text = describe_effect(by_name["CE"], row, "miou_tail")
        direction = "holds" if diff > 0 else "does not hold"
        lines.append(f"- {name}: {text}: the published direction ({name} > CE on tail mIoU) {direction} here.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_shared_data("camvid"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="one run per method and seed; with several, mean and std per key")
    parser.add_argument("--pretrained", choices=available_efficientnet_lite(),
                        help="ImageNet-pretrained EfficientNet-Lite encoder (LR-ASPP head) instead of --arch")
    parser.add_argument("--trainable-layers", type=int, default=5,
                        help="with --pretrained: encoder levels trained, counted from the last (5: all)")
    parser.add_argument("--work-dir", default="/tmp/lightning_lt_camvid_bench")
    parser.add_argument("--name", default="camvid")
    parser.add_argument("--keep-rows", action="store_true", help="keep the other methods' rows of the existing results")
    parser.add_argument("--note", action="append", default=[], help="a line added to the markdown note")
    args = parser.parse_args()
    if not Path(args.root).exists():
        parser.error(f"CamVid not found at {args.root}; pass --root (SegNet layout)")
    set_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    runs = {method: [] for method in args.methods}
    for seed in args.seeds:  # seeds outer: a slow phase of the shared machine hits every method alike
        for method in args.methods:
            runs[method].append(run(method, seed, args))
    if len(args.seeds) == 1:
        rows = [runs[method][0] for method in args.methods]
        for row in rows:
            row.pop("seed")
    else:
        if "CE+AUC" in runs and "CE+AUC+TMB" in runs:  # the ratio within each seed, then its mean and std
            for tmb, auc in zip(runs["CE+AUC+TMB"], runs["CE+AUC"]):
                tmb["step_ratio_to_ce_auc"] = tmb["step_s"] / auc["step_s"]
        rows = [aggregate_seeds(runs[method]) for method in args.methods]
    if args.keep_rows and (RESULTS_DIR / f"{args.name}.json").exists():
        kept = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())["rows"]
        new = {row["name"]: row for row in rows}
        rows = [new.pop(row["name"], row) for row in kept] + list(new.values())
    by_name = {row["name"]: row for row in rows}
    if "CE+AUC" in by_name and "CE+AUC+TMB" in by_name and len(args.seeds) == 1:
        by_name["CE+AUC+TMB"]["step_ratio_to_ce_auc"] = by_name["CE+AUC+TMB"]["step_s"] / by_name["CE+AUC"]["step_s"]
    setup = {
        "data": "CamVid (SegNet layout), train 367 -> test 233 images",
        "size": args.size,
        "arch": f"{args.arch} (random init)" if args.pretrained is None else (
            f"LR-ASPP on {args.pretrained} (ImageNet-pretrained encoder from the weight wheel, output stride 16, "
            f"{args.trainable_layers} of 5 levels trained; head random init; inputs renormalised to the encoder's "
            "(x * 255 - 127) / 128)"
        ),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW lr {args.lr} wd 0.01, poly 0.9 per step",
        "augmentation": "random scale 0.75-1.5, crop, hflip",
        "tail_classes": "Pole, SignSymbol, Fence, Pedestrian, Bicyclist (pixel share < 0.5/11)",
        "auc": "square surrogate, one-vs-one, gamma 1, lambda 1",
        "tmb": "memory_size 5, p_sample 1, p_resize 1, placement reference (AUCSeg)",
        "seed": args.seeds[0] if len(args.seeds) == 1 else args.seeds,
        **environment(),
    }
    notes = [
        "miou / miou_head / miou_tail / pixel_acc: test split, final epoch. step_s: median training step "
        "(memory bank included). tmb_overhead: time in the memory bank / rest of the step, measured inside the "
        "CE+AUC+TMB run; step_ratio_to_ce_auc compares step_s across runs (noisier).",
        *effect_notes(by_name, len(args.seeds)),
        *args.note,
    ]
    print(write_results(args.name, setup, rows, COLUMNS, notes, results_dir=RESULTS_DIR))


if __name__ == "__main__":
    main()
