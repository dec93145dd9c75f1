"""Long-tailed semantic segmentation as a LightningModule: CE (+ AUCSeg's pixel AUC loss)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_lt.callbacks.memory_bank import TailMemoryBank, split_segmentation_batch
from lightning_lt.losses import PixelAUCLoss
from lightning_lt.losses.pixel_auc import check_resizable_logits
from lightning_lt.metrics.segmentation import SegmentationIoU, pixel_tail_classes, validate_tail_classes
from lightning_lt.nets.segmentation import TorchvisionSegmentation
from lightning_lt.tasks.base import (
    DEFAULT_PER_CLASS_SCALARS_MAX,
    TaskModule,
    check_class_info,
    check_per_class_scalars_max,
)
from lightning_lt.tasks.plotting import log_figure, per_class_iou_figure

__all__ = ["NetFactory", "SegmentationModule", "default_segmentation_optimizer", "segmentation_class_weights"]

#: A segmentation network is given as a factory called with the number of classes, e.g. the class
#: :class:`~lightning_lt.nets.TorchvisionSegmentation`; in a config, ``class_path`` + ``init_args`` without
#: ``num_classes`` (the data module provides it).
NetFactory = Callable[[int], nn.Module]

_WEIGHTINGS = ("inverse", "sqrt_inverse", "median_frequency")


def default_segmentation_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW as in AUCSeg (SegNeXt): lr 6e-5, weight decay 0.01."""
    return torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)


def segmentation_class_weights(class_counts: Sequence[int], mode: str) -> Tensor:
    """Cross-entropy class weights from training pixel counts, normalised to mean 1.

    With pixel shares ``f_c = n_c / sum(n)``: ``"inverse"``: ``w_c ∝ 1 / f_c``; ``"sqrt_inverse"``:
    ``w_c ∝ 1 / sqrt(f_c)``; ``"median_frequency"`` (SegNet's median frequency balancing, on total
    counts): ``w_c = median(f) / f_c``, not renormalised. Classes with no training pixel get the largest
    weight of the others (they never occur in a training target anyway).

    Example:
        >>> print(segmentation_class_weights([300, 100], "inverse").tolist())
        [0.5, 1.5]
    """
    if mode not in _WEIGHTINGS:
        raise ValueError(f"Expected a class weighting in {_WEIGHTINGS} or a list of weights, got {mode!r}")
    counts = torch.as_tensor([float(c) for c in class_counts], dtype=torch.float64)
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"Pixel class counts must be >= 0 with a positive sum, got {counts.tolist()}")
    share = counts / counts.sum()
    seen = share > 0
    if mode == "median_frequency":
        weights = share[seen].median() / share.clamp_min(1e-30)
    else:
        weights = 1.0 / share.clamp_min(1e-30)
        if mode == "sqrt_inverse":
            weights = weights.sqrt()
    weights = torch.where(seen, weights, weights[seen].max())
    if mode != "median_frequency":
        weights = weights / weights.mean()
    return weights.float()


def _has_aux_head(net: nn.Module) -> bool:
    """Whether ``net`` carries an auxiliary head: torchvision's ``aux_classifier``, directly or inside a wrapper
    such as :class:`~lightning_lt.nets.TorchvisionSegmentation`."""
    return any(getattr(module, "aux_classifier", None) is not None for module in net.modules())


