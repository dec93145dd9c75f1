"""What the task modules share: class facts from the data module, config hyper-parameters, optimizers."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

__all__ = ["TaskModule", "check_class_info", "safe_metric_key"]


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
