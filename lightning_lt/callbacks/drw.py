"""Deferred re-weighting (DRW, Cao et al., NeurIPS 2019) as a Lightning callback."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_lt.callbacks.stages import StageCallback
from lightning_lt.losses.class_balanced import _check_beta, class_balanced_weights


class DeferredReweighting(StageCallback):
    """Switch the loss to class-balanced weights from epoch ``start_epoch`` on (deferred re-weighting).

    For epochs ``e < start_epoch`` the loss is unweighted; from ``e >= start_epoch`` (0-based, as
    ``trainer.current_epoch``) it uses ``w_c = (1 - beta) / (1 - beta^n_c)`` normalised to
    ``sum_c w_c = C`` (:func:`~lightning_lt.losses.class_balanced_weights`), set through
    ``getattr(pl_module, loss_attr).set_class_weights(w)``. With ``F.cross_entropy``-style reduction
    the batch loss is ``sum_i w_{y_i} l_i / sum_i w_{y_i}``. LDAM-DRW uses ``start_epoch=160`` of 200
    epochs and ``beta=0.9999``.

    A :class:`~lightning_lt.callbacks.stages.StageCallback` with two stages (unweighted, re-weighted):
    the weights are (re)applied in ``on_fit_start`` and every ``on_train_epoch_start``, and whether the
    switch has happened is kept in the callback's ``state_dict``, so a run resumed from a checkpoint
    saved after the switch is re-weighted from its first step (Lightning calls ``on_fit_start``
    before it restores ``trainer.current_epoch``).

    Args:
        start_epoch: first (0-based) epoch trained with class-balanced weights, ``>= 0``.
        beta: in ``[0, 1)``; ``beta = 0`` gives uniform weights.
        loss_attr: name of the LightningModule attribute holding a :mod:`lightning_lt.losses` loss.

    Raises:
        ValueError: if ``start_epoch < 0``, ``beta`` is outside ``[0, 1)`` or ``loss_attr`` is empty; at
            fit start, if the module has no ``class_counts`` or no ``loss_attr`` attribute, or the loss
            has no ``set_class_weights``.

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning_lt.losses import CrossEntropyLoss
        >>> module = SimpleNamespace(class_counts=[100, 10], loss=CrossEntropyLoss([100, 10]))
        >>> drw = DeferredReweighting(start_epoch=2, beta=0.9)
        >>> drw.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
        >>> print(module.loss.weight)
        None
        >>> drw.on_train_epoch_start(SimpleNamespace(current_epoch=2), module)
        >>> print([round(w, 4) for w in module.loss.weight.tolist()])
        [0.7889, 1.2111]
    """

    def __init__(self, start_epoch: int = 160, beta: float = 0.9999, loss_attr: str = "loss") -> None:
        super().__init__()
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or start_epoch < 0:
            raise ValueError(
                f"Expected `start_epoch` to be an integer >= 0 (the 0-based epoch from which the loss is "
                f"re-weighted), got {start_epoch!r}."
            )
        _check_beta(beta, type(self).__name__)
        if not isinstance(loss_attr, str) or not loss_attr:
            raise ValueError(
                f"Expected `loss_attr` to be the name of the LightningModule attribute holding the loss "
                f"(e.g. 'loss'), got {loss_attr!r}."
            )
        self.start_epoch = start_epoch
        self.beta = float(beta)
        self.loss_attr = loss_attr

    @property
    def active(self) -> bool:
        """Whether the loss is re-weighted (the second stage)."""
        return bool(self.stage)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_attr=self.loss_attr)

    def _loss(self, pl_module: Any) -> Any:
        if not hasattr(pl_module, self.loss_attr):
            raise ValueError(
                f"DeferredReweighting(loss_attr={self.loss_attr!r}): {type(pl_module).__name__} has no attribute "
                f"{self.loss_attr!r}. Set `loss_attr` to the name of the attribute that holds the loss."
            )
        loss = getattr(pl_module, self.loss_attr)
        if not callable(getattr(loss, "set_class_weights", None)):
            raise ValueError(
                f"DeferredReweighting needs a loss with `set_class_weights`, but {type(pl_module).__name__}."
                f"{self.loss_attr} is {type(loss).__name__}. Use a loss from `lightning_lt.losses` (e.g. "
                "CrossEntropyLoss or LDAMLoss) or implement `set_class_weights(weight)`."
            )
        return loss

    def _class_counts(self, pl_module: Any) -> Any:
        counts = getattr(pl_module, "class_counts", None)
        if counts is None:
            raise ValueError(
                f"DeferredReweighting needs the training class counts as `{type(pl_module).__name__}.class_counts`, "
                "but the module has no such attribute (or it is None). "
                "`lightning_lt.tasks.LongTailClassifier` has it (LightningCLI links `data.class_counts`); "
                "for your own module set `self.class_counts = datamodule.class_counts` in `__init__`."
            )
        if isinstance(counts, Tensor):
            counts = counts.detach().cpu()
        return counts

    def stage_at(self, epoch: int, trainer: Any) -> Hashable:
        return epoch >= self.start_epoch

    def apply_stage(self, trainer: Any, pl_module: Any, stage: Hashable) -> None:
        loss = self._loss(pl_module)
        if stage:
            weights = class_balanced_weights(self._class_counts(pl_module), self.beta)
            loss.set_class_weights(weights)
        else:
            loss.set_class_weights(None)

    def describe_stage(self, stage: Hashable) -> str:
        return f"`{self.loss_attr}` class-balanced weights (beta={self.beta})" if stage else f"`{self.loss_attr}` unweighted"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._class_counts(pl_module)  # validate before the first batch
        if self.active:
            rank_zero_info(f"DeferredReweighting: re-applying class-balanced weights to `{self.loss_attr}` (resumed).")
        super().on_fit_start(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "active": self.active, "start_epoch": self.start_epoch, "beta": self.beta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = bool(state_dict.get("stage", state_dict.get("active", self.active)))
        saved = (state_dict.get("start_epoch", self.start_epoch), state_dict.get("beta", self.beta))
        if saved != (self.start_epoch, self.beta):
            rank_zero_warn(
                f"DeferredReweighting: the checkpoint was saved with start_epoch={saved[0]}, beta={saved[1]} but "
                f"this callback has start_epoch={self.start_epoch}, beta={self.beta}; the new values apply from "
                "the next epoch."
            )
