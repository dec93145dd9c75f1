"""Test-only pieces of the kill-and-resume tests (tests/test_fault_tolerance.py): a callback that SIGKILLs its
own ``lightning-lt fit`` process right after a given checkpoint was written, and a tiny segmentation network.

They are named by ``class_path`` in the YAML configs the tests write (``tests.fault_helpers.KillAfter``), so the
subprocess needs the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn


class KillAfter(pl.Callback):
    """SIGKILL the process at the first hook that runs after the checkpoint of epoch ``epoch`` (or of optimizer
    step ``step``) was written: no clean-up, no ``finally``, as a pre-empted or OOM-killed job.

    Lightning moves every ``ModelCheckpoint`` to the end of the callback list (``_reorder_callbacks``), whatever
    the order in the config, so a callback cannot run "after the save" in the same hook. The kill therefore
    happens in the next hook: ``on_train_epoch_start`` of epoch ``epoch + 1`` (epoch-end checkpoints are written
    in ``on_train_epoch_end`` or ``on_validation_end`` of ``epoch``), or ``on_train_batch_start`` once
    ``trainer.global_step == step`` (``every_n_train_steps`` checkpoints are written in ``on_train_batch_end``).
    Everything the uninterrupted run does between the save and the kill is lost, as in a real crash.
    """

    def __init__(self, epoch: Optional[int] = None, step: Optional[int] = None) -> None:
        super().__init__()
        if (epoch is None) == (step is None):
            raise ValueError(f"Expected exactly one of `epoch` and `step`, got epoch={epoch}, step={step}")
        self.epoch = epoch
        self.step = step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(pl.Callback):
    """Appends ``<epoch> <batch_idx> <global_step> <first pixel values of each sample>`` per training batch to
    ``path`` (flushed at once, so a killed run keeps its lines): which samples a run trained on, in which order.

    Samples are identified by a fingerprint: the sum of each image's pixels, rounded (the data sets of the tests
    have random pixels, so fingerprints are distinct)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch["image"]
        keys = " ".join(f"{float(v):.3f}" for v in images.flatten(1).sum(1))
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_step} {keys}\n")


class TinySegNet(nn.Module):
    """Two convolutions; ``num_classes`` first, as :class:`~lightning_lt.tasks.SegmentationModule` calls its
    ``net`` factory."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
