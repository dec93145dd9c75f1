"""Epoch-indexed learning-rate schedules of the long-tail literature, valid past their planned length.

Both schedulers are :class:`torch.optim.lr_scheduler.LambdaLR` subclasses meant to be stepped once per epoch
(Lightning: ``{"scheduler": ..., "interval": "epoch"}``). Epochs are 0-based: during epoch ``e`` (after ``e``
calls of ``step()``) the learning rate is ``base_lr * factor(e)``. The factor is a picklable callable object, so
``state_dict()`` / ``load_state_dict()`` round-trip the schedule's hyperparameters.
"""

import bisect
import math
import numbers
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, got {value!r}")


class WarmupMultiStepFactor:
    """``factor(e) = min(1, (e + 1) / warmup_epochs) * gamma ** #{m in milestones : m <= e}``."""

    def __init__(self, warmup_epochs: int, milestones: Sequence[int], gamma: float) -> None:
        self.warmup_epochs = int(warmup_epochs)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, epoch: int) -> float:
        warmup = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return warmup * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class WarmupCosineFactor:
    """Linear warm-up for ``warmup_epochs``, then a half cosine from 1 to ``eta_min_ratio`` at ``max_epochs``."""

    def __init__(self, max_epochs: int, warmup_epochs: int, eta_min_ratio: float) -> None:
        self.max_epochs = int(max_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.eta_min_ratio = float(eta_min_ratio)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        progress = min(1.0, (epoch - self.warmup_epochs) / (self.max_epochs - self.warmup_epochs))
        return self.eta_min_ratio + (1.0 - self.eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupMultiStepLR(LambdaLR):
    r"""Linear warm-up followed by step decay: the LDAM-DRW CIFAR schedule.

    .. math::
        \mathrm{lr}(e) = \mathrm{lr}_0 \cdot \min\!\Big(1, \frac{e + 1}{\mathrm{warmup\_epochs}}\Big)
        \cdot \gamma^{\#\{m \in \mathrm{milestones} \,:\, m \le e\}}

    for 0-based epoch ``e``. The defaults reproduce LDAM-DRW's CIFAR schedule, written there with 1-based
    ``E = e + 1`` as ``E <= 5: lr0 * E / 5``, ``E > 160: lr0 * 0.01``, ``E > 180: lr0 * 1e-4``: here epochs
    0..4 warm up (``lr0 / 5 ... lr0``), epoch 160 (the 161st) is the first at ``0.01 lr0`` and epoch 180 the
    first at ``1e-4 lr0``. Past the last milestone the rate stays at ``lr0 * gamma ** len(milestones)``.

    Args:
        optimizer: wrapped optimizer.
        warmup_epochs: epochs of linear warm-up (0 disables it).
        milestones: strictly increasing 0-based epochs at which the rate is multiplied by ``gamma``.
        gamma: multiplicative decay per milestone.
        last_epoch: index of the last epoch when resuming (``-1`` starts fresh), as in ``LambdaLR``.

    Raises:
        ValueError: negative ``warmup_epochs`` / milestones, milestones not strictly increasing, ``gamma <= 0``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = WarmupMultiStepLR(opt, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
        >>> lrs = []
        >>> for epoch in range(200):
        ...     lrs.append(opt.param_groups[0]["lr"])
        ...     opt.step()
        ...     sched.step()
        >>> [round(lrs[e], 8) for e in (0, 4, 5, 159, 160, 179, 180, 199)]
        [0.02, 0.1, 0.1, 0.1, 0.001, 0.001, 1e-05, 1e-05]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: int = 5,
        milestones: Sequence[int] = (160, 180),
        gamma: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        _check_int("warmup_epochs", warmup_epochs, 0)
        milestones = list(milestones)
        for i, m in enumerate(milestones):
            _check_int(f"milestones[{i}]", m, 0)
        if any(b <= a for a, b in zip(milestones[:-1], milestones[1:])):
            raise ValueError(f"Expected `milestones` to be strictly increasing, got {milestones}")
        if not isinstance(gamma, numbers.Real) or not gamma > 0:
            raise ValueError(f"Expected `gamma` > 0, got {gamma!r}")
        super().__init__(optimizer, WarmupMultiStepFactor(warmup_epochs, milestones, gamma), last_epoch=last_epoch)

    @property
    def factor(self) -> WarmupMultiStepFactor:
        """The schedule ``factor(epoch)`` (shared by all parameter groups)."""
        return self.lr_lambdas[0]


class WarmupCosineLR(LambdaLR):
    r"""Linear warm-up followed by cosine annealing to ``eta_min_ratio * lr0`` at ``max_epochs``.

    .. math::
        \mathrm{lr}(e) = \mathrm{lr}_0 \cdot \begin{cases}
            \frac{e + 1}{W} & e < W \\
            r + (1 - r)\,\frac{1 + \cos(\pi \min(1, \frac{e - W}{T - W}))}{2} & e \ge W
        \end{cases}

    with ``W = warmup_epochs``, ``T = max_epochs``, ``r = eta_min_ratio`` and 0-based epoch ``e``. Without
    warm-up this equals ``CosineAnnealingLR(T_max=max_epochs, eta_min=r * lr0)`` for ``e <= T``; past
    ``max_epochs`` the rate stays at ``r * lr0`` (it does not rise again).

    Args:
        optimizer: wrapped optimizer.
        max_epochs: planned number of epochs ``T`` (``> warmup_epochs``).
        warmup_epochs: epochs of linear warm-up ``W`` (0 disables it).
        eta_min_ratio: final rate as a fraction of the initial one, in ``[0, 1]``.
        last_epoch: index of the last epoch when resuming (``-1`` starts fresh), as in ``LambdaLR``.

    Raises:
        ValueError: ``max_epochs <= warmup_epochs``, negative values, ``eta_min_ratio`` outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2)
        >>> lrs = []
        >>> for epoch in range(12):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.05, 0.1, 0.1, 0.0962, 0.0854, 0.0691, 0.05, 0.0309, 0.0146, 0.0038, 0.0, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_epochs: int,
        warmup_epochs: int = 0,
        eta_min_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_int("warmup_epochs", warmup_epochs, 0)
        _check_int("max_epochs", max_epochs, 1)
        if max_epochs <= warmup_epochs:
            raise ValueError(
                f"Expected `max_epochs` > `warmup_epochs`, got max_epochs={max_epochs}, warmup_epochs={warmup_epochs}"
            )
        if not isinstance(eta_min_ratio, numbers.Real) or not 0.0 <= eta_min_ratio <= 1.0:
            raise ValueError(f"Expected `eta_min_ratio` in [0, 1], got {eta_min_ratio!r}")
        super().__init__(optimizer, WarmupCosineFactor(max_epochs, warmup_epochs, eta_min_ratio), last_epoch=last_epoch)

    @property
    def factor(self) -> WarmupCosineFactor:
        """The schedule ``factor(epoch)`` (shared by all parameter groups)."""
        return self.lr_lambdas[0]
