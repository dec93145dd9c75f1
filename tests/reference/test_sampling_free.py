"""Reference test: the sampling-free classification loss against a transcription of the official code.

Reference: ChenJoya/sampling-free (maskrcnn-benchmark fork of "Is Heuristic Sampling Necessary in Training Deep
Object Detectors?"), the RetinaNet loss with ``MODEL.SAMPLING_FREE_ON``:

- ``maskrcnn_benchmark/modeling/rpn/retinanet/loss.py``, ``RetinaNetLossComputationFree.__call__`` (the loss),
  with ``discard_cases = ['between_thresholds']``;
- ``maskrcnn_benchmark/modeling/rpn/loss.py``, ``RPNLossComputationSampling.prepare_targets`` (its parent: the
  per-anchor labels; ``generate_retinanet_labels`` reads the matched box's ``labels`` field);
- ``maskrcnn_benchmark/modeling/rpn/utils.py``, ``concat_box_prediction_layers`` (the ``[N * A, C]`` layout);
- ``maskrcnn_benchmark/modeling/matcher.py``, ``Matcher`` (-1 below the background threshold, -2 between);
- ``maskrcnn_benchmark/modeling/sampling_free.py``, ``guided_loss_scaling``.

What the reference computes: ``labels`` per image are the matched boxes' classes ``1..K``, set to 0 below the
background threshold and to -1 between the thresholds; the BCE targets are one-hot only where ``labels > 0``, so
the -1 anchors get all-zero targets and count as background in ``binary_cross_entropy_with_logits(box_cls,
box_cls_labels, reduction="sum")``; the normaliser is ``pos_inds.numel() + N`` with ``N = len(labels)``, the
number of images in the (per-GPU) batch. The library uses the same loss for FCOS, over points.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.tasks.detection import (
    DetectionModule,
    SamplingFreeFCOSHead,
    SamplingFreeRetinaNetClassificationHead,
    guided_loss_scaling,
)

BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = -1, -2  # maskrcnn_benchmark.modeling.matcher.Matcher


def reference_free_cls_loss(box_cls, gt_labels, matched_idxs, retinanet_regression_loss):
    """Transcription of ``RetinaNetLossComputationFree.__call__`` (classification part) and its
    ``prepare_targets``, step for step.

    Args:
        box_cls: ``[N, A, C]`` logits (anchors of all levels per image, as ``concat_box_prediction_layers``
            orders them before its final reshape).
        gt_labels: per image, the ``[M_i]`` classes ``1..K`` of its boxes (maskrcnn-benchmark's contiguous ids).
        matched_idxs: per image, ``[A]`` matcher output (box index, -1 or -2).
        retinanet_regression_loss: the regression loss that guided loss scaling follows.

    Returns:
        ``(retinanet_cls_loss before guided scaling, after)``.
    """
    # prepare_targets (RPNLossComputationSampling), one image at a time
    labels = []
    for gt_labels_per_image, matched_idxs_per_image in zip(gt_labels, matched_idxs):
        # match_targets_to_anchors: matched_targets = target[matched_idxs.clamp(min=0)]
        matched_labels = gt_labels_per_image[matched_idxs_per_image.clamp(min=0)]
        # generate_retinanet_labels: matched_targets.get_field("labels"); then .to(dtype=torch.float32)
        labels_per_image = matched_labels.to(dtype=torch.float32)
        # Background (negative examples)
        bg_indices = matched_idxs_per_image == BELOW_LOW_THRESHOLD
        labels_per_image[bg_indices] = 0
        # discard_cases = ['between_thresholds'] (no 'not_visibility' for RetinaNet)
        inds_to_discard = matched_idxs_per_image == BETWEEN_THRESHOLDS
        labels_per_image[inds_to_discard] = -1
        labels.append(labels_per_image)

    # RetinaNetLossComputationFree.__call__
    N = len(labels)
    C = box_cls.shape[-1]
    box_cls = box_cls.reshape(-1, C)  # concat_box_prediction_layers: cat(..., dim=1).reshape(-1, C)
    labels = torch.cat(labels, dim=0)
    pos_inds = torch.nonzero(labels > 0).squeeze(1)
    box_cls_labels = torch.zeros_like(box_cls, device=box_cls.device)
    box_cls_labels[pos_inds, labels[pos_inds].long() - 1] = 1
    retinanet_cls_loss = F.binary_cross_entropy_with_logits(box_cls, box_cls_labels, reduction="sum") / (
        pos_inds.numel() + N
    )
    unscaled = retinanet_cls_loss
    # guided_loss_scaling (sampling_free.py)
    with torch.no_grad():
        w = retinanet_regression_loss / retinanet_cls_loss
    retinanet_cls_loss = retinanet_cls_loss * w  # the reference's `box_cls_loss *= w`
    return unscaled, retinanet_cls_loss


def random_batch(seed: int, fcos: bool, anchors: int = 60, classes: int = 5):
    """Logits, 0-based targets and matcher outputs of 4 images with 3, 1, 2 and 4 boxes and different numbers of
    foreground anchors (one image with none); RetinaNet's also has anchors between the thresholds."""
    g = torch.Generator().manual_seed(seed)
    boxes_per_image = [3, 1, 2, 4]
    foreground_per_image = [17, 3, 0, 8]
    logits = (torch.randn(len(boxes_per_image), anchors, classes, generator=g, dtype=torch.float64) * 3 - 2)
    targets, matched = [], []
    for m, num_foreground in zip(boxes_per_image, foreground_per_image):
        labels = torch.randint(0, classes, (m,), generator=g)
        xy = torch.rand(m, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + 5 + torch.rand(m, 2, generator=g) * 30], dim=1)
        foreground = torch.zeros(anchors, dtype=torch.bool)
        foreground[torch.randperm(anchors, generator=g)[:num_foreground]] = True
        idx = torch.randint(0, m, (anchors,), generator=g)
        negative = torch.full((anchors,), BELOW_LOW_THRESHOLD)
        if not fcos:  # a third of the non-foreground anchors between the thresholds
            negative = torch.where(torch.rand(anchors, generator=g) < 0.33, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD)
        matched.append(torch.where(foreground, idx, negative))
        targets.append({"boxes": boxes, "labels": labels})
    return logits, targets, matched


