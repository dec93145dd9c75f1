"""MaxNorm: per-class norm constraint on the classifier by projected gradient descent (weight balancing, Alshammari et
al., CVPR 2022)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

__all__ = ["MaxNorm", "max_norm_radius", "project_rows"]

_INTERVALS = ("step", "epoch")


def max_norm_radius(weight: Tensor, threshold: float, relative: bool = True) -> float:
    """The radius of the MaxNorm ball: ``threshold`` itself, or, ``relative``, ``min_c |w_c| + threshold *
    (max_c |w_c| - min_c |w_c|)`` over the L2 norms of the rows of ``weight`` (``MaxNorm_via_PGD.setPerLayerThresh``
    of github:ShadeAlsha/LTR-weight-balancing, ``utils/regularizers.py``, with ``thresh=0.1`` in its second stage).

    Example:
        >>> max_norm_radius(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), 0.5)  # 1 + 0.5 * (5 - 1)
        3.0
    """
    if not relative:
        return float(threshold)
    norms = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
    return float(norms.min() + threshold * (norms.max() - norms.min()))


@torch.no_grad()
def project_rows(weight: Tensor, radius: float) -> int:
    """Scale every row of ``weight`` (in place) whose L2 norm exceeds ``radius`` back to norm ``radius``; rows inside
    the ball are left alone. Returns the number of projected rows.

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.6, 0.8]])
        >>> project_rows(w, 2.0), [round(v, 4) for v in w.flatten().tolist()]
        (1, [1.2, 1.6, 0.6, 0.8])
    """
    norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
    outside = norms > radius
    scale = torch.where(outside, radius / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))
    weight.mul_(scale.view(-1, *([1] * (weight.ndim - 1))))
    return int(outside.sum())


class MaxNorm(Callback):
    r"""Keep every class's classifier weight inside an L2 ball: after each optimizer step (or each training epoch),
    rows with ``|w_c| > r`` are scaled to ``|w_c| = r`` (projected gradient descent onto ``{W : |w_c| <= r}``).

    The second stage of weight balancing (Alshammari et al., CVPR 2022) re-trains the classifier of a frozen
    backbone with a class-balanced loss, a large weight decay and this constraint: the decay shrinks all class
    weights, the ball caps the norms of the head classes, so that the tail classes' weights can catch up.

    The radius ``r`` is ``threshold`` (``relative=False``) or, as in the official code (``relative=True``, its
    ``thresh=0.1``), ``min_c |w_c| + threshold * (max_c |w_c| - min_c |w_c|)`` of the weights at the start of the
    fit (:func:`max_norm_radius`). The radius is kept in the callback's ``state_dict``, so a resumed run keeps the
    radius of the original start instead of recomputing it from the half-trained weights.

    Which rows: ``param`` names a parameter of the LightningModule (``pl_module.get_parameter(param)``) whose first
    dimension indexes the classes, ``"head.weight"`` for :class:`~lightning_lt.tasks.LongTailClassifier`'s linear
    head (``[C, D]``); the bias is not constrained (the official code gives it an infinite threshold).

    When: ``interval="step"`` (default) projects after every optimizer step (checked in ``on_train_batch_end`` by
    ``trainer.global_step``, so gradient accumulation projects once per step); ``"epoch"`` projects once at the end
    of each training epoch, which is what the official code does (``utils/trainval.py``, ``train_model``: ``PGD``
    after the training phase of every epoch). Under DDP every process holds the same weights after a step and
    projects them alike.

    Args:
        threshold: the radius (``relative=False``) or its position between the smallest and the largest row norm at
            the start (``relative=True``), ``> 0``.
        relative: radius relative to the starting norms (official weight balancing) or absolute.
        param: dotted name of the constrained parameter (rows = classes).
        interval: ``"step"`` or ``"epoch"``.

    Raises:
        ValueError: ``threshold <= 0`` or not finite, an unknown ``interval``, an empty ``param``; at fit start, a
            ``param`` the module does not have or a 1-D parameter (a bias).

    Example:
        >>> from types import SimpleNamespace
        >>> module = nn.Module()
        >>> module.head = nn.Linear(2, 2, bias=False)
        >>> _ = module.head.weight.data.copy_(torch.tensor([[3.0, 4.0], [0.6, 0.8]]))
        >>> callback = MaxNorm(threshold=2.0, relative=False)
        >>> callback.on_fit_start(SimpleNamespace(), module)
        >>> callback.project(module)
        >>> [round(v, 4) for v in module.head.weight.norm(dim=1).tolist()]
        [2.0, 1.0]
    """

    def __init__(
        self,
        threshold: float = 0.1,
        relative: bool = True,
        param: str = "head.weight",
        interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        is_number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not is_number or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(
                f"Expected `threshold` of MaxNorm to be a finite number > 0, got {threshold!r}. HINT: the official "
                "weight-balancing value is `threshold=0.1` with `relative=True` (10% of the way from the smallest to "
                "the largest class norm); with `relative=False` it is the radius itself."
            )
        if interval not in _INTERVALS:
            raise ValueError(f"Expected `interval` of MaxNorm to be one of {_INTERVALS}, got {interval!r}.")
        if not isinstance(param, str) or not param:
            raise ValueError(f"Expected `param` of MaxNorm to name a parameter, e.g. 'head.weight', got {param!r}.")
        self.threshold = float(threshold)
        self.relative = bool(relative)
        self.param = param
        self.interval = interval
        #: Radius of the ball; set at the first fit start and kept across checkpoints.
        self.radius: Optional[float] = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(param=self.param)

    def _weight(self, pl_module: nn.Module) -> nn.Parameter:
        try:
            weight = pl_module.get_parameter(self.param)
        except AttributeError as err:
            names = [name for name, p in pl_module.named_parameters() if p.ndim >= 2][-5:]
            raise ValueError(
                f"MaxNorm(param={self.param!r}): {type(pl_module).__name__} has no parameter {self.param!r} ({err}). "
                f"HINT: set `param` to the classifier weight, e.g. one of {names}."
            ) from err
        if weight.ndim < 2:
            raise ValueError(
                f"MaxNorm(param={self.param!r}) constrains the per-class rows of a matrix, but {self.param!r} has "
                f"shape {tuple(weight.shape)}. HINT: name the classifier weight (e.g. 'head.weight'); weight balancing "
                "leaves the bias unconstrained."
            )
        return weight

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight = self._weight(pl_module)
        if self.radius is None:
            self.radius = max_norm_radius(weight, self.threshold, self.relative)
            rank_zero_info(
                f"MaxNorm: {self.param} rows are kept within norm {self.radius:.4g} (row norms now "
                f"{float(weight.detach().reshape(weight.shape[0], -1).norm(dim=1).min()):.4g} .. "
                f"{float(weight.detach().reshape(weight.shape[0], -1).norm(dim=1).max()):.4g})."
            )
        self._last_step = int(getattr(trainer, "global_step", 0))

    def project(self, pl_module: nn.Module) -> None:
        """Project the rows of the constrained parameter onto the ball (needs the radius: after ``on_fit_start``)."""
        if self.radius is None:
            raise RuntimeError("MaxNorm.project needs the radius, which is set in `on_fit_start`. HINT: add the "
                               "callback to the Trainer (or call `on_fit_start` first).")
        project_rows(self._weight(pl_module).data, self.radius)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step" and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.project(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self.project(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"radius": self.radius, "threshold": self.threshold, "relative": self.relative}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("threshold", self.threshold), state_dict.get("relative", self.relative))
        if saved != (self.threshold, self.relative):
            rank_zero_warn(
                f"MaxNorm: the checkpoint was saved with threshold={saved[0]}, relative={saved[1]} but this callback "
                f"has threshold={self.threshold}, relative={self.relative}; the radius is recomputed from the current "
                "weights."
            )
            return
        self.radius = state_dict.get("radius", self.radius)