class SegmentationModule(TaskModule):
    """Semantic segmentation for long-tailed data: loss ``CE + auc_weight * PixelAUC`` (AUCSeg).

    The network's logits are resized (bilinear) to the label size when they differ (an error if their
    aspect ratio differs, e.g. channels-last logits). Pixels labelled ``ignore_index`` are left out of both
    losses and of the metrics.

    **Auxiliary head** (torchvision's ``aux_loss=True`` of DeepLabV3 / FCN): when the network has one
    (``forward_with_aux``, as :class:`~lightning_lt.nets.TorchvisionSegmentation`, or a dict output with
    ``"aux"``), training adds ``aux_weight * CE(aux logits)``, 0.4 by default as AUCSeg's MMSegmentation
    configs weight their auxiliary FCN head (``loss_weight=0.4``; torchvision's reference training uses 0.5). The auxiliary logits get
    the cross-entropy only (same class weights and ignore index), and evaluation uses the main head alone.

    Logged: ``train/loss``, ``train/loss_ce``, ``train/loss_auc`` (with an AUC loss), ``train/loss_aux``
    (with an auxiliary head); ``{stage}/loss``,
    ``{stage}/miou``, ``{stage}/miou_head``, ``{stage}/miou_tail``, ``{stage}/pixel_acc``, ``{stage}/macc``
    and, with ``log_per_class``, ``{stage}/iou/<class name>`` for val and test; a per-class IoU bar chart
    (tail classes highlighted) at the end of each validation epoch.

    **Tail classes** (for head/tail mIoU): those of a :class:`~lightning_lt.callbacks.TailMemoryBank` in the
    Trainer's callbacks if there is one (it is an error if ``tail_classes`` is also given and differs),
    else ``tail_classes``, else :func:`~lightning_lt.metrics.segmentation.pixel_tail_classes` on
    ``class_counts`` with ``tail_share``.

    Args:
        net: factory called as ``net(num_classes)`` returning a network whose output is ``[B, C, h, w]``
            logits (or a dict with ``"out"``, as torchvision's models). An ``nn.Module`` instance is
            accepted too (in Python).
        num_classes: number of classes (linked from the data module by the ``lightning-lt`` CLI).
        class_counts: training pixels per class (linked by the CLI); for the automatic tail classes and
            class weighting.
        class_names: class names for logging (linked by the CLI).
        ignore_index: label of unlabelled pixels; ``None`` takes the data module's ``ignore_index`` at
            setup (and ignores nothing without one).
        class_weights: cross-entropy class weights: ``None``, a list of ``num_classes`` weights, or one of
            ``"inverse"``, ``"sqrt_inverse"``, ``"median_frequency"`` (see
            :func:`segmentation_class_weights`).
        auc_loss: AUCSeg's :class:`~lightning_lt.losses.PixelAUCLoss`, or ``None`` for plain CE. Its
            ``ignore_index`` is set to the task's when it is ``None``.
        auc_weight: ``lambda`` of ``CE + lambda * AUC`` (AUCSeg: 4.0 on ADE20K, 1.0 on Cityscapes).
        tail_classes: explicit tail class ids (see above).
        tail_share: threshold of the automatic tail rule.
        optimizer: factory called with the parameters (default AdamW, lr 6e-5, weight decay 0.01).
        lr_scheduler: optional factory called with the optimizer (e.g. ``torch.optim.lr_scheduler.PolynomialLR``).
        lr_scheduler_interval: ``"step"`` (default, as the poly schedule of segmentation) or ``"epoch"``.
        log_per_class: log the IoU of every class (once per epoch).
        per_class_scalars_max: with ``log_per_class``, up to this many classes the per-class values are scalars
            through ``self.log`` (in ``callback_metrics``); above it they are logged once per epoch as one
            structured object (a single ``log_metrics`` call per logger), see
            :meth:`~lightning_lt.tasks.base.TaskModule.log_class_values`. Either way ``module.per_class_values``
            holds the last epoch's values.
        plot_per_class: log the per-class IoU figure at the end of each validation epoch.
        aux_weight: weight of the auxiliary head's cross-entropy (see above); ``> 0`` when the network has
            an auxiliary head.
        image_key: key of the images in dict batches.
        mask_key: key of the masks in dict batches.

    Raises:
        ValueError: on inconsistent sizes (``class_counts``/``class_names``/``class_weights`` vs
            ``num_classes``), ``auc_weight < 0``, an AUC loss given with a zero weight, ``aux_weight <= 0``
            with a network that has an auxiliary head, an ignore index that disagrees with the data module's
            or the AUC loss's, tail classes that disagree with the memory bank's; a dict batch without
            ``image_key`` / ``mask_key``; logits of another aspect ratio than the labels.
    """

    def __init__(
        self,
        net: NetFactory = TorchvisionSegmentation,
        num_classes: int = 2,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        ignore_index: Optional[int] = None,
        class_weights: Union[None, Literal["inverse", "sqrt_inverse", "median_frequency"], Sequence[float]] = None,
        auc_loss: Optional[PixelAUCLoss] = None,
        auc_weight: float = 1.0,
        tail_classes: Optional[Sequence[int]] = None,
        tail_share: float = 0.1,
        optimizer: OptimizerCallable = default_segmentation_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "step",
        log_per_class: bool = True,
        per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX,
        plot_per_class: bool = True,
        aux_weight: float = 0.4,
        image_key: str = "image",
        mask_key: str = "mask",
    ) -> None:
        super().__init__()
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        if auc_weight < 0:
            raise ValueError(f"Expected `auc_weight` >= 0, got {auc_weight}")
        if auc_loss is not None and auc_weight == 0:
            raise ValueError("`auc_loss` is set but `auc_weight` is 0, so it would be computed and ignored. "
                             "HINT: set `auc_weight` > 0 or `auc_loss: null`.")
        self.save_config_hyperparameters(("net", "auc_loss", "optimizer", "lr_scheduler"))
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.class_names = names
        self.ignore_index = ignore_index
        self.net = net if isinstance(net, nn.Module) else net(num_classes)
        if aux_weight < 0:
            raise ValueError(f"Expected `aux_weight` >= 0, got {aux_weight}")
        self.has_aux_head = _has_aux_head(self.net)
        if aux_weight == 0 and self.has_aux_head:
            raise ValueError(
                "The network has an auxiliary head but `aux_weight` is 0, so the head would never be trained. "
                "HINT: set `aux_weight` > 0 (AUCSeg / MMSegmentation: 0.4), or build the network without it "
                "(`aux_loss=False`)."
            )
        self.aux_weight = float(aux_weight)
        self.image_key = image_key
        self.mask_key = mask_key
        self.register_buffer("ce_weight", self._ce_weight(class_weights), persistent=False)
        self.auc_loss = auc_loss
        self.auc_weight = float(auc_weight)
        self.tail_share = tail_share
        self.requested_tail_classes = None if tail_classes is None else validate_tail_classes(tail_classes, num_classes)
        self.tail_classes: Optional[list[int]] = self.requested_tail_classes
        if self.tail_classes is None and class_counts is not None:
            self.tail_classes = pixel_tail_classes(class_counts, tail_share)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.log_per_class = log_per_class
        self.per_class_scalars_max = check_per_class_scalars_max(per_class_scalars_max)
        self.plot_per_class = plot_per_class
        self.val_metric = SegmentationIoU(num_classes, ignore_index=ignore_index, tail_classes=self.tail_classes)
        self.test_metric = SegmentationIoU(num_classes, ignore_index=ignore_index, tail_classes=self.tail_classes)
        self._sync_ignore_index()

    def _ce_weight(self, class_weights: Any) -> Tensor:
        if class_weights is None:
            return torch.empty(0)
        if isinstance(class_weights, str):
            if self.class_counts is None:
                raise ValueError(
                    f"`class_weights={class_weights!r}` needs the training pixel `class_counts`. HINT: use the "
                    "`lightning-lt` CLI (it links them from the data module) or pass `class_counts`."
                )
            return segmentation_class_weights(self.class_counts, class_weights)
        weights = torch.as_tensor([float(w) for w in class_weights])
        if weights.numel() != self.num_classes or (weights < 0).any():
            raise ValueError(
                f"`class_weights` must hold {self.num_classes} non-negative weights, got {weights.tolist()}"
            )
        return weights

    def _sync_ignore_index(self) -> None:
        if self.auc_loss is not None:
            if self.auc_loss.ignore_index is None:
                self.auc_loss.ignore_index = self.ignore_index
            elif self.ignore_index is not None and self.auc_loss.ignore_index != self.ignore_index:
                raise ValueError(
                    f"The AUC loss ignores label {self.auc_loss.ignore_index} but the task ignores {self.ignore_index}. "
                    "HINT: leave the loss's `ignore_index` unset; it takes the task's."
                )
        for metric in (self.val_metric, self.test_metric):
            metric.ignore_index = self.ignore_index

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_ignore = getattr(datamodule, "ignore_index", None)
        if data_ignore is not None:
            if self.ignore_index is None:
                self.ignore_index = int(data_ignore)
            elif self.ignore_index != data_ignore:
                raise ValueError(
                    f"`ignore_index={self.ignore_index}` but the data module labels unlabelled pixels "
                    f"{data_ignore}. HINT: leave the task's `ignore_index` unset to take the data module's."
                )
        self._sync_ignore_index()
        banks = [cb for cb in trainer.callbacks if isinstance(cb, TailMemoryBank)] if trainer is not None else []
        if banks and banks[0].tail_classes is not None:
            bank_tail = sorted(banks[0].tail_classes)
            if self.requested_tail_classes is not None and sorted(self.requested_tail_classes) != bank_tail:
                raise ValueError(
                    f"`tail_classes={self.requested_tail_classes}` differs from the TailMemoryBank's {bank_tail}; head/tail "
                    "mIoU are reported over the memory bank's tail classes. HINT: set the list in one place."
                )
            self.tail_classes = bank_tail
        for metric in (self.val_metric, self.test_metric):
            if self.tail_classes is not None:
                metric.tail_classes = self.tail_classes

    def _split(self, batch: Any) -> tuple[Tensor, Tensor]:
        return split_segmentation_batch(batch, self.image_key, self.mask_key, owner=type(self).__name__)

    # ---------------------------------------------------------------------------------------- model
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, h, w]`` at the network's output resolution."""
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        return out

    def _logits(self, images: Tensor, masks: Tensor) -> Tensor:
        return self._to_label_size(self(images), masks)

    def _to_label_size(self, logits: Tensor, masks: Tensor) -> Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"The network returns {logits.shape[1]} channels but `num_classes` is {self.num_classes}."
            )
        if logits.shape[-2:] != masks.shape[-2:]:
            check_resizable_logits(logits, masks, type(self).__name__)
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def _train_logits(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Main and auxiliary logits at label resolution (``None`` without an auxiliary head)."""
        if not self.has_aux_head:
            return self._logits(images, masks), None
        forward_with_aux = getattr(self.net, "forward_with_aux", None)
        if callable(forward_with_aux):
            out, aux = forward_with_aux(images)
        else:  # a torchvision model: {"out": ..., "aux": ...}
            result = self.net(images)
            out, aux = result["out"], result.get("aux")
        return self._to_label_size(out, masks), None if aux is None else self._to_label_size(aux, masks)

    def _cross_entropy(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled pixels, ``sum_p w_{y_p} CE_p / sum_p w_{y_p}`` (``w = 1`` without
        class weights), as ``F.cross_entropy``'s mean, but 0 (still in the graph) when no pixel is labelled, where
        that mean is ``nan``; the division is guarded on the device, without a host synchronisation."""
        ignore = -100 if self.ignore_index is None else self.ignore_index
        weight = self.ce_weight.to(logits.dtype) if self.ce_weight.numel() else None
        total = F.cross_entropy(logits, masks, weight=weight, ignore_index=ignore, reduction="sum")
        labelled = masks != ignore
        if weight is None:
            norm = labelled.sum()
        else:
            norm = (weight[torch.where(labelled, masks, 0)] * labelled).sum()
        return total / torch.where(norm > 0, norm, 1)  # no labelled pixel: total is 0, with zero gradients

    def compute_losses(self, logits: Tensor, masks: Tensor, aux_logits: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{"loss", "loss_ce"[, "loss_auc"][, "loss_aux"]}`` for logits at label resolution."""
        loss_ce = self._cross_entropy(logits, masks)
        losses = {"loss_ce": loss_ce, "loss": loss_ce}
        if self.auc_loss is not None:
            losses["loss_auc"] = self.auc_loss(logits, masks)
            losses["loss"] = loss_ce + self.auc_weight * losses["loss_auc"]
        if aux_logits is not None:
            losses["loss_aux"] = self._cross_entropy(aux_logits, masks)
            losses["loss"] = losses["loss"] + self.aux_weight * losses["loss_aux"]
        return losses

    # ------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, masks = self._split(batch)
        logits, aux_logits = self._train_logits(images, masks)
        losses = self.compute_losses(logits, masks, aux_logits)
        batch_size = images.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items() if k != "loss"}, on_step=True, on_epoch=True, batch_size=batch_size
        )
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        if isinstance(batch, Mapping):
            if self.image_key not in batch:
                raise ValueError(
                    f"The prediction batch is a dict without the key {self.image_key!r}; its keys are {list(batch)}. "
                    "HINT: pass `image_key=...` to SegmentationModule with the key of the images."
                )
            images = batch[self.image_key]
        else:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).argmax(dim=1)

    def _eval_step(self, batch: Any, stage: str, metric: SegmentationIoU) -> None:
        images, masks = self._split(batch)
        logits = self._logits(images, masks)
        self.update_eval_loss(stage, self.compute_losses(logits, masks)["loss"], images.shape[0])
        metric.update(logits, masks)

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch_metrics("val", self.val_metric)
        if self.plot_per_class and not self.trainer.sanity_checking and self.trainer.is_global_zero and self.loggers:
            figure = per_class_iou_figure(
                values["iou"].cpu().tolist(), self.class_names, self.tail_classes,
                title=f"per-class IoU, epoch {self.current_epoch}",
            )
            for logger in self.loggers:
                log_figure(logger, "val/per_class_iou", figure, step=self.global_step)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metric)

    def _log_epoch_metrics(self, stage: str, metric: SegmentationIoU) -> dict[str, Tensor]:
        self.log_eval_loss(stage)
        with warnings.catch_warnings():
            if self.tail_classes is None:
                warnings.simplefilter("ignore")
            values = metric.compute()
        keys = ["miou", "pixel_acc", "macc"] + (["miou_head", "miou_tail"] if self.tail_classes is not None else [])
        # torchmetrics has synchronised the values already; sync_dist only averages equal numbers.
        self.log_dict({f"{stage}/{k}": values[k] for k in keys}, sync_dist=True)
        if self.log_per_class:
            self.log_class_values(stage, "iou", self.class_names, values["iou"])
        metric.reset()
        return values

    def on_fit_start(self) -> None:
        if self.tail_classes is None:
            rank_zero_warn(
                "SegmentationModule has no tail classes (no `tail_classes`, `class_counts` or TailMemoryBank): "
                "head/tail mIoU are not logged."
            )
