"""Row ``device-data-path`` of ``benchmarks/scale.py``: ``fit`` throughput of the device-resident data path.

The same ``Trainer.fit`` (``LongTailClassifier``, ResNet-32, cross-entropy, SGD lr 0.1, batch 128, fp32; the CE
method of ``cifar10_lt.py``) on CIFAR-10-LT (imbalance factor 100, 12,406 images) from
``../shared/data/cifar10-jpeg`` through ``ImageFolderLT``, fed three ways:

* ``device``: ``ImageFolderLT(device_data=True)``, images on the device, crop / flip / normalisation per batch there;
* ``compute-only``: one fixed synthetic batch already on the device, served again at every step (no data
  loading at all: the limit of any data path);
* ``loader``: ``ImageFolderLT()`` as it is today, every image decoded with PIL and augmented in ``DataLoader``
  workers (``--loader-workers``; 4 on a GPU, as in the configs).

Images/s are measured by ``common.TrainThroughput`` (from the end of an epoch's first batch to the end of its
last); on the CPU one epoch of ``steps + 1`` batches per fit, on a GPU ``--gpu-epochs`` full epochs of which the
first is not counted. The three fits alternate ``repeats`` times and the medians are reported, with the ratios
``ratio_to_compute_only`` (device / compute-only; target >= 0.8 on a GPU), ``ratio_loader_to_compute_only``
and ``ratio_device_to_loader``. ``data_images_per_s_*`` time the two real training loaders alone (no model),
and ``full_run_minutes_extrapolated`` is the training time of the 200-epoch schedule at the measured rate
(without validation). ``--full-run`` also trains the whole schedule (200 epochs by default, the LDAM-DRW
schedule with CE, validation every epoch) on the device path and reports its measured wall time and final
accuracy.

    python benchmarks/scale.py --rows device-data-path --keep-rows                    # CPU, a few hundred steps
    python benchmarks/scale_device.py --full-run --accelerator gpu --name scale-gpu --keep-rows   # on a GPU

``scale_device.py`` takes the options below and passes the others to ``scale.py`` (with ``--rows device-data-path``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_lt import METHODS, Schedule, build_model  # noqa: E402
from common import TrainThroughput, default_shared_data, synchronize  # noqa: E402

from lightning_lt.datamodules import ImageFolderLT  # noqa: E402

ROW = "device-data-path"
FULL_EPOCHS = 200

#: Options of this row (``scale.py`` has no room for them); set by :func:`main`, read by :func:`run`.
OPTIONS = argparse.Namespace(
    root=default_shared_data("cifar10-jpeg"), steps=20, repeats=3, gpu_epochs=3, loader_workers=None,
    full_run=False, full_run_epochs=FULL_EPOCHS, batch_size=128,
)


class SyntheticBatches:
    """``length`` times one fixed ``[x, y]`` batch already on the device: training without any data loading."""

    def __init__(self, batch: list[torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


def _trainer(args: argparse.Namespace, **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator=args.accelerator, devices=1, precision="32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        benchmark=args.accelerator == "gpu", **kwargs,
    )  # fmt: skip


def fit_images_per_s(dm: ImageFolderLT, data: Any, args: argparse.Namespace, opts: argparse.Namespace) -> float:
    """Training images/s of one ``fit`` of the CE model fed by ``data`` (a data module or an iterable)."""
    seed_everything(0)
    model = build_model(dm, METHODS["CE"], Schedule(FULL_EPOCHS), lr=0.1)
    if args.accelerator == "gpu":
        throughput = TrainThroughput(skip_epochs=1)
        limits = {"max_epochs": opts.gpu_epochs}
    else:
        throughput = TrainThroughput(skip_epochs=0)
        limits = {"max_epochs": 1, "limit_train_batches": opts.steps + 1}
    trainer = _trainer(args, limit_val_batches=0, callbacks=[throughput], **limits)
    if isinstance(data, ImageFolderLT):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, train_dataloaders=data)
    return throughput.images_per_s


def data_images_per_s(dm: ImageFolderLT, batches: int, device: torch.device) -> float:
    """Images/s of iterating ``dm``'s training loader alone (batches moved to ``device``), after its first batch."""
    loader = dm.train_dataloader()
    images, start = 0, None
    for step, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        if step == 0:
            synchronize(device)
            start = time.perf_counter()
        else:
            images += y.shape[0]
        if step == batches:
            break
    synchronize(device)
    return images / (time.perf_counter() - start)


