"""Stage-wise callbacks: behaviour that depends on the epoch and survives checkpoint resume."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class StageCallback(Callback):
    """Base class of callbacks whose behaviour is a *stage* chosen by the epoch.

    Subclasses implement :meth:`stage_at` (the stage of a 0-based epoch) and :meth:`apply_stage`. The
    stage is applied in ``on_fit_start`` and re-evaluated in every ``on_train_epoch_start``; it is kept in
    the callback's ``state_dict``. Lightning restores ``trainer.current_epoch`` only after
    ``on_fit_start``, so on resume the *saved* stage is applied there and the epoch's stage is confirmed
    before the first batch: a run resumed after a switch continues in the right stage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage: Optional[Hashable] = None

    def stage_at(self, epoch: int, trainer: pl.Trainer) -> Hashable:
        """The stage of 0-based ``epoch``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `stage_at(epoch, trainer)`")

    def apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable) -> None:
        """Put ``stage`` into effect."""
        raise NotImplementedError(f"{type(self).__name__} must implement `apply_stage(trainer, pl_module, stage)`")

    def describe_stage(self, stage: Hashable) -> str:
        return repr(stage)

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable, force: bool) -> None:
        if not force and stage == self.stage:
            return
        self.apply_stage(trainer, pl_module, stage)
        if stage != self.stage:
            rank_zero_info(
                f"{type(self).__name__}: epoch {trainer.current_epoch}: stage {self.describe_stage(stage)}"
            )
        self.stage = stage

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stage if self.stage is not None else self.stage_at(trainer.current_epoch, trainer)
        self._enter(trainer, pl_module, stage, force=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module, self.stage_at(trainer.current_epoch, trainer), force=False)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = state_dict.get("stage", self.stage)
