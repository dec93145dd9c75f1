"""Cost of an optimizer step with SAM, in a plain PyTorch loop and through the Lightning callbacks.

CIFAR ResNet-32 (``lightning_lt.nets.CIFARResNet(32)`` + a linear head, 10 classes), one fixed batch of
128 random 3x32x32 images held in memory (so data loading is not measured), CPU with every core.
Rows (``step_s`` = median seconds per optimizer step):

* ``SGD-loop``: plain PyTorch loop, forward + cross-entropy + backward + ``torch.optim.SGD`` step;
* ``SAM-loop``: the same loop stepping ``lightning_lt.optim.SAM(SGD, rho=0.05).step(closure)``;
* ``SGD-callback``: ``Trainer.fit`` of ``LongTailClassifier`` (same network, CE, SGD), no callback;
* ``SAM-callback``: the same with ``lightning_lt.callbacks.SAM(rho=0.05)``;
* ``SAM-every-4-callback``: the efficient option ``callbacks.SAM(rho=0.05, sam_every=4)``: one SAM step
  (2 passes) then three plain steps (1 pass); its ``step_s`` is the median over whole 4-step cycles
  of the cycle's mean step time.

Each row also has ``ratio_to_sgd_loop``; ``SAM-callback`` has ``ratio_to_sam_loop``. Lightning steps are
timed from ``on_train_batch_start`` to ``on_train_batch_end`` (so Lightning's per-step work, hooks and
``self.log``, is included); loop steps are timed around one iteration. Configurations run interleaved
in rounds (every configuration once per round, the order rotated each round), each with its own warm-up
steps, so that drifts of a noisy machine hit all alike. Writes ``benchmarks/results/sam_overhead.json``
and ``.md``. Targets: SAM-callback within 5% of SAM-loop; SAM-every-4-callback at most 1.35 x SGD-loop.

    python benchmarks/sam_overhead.py                 # about 3 minutes on 2 cores
    python benchmarks/sam_overhead.py --rounds 3 --steps 4 --name sam_overhead-quick
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, set_threads, write_results  # noqa: E402

from lightning_lt import callbacks as lt_callbacks  # noqa: E402
from lightning_lt import optim as lt_optim  # noqa: E402
from lightning_lt.losses import CrossEntropyLoss  # noqa: E402
from lightning_lt.nets import CIFARResNet  # noqa: E402
from lightning_lt.tasks import LongTailClassifier  # noqa: E402

COLUMNS = ("step_s", "passes_per_step", "ratio_to_sgd_loop", "ratio_to_sam_loop", "samples")
NUM_CLASSES = 10
RHO = 0.05
SAM_EVERY = 4
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 2e-4
CONFIGS = ("SGD-loop", "SAM-loop", "SGD-callback", "SAM-callback", "SAM-every-4-callback")
PASSES = {"SGD-loop": 1.0, "SAM-loop": 2.0, "SGD-callback": 1.0, "SAM-callback": 2.0,
          "SAM-every-4-callback": (SAM_EVERY + 1) / SAM_EVERY}


def make_batch(batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return x, y


def make_network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    backbone = CIFARResNet(32)
    return nn.Sequential(backbone, nn.Linear(backbone.num_features, NUM_CLASSES))


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


# ----------------------------------------------------------------------------------- plain loops
def time_loop(sam: bool, batch: tuple[Tensor, Tensor], warmup: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of ``steps`` iterations after ``warmup`` untimed ones."""
    model = make_network(seed)
    model.train()
    x, y = batch
    base = sgd(model.parameters())
    # model=: BatchNorm statistics are updated by the first pass only, as the callback does.
    optimizer = lt_optim.SAM(base, rho=RHO, model=model) if sam else base
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        if sam:
            def closure() -> Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


# ------------------------------------------------------------------------------------- Lightning
class _RepeatBatch(Dataset):
    """``length`` copies of one in-memory batch (the loader does no collation: ``batch_size=None``)."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class StepTimer(Callback):
    """Seconds from ``on_train_batch_start`` to ``on_train_batch_end`` of every batch after ``warmup``;
    ``sam_phase`` records, for a SAM wrapper with ``sam_every``, the step's position in its cycle."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.phases: list[int | None] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            optimizer = trainer.strategy.optimizers[0]
            if isinstance(optimizer, lt_optim.GroupSAM):
                self.phases.append(optimizer.sam_steps % optimizer.sam_every)
            else:
                self.phases.append(None)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._start
        if batch_idx >= self.warmup:
            self.times.append(elapsed)


