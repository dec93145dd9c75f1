"""Optimizer wrappers (the SAM family), rho schedules and learning-rate schedules."""

from lightning_lt.optim.lr_scheduler import (
    WarmupCosineFactor,
    WarmupCosineLR,
    WarmupMultiStepFactor,
    WarmupMultiStepLR,
)
from lightning_lt.optim.rho import ConstantRho, LinearRho, RhoSchedule, StepRho
from lightning_lt.optim.sam import SAM, SSESAM, GroupSAM, ImbSAM, preserve_batchnorm_stats

__all__ = [
    "SAM",
    "SSESAM",
    "ConstantRho",
    "GroupSAM",
    "ImbSAM",
    "LinearRho",
    "RhoSchedule",
    "StepRho",
    "WarmupCosineFactor",
    "WarmupCosineLR",
    "WarmupMultiStepFactor",
    "WarmupMultiStepLR",
    "preserve_batchnorm_stats",
]
