"""Lightning callbacks for long-tailed training."""

from lightning_lt.callbacks.drw import DeferredReweighting

__all__ = ["DeferredReweighting"]
