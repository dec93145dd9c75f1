"""Training throughput of the classification task with 1 and 2 DDP processes on CPU.

CIFAR ResNet-20 (``lightning_lt.nets.CIFARResNet(20)``) + ``LongTailClassifier`` on in-memory random
3x32x32 images (so that data loading is not measured), batch ``--batch-size`` per process (weak scaling:
the global batch doubles with 2 processes), SGD. The cores are split between the processes: 1 process uses
every core for intra-op threads, 2 processes use half each (``torch.set_num_threads``). ``images_per_s`` is
the total over all processes, counted from the end of the first batch of the second epoch to the end of
its last batch (TrainThroughput). Rows ``1-process`` and ``2-process``; the second also has
``ratio_to_1_process``. On a machine with N GPUs the same script measures GPU scaling
(``--accelerator gpu``).

    python benchmarks/ddp_scaling.py                  # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, TrainThroughput, environment, write_results  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One fit with ``args.devices`` processes; rank 0 prints the total throughput as JSON."""
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lt.nets import CIFARResNet
    from lightning_lt.tasks import LongTailClassifier

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // args.devices) if args.accelerator == "cpu" else torch.get_num_threads())
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.samples, 3, 32, 32, generator=g), torch.randint(0, 10, (args.samples,), generator=g))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    module = LongTailClassifier(CIFARResNet(20), num_classes=10, log_per_class=False, plot_per_class=False)
    throughput = TrainThroughput(skip_epochs=1)
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[throughput], limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    per_rank = torch.tensor([throughput.images, throughput.seconds], dtype=torch.float64)
    totals = trainer.strategy.all_gather(per_rank).reshape(-1, 2) if args.devices > 1 else per_rank[None]
    if trainer.is_global_zero:
        # every rank times the same steps; the total rate is the sum of the ranks' rates
        rate = float(sum(images / seconds for images, seconds in totals.tolist()))
        print("RESULT " + json.dumps({"images_per_s": rate, "threads_per_process": torch.get_num_threads()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--name", default="ddp_scaling")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.devices = args.devices[0]
        worker(args)
        return

    rows = []
    for devices in args.devices:
        command = [sys.executable, __file__, "--worker", "--devices", str(devices), "--accelerator", args.accelerator,
                   "--batch-size", str(args.batch_size), "--samples", str(args.samples)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        rows.append({"name": f"{devices}-process", **result})
        print(rows[-1], flush=True)
    base = rows[0]["images_per_s"]
    for row in rows[1:]:
        row["ratio_to_1_process"] = row["images_per_s"] / base
    setup = {
        "task": "LongTailClassifier + CIFAR ResNet-20, 10 classes, in-memory random 3x32x32",
        "batch_size_per_process": args.batch_size,
        "samples": args.samples,
        "strategy": "ddp (gloo on CPU)",
        "accelerator": args.accelerator,
        "threads": "cores split evenly between the processes",
        **environment(),
    }
    notes = ["Weak scaling: each process keeps its batch size. On 2 CPU cores the two processes share the same "
             "cores that one process uses with 2 threads, so a ratio near 1 means DDP costs little; the ratio "
             "measures overhead here, not speed-up."]
    print(write_results(args.name, setup, rows, ("images_per_s", "ratio_to_1_process", "threads_per_process"), notes,
                        results_dir=RESULTS_DIR))


if __name__ == "__main__":
    main()
