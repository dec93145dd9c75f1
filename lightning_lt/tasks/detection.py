"""Object detection (torchvision RetinaNet / FCOS) with sampling-free training (Chen et al.)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_lt.metrics.detection import DetectionMAP
from lightning_lt.tasks.base import TaskModule, check_class_info, safe_metric_key

__all__ = [
    "DetectionModule",
    "build_detector",
    "default_detection_optimizer",
    "guided_loss_scaling",
    "optimal_bias",
]

_ARCHS = ("retinanet", "fcos")
_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def default_detection_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD as in the detection literature: lr 0.01, momentum 0.9, weight decay 1e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


def optimal_bias(foreground: int, background: int, num_classes: int) -> tuple[float, float]:
    """Sampling-free optimal bias initialisation: ``pi = fg / (fg + bg) / K`` and ``b = -log((1 - pi) / pi)``.

    The classification bias makes every sigmoid output start at the expected positive rate ``pi`` of one
    class on one anchor, instead of focal loss's hand-set prior 0.01.

    Example:
        >>> pi, bias = optimal_bias(foreground=10, background=990, num_classes=10)
        >>> print(f"{pi:.4f} {bias:.4f}")
        0.0010 -6.9068
    """
    if foreground <= 0 or background < 0:
        raise ValueError(
            f"Cannot initialise the bias from {foreground} foreground and {background} background anchors: the "
            "training set must hold at least one box that the detector's assignment rule matches."
        )
    pi = foreground / (foreground + background) / num_classes
    return pi, -math.log((1 - pi) / pi)


def guided_loss_scaling(cls_loss: Tensor, reg_loss: Tensor) -> Tensor:
    """Guided loss scaling: ``L_cls * stopgrad(L_reg / L_cls)``.

    The value equals ``L_reg`` and the gradient is ``L_cls``'s scaled by the constant ``L_reg / L_cls``, so
    the classification term follows the regression term's magnitude without changing its direction.

    Example:
        >>> cls, reg = torch.tensor(8.0, requires_grad=True), torch.tensor(0.5)
        >>> scaled = guided_loss_scaling(cls, reg)
        >>> scaled.backward()
        >>> print(scaled.item(), cls.grad.item())
        0.5 0.0625
    """
    return cls_loss * (reg_loss / cls_loss.clamp_min(1e-12)).detach()


def _bce_classification(cls_logits: Tensor, targets: list[dict[str, Tensor]], matched_idxs: list[Tensor],
                        ignore_value: Optional[int]) -> Tensor:
    """Plain BCE over every (non-ignored) anchor and class, per image summed and divided by its number of
    foreground anchors (torchvision's focal-loss normalisation), averaged over the images."""
    losses = []
    for target, logits, matched in zip(targets, cls_logits, matched_idxs):
        foreground = matched >= 0
        labels = torch.zeros_like(logits)
        labels[foreground, target["labels"][matched[foreground]]] = 1.0
        valid = matched != ignore_value if ignore_value is not None else torch.ones_like(foreground)
        loss = F.binary_cross_entropy_with_logits(logits[valid], labels[valid], reduction="sum")
        losses.append(loss / max(1, int(foreground.sum())))
    return torch.stack(losses).mean()


class SamplingFreeRetinaNetClassificationHead(RetinaNetClassificationHead):
    """RetinaNet's classification head with plain BCE over all anchors (no focal loss, no sampling)."""

    def compute_loss(self, targets, head_outputs, matched_idxs):  # type: ignore[override]
        return _bce_classification(head_outputs["cls_logits"], targets, matched_idxs, self.BETWEEN_THRESHOLDS)


class SamplingFreeFCOSHead(FCOSHead):
    """FCOS's head with plain BCE in place of the focal classification loss (regression and centerness
    unchanged)."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[override]
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        num_foreground = sum(int((m >= 0).sum()) for m in matched_idxs)
        # torchvision's FCOS normalises by the foreground points of the whole batch
        per_image = [
            _bce_classification(logits[None], [t], [m], None) * max(1, int((m >= 0).sum()))
            for t, logits, m in zip(targets, head_outputs["cls_logits"], matched_idxs)
        ]
        losses["classification"] = torch.stack(per_image).sum() / max(1, num_foreground)
        return losses


def build_detector(
    arch: str, num_classes: int, backbone: str = "resnet50", min_size: int = 800, max_size: int = 1333,
    trainable_backbone_layers: int = 5, frozen_batchnorm: bool = False, **kwargs: Any,
) -> nn.Module:
    """A torchvision RetinaNet or FCOS with a ResNet-FPN backbone (P3-P7), built without downloading weights."""
    if arch not in _ARCHS:
        raise ValueError(f"Unknown `arch` {arch!r}: choose from {_ARCHS}")
    if backbone not in _BACKBONES:
        raise ValueError(f"Unknown `backbone` {backbone!r}: choose from {_BACKBONES}")
    body = resnet_fpn_backbone(
        backbone_name=backbone, weights=None, trainable_layers=trainable_backbone_layers,
        norm_layer=FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d,
        returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
    )
    cls = RetinaNet if arch == "retinanet" else FCOS
    return cls(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)


class DetectionModule(TaskModule):
    """Object detection with torchvision's RetinaNet or FCOS, trained with the stock focal loss or sampling-free.

    **Sampling-free training** (Chen et al., "Is Sampling Heuristics Necessary in Training Deep Object
    Detectors?", ``sampling_free=True``):

    1. *Optimal bias initialisation*: before the first training step, one pass over the training set assigns
       anchors (RetinaNet) or points (FCOS) to boxes with the detector's own rule, counting ``fg`` foreground and
       ``bg`` background ones (anchors between RetinaNet's IoU thresholds are ignored, as in its loss); then
       ``pi = fg / (fg + bg) / K`` and the classification bias is ``-log((1 - pi) / pi)``
       (:func:`optimal_bias`). ``pi`` and the bias are kept in the state dict (``prior_pi``, so a resumed run
       does not recompute them), logged, and summed over ranks under DDP.
    2. *Plain BCE over all anchors* for classification, scaled by *guided loss scaling*
       ``L_cls * stopgrad(L_reg / L_cls)`` (:func:`guided_loss_scaling`).
    3. *Adaptive inference threshold*: detections are kept above ``pi * K`` (= ``fg / (fg + bg)``) instead
       of ``score_thresh``.

    Batches are ``(images, targets)``: lists of ``[3, H, W]`` float images in ``[0, 1]`` and dicts with
    ``boxes`` (xyxy, pixels) and ``labels`` (``0..K-1``). Logged: ``train/loss`` and its parts;
    ``{stage}/map``, ``ap50``, ``ap75``, ``ap_small|medium|large``, ``ap_rare|common|frequent`` (LVIS-style
    groups from training box counts) and ``ap/<class>``.

    Args:
        arch: ``"retinanet"`` or ``"fcos"``.
        num_classes / class_counts / class_names: from the data module (linked by the CLI); ``class_counts``
            are training boxes per class (frequency groups).
        backbone: ResNet depth of the FPN backbone (``resnet18`` ... ``resnet101``).
        min_size / max_size: the detector's internal resize (shorter side / longest side).
        weights_path: a local state dict of the whole detector.
        backbone_weights_path: a local torchvision ImageNet ResNet state dict for the backbone; it then uses
            frozen batch norm (as torchvision's detectors do); from scratch it uses trainable batch norm.
        trainable_backbone_layers: ResNet stages trained (5 = all).
        sampling_free: sampling-free training instead of focal loss (see above).
        score_thresh: inference score threshold of the focal-loss detector (sampling-free uses ``pi * K``).
        nms_thresh / detections_per_img: the detector's post-processing.
        rare_max / common_max: frequency-group limits in training boxes (LVIS: 10 / 100).
        optimizer / lr_scheduler / lr_scheduler_interval: factories.
        log_per_class: log one AP per class.

    Raises:
        ValueError: unknown ``arch`` / ``backbone``, inconsistent class facts, or (at the start of training)
            a training set in which no anchor matches a box.
    """

    def __init__(
        self,
        arch: Literal["retinanet", "fcos"] = "retinanet",
        num_classes: int = 2,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50",
        min_size: int = 800,
        max_size: int = 1333,
        weights_path: Optional[str] = None,
        backbone_weights_path: Optional[str] = None,
        trainable_backbone_layers: int = 5,
        sampling_free: bool = False,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        rare_max: int = 10,
        common_max: int = 100,
        optimizer: OptimizerCallable = default_detection_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "step",
        log_per_class: bool = True,
    ) -> None:
        super().__init__()
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        self.save_config_hyperparameters(("optimizer", "lr_scheduler"))
        self.num_classes, self.class_counts, self.class_names = num_classes, class_counts, names
        self.arch = arch
        self.sampling_free = sampling_free
        self.score_thresh = score_thresh
        self.model = build_detector(
            arch, num_classes, backbone, min_size, max_size, trainable_backbone_layers,
            frozen_batchnorm=backbone_weights_path is not None, score_thresh=score_thresh,
            nms_thresh=nms_thresh, detections_per_img=detections_per_img,
        )
        if sampling_free:
            head = self.model.head
            if arch == "retinanet":
                head.classification_head.__class__ = SamplingFreeRetinaNetClassificationHead
            else:
                head.__class__ = SamplingFreeFCOSHead
        if backbone_weights_path is not None:
            self._load_backbone(backbone_weights_path)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        # -1 = not computed yet; a persistent buffer, so checkpoints carry it and a resume does not recompute
        self.register_buffer("prior_pi", torch.tensor(-1.0, dtype=torch.float64))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.log_per_class = log_per_class
        self.val_metric = DetectionMAP(num_classes, class_counts=class_counts, rare_max=rare_max, common_max=common_max)
        self.test_metric = DetectionMAP(num_classes, class_counts=class_counts, rare_max=rare_max, common_max=common_max)

    def _load_backbone(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        body = self.model.backbone.body
        own = body.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise ValueError(f"No tensor of {path} matches the {self.hparams.get('backbone')} backbone's parameters.")
        body.load_state_dict(matched, strict=False)
        rank_zero_info(f"DetectionModule: loaded {len(matched)} of {len(own)} backbone tensors from {path}")

    # ------------------------------------------------------------------------------------- model
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections (``boxes``, ``scores``, ``labels``) for a list of images, in their coordinates."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(images)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------------ bias initialisation
    @torch.no_grad()
    def count_assignments(self, loader: Any) -> tuple[int, int]:
        """Foreground and background anchors (points for FCOS) of ``loader``'s images under the detector's
        own assignment (RetinaNet's ``proposal_matcher``; FCOS's centre sampling and scale ranges), taken
        from the matching the detector passes to its loss."""
        recorded: list[Tensor] = []
        head = self.model.head

        def record(targets: Any, head_outputs: Any, anchors: Any, matched_idxs: list[Tensor]) -> dict[str, Tensor]:
            recorded.extend(m.detach() for m in matched_idxs)
            return {"classification": torch.zeros(()), "bbox_regression": torch.zeros(())}

        fg = bg = 0
        with _training_without_batchnorm_updates(self.model), _patched(head, "compute_loss", record):
            for batch in loader:
                images, targets = self._to_device(batch)
                self.model(images, targets)
                for matched in recorded:
                    fg += int((matched >= 0).sum())
                    bg += int((matched == -1).sum())  # RetinaNet's -2 (between thresholds) is ignored
                recorded.clear()
        return fg, bg

    def _to_device(self, batch: Any) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = batch[0], batch[1]
        images = [image.to(self.device) for image in images]
        targets = [{k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        return images, targets

    def initialise_bias(self, loader: Any) -> float:
        """Count assignments over ``loader`` (summed over ranks), set ``prior_pi``, the classification bias and
        the adaptive score threshold; return ``pi``."""
        fg, bg = self.count_assignments(loader)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(torch.tensor([fg, bg], dtype=torch.float64, device=self.device),
                                                  reduce_op="sum")
            fg, bg = int(counts[0]), int(counts[1])
        pi, _ = optimal_bias(fg, bg, self.num_classes)
        self.prior_pi.fill_(pi)
        self._apply_prior()
        rank_zero_info(
            f"DetectionModule: sampling-free bias initialisation from {fg} foreground and {bg} background "
            f"{'anchors' if self.arch == 'retinanet' else 'points'}: pi = {pi:.3e}, bias = {self.prior_bias:.4f}, "
            f"score threshold = {self.model.score_thresh:.3e}"
        )
        return pi

    @property
    def prior_bias(self) -> float:
        pi = float(self.prior_pi)
        return -math.log((1 - pi) / pi)

    def _apply_prior(self) -> None:
        head = self.model.head.classification_head
        head.cls_logits.bias.data.fill_(self.prior_bias)
        self.model.score_thresh = float(self.prior_pi) * self.num_classes

    def on_train_start(self) -> None:
        self._log_box_report()
        if not self.sampling_free:
            return
        if float(self.prior_pi) < 0:
            self.initialise_bias(self.trainer.train_dataloader)
        else:  # restored from a checkpoint: the bias is in the weights, restore the threshold
            self.model.score_thresh = float(self.prior_pi) * self.num_classes
        self.log_dict({"prior/pi": float(self.prior_pi), "prior/bias": self.prior_bias}, rank_zero_only=True)

    def _log_box_report(self) -> None:
        """Log the data module's counts of clipped / dropped / ignored boxes (``data/<split>_<kind>``)."""
        report = getattr(getattr(self.trainer, "datamodule", None), "box_report", None)
        if not isinstance(report, dict):
            return
        values = {f"data/{split}_{kind}": float(n) for split, counts in report.items() for kind, n in counts.items()}
        self.log_dict(values, rank_zero_only=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pi = checkpoint.get("state_dict", {}).get("prior_pi")
        if self.sampling_free and pi is not None and float(pi) > 0:
            self.model.score_thresh = float(pi) * self.num_classes

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = batch[0], batch[1]
        losses = dict(self.model(list(images), list(targets)))
        if self.sampling_free:
            losses["classification_raw"] = losses["classification"].detach()
            losses["classification"] = guided_loss_scaling(losses["classification"], losses["bbox_regression"])
        total = sum(v for k, v in losses.items() if not k.endswith("_raw"))
        batch_size = len(images)
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True,
                      batch_size=batch_size)
        return total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Tensor]]:
        images = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
        return self.model(list(images))

    def _eval_step(self, batch: Any, metric: DetectionMAP) -> None:
        images, targets = batch[0], batch[1]
        detections = self.model(list(images))
        metric.update(detections, list(targets))

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", self.val_metric)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metric)

    def _log_epoch_metrics(self, stage: str, metric: DetectionMAP) -> None:
        values = metric.compute()
        keys = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ap_rare", "ap_common", "ap_frequent")
        self.log_dict({f"{stage}/{k}": values[k] for k in keys if k in values}, sync_dist=True)
        if self.log_per_class:
            per_class = values["ap_per_class"]
            self.log_dict({f"{stage}/ap/{safe_metric_key(n)}": per_class[i] for i, n in enumerate(self.class_names)},
                          sync_dist=True)
        metric.reset()


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` (an instance attribute) for the duration of the block."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextmanager
def _training_without_batchnorm_updates(model: nn.Module) -> Iterator[None]:
    """``model.train()`` (the detectors assign anchors only in training mode) with batch-norm layers in eval
    mode, so that counting does not change their running statistics."""
    was_training = model.training
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        model.train(was_training)