def library_cls_loss(arch: str, logits, targets, matched):
    classes = logits.shape[-1]
    if arch == "retinanet":
        head = SamplingFreeRetinaNetClassificationHead(in_channels=32, num_anchors=1, num_classes=classes).double()
        return head.compute_loss(targets, {"cls_logits": logits}, matched)
    head = SamplingFreeFCOSHead(in_channels=32, num_anchors=1, num_classes=classes, num_convs=1).double()
    n, a = logits.shape[:2]
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(a, 2, generator=g, dtype=torch.float64) * 60
    points = [torch.cat([xy, xy + 8], dim=1) for _ in range(n)]
    head_outputs = {"cls_logits": logits, "bbox_regression": torch.rand(n, a, 4, generator=g, dtype=torch.float64),
                    "bbox_ctrness": torch.randn(n, a, 1, generator=g, dtype=torch.float64)}
    return head.compute_loss(targets, head_outputs, points, matched)["classification"]


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_loss_matches_the_reference(arch, seed):
    logits, targets, matched = random_batch(seed, fcos=arch == "fcos")
    counts = [int((m >= 0).sum()) for m in matched]
    assert len(set(counts)) == len(counts) and 0 in counts  # different foreground counts, one image without any
    if arch == "retinanet":
        assert all(bool((m == BETWEEN_THRESHOLDS).any()) for m in matched)
    reg = torch.tensor(0.37, dtype=torch.float64)

    ours_logits = logits.clone().requires_grad_(True)
    ours = library_cls_loss(arch, ours_logits, targets, matched)
    ours_scaled = guided_loss_scaling(ours, reg)
    ref_logits = logits.clone().requires_grad_(True)
    ref, ref_scaled = reference_free_cls_loss(ref_logits, [t["labels"] + 1 for t in targets], matched, reg)

    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_scaled, ref_scaled, rtol=1e-6, atol=1e-6)
    for a, b in ((ours, ref), (ours_scaled, ref_scaled)):
        (grad_ours,) = torch.autograd.grad(a, ours_logits, retain_graph=True)
        (grad_ref,) = torch.autograd.grad(b, ref_logits, retain_graph=True)
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)


def test_the_detectors_loss_matches_the_reference_on_its_own_matching():
    """Through torchvision's RetinaNet: the library's classification loss of a real batch (3 images, 2 / 1 / 0
    boxes, real anchors with between-threshold ones) equals the reference on the same logits and matching."""
    torch.manual_seed(0)
    module = DetectionModule("retinanet", num_classes=3, backbone="resnet18", min_size=64, max_size=64,
                             sampling_free=True)
    module.train()
    images = [torch.rand(3, 64, 64) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6, 30, 40], [30, 20, 60, 50]]), "labels": torch.tensor([2, 0])},
        {"boxes": torch.tensor([[10.0, 10, 26, 22]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    recorded = {}
    head = module.model.head.classification_head
    stock = head.compute_loss

    def record(targets_, head_outputs, matched_idxs):
        recorded.update(logits=head_outputs["cls_logits"], matched=matched_idxs, targets=targets_)
        return stock(targets_, head_outputs, matched_idxs)

    head.compute_loss = record
    losses = module.model(images, targets)
    matched = recorded["matched"]
    assert any(bool((m == BETWEEN_THRESHOLDS).any()) for m in matched)
    # the reference has no image without boxes (maskrcnn-benchmark drops them from training); its formula on the
    # other two images, plus one image whose anchors are all background, is what the library computes
    gt_labels = [t["labels"] + 1 if len(t["labels"]) else torch.ones(1, dtype=torch.int64) for t in recorded["targets"]]
    ref, ref_scaled = reference_free_cls_loss(recorded["logits"], gt_labels, matched, losses["bbox_regression"])
    torch.testing.assert_close(losses["classification"], ref, rtol=1e-6, atol=1e-6)
    ours_scaled = guided_loss_scaling(losses["classification"], losses["bbox_regression"])
    torch.testing.assert_close(ours_scaled, ref_scaled, rtol=1e-6, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours_scaled, recorded["logits"], retain_graph=True)
    (grad_ref,) = torch.autograd.grad(ref_scaled, recorded["logits"], retain_graph=True)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)
