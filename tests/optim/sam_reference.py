"""A straightforward re-implementation of SAM / ASAM / ImbSAM / SSE-SAM steps, for the tests.

Written from the formulas (../shared/docs/methods.md), independently of lightning_lt.optim.sam: every
gradient comes from torch.autograd.grad on fresh copies of the weights, and the SGD update (momentum,
weight decay) is written out. Group losses: ``L_head = sum_{head} l_i / B``, ``L_tail = tail_weight *
sum_{tail} l_i / B`` with the published factors (ImbSAM 2, SSE-SAM 1). The official training steps
themselves are transcribed in tests/reference/test_imbsam.py and test_ssesam.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

B, D, C = 12, 5, 4
TAIL = torch.tensor([2, 3])
#: the factor on the tail loss in the official code of each method
TAIL_WEIGHT = {"imbsam": 2.0, "ssesam": 1.0}


def problem(seed: int = 0) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Data ``X [B, D]``, labels ``y`` (head and tail classes present) and initial weights ``[W, b]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    y = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0, 3, 1, 0, 2])
    w = torch.randn(D, C, generator=g) * 0.5
    b = torch.randn(C, generator=g) * 0.1
    return x, y, [w, b]


def group_loss(params: Sequence[Tensor], x: Tensor, y: Tensor, group: Optional[str], tail_weight: float = 1.0) -> Tensor:
    """The batch mean (``group=None``), ``L_head`` ("head") or ``L_tail`` ("tail", times ``tail_weight``)."""
    per_sample = F.cross_entropy(x @ params[0] + params[1], y, reduction="none")
    if group is None:
        return per_sample.mean()
    in_tail = (y[:, None] == TAIL[None, :]).any(1)
    if group == "tail":
        return tail_weight * per_sample[in_tail].sum() / y.shape[0]
    return per_sample[~in_tail].sum() / y.shape[0]


def gradient(params: Sequence[Tensor], x: Tensor, y: Tensor, group: Optional[str], tail_weight: float = 1.0) -> list[Tensor]:
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    return list(torch.autograd.grad(group_loss(leaves, x, y, group, tail_weight), leaves))


def perturbed(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, adaptive: bool) -> list[Tensor]:
    if adaptive:
        norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
        return [p + rho * p * p * g / (norm + 1e-12) for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [p + rho * g / (norm + 1e-12) for p, g in zip(params, grads)]


def sam_gradient(params, x, y, group, rho, adaptive=False, tail_weight=1.0) -> list[Tensor]:
    """Gradient of the group loss at ``w + e`` (``rho = 0``: at ``w``)."""
    if rho == 0:
        return gradient(params, x, y, group, tail_weight)
    e_grad = gradient(params, x, y, group, tail_weight)
    return gradient(perturbed(params, e_grad, rho, adaptive), x, y, group, tail_weight)


class ReferenceSGD:
    """torch.optim.SGD's update written out: ``buf = m * buf + (g + wd * p)``, ``p -= lr * buf``."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: Optional[list[Tensor]] = None

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        d = [g + self.weight_decay * p for p, g in zip(params, grads)]
        self.buffers = d if self.buffers is None else [self.momentum * b + di for b, di in zip(self.buffers, d)]
        return [p - self.lr * b for p, b in zip(params, self.buffers)]


def reference_run(method: str, steps: int, stages: Sequence[int] = (), rho: float = 0.05, rho_head: float = 0.05,
                  rho_tail: float = 0.1, adaptive: bool = False, lr: float = 0.1, momentum: float = 0.9,
                  weight_decay: float = 1e-3, tail_weight: Optional[float] = None) -> list[Tensor]:
    """Weights after ``steps`` updates of ``method`` on the fixed batch of :func:`problem`.

    ``method``: "sgd", "sam", "imbsam" or "ssesam" (``stages[k]`` = SSE-SAM stage of step k);
    ``tail_weight``: the factor on the tail loss (default: the method's published one, :data:`TAIL_WEIGHT`).
    """
    tail_weight = TAIL_WEIGHT.get(method, 1.0) if tail_weight is None else tail_weight
    x, y, params = problem()
    sgd = ReferenceSGD(lr, momentum, weight_decay)
    for k in range(steps):
        if method == "sgd":
            grads = gradient(params, x, y, None)
        elif method == "sam":
            grads = sam_gradient(params, x, y, None, rho, adaptive)
        elif method == "imbsam":
            head = gradient(params, x, y, "head")
            tail = sam_gradient(params, x, y, "tail", rho, adaptive, tail_weight)
            grads = [h + t for h, t in zip(head, tail)]
        elif method == "ssesam":
            r_head = rho_head if stages[k] == 1 else 0.0
            head = sam_gradient(params, x, y, "head", r_head, adaptive)
            tail = sam_gradient(params, x, y, "tail", rho_tail, adaptive, tail_weight)
            grads = [h + t for h, t in zip(head, tail)]
        else:
            raise ValueError(method)
        params = sgd.step(params, grads)
    return params