def full_run(dm: ImageFolderLT, args: argparse.Namespace, epochs: int) -> dict[str, float]:
    """The whole schedule on the device path (validation every epoch): wall minutes, images/s, final accuracy."""
    seed_everything(0)
    model = build_model(dm, METHODS["CE"], Schedule(epochs), lr=0.1)
    throughput = TrainThroughput(skip_epochs=1)
    trainer = _trainer(args, max_epochs=epochs, check_val_every_n_epoch=1, callbacks=[throughput])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    minutes = (time.perf_counter() - start) / 60
    return {
        "full_run_minutes": minutes,
        "full_run_images_per_s": throughput.images_per_s,
        "full_run_acc": float(trainer.callback_metrics["val/acc"]),
        "full_run_epochs": epochs,
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    opts = argparse.Namespace(**{k: getattr(args, k, v) for k, v in vars(OPTIONS).items()})
    if args.quick:
        opts.steps, opts.repeats, opts.gpu_epochs = 2, 1, 2
    gpu = args.accelerator == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    workers = opts.loader_workers if opts.loader_workers is not None else (4 if gpu else min(2, os.cpu_count() or 1))
    common = {"root": opts.root, "imbalance_factor": 100, "batch_size": opts.batch_size}
    device_dm = ImageFolderLT(**common, device_data=True)
    loader_dm = ImageFolderLT(**common, num_workers=workers, pin_memory=gpu)
    start = time.perf_counter()
    device_dm.setup("fit")
    decode_seconds = time.perf_counter() - start
    loader_dm.setup("fit")

    targets = torch.tensor(device_dm.train_targets())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(opts.batch_size, 3, 32, 32, generator=generator)
    y = targets[torch.randint(len(targets), (opts.batch_size,), generator=generator)]
    batches_per_epoch = math.ceil(len(targets) / opts.batch_size)
    synthetic = SyntheticBatches([x.to(device), y.to(device)], batches_per_epoch if gpu else opts.steps + 1)

    samples: dict[str, list[float]] = {"device": [], "compute_only": [], "loader": []}
    for _ in range(opts.repeats):  # alternate, so that drifts of a shared machine hit all three alike
        samples["compute_only"].append(fit_images_per_s(device_dm, synthetic, args, opts))
        samples["device"].append(fit_images_per_s(device_dm, device_dm, args, opts))
        samples["loader"].append(fit_images_per_s(loader_dm, loader_dm, args, opts))
    median = {k: statistics.median(v) for k, v in samples.items()}
    data_batches = batches_per_epoch if gpu else 2 * opts.steps
    data = {name: data_images_per_s(dm, data_batches, device) for name, dm in (("device", device_dm), ("loader", loader_dm))}

    images_per_epoch = sum(device_dm.class_counts)
    row: dict[str, Any] = {
        "name": ROW,
        "images_per_s": median["device"],
        "images_per_s_compute_only": median["compute_only"],
        "images_per_s_loader": median["loader"],
        "ratio_to_compute_only": median["device"] / median["compute_only"],
        "ratio_loader_to_compute_only": median["loader"] / median["compute_only"],
        "ratio_device_to_loader": median["device"] / median["loader"],
        "data_images_per_s_device": data["device"],
        "data_images_per_s_loader": data["loader"],
        "full_run_minutes_extrapolated": FULL_EPOCHS * images_per_epoch / median["device"] / 60,
    }
    if opts.full_run:
        row.update(full_run(device_dm, args, opts.full_run_epochs))
    fits = (f"{opts.gpu_epochs} full epochs per fit, the first not counted" if gpu
            else f"1 epoch of {opts.steps + 1} batches per fit, the first not counted")  # fmt: skip
    setup = {
        "what": "images/s of Trainer.fit (LongTailClassifier, ResNet-32, CE, SGD lr 0.1, batch "
                f"{opts.batch_size}, fp32) on CIFAR-10-LT IF=100 ({images_per_epoch} images) from "
                f"{Path(opts.root).name} via ImageFolderLT: device_data=True vs one fixed synthetic batch on the "
                f"device (compute only) vs the PIL + DataLoader path ({workers} workers); {fits}; medians of "
                f"{opts.repeats} alternating repeats",
        "accelerator": args.accelerator,
        "samples_images_per_s": samples,
        "data_only": f"training loader alone, {data_batches} batches after the first",
        "decode_seconds": decode_seconds,
        "full_run_minutes_extrapolated": f"{FULL_EPOCHS} epochs x {images_per_epoch} images at images_per_s, "
                                         "training only (no validation, no start-up)",
    }
    if opts.full_run:
        setup["full_run"] = (f"{opts.full_run_epochs}-epoch LDAM-DRW schedule with CE on the device path, validation "
                             "every epoch; wall minutes of fit, final-epoch val/acc")
    return row, setup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=OPTIONS.root, help="CIFAR-10 folder root/{train,test}/<class>/*.jpg")
    parser.add_argument("--steps", type=int, default=OPTIONS.steps, help="timed steps per fit on the CPU")
    parser.add_argument("--repeats", type=int, default=OPTIONS.repeats)
    parser.add_argument("--gpu-epochs", type=int, default=OPTIONS.gpu_epochs, help="epochs per fit on a GPU")
    parser.add_argument("--loader-workers", type=int, default=None, help="workers of the PIL loader (4 on a GPU)")
    parser.add_argument("--full-run", action="store_true", help="also train the whole schedule on the device path")
    parser.add_argument("--full-run-epochs", type=int, default=FULL_EPOCHS)
    own, rest = parser.parse_known_args(argv)
    for key, value in vars(own).items():
        setattr(OPTIONS, key, value)
    import scale

    scale.main(["--rows", ROW, *rest])


if __name__ == "__main__":
    main()
