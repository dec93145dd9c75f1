"""What the task modules share: class facts from the data module, config hyper-parameters, optimizers."""

from __future__ import annotations

import inspect
import os
import random
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["TaskModule", "WeightedMean", "check_class_info", "reseed_for_epoch", "safe_metric_key"]


def check_class_info(
    num_classes: int, class_counts: Optional[Sequence[int]], class_names: Optional[Sequence[str]]
) -> tuple[Optional[list[int]], list[str]]:
    """Validate ``num_classes`` / ``class_counts`` / ``class_names`` (as linked from a data module) and return
    the counts as ints (or ``None``) and the names (``"0" .. "C-1"`` by default)."""
    if num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2, got {num_classes}")
    if class_counts is not None:
        class_counts = [int(c) for c in class_counts]
        if len(class_counts) != num_classes:
            raise ValueError(
                f"`class_counts` has {len(class_counts)} entries but `num_classes` is {num_classes}. HINT: let "
                "the data module provide both (the `lightning-lt` CLI links them), or pass one count per class."
            )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"`class_names` has {len(class_names)} entries but `num_classes` is {num_classes}.")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return class_counts, names


class TaskModule(LightningModule):
    """Base of the task modules: config-only hyper-parameters and optimizer / scheduler factories."""

    optimizer_factory: OptimizerCallable
    lr_scheduler_factory: Optional[LRSchedulerCallable] = None
    lr_scheduler_interval: Literal["epoch", "step"] = "epoch"

    def __init__(self) -> None:
        super().__init__()
        # Evaluation losses as sample-weighted means whose sums are synced across processes: exact under
        # DDP with unequal shards (``self.log(..., sync_dist=True)`` averages the batch-size weights in an
        # integer tensor and would be off by N / (N - 1) for an odd number of samples).
        self.eval_losses = nn.ModuleDict({"val": WeightedMean(), "test": WeightedMean()})

    def on_train_epoch_start(self) -> None:
        """With ``seed_everything(s)`` (``PL_GLOBAL_SEED``), reseed the global random generators (torch, numpy,
        random) from ``(s, epoch)``: the random draws of an epoch (augmentation in the main process, dropout)
        then do not depend on what happened before it, so a run resumed from an epoch-end checkpoint repeats
        the uninterrupted run exactly (with ``num_workers=0``; workers are seeded by the data loader)."""
        reseed_for_epoch(self.current_epoch)

    def update_eval_loss(self, stage: str, loss: Tensor, num_samples: int) -> None:
        """Add a batch's mean ``loss`` over ``num_samples`` samples to the ``stage`` loss (0 samples is allowed)."""
        self.eval_losses[stage].update(loss.detach(), num_samples)

    def log_eval_loss(self, stage: str) -> None:
        """Log ``{stage}/loss``, the sample-weighted mean over every process's samples, and reset it."""
        metric = self.eval_losses[stage]
        with warnings.catch_warnings():  # a process without evaluation batches has not called update()
            warnings.simplefilter("ignore")
            value = metric.compute()  # a collective under DDP: every process calls it
        if torch.isfinite(value):  # the same synced value on every process, so all log or none
            self.log(f"{stage}/loss", value, sync_dist=True)
        metric.reset()

    def save_config_hyperparameters(self, object_keys: Sequence[str]) -> None:
        """``save_hyperparameters()`` of the caller's arguments, keeping objects only as config.

        Under LightningCLI the arguments are config (``class_path`` / ``init_args`` dicts), so a checkpoint
        can rebuild the model. In plain Python use, objects (networks, losses, factories) are not config:
        they are dropped from the hyper-parameters (weights are in the state dict).
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key in object_keys:
            if not isinstance(self.hparams.get(key), (dict, str, type(None))):
                self.hparams.pop(key)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}


def safe_metric_key(name: str) -> str:
    """A class name as a metric-key component: runs of characters other than ``[0-9A-Za-z_.-]`` become ``_``."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name) or "class"


def reseed_for_epoch(epoch: int) -> None:
    """Seed torch, numpy and ``random`` from ``(PL_GLOBAL_SEED, epoch)``; nothing without a global seed."""
    base = os.environ.get("PL_GLOBAL_SEED")
    if base is None:
        return
    seed = (int(base) * 1_000_003 + int(epoch)) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WeightedMean(Metric):
    """``sum_b w_b * x_b / sum_b w_b`` with the two sums synced across processes (``nan`` without weight).

    Like ``torchmetrics.MeanMetric`` but updated out of place, so that states reset under
    ``torch.inference_mode`` (one ``Trainer.validate``) can be updated again under ``no_grad`` (a later DDP run
    with gloo, which Lightning evaluates without inference mode).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float) -> None:
        self.total = self.total + value.detach().double().sum() * float(weight)
        self.weight = self.weight + float(weight)

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()
