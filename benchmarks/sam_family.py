"""The SAM family on a long-tailed problem small enough for a full schedule and several seeds on 2 CPU cores.

CIFAR-10-LT cannot separate these methods on this machine: the SAM rows cost 2-4 passes per step, so 2 seeds of
5 rows fit 6 epochs of a half-width ResNet-20, after which no row classifies a single image of the two smallest
classes (``sam_family-cifar10``). Here the data is scikit-learn's 8x8 digits made long-tailed
(:class:`~lightning_lt.datamodules.DigitsLT`, bundled with scikit-learn, no download) at imbalance factor 50:
130 ... 3 training images per class, of which 1 class is many-shot (> 100), 4 medium-shot and 5 few-shot (< 20),
and a balanced test set of 40 images per class. Every row trains the quickstart's MLP (64 -> 128 -> 128 -> 10)
with cross-entropy for ``--epochs`` (200, the length of the SAM-family papers' CIFAR schedules) with one schedule
(SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 32, 5 warm-up epochs, cosine decay), so the tail is learned
and every shot group has an accuracy. Rows (the SAM-family values of ``benchmarks/cifar10_lt.py``, not tuned here;
the tail of ImbSAM and SSE-SAM is the few-shot group, ``tail_threshold`` 20):

* ``CE``: plain SGD;
* ``SAM``: ``callbacks.SAM(rho=0.1)``, 2 passes per step;
* ``ImbSAM``: ``callbacks.ImbSAM(rho=0.05, tail_threshold=20, tail_weight=2.0)``, 3 passes;
* ``SSE-SAM``: ``callbacks.SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=20, gamma=0.7, tail_weight=1.0)``;
* ``SAM-every-4``: ``callbacks.SAM(rho=0.1, sam_every=4)``, the efficient option (1.25 passes per step).

Keys: ``acc``, ``acc_many``, ``acc_medium``, ``acc_few`` (the final epoch, on the test set), ``acc_best`` /
``best_epoch`` (the epoch with the best test accuracy, as the LDAM-DRW code selects; optimistic), ``train_minutes``;
with several seeds mean and sample std (``<key>_std``). The note compares every row with CE on ``acc_few`` and
``acc`` and ImbSAM / SSE-SAM with SAM on ``acc_few``, in standard deviations.

    python benchmarks/sam_family.py          # 5 rows x 5 seeds, 2 single-thread processes: 7 minutes on 2 cores
    python benchmarks/sam_family.py --epochs 2 --seeds 0 --workers 1 --results-dir /tmp/results   # smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_lt import ACC_KEYS, BestEpoch, accuracy_row  # noqa: E402
from common import RESULTS_DIR, aggregate_seeds, describe_effect, environment, write_results  # noqa: E402

from lightning_lt.callbacks import SAM, SSESAM, ImbSAM  # noqa: E402
from lightning_lt.datamodules import DigitsLT  # noqa: E402
from lightning_lt.losses import CrossEntropyLoss  # noqa: E402
from lightning_lt.nets import MLP  # noqa: E402
from lightning_lt.optim import WarmupCosineLR  # noqa: E402
from lightning_lt.tasks import LongTailClassifier  # noqa: E402

ROWS: dict[str, Callable[[int], list[Callback]]] = {
    "CE": lambda tail: [],
    "SAM": lambda tail: [SAM(rho=0.1)],
    "ImbSAM": lambda tail: [ImbSAM(rho=0.05, tail_threshold=tail, tail_weight=2.0)],
    "SSE-SAM": lambda tail: [SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=tail, gamma=0.7, tail_weight=1.0)],
    "SAM-every-4": lambda tail: [SAM(rho=0.1, sam_every=4)],
}
COLUMNS = (*ACC_KEYS, "acc_best", "best_epoch", "train_minutes")


def train(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(seed, workers=True)
    data = DigitsLT(imbalance_factor=args.imbalance_factor, n_max=args.n_max, batch_size=args.batch_size, seed=seed)
    model = LongTailClassifier(
        MLP(64, [128, 128]), num_classes=10, class_counts=data.class_counts, class_names=data.class_names,
        loss=CrossEntropyLoss, head="linear",
        optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=functools.partial(WarmupCosineLR, max_epochs=args.epochs, warmup_epochs=min(5, args.epochs - 1)),
        log_per_class=False, plot_per_class=False,
    )  # fmt: skip
    best = BestEpoch()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=args.val_every, callbacks=[best, *ROWS[name](args.tail_threshold)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    row: dict[str, Any] = {"name": name, "seed": seed, **accuracy_row(metrics, best), "train_minutes": minutes}
    print(json.dumps(row), flush=True)
    return row


def direction_notes(rows: Sequence[dict[str, Any]], n_seeds: int) -> list[str]:
    """Every row against CE (the SAM-family papers: higher few-shot accuracy) and ImbSAM / SSE-SAM against SAM."""
    by_name = {row["name"]: row for row in rows}
    if n_seeds < 2 or "CE" not in by_name:
        return []
    lines = [f"Published direction, {n_seeds} seeds (d = mean(row) - mean(reference), in pooled and paired standard "
             "deviations; the SAM-family papers expect every SAM variant > CE on the few-shot classes, and ImbSAM / "
             "SSE-SAM > SAM there):"]  # fmt: skip
    for name, row in by_name.items():
        if name == "CE":
            continue
        d, text = describe_effect(by_name["CE"], row, "acc_few")
        parts = [f"acc_few vs CE {'holds' if d > 0 else 'does not hold'} ({text})",
                 f"acc vs CE: {describe_effect(by_name['CE'], row, 'acc')[1]}"]  # fmt: skip
        if name in ("ImbSAM", "SSE-SAM") and "SAM" in by_name:
            d, text = describe_effect(by_name["SAM"], row, "acc_few")
            parts.append(f"acc_few vs SAM {'holds' if d > 0 else 'does not hold'} ({text})")
        lines.append(f"- {name}: " + "; ".join(parts))
    return lines


def _quiet(threads: int) -> None:
    """Threads (a 64-128-128-10 MLP gains nothing from more than one) and quiet logs: the script's process and
    its workers."""
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--imbalance-factor", type=float, default=50.0)
    parser.add_argument("--n-max", type=int, default=130)
    parser.add_argument("--tail-threshold", type=int, default=20, help="ImbSAM / SSE-SAM tail: n_c < this")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-every", type=int, default=1, help="test-set evaluation every n epochs (best epoch)")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads per process")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (1: in this one)")
    parser.add_argument("--name", default="sam_family")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    jobs = [(name, seed) for seed in args.seeds for name in args.rows]  # seeds outer: a slow phase hits every row
    if args.workers > 1:  # one single-thread process per core: the runs are independent and each is deterministic
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_quiet, initargs=(args.threads,)) as pool:  # fmt: skip
            results = list(pool.map(train, *zip(*jobs), [args] * len(jobs)))
    else:
        results = [train(name, seed, args) for name, seed in jobs]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.rows}
    for row in results:
        runs[row["name"]].append(row)
    rows = [r[0] for r in runs.values()] if len(args.seeds) == 1 else [aggregate_seeds(r) for r in runs.values()]
    data = DigitsLT(imbalance_factor=args.imbalance_factor, n_max=args.n_max)
    setup = {
        "data": f"DigitsLT (scikit-learn 8x8 digits), imbalance factor {args.imbalance_factor:g} (exp), "
                f"{sum(data.class_counts)} training images; balanced test set of 40 per class (400)",
        "class_counts": data.class_counts,
        "groups": "many > 100, medium 20-100, few < 20 training images; ImbSAM / SSE-SAM tail: "
                  f"n_c < {args.tail_threshold}",
        "model": "MLP 64 -> 128 -> 128 -> 10 (ReLU), cross-entropy, every row",
        "schedule": f"{args.epochs} epochs, SGD lr {args.lr} momentum 0.9 wd 5e-4, batch {args.batch_size}, "
                    f"{min(5, args.epochs - 1)} warm-up epochs, cosine decay",
        "methods": "SAM rho 0.1; ImbSAM rho 0.05 tail_weight 2.0; SSE-SAM rho_head 0.05 rho_tail 0.1 gamma 0.7 "
                   "tail_weight 1.0; SAM-every-4 rho 0.1 (the values of benchmarks/cifar10_lt.py)",
        "seeds": args.seeds,
        **environment(),
        "processes": f"{args.workers} in parallel, {args.threads} thread(s) each",
    }  # fmt: skip
    notes = [
        "acc, acc_many, acc_medium, acc_few: the final epoch on the balanced test set. acc_best / best_epoch: the "
        "epoch with the best test accuracy (what the LDAM-DRW code reports; it selects on the test set, so it is "
        "optimistic); the group accuracies at that epoch are in the JSON (`*_at_best`). Mean ± sample std over the "
        "seeds; per-seed rows in the JSON (`runs`). The seed sets the initialisation and the batch order; the "
        "long-tailed subset and the test split are the same in every run (imbalance_seed 0).",
        *direction_notes(rows, len(args.seeds)),
    ]
    torch.set_num_threads(threads)
    return write_results(args.name, setup, rows, COLUMNS, notes, Path(args.results_dir))


if __name__ == "__main__":
    _quiet(torch.get_num_threads())  # as a script only: a caller's (a test's) logging stays as it is
    main()
