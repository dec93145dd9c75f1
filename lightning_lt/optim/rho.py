"""Schedules of the SAM radius ``rho`` by epoch (as in the SAM-for-long-tails code)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["ConstantRho", "LinearRho", "RhoSchedule", "StepRho"]


def check_rho(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` to be a finite number >= 0, got {value!r}")
    return float(value)


class RhoSchedule:
    """``rho`` as a function of the 0-based epoch."""

    def __call__(self, epoch: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement `__call__(epoch)`")


class ConstantRho(RhoSchedule):
    """The same ``rho`` every epoch.

    Example:
        >>> ConstantRho(0.1)(150)
        0.1
    """

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = check_rho("rho", rho)

    def __call__(self, epoch: int) -> float:
        return self.rho


class StepRho(RhoSchedule):
    """Piecewise-constant ``rho``: ``values[k]`` from epoch ``milestones[k - 1]`` on (``values[0]`` first).

    Example:
        >>> schedule = StepRho(values=[0.05, 0.1, 0.2], milestones=[5, 60])
        >>> [schedule(e) for e in (0, 4, 5, 59, 60, 199)]
        [0.05, 0.05, 0.1, 0.1, 0.2, 0.2]
    """

    def __init__(self, values: Sequence[float], milestones: Sequence[int]) -> None:
        self.values = [check_rho(f"values[{i}]", v) for i, v in enumerate(values)]
        self.milestones = [int(m) for m in milestones]
        if len(self.values) != len(self.milestones) + 1:
            raise ValueError(
                f"Expected one more value than milestones (a value before the first milestone), got "
                f"{len(self.values)} values and {len(self.milestones)} milestones"
            )
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(m < 0 for m in self.milestones):
            raise ValueError(f"Expected `milestones` to be strictly increasing epochs >= 0, got {self.milestones}")

    def __call__(self, epoch: int) -> float:
        return self.values[bisect.bisect_right(self.milestones, epoch)]


class LinearRho(RhoSchedule):
    """``rho`` interpolated linearly from ``start`` (epoch 0) to ``end`` (epoch ``epochs - 1``), then held.

    Example:
        >>> schedule = LinearRho(start=0.0, end=0.2, epochs=5)
        >>> [round(schedule(e), 3) for e in range(7)]
        [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2]
    """

    def __init__(self, start: float, end: float, epochs: int) -> None:
        self.start = check_rho("start", start)
        self.end = check_rho("end", end)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Expected `epochs` to be an integer >= 1, got {epochs!r}")
        self.epochs = epochs

    def __call__(self, epoch: int) -> float:
        if self.epochs == 1:
            return self.end
        t = min(max(epoch, 0), self.epochs - 1) / (self.epochs - 1)
        return self.start + t * (self.end - self.start)
