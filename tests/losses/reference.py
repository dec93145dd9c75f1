"""Independent brute-force references for the loss tests: plain Python floats, one sample at a time."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def log_softmax_row(row: Sequence[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - log_z for v in row]


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reduce_loop(
    per_sample: Sequence[float], target: Sequence[int], weight: Optional[Sequence[float]], reduction: str
) -> object:
    """F.cross_entropy(weight=...) semantics, written as loops."""
    w = [1.0 if weight is None else float(weight[t]) for t in target]
    weighted = [wi * li for wi, li in zip(w, per_sample)]
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return sum(weighted)
    return sum(weighted) / sum(w)


def brute_force(
    sample_loss: Callable[[list[float], int], float],
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[Sequence[float]] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Apply ``sample_loss(row, y)`` to every sample (float64 Python math) and reduce with loops."""
    rows = logits.detach().double().tolist()
    ys = [int(t) for t in target.tolist()]
    per_sample = [sample_loss(row, y) for row, y in zip(rows, ys)]
    if weight is not None and isinstance(weight, torch.Tensor):
        weight = weight.double().tolist()
    return torch.tensor(reduce_loop(per_sample, ys, weight, reduction), dtype=torch.float64)


def cb_weights_loop(counts: Sequence[float], beta: float) -> list[float]:
    raw = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    total = sum(raw)
    return [r / total * len(counts) for r in raw]


def random_batch(batch: int = 16, num_classes: int = 5, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g) * scale
    target = torch.randint(0, num_classes, (batch,), generator=g)
    target[:num_classes] = torch.arange(num_classes)  # every class present
    return logits, target
