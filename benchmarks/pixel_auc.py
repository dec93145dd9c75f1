"""Forward + backward time of AUCSeg's pixel AUC loss: vectorised over classes vs a per-class Python loop.

Both compute the one-vs-one square loss from the same per-class moments (no pixel pairs). "loop" is
the reference implementation's approach, written here from the formula: a one-hot label matrix built
class by class, then ``for i in range(C): if N[i] == 0: continue; ...`` with class ``i``'s loss from
per-pixel vectors. "vectorised" is :func:`lightning_lt.losses.functional.pixel_auc_loss`. The two
values are checked to agree (relative 1e-4) before timing. Configurations run interleaved in rounds
after untimed warm-up; ``fwd_bwd_s`` is the median over the rounds. Writes
``benchmarks/results/pixel_auc.json`` and ``.md``. Target: vectorised at least 10 x faster.

    python benchmarks/pixel_auc.py                      # C=150, batch 4, 128 x 128 (ADE20K-like)
    python benchmarks/pixel_auc.py --classes 171 --size 64 --repeats 3 --name pixel_auc-quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, set_threads, write_results  # noqa: E402

from lightning_lt.losses.functional import pixel_auc_loss  # noqa: E402

COLUMNS = ("fwd_bwd_s", "speedup")
IGNORE = 255
GAMMA = 1.0


def per_class_loop_loss(
    logits: Tensor, target: Tensor, gamma: float = GAMMA, ignore_index: Optional[int] = IGNORE
) -> Tensor:
    """Ovo square pixel AUC loss with a Python loop over classes (the reference's structure)."""
    num_classes = logits.shape[1]
    scores = torch.sigmoid(logits).permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        scores, labels = scores[keep], labels[keep]
    onehot = torch.stack([labels.eq(c).to(scores.dtype) for c in range(num_classes)], 1)  # [P, C]
    counts = onehot.sum(0)
    inv_count = 1.0 / counts[labels]  # 1 / N_{y_q} per pixel
    k = int((counts > 0).sum())
    if k < 2:
        return logits.sum() * 0.0
    total = scores.new_zeros(())
    for i in range(num_classes):
        if counts[i] == 0:
            continue
        score_i, is_i = scores[:, i], onehot[:, i]
        margin = (gamma - score_i) * is_i  # gamma - a on class i's pixels, 0 elsewhere
        pos1 = margin.sum() / counts[i]  # E (gamma - a)
        pos2 = (margin * margin).sum() / counts[i]  # E (gamma - a)^2
        neg_weight = inv_count * (1.0 - is_i)  # sum_{j != i} mean over class j
        neg1 = (score_i * neg_weight).sum()
        neg2 = (score_i * score_i * neg_weight).sum()
        total = total + 0.5 * ((k - 1) * pos2 + 2.0 * pos1 * neg1 + neg2)
    return total / (k * (k - 1))


def vectorised_loss(logits: Tensor, target: Tensor) -> Tensor:
    return pixel_auc_loss(logits, target, GAMMA, "ovo", "square", ignore_index=IGNORE)


def make_inputs(num_classes: int, batch: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random logits; labels with a long-tailed (Zipf-like) class distribution and 5% ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, size, size, generator=generator)
    prior = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)
    target = torch.multinomial(prior, batch * size * size, replacement=True, generator=generator)
    target = target.reshape(batch, size, size)
    ignored = torch.rand(batch, size, size, generator=generator) < 0.05
    return logits, target.masked_fill(ignored, IGNORE)


def time_fwd_bwd(fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor) -> float:
    x = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(x, target).backward()
    return time.perf_counter() - start


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=150, help="number of classes C")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="height = width of logits and labels")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each configuration first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="pixel_auc")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.classes < 2 or args.batch < 1 or args.size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --classes >= 2, --batch >= 1, --size >= 1, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads()
    logits, target = make_inputs(args.classes, args.batch, args.size, args.seed)
    configs: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "loop": per_class_loop_loss,
        "vectorised": vectorised_loss,
    }

    with torch.no_grad():
        loop_value = per_class_loop_loss(logits, target).item()
        vec_value = vectorised_loss(logits, target).item()
    rel = abs(vec_value - loop_value) / abs(loop_value)
    if rel > 1e-4:
        raise RuntimeError(f"loop ({loop_value}) and vectorised ({vec_value}) disagree: relative {rel:.2e}")

    for name, fn in configs.items():
        for _ in range(args.warmup):
            time_fwd_bwd(fn, logits, target)
    times: dict[str, list[float]] = {name: [] for name in configs}
    load_before = os.getloadavg()
    start = time.perf_counter()
    names = list(configs)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[:r % 2]:  # alternate the order so drifts hit both alike
            times[name].append(time_fwd_bwd(configs[name], logits, target))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.4f}s" for n in names), flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    speedup = median["loop"] / median["vectorised"]
    rows: list[dict[str, Any]] = [
        {"name": "loop", "fwd_bwd_s": median["loop"], "times_s": times["loop"]},
        {"name": "vectorised", "fwd_bwd_s": median["vectorised"], "speedup": speedup, "times_s": times["vectorised"]},
    ]
    setup = {
        "C": args.classes,
        "batch": args.batch,
        "H": args.size,
        "W": args.size,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "loss": f"one-vs-one square surrogate, gamma {GAMMA}, ignore_index {IGNORE}, float32",
        "data": f"random normal logits [{args.batch}, {args.classes}, {args.size}, {args.size}] (seed {args.seed}); "
                f"labels drawn with probability proportional to 1 / (class rank), 5% set to {IGNORE}",
        "timing": f"{args.warmup} untimed warm-up runs per configuration, then {args.repeats} rounds of one "
                  "forward + backward each (order alternated per round); fwd_bwd_s is the median",
        "values": f"loop {loop_value:.8g}, vectorised {vec_value:.8g} (relative difference {rel:.1e})",
        "load_average": f"1-minute load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
                        f"({time.perf_counter() - start:.0f} s of timing; above the core count means other processes "
                        "shared the CPU)",
        "times_s": "each row's raw timed runs, in order",
        **environment(),
    }
    notes = [f"Target: vectorised at least 10 x faster than the per-class loop: "
             f"{'met' if speedup >= 10 else 'missed'} ({speedup:.1f} x).",
             "Spread of the timed runs (min - max): " + "; ".join(
                 f"{name} {min(values):.4f} - {max(values):.4f} s" for name, values in times.items())
             + ". Freshly allocated memory can be slow to touch on a VM (page faults), which inflates single "
               "runs of both configurations; the median is robust to a few such runs."]
    path = write_results(args.name, setup, rows, COLUMNS, notes, Path(args.results_dir))
    for row in rows:
        print({k: v for k, v in row.items() if k != "times_s"})
    print(notes[0])
    print(path)


if __name__ == "__main__":
    main()
