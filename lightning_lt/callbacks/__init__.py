"""Lightning callbacks for long-tailed training."""

from lightning_lt.callbacks.drw import DeferredReweighting
from lightning_lt.callbacks.maxnorm import MaxNorm
from lightning_lt.callbacks.memory_bank import TailMemoryBank
from lightning_lt.callbacks.mixup import CutMix, Mixup
from lightning_lt.callbacks.sam import SAM, SSESAM, ImbSAM, OptimizerStages, SAMAdapter
from lightning_lt.callbacks.stages import StageCallback
from lightning_lt.callbacks.test_distributions import TestDistributions
from lightning_lt.callbacks.test_time_aggregation import TestTimeAggregation

__all__ = [
    "SAM",
    "SSESAM",
    "CutMix",
    "DeferredReweighting",
    "ImbSAM",
    "MaxNorm",
    "Mixup",
    "OptimizerStages",
    "SAMAdapter",
    "StageCallback",
    "TailMemoryBank",
    "TestDistributions",
    "TestTimeAggregation",
]
