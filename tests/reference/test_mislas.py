"""MiSLAS (Zhong et al., CVPR 2021) against transcriptions of its official code.

Reference: github:dvlab-research/MiSLAS, read, not imported:

- ``methods.py``, ``LabelAwareSmoothing.__init__``: per-class smoothing from ``cls_num_list`` with ``n_1 = max``,
  ``n_K = min`` (so the class order does not matter; head = most samples gets ``smooth_head``), by ``shape``
  (concave / linear / convex / exp), numpy float64 cast to float32; ``forward``: ``confidence * nll + smoothing *
  (-mean_c log p_c)``, averaged over the batch;
- ``methods.py``, ``mixup_data`` / ``mixup_criterion``: ``lam * x + (1 - lam) * x[index]``, ``y_a = y``,
  ``y_b = y[index]``; ``lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)``;
- ``methods.py``, ``LearnableWeightScaling``: ``learned_norm * logits`` with ``learned_norm = ones(1, C)``;
- ``train_stage2.py``, ``train``: the backbone under ``torch.no_grad()``, in ``train()`` mode with ``shift_bn`` (its
  BatchNorm statistics follow the stage-2 batches) and ``eval()`` mode without; ``adjust_learning_rate``: a cosine
  ``0.5 * lr * (1 + cos(pi * epoch / num_epochs))`` per epoch, ``lr_factor`` times it for the classifier (group 0), the
  full rate for the LWS scales (group 1).
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lt.callbacks import Mixup
from lightning_lt.datamodules.profiles import imbalance_counts
from lightning_lt.losses import CrossEntropyLoss, LabelAwareSmoothingLoss, mixed_loss
from lightning_lt.nets import MLP
from lightning_lt.optim import WarmupCosineLR
from lightning_lt.tasks import DecoupledClassifier, LongTailClassifier

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference")

CIFAR10_LT = imbalance_counts(5000, 10, 100.0, "exp")
CIFAR100_LT = imbalance_counts(500, 100, 100.0, "exp")


# ----------------------------------------------------------------------------- transcriptions of the reference
def official_smooth(cls_num_list, smooth_head, smooth_tail, shape="concave", power=None) -> torch.Tensor:
    """``LabelAwareSmoothing.__init__``, step for step."""
    n_1 = max(cls_num_list)
    n_K = min(cls_num_list)
    if shape == "concave":
        smooth = smooth_tail + (smooth_head - smooth_tail) * np.sin((np.array(cls_num_list) - n_K) * np.pi / (2 * (n_1 - n_K)))
    elif shape == "linear":
        smooth = smooth_tail + (smooth_head - smooth_tail) * (np.array(cls_num_list) - n_K) / (n_1 - n_K)
    elif shape == "convex":
        smooth = smooth_head + (smooth_head - smooth_tail) * np.sin(1.5 * np.pi + (np.array(cls_num_list) - n_K) * np.pi / (2 * (n_1 - n_K)))
    elif shape == "exp" and power is not None:
        smooth = smooth_tail + (smooth_head - smooth_tail) * np.power((np.array(cls_num_list) - n_K) / (n_1 - n_K), power)
    smooth = torch.from_numpy(smooth)
    return smooth.float()


def official_las_forward(smooth: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``LabelAwareSmoothing.forward``, step for step."""
    smoothing = smooth[target]
    confidence = 1.0 - smoothing
    logprobs = F.log_softmax(x, dim=-1)
    nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1))
    nll_loss = nll_loss.squeeze(1)
    smooth_loss = -logprobs.mean(dim=-1)
    loss = confidence * nll_loss + smoothing * smooth_loss
    return loss.mean()


def official_mixup_data(x, y, lam, index):
    """``mixup_data`` with its two draws given: ``lam = np.random.beta(alpha, alpha)``, ``index = torch.randperm(B)``."""
    mixed_x = lam * x + (1 - lam) * x[index, :]
    y_a, y_b = y, y[index]
    return mixed_x, y_a, y_b, lam


def official_mixup_criterion(criterion, pred, y_a, y_b, lam):
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def official_lr(epoch: int, lr: float, num_epochs: int, lr_factor: float) -> list[float]:
    """``train_stage2.adjust_learning_rate``: [classifier group, LWS group]."""
    lr_min, lr_max = 0, lr
    lr = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(epoch / num_epochs * 3.1415926535))
    return [lr_factor * lr, 1.00 * lr]


# ----------------------------------------------------------------------------- label-aware smoothing
SHAPES = [("concave", None), ("linear", None), ("convex", None), ("exp", 3.0)]


@pytest.mark.parametrize("counts", [CIFAR10_LT, CIFAR100_LT, [7, 300, 30, 120, 2]], ids=["c10", "c100", "unsorted"])
@pytest.mark.parametrize("shape, power", SHAPES)
@pytest.mark.parametrize("head, tail", [(0.3, 0.0), (0.4, 0.1)])  # MiSLAS's CIFAR-10-LT / CIFAR-100-LT values
def test_label_aware_smoothing_values_and_gradients(counts, shape, power, head, tail):
    generator = torch.Generator().manual_seed(len(counts))
    logits = (3 * torch.randn(64, len(counts), generator=generator)).requires_grad_(True)
    target = torch.randint(0, len(counts), (64,), generator=generator)
    smooth = official_smooth(counts, head, tail, shape, power)
    loss = LabelAwareSmoothingLoss(counts, smooth_head=head, smooth_tail=tail, shape=shape, power=power)
    torch.testing.assert_close(loss.epsilons, smooth, rtol=0, atol=1e-7)
    ours = loss(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = official_las_forward(smooth, logits, target)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=1e-6)


