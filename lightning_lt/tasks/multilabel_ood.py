"""Multi-label classification with out-of-distribution detection (JointEnergy; unknown-aware training)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_lt.losses.multilabel import energy_gap_loss, multilabel_bce, outlier_confidence_loss
from lightning_lt.metrics.multilabel import MultilabelAP, label_tail_groups
from lightning_lt.metrics.ood import OOD_SCORES, OODDetection, ood_scores
from lightning_lt.tasks.base import (
    DEFAULT_PER_CLASS_SCALARS_MAX,
    TaskModule,
    check_class_info,
    check_per_class_scalars_max,
)
from lightning_lt.tasks.plotting import log_figure, ood_score_histogram_figure

__all__ = ["MultiLabelOODModule", "default_multilabel_optimizer"]


def default_multilabel_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam, lr 1e-4 (the JointEnergy / EDGE fine-tuning setting)."""
    return torch.optim.Adam(params, lr=1e-4)


class MultiLabelOODModule(TaskModule):
    """Multi-label classification that also detects images belonging to none of the known label sets.

    **Training.** A batch ``(images, targets)`` (multi-hot ``[B, C]``) trains ``L_id = loss(logits, targets)``
    (binary cross-entropy by default; e.g. :class:`~lightning_lt.losses.AsymmetricLoss`). With an
    outlier-exposure (OE) stream, the batch is a dict ``{"id": (images, targets), "oe": (images, ...)}``
    (Lightning's ``CombinedLoader``, as the multi-label data modules build it when ``oe_classes`` are given)
    and the loss is unknown-aware training (EDGE, AAAI 2025):

    ``L = L_id + alpha * L_conf + beta * 1[epoch >= gap_start_epoch] * L_gap``

    with ``L_conf = mean_{o, c} -log(1 - sigmoid(f_c(x_o)))`` over the OE images and labels and
    ``L_gap = mean_{o, j} relu(S(x_o) - S(x_j) + gap_margin)`` over OE images ``o`` and the ``gap_k``
    in-distribution images ``j`` of the batch with the lowest JointEnergy ``S`` (see
    :mod:`lightning_lt.losses.multilabel`). ID and OE images go through the network in one forward pass. Under
    DDP the batch of ``L_gap`` is the global one, as in the reference (one ``nn.DataParallel`` batch): the
    JointEnergies of all processes are gathered with their gradients, so the bottom-``gap_k`` is taken over the
    union of the processes' batches and a DDP step equals the single-process step on that union.

    **Evaluation.** Batches ``(images, targets, is_ood)`` (``is_ood`` optional). Logged per stage: ``map``
    (macro mAP over the labels with a positive), ``map_head`` / ``map_tail``, one ``ap/<label>`` per label
    (``log_per_class``) on the in-distribution images, and for every OOD score (``ood_scores``:
    ``jointenergy`` = ``sum_c softplus(f_c)``, ``maxlogit``, ``maxsigmoid``, ``energy`` = ``logsumexp_c f_c``;
    all with **higher = in-distribution**) ``auroc_<score>``, ``aupr_in_<score>``, ``aupr_out_<score>`` and
    ``fpr95_<score>`` (in-distribution = positive). At the end of each validation epoch a histogram of the
    ``histogram_score`` of ID vs OOD images is logged (in DDP, from rank 0's share of the images).

    **Head / tail labels**: ``tail_labels`` if given; else the data module's ``tail_labels`` if it has them;
    else labels with fewer than ``tail_threshold`` positive training images (``class_counts``).

    Args:
        backbone: network returning ``[B, num_classes]`` logits (e.g. ``TorchvisionBackbone(..., num_classes=...)``)
            or ``[B, D]`` features with ``num_features`` (a linear head is added).
        num_classes: number of labels (linked from the data module by the ``lightning-lt`` CLI).
        class_counts: positive training images per label (linked by the CLI).
        class_names: label names (linked by the CLI).
        loss: in-distribution loss ``loss(logits, targets)``; ``None`` is binary cross-entropy.
        alpha: weight of the OE confidence loss (``>= 0``).
        beta: weight of the energy-gap loss (``>= 0``).
        gap_start_epoch: first (0-based) epoch with the gap loss.
        gap_k: bottom-k in-distribution images of the (global) batch in the gap loss.
        gap_margin: margin ``m`` of the gap loss.
        tail_labels / tail_threshold: see above.
        ood_score_names: OOD scores evaluated side by side.
        histogram_score: score shown in the ID-vs-OOD histogram.
        optimizer / lr_scheduler / lr_scheduler_interval: optimizer and scheduler factories.
        log_per_class: log the AP of every label (once per epoch).
        per_class_scalars_max: with ``log_per_class``, up to this many classes the per-class values are scalars
            through ``self.log`` (in ``callback_metrics``); above it they are logged once per epoch as one
            structured object (a single ``log_metrics`` call per logger), see
            :meth:`~lightning_lt.tasks.base.TaskModule.log_class_values`. Either way ``module.per_class_values``
            holds the last epoch's values.
        plot_histogram: log the score histogram at the end of each validation epoch.

    Raises:
        ValueError: on inconsistent class facts, negative weights, ``gap_k < 1``, an unknown score name, or a
            backbone whose output size cannot be determined.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        loss: Optional[nn.Module] = None,
        alpha: float = 1.0,
        beta: float = 0.1,
        gap_start_epoch: int = 50,
        gap_k: int = 50,
        gap_margin: float = 1.0,
        tail_labels: Optional[Sequence[int]] = None,
        tail_threshold: int = 20,
        ood_score_names: Sequence[str] = OOD_SCORES,
        histogram_score: str = "jointenergy",
        optimizer: OptimizerCallable = default_multilabel_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        log_per_class: bool = True,
        per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX,
        plot_histogram: bool = True,
    ) -> None:
        super().__init__()
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        for name, value in (("alpha", alpha), ("beta", beta), ("gap_start_epoch", gap_start_epoch)):
            if value < 0:
                raise ValueError(f"Expected `{name}` >= 0, got {value}")
        if gap_k < 1:
            raise ValueError(f"Expected `gap_k` >= 1 (bottom-k in-distribution images), got {gap_k}")
        unknown = [s for s in ood_score_names if s not in OOD_SCORES]
        if unknown or not ood_score_names:
            raise ValueError(f"Unknown OOD score(s) {unknown} in `ood_score_names`: choose from {OOD_SCORES}")
        if histogram_score not in ood_score_names:
            raise ValueError(f"`histogram_score={histogram_score!r}` is not one of `ood_score_names` {list(ood_score_names)}")
        self.save_config_hyperparameters(("backbone", "loss", "optimizer", "lr_scheduler"))
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.class_names = names
        self.backbone = backbone
        self.head = self._build_head(backbone, num_classes)
        self.loss = loss
        self.alpha, self.beta = float(alpha), float(beta)
        self.gap_start_epoch, self.gap_k, self.gap_margin = int(gap_start_epoch), int(gap_k), float(gap_margin)
        self.tail_threshold = tail_threshold
        self.requested_tail_labels = None if tail_labels is None else [int(c) for c in tail_labels]
        self.ood_score_names = list(ood_score_names)
        self.histogram_score = histogram_score
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.log_per_class = log_per_class
        self.per_class_scalars_max = check_per_class_scalars_max(per_class_scalars_max)
        self.plot_histogram = plot_histogram
        tail = self.requested_tail_labels
        if tail is None and class_counts is not None:
            tail = _tail_or_none(class_counts, tail_threshold)
        self.tail_labels: Optional[list[int]] = tail
        self.val_map = MultilabelAP(num_classes, tail_labels=tail)
        self.test_map = MultilabelAP(num_classes, tail_labels=tail)
        self.val_ood = OODDetection(self.ood_score_names)
        self.test_ood = OODDetection(self.ood_score_names)
        self._histogram: dict[str, list[Tensor]] = {"id": [], "ood": []}
        self._warned_no_oe = False

    @staticmethod
    def _build_head(backbone: nn.Module, num_classes: int) -> nn.Module:
        num_features = getattr(backbone, "num_features", None)
        if num_features is None:
            return nn.Identity()  # the backbone returns logits itself
        if not isinstance(num_features, int):
            raise ValueError(f"`backbone.num_features` must be an int, got {num_features!r}")
        return nn.Linear(num_features, num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_tail = getattr(datamodule, "tail_labels", None)
        if self.requested_tail_labels is None and data_tail is not None:
            self.tail_labels = list(data_tail)
        if self.tail_labels is not None:
            self.val_map.tail_labels = self.tail_labels
            self.test_map.tail_labels = self.tail_labels

    # ---------------------------------------------------------------------------------------- model
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        logits = self.head(self.backbone(x))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"The network returns shape {tuple(logits.shape)}, expected [batch, {self.num_classes}]. HINT: give "
                "the backbone `num_features` (a linear head is added) or make it return one logit per label."
            )
        return logits

    def id_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.loss is None:
            return multilabel_bce(logits, targets)
        return self.loss(logits, targets.to(logits.dtype))

    def gap_active(self) -> bool:
        """Whether the energy-gap term is on in the current epoch."""
        return self.beta > 0 and self.current_epoch >= self.gap_start_epoch

    def compute_losses(self, id_logits: Tensor, targets: Tensor, oe_logits: Optional[Tensor]) -> dict[str, Tensor]:
        """``{"loss", "loss_id"[, "loss_conf", "loss_gap"]}``; the OE terms need ``oe_logits``."""
        losses = {"loss_id": self.id_loss(id_logits, targets)}
        total = losses["loss_id"]
        if oe_logits is not None:
            losses["loss_conf"] = outlier_confidence_loss(oe_logits)
            total = total + self.alpha * losses["loss_conf"]
            if self.gap_active():
                losses["loss_gap"] = energy_gap_loss(
                    id_logits, oe_logits, self.gap_k, self.gap_margin, global_batch=True
                )
                total = total + self.beta * losses["loss_gap"]
        losses["loss"] = total
        return losses

    # ------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        oe_images = None
        if isinstance(batch, dict):
            if "id" not in batch:
                raise ValueError(f"A dict training batch needs an 'id' entry (and optionally 'oe'), got keys {list(batch)}")
            images, targets = batch["id"][0], batch["id"][1]
            if batch.get("oe") is not None:
                oe_images = batch["oe"][0]
        else:
            images, targets = batch[0], batch[1]
        if oe_images is None and (self.alpha > 0 or self.beta > 0) and not self._warned_no_oe:
            self._warned_no_oe = True
            if isinstance(batch, dict):
                rank_zero_warn("MultiLabelOODModule: a training batch has no 'oe' images; trained with L_id only.")
        if oe_images is not None:
            logits = self(torch.cat([images, oe_images]))
            id_logits, oe_logits = logits[: images.shape[0]], logits[images.shape[0] :]
        else:
            id_logits, oe_logits = self(images), None
        losses = self.compute_losses(id_logits, targets, oe_logits)
        self.log("train/loss", losses["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, on_step=True, on_epoch=True,
                      batch_size=images.shape[0])
        return losses["loss"]

    # ----------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_map, self.val_ood)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_map, self.test_ood)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(images)
        return {"probs": logits.sigmoid(), **ood_scores(logits, self.ood_score_names)}

    def _eval_step(self, batch: Any, stage: str, map_metric: MultilabelAP, ood_metric: OODDetection) -> None:
        images, targets = batch[0], batch[1]
        is_ood = batch[2].bool() if len(batch) > 2 else torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        logits = self(images)
        in_dist = ~is_ood
        if in_dist.any():
            map_metric.update(logits[in_dist], targets[in_dist])
            self.update_eval_loss(stage, self.id_loss(logits[in_dist], targets[in_dist]), int(in_dist.sum()))
        else:  # keeps every process's loss state in step under DDP
            self.update_eval_loss(stage, logits.new_zeros(()), 0)
        scores = ood_scores(logits, self.ood_score_names)
        ood_metric.update(scores, is_ood)
        if stage == "val" and self.plot_histogram:
            self._histogram["id"].append(scores[self.histogram_score][in_dist].detach().cpu())
            self._histogram["ood"].append(scores[self.histogram_score][is_ood].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", self.val_map, self.val_ood)
        histogram, self._histogram = self._histogram, {"id": [], "ood": []}
        if self.plot_histogram and not self.trainer.sanity_checking and self.trainer.is_global_zero and self.loggers:
            figure = ood_score_histogram_figure(
                torch.cat(histogram["id"]).tolist() if histogram["id"] else [],
                torch.cat(histogram["ood"]).tolist() if histogram["ood"] else [],
                self.histogram_score, title=f"{self.histogram_score}: ID vs OOD, epoch {self.current_epoch}",
            )
            for logger in self.loggers:
                log_figure(logger, f"val/ood_histogram_{self.histogram_score}", figure, step=self.global_step)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_map, self.test_ood)

    def _log_epoch_metrics(self, stage: str, map_metric: MultilabelAP, ood_metric: OODDetection) -> None:
        self.log_eval_loss(stage)
        values: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            if self.tail_labels is None:
                warnings.simplefilter("ignore")
            maps = map_metric.compute()
        keys = ["map"] + (["map_head", "map_tail"] if self.tail_labels is not None else [])
        values.update({k: maps[k] for k in keys})
        values.update(ood_metric.compute())
        # torchmetrics has synchronised the values already; sync_dist only averages equal numbers.
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=True)
        if self.log_per_class:
            self.log_class_values(stage, "ap", self.class_names, maps["ap"])
        map_metric.reset()
        ood_metric.reset()


def _tail_or_none(class_counts: Sequence[int], tail_threshold: int) -> Optional[list[int]]:
    try:
        return label_tail_groups(class_counts, tail_threshold)
    except ValueError as err:
        rank_zero_warn(f"No head / tail split of the labels: {err}")
        return None
