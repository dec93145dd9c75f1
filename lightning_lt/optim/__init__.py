"""Optimizers and learning-rate schedules."""

from lightning_lt.optim.lr_scheduler import (
    WarmupCosineFactor,
    WarmupCosineLR,
    WarmupMultiStepFactor,
    WarmupMultiStepLR,
)

__all__ = ["WarmupCosineFactor", "WarmupCosineLR", "WarmupMultiStepFactor", "WarmupMultiStepLR"]