def test_head_gets_smooth_head_whatever_the_class_order():
    counts = [7, 300, 30, 120, 2]
    eps = LabelAwareSmoothingLoss(counts, smooth_head=0.4, smooth_tail=0.1).epsilons
    assert eps[1].item() == pytest.approx(0.4) and eps[4].item() == pytest.approx(0.1)


# ----------------------------------------------------------------------------- mixup
@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_mixup_batch_and_loss_equal_the_reference(lam):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    model = LongTailClassifier(MLP(64, (16,)), 10, loss=CrossEntropyLoss, plot_per_class=False)
    mixup = Mixup(lam=lam, seed=3)
    model.batch_transforms.append(mixup)
    ours = model.training_step([x, y], 0)
    (grads_ours,) = [torch.autograd.grad(ours, model.head.weight)]
    # the same draws, read back: the permutation from y_b of a batch of distinct labels
    replay = Mixup(lam=lam, seed=3)
    _, target = replay(x, torch.arange(8))
    index = target.y_b
    mixed_x, y_a, y_b, lam_ = official_mixup_data(x, y, lam, index)
    theirs = official_mixup_criterion(F.cross_entropy, model(mixed_x), y_a, y_b, lam_)
    (grads_theirs,) = [torch.autograd.grad(theirs, model.head.weight)]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads_ours, grads_theirs, rtol=0, atol=1e-6)
    mixed, target = Mixup(lam=lam, seed=3)(x, y)
    torch.testing.assert_close(mixed, mixed_x, rtol=0, atol=1e-6)
    assert torch.equal(target.y_a, y_a) and torch.equal(target.y_b, y_b) and target.lam == lam


def test_mixed_loss_is_mixup_criterion():
    logits, y_a, y_b = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.randint(0, 4, (6,))
    from lightning_lt.losses import MixedTarget

    las = LabelAwareSmoothingLoss([50, 20, 10, 5])
    expected = official_mixup_criterion(las, logits, y_a, y_b, 0.6)
    torch.testing.assert_close(mixed_loss(las, logits, MixedTarget(y_a, y_b, 0.6)), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- stage 2: LWS, BN shift, learning rates
def stage2(**kwargs) -> DecoupledClassifier:
    defaults = dict(backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16)), num_classes=10,
                    loss=CrossEntropyLoss, init_from="stage1.ckpt", plot_per_class=False)  # fmt: skip
    defaults["backbone"].num_features = 16
    defaults.update(kwargs)
    return DecoupledClassifier(**defaults)


def test_learnable_weight_scaling_equals_the_reference():
    torch.manual_seed(1)
    model = stage2(learnable_scales=True, head_lr_factor=0.5)
    with torch.no_grad():
        model.logit_scales.uniform_(0.5, 2.0)
    learned_norm = model.logit_scales.detach().clone().view(1, -1).requires_grad_(True)  # LWS's shape [1, C]
    features, target = torch.randn(5, 16), torch.randint(0, 10, (5,))
    ours = F.cross_entropy(model.classify(features), target)
    theirs = F.cross_entropy(learned_norm * model.head(features), target)  # lws_model(classifier(feat))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, model.logit_scales)
    (g_theirs,) = torch.autograd.grad(theirs, learned_norm)
    torch.testing.assert_close(g_ours, g_theirs.view(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift_bn", [False, True])
def test_bn_shift_follows_train_stage2(shift_bn):
    torch.manual_seed(2)
    model = stage2(bn_shift=shift_bn)
    reference = copy.deepcopy(model.backbone)
    x = torch.randn(8, 1, 8, 8) * 3 + 1
    model.train()
    assert model.backbone.training is shift_bn and model.head.training
    logits = model.training_logits(x)
    reference.train() if shift_bn else reference.eval()  # train_stage2.train: model.train() / model.eval()
    with torch.no_grad():
        feat = reference(x)
    torch.testing.assert_close(logits, model.classify(feat), rtol=0, atol=1e-6)
    bn, bn_ref = model.backbone[2], reference[2]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-6)
    assert shift_bn == (not torch.allclose(bn.running_mean, torch.zeros(16)))
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_learning_rates_follow_adjust_learning_rate():
    model = stage2(learnable_scales=True, head_lr_factor=0.5,
                   optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=2e-4),
                   lr_scheduler=functools.partial(WarmupCosineLR, max_epochs=10, warmup_epochs=0))  # fmt: skip
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == head_ids
    assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(model.logit_scales)]
    for epoch in range(10):
        ours = [group["lr"] for group in optimizer.param_groups]
        assert ours == pytest.approx(official_lr(epoch, 0.1, 10, 0.5), abs=1e-9), epoch
        optimizer.step()
        scheduler.step()