def time_lightning(callback: Callback | None, batch: tuple[Tensor, Tensor], warmup: int, steps: int,
                   seed: int) -> tuple[list[float], list[int | None]]:
    torch.manual_seed(seed)
    model = LongTailClassifier(
        backbone=CIFARResNet(32), num_classes=NUM_CLASSES, loss=CrossEntropyLoss, head="linear",
        optimizer=sgd, log_per_class=False, plot_per_class=False,
    )
    timer = StepTimer(warmup)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer] + ([callback] if callback is not None else []),
    )
    loader = DataLoader(_RepeatBatch(batch, warmup + steps), batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(model, train_dataloaders=loader)
    if len(timer.times) != steps:
        raise RuntimeError(f"expected {steps} timed steps, got {len(timer.times)}")
    return timer.times, timer.phases


# ---------------------------------------------------------------------------------------- runner
def runners(batch: tuple[Tensor, Tensor], args: argparse.Namespace) -> dict[str, Callable[[], tuple[list[float], Any]]]:
    warmup, steps, seed = args.warmup, args.steps, args.seed
    return {
        "SGD-loop": lambda: (time_loop(False, batch, warmup, steps, seed), None),
        "SAM-loop": lambda: (time_loop(True, batch, warmup, steps, seed), None),
        "SGD-callback": lambda: time_lightning(None, batch, warmup, steps, seed),
        "SAM-callback": lambda: time_lightning(lt_callbacks.SAM(rho=RHO), batch, warmup, steps, seed),
        "SAM-every-4-callback": lambda: time_lightning(
            lt_callbacks.SAM(rho=RHO, sam_every=SAM_EVERY), batch, warmup, steps, seed
        ),
    }


def cycle_means(times: Sequence[float], phases: Sequence[int | None], every: int) -> list[float]:
    """Mean step time of each whole cycle ``phase 0, 1, ..., every - 1`` (0 = the SAM step)."""
    if len(times) % every or any(p != i % every for i, p in enumerate(phases)):
        raise RuntimeError(f"timed steps are not whole SAM cycles: phases {list(phases)}")
    return [statistics.fmean(times[i:i + every]) for i in range(0, len(times), every)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round "
                        f"(a multiple of {SAM_EVERY})")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before them (a multiple of "
                        f"{SAM_EVERY}, so that timed SAM-every-{SAM_EVERY} steps start a cycle)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="sam_overhead")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.steps % SAM_EVERY or args.warmup % SAM_EVERY or args.steps < SAM_EVERY:
        parser.error(f"--steps and --warmup must be multiples of {SAM_EVERY} (--steps >= {SAM_EVERY})")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    seed_everything(args.seed, verbose=False)
    batch = make_batch(args.batch_size, args.seed)
    run = runners(batch, args)
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    raw: dict[str, list[float]] = {name: [] for name in CONFIGS}
    load_before = os.getloadavg()
    start = time.perf_counter()
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for name in order:
            times, phases = run[name]()
            raw[name] += times
            if name == "SAM-every-4-callback":
                samples[name] += cycle_means(times, phases, SAM_EVERY)
            else:
                samples[name] += times
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {statistics.median(samples[n]):.3f}s" for n in CONFIGS) + f" ({time.perf_counter() - start:.0f}s)",
            flush=True)
    median = {name: statistics.median(values) for name, values in samples.items()}
    rows = []
    for name in CONFIGS:
        row: dict[str, Any] = {"name": name, "step_s": median[name], "passes_per_step": PASSES[name],
                               "ratio_to_sgd_loop": median[name] / median["SGD-loop"]}
        if name == "SAM-callback":
            row["ratio_to_sam_loop"] = median[name] / median["SAM-loop"]
        row["samples"] = len(samples[name])
        row["step_times_s"] = raw[name]
        rows.append(row)
    sam_ratio = median["SAM-callback"] / median["SAM-loop"]
    every_ratio = median["SAM-every-4-callback"] / median["SGD-loop"]
    setup = {
        "model": f"CIFARResNet(32) + linear head, {NUM_CLASSES} classes; SGD lr {LR} momentum {MOMENTUM} wd "
                 f"{WEIGHT_DECAY}; SAM rho {RHO} (BatchNorm statistics updated by the first pass only)",
        "data": f"one batch of {args.batch_size} random 3x32x32 images (seed {args.seed}) held in memory, "
                "fed again every step (no data loading in the timed region)",
        "lightning": "LongTailClassifier (CrossEntropyLoss, linear head, self.log of the train loss) under "
                     "Trainer.fit, accelerator cpu, logger/checkpointing/progress bar off",
        "timing": f"{args.rounds} rounds; per round every configuration runs {args.warmup} untimed warm-up "
                  f"steps then {args.steps} timed steps on a fresh model (order rotated each round). Loop rows "
                  "time one iteration (forward, loss, backward, step); Lightning rows time "
                  "on_train_batch_start -> on_train_batch_end. step_s is the median over all timed steps, "
                  f"except SAM-every-4-callback: the timed steps form whole cycles of {SAM_EVERY} steps (one SAM "
                  f"step with 2 passes, then {SAM_EVERY - 1} plain steps with 1), each cycle's mean step time "
                  "is one sample, and step_s is the median of those per-step cycle averages",
        "load_average": f"1-minute load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
                        f"({time.perf_counter() - start:.0f} s of timing; above the core count means other processes "
                        "shared the CPU)",
        "step_times_s": "each row's raw timed steps, in order (for SAM-every-4-callback grouped in cycles)",
        **environment(),
    }
    notes = [
        f"Targets: SAM-callback within 5% of SAM-loop (ratio_to_sam_loop <= 1.05): "
        f"{'met' if sam_ratio <= 1.05 else 'missed'} ({sam_ratio:.3f}); SAM-every-4-callback at most "
        f"1.35 x SGD-loop: {'met' if every_ratio <= 1.35 else 'missed'} ({every_ratio:.3f}).",
        f"passes_per_step: forward/backward passes per optimizer step ({SAM_EVERY + 1}/{SAM_EVERY} for SAM every "
        f"{SAM_EVERY} steps).",
    ]
    path = write_results(args.name, setup, rows, COLUMNS, notes, Path(args.results_dir))
    for row in rows:
        print({k: v for k, v in row.items() if k != "step_times_s"})
    print(notes[0])
    print(path)


if __name__ == "__main__":
    main()
