"""Class-balanced sigmoid / focal loss and its bias initialisation against the authors' TensorFlow code.

Reference: github:richardaecn/class-balanced-loss (Cui et al., CVPR 2019), read, not imported:

- ``src/cifar_main.py``, ``main()``: the class weights ``(1 - beta) / (1 - beta^n)``, normalised to sum ``C``;
- ``src/cifar_main.py``, ``_tower_fn()``: each sample's class weight tiled over the ``C`` columns, the loss
  branches (softmax / sigmoid / focal) and their normalisation;
- ``src/cifar_main.py``, ``focal_loss()``: the sigmoid focal loss with its stable modulator, summed and divided by
  the number of positive labels (the batch size);
- ``src/model_base.py``, ``_fully_connected()``: the last layer's bias initialised to ``-log(C - 1)`` for the
  sigmoid and focal losses (``tf.layers.dense``'s default, zeros, for softmax).

github:vandit15/Class-balanced-loss-pytorch (a PyTorch port) was read as a cross-check: its focal branch is the same
computation; its sigmoid branch averages over ``B * C`` elements (and passes ``weights=`` to
``binary_cross_entropy_with_logits``, which has no such argument) and its softmax branch is a binary cross-entropy
on softmax probabilities, so it is not the reference for those two.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_lt.cli import LightningLTCLI
from lightning_lt.datamodules.profiles import imbalance_counts
from lightning_lt.losses import ClassBalancedLoss
from lightning_lt.nets import MLP
from lightning_lt.tasks import LongTailClassifier
from tests.helpers import REPO_ROOT

COUNTS_C100 = imbalance_counts(500, 100, 100.0, "exp")  # CIFAR-100-LT, IF = 100


# ----------------------------------------------------------------------------- transcription of the reference
def official_class_weights(samples_per_cls, beta: float, num_classes: int) -> np.ndarray:
    """``src/cifar_main.py``, ``main()``: ``effective_num = 1 - beta^n``, ``weights = (1 - beta) / effective_num``,
    ``weights = weights / sum(weights) * C`` (numpy float64)."""
    effective_num = 1.0 - np.power(beta, samples_per_cls)
    weights = (1.0 - beta) / np.array(effective_num)
    return weights / np.sum(weights) * num_classes


def tf_sigmoid_cross_entropy_with_logits(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``tf.nn.sigmoid_cross_entropy_with_logits`` as TensorFlow documents its stable form:
    ``max(x, 0) - x * z + log(1 + exp(-abs(x)))``."""
    return logits.clamp_min(0) - logits * labels + torch.log(1 + torch.exp(-logits.abs()))


def official_focal_loss(labels, logits, alpha, gamma: float) -> torch.Tensor:
    """``src/cifar_main.py``, ``focal_loss(labels, logits, alpha, gamma)``, step for step."""
    cross_entropy = tf_sigmoid_cross_entropy_with_logits(labels, logits)
    if gamma == 0.0:
        modulator = 1.0
    else:
        modulator = torch.exp(-gamma * labels * logits - gamma * torch.log1p(torch.exp(-1.0 * logits)))
    loss = modulator * cross_entropy
    weighted_loss = alpha * loss
    focal_loss = torch.sum(weighted_loss)
    focal_loss = focal_loss / torch.sum(labels)  # "Normalize by the total number of positive samples."
    return focal_loss


def official_tower_loss(label, logits, samples_per_cls, beta: float, gamma: float, loss_type: str) -> torch.Tensor:
    """``src/cifar_main.py``, ``_tower_fn()``: the loss of one tower (weight decay left out)."""
    num_classes = logits.shape[1]
    weights = official_class_weights(samples_per_cls, beta, num_classes)
    one_hot_labels = F.one_hot(label, num_classes).to(logits.dtype)
    weights = torch.as_tensor(weights, dtype=logits.dtype)
    weights = weights[None].repeat(one_hot_labels.shape[0], 1) * one_hot_labels  # tf.tile(expand_dims) * one_hot
    weights = weights.sum(dim=1)
    weights = weights[:, None].repeat(1, num_classes)
    if loss_type == "softmax":
        # tf.losses.softmax_cross_entropy(one_hot, logits, weights=reduce_mean(weights, axis=1)), whose default
        # reduction SUM_BY_NONZERO_WEIGHTS divides the weighted sum by the number of non-zero weights
        sample_weights = weights.mean(dim=1)
        cross_entropy = -(one_hot_labels * torch.log_softmax(logits, dim=1)).sum(dim=1)
        tower_loss = (sample_weights * cross_entropy).sum() / (sample_weights != 0).sum()
    elif loss_type == "sigmoid":
        tower_loss = weights * tf_sigmoid_cross_entropy_with_logits(one_hot_labels, logits)
        tower_loss = tower_loss.sum() / one_hot_labels.sum()
    else:
        tower_loss = official_focal_loss(one_hot_labels, logits, weights, gamma)
    return tower_loss


def official_bias(out_dim: int, loss_type: str) -> np.ndarray:
    """``src/model_base.py``, ``_fully_connected()``: ``bias_initializer=tf.constant_initializer(-np.log(out_dim -
    1))`` for sigmoid / focal; ``tf.layers.dense``'s default zero bias for softmax."""
    if loss_type in ("sigmoid", "focal"):
        return np.full(out_dim, -np.log(out_dim - 1))
    return np.zeros(out_dim)


# ----------------------------------------------------------------------------- the loss, values and gradients
@pytest.mark.parametrize("loss_type", ["focal", "sigmoid", "softmax"])
@pytest.mark.parametrize(("counts", "beta", "gamma"), [(COUNTS_C100, 0.9999, 1.0), ([50, 20, 9, 3, 1], 0.99, 2.0)])
def test_loss_and_gradient_equal_the_official_code(loss_type, counts, beta, gamma):
    generator = torch.Generator().manual_seed(0)
    num_classes = len(counts)
    logits = (4 * torch.randn(64, num_classes, generator=generator, dtype=torch.float64)).requires_grad_()
    target = torch.randint(num_classes, (64,), generator=generator)
    expected = official_tower_loss(target, logits, counts, beta, gamma, loss_type)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = ClassBalancedLoss(counts, beta=beta, loss_type=loss_type, gamma=gamma).double()
    got = loss(logits, target)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_class_weights_equal_the_official_code():
    loss = ClassBalancedLoss(COUNTS_C100, beta=0.9999, loss_type="focal").double()
    expected = torch.as_tensor(official_class_weights(COUNTS_C100, 0.9999, 100))
    torch.testing.assert_close(loss.cb_weight, expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the bias initialisation
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("loss_type", ["focal", "sigmoid"])
def test_head_bias_equals_the_official_initialiser(num_classes, loss_type):
    counts = imbalance_counts(500, num_classes, 100.0, "exp")
    for head_bias_init in ("auto", "sigmoid_prior"):  # the loss picks it, or the config names it
        model = LongTailClassifier(
            MLP(8, (16,)), num_classes, counts, head_bias_init=head_bias_init,
            loss=functools.partial(ClassBalancedLoss, loss_type=loss_type),
        )  # fmt: skip
        expected = torch.as_tensor(official_bias(num_classes, loss_type), dtype=torch.float32)
        torch.testing.assert_close(model.head.bias.detach(), expected, rtol=0, atol=1e-6)


def test_softmax_class_balanced_keeps_the_default_bias():
    """``"auto"`` uses the sigmoid prior only for sigmoid outputs; the softmax loss keeps PyTorch's bias."""
    torch.manual_seed(0)
    model = LongTailClassifier(MLP(8, (16,)), 10, list(range(10, 0, -1)), loss=ClassBalancedLoss)
    assert not model.loss.sigmoid_outputs
    assert model.head.bias.abs().max() <= 1 / math.sqrt(16) and model.head.bias.std() > 0


# ----------------------------------------------------------------------------- the initial loss of the config
def expected_initial_loss(num_classes: int, gamma: float) -> float:
    """The loss at logits equal to the bias ``-log(C - 1)`` (``p = 1 / C`` for every class) with every class once
    in the batch (the class-balanced weights then average to 1), by hand: the target class contributes
    ``(1 - p)^gamma * (-log p)``, each of the ``C - 1`` others ``p^gamma * (-log(1 - p))``."""
    p = 1.0 / num_classes
    return (1 - p) ** gamma * -math.log(p) + (num_classes - 1) * p**gamma * -math.log(1 - p)


def cb_focal_model(config: str, *overrides: str) -> LongTailClassifier:
    # val_per_class=0: the literature's training set (the configs hold out 50 images per class for validation,
    # 50 of them from the largest classes' own images), so the counts are CIFAR-100-LT's published ones
    args = ["--config", str(REPO_ROOT / "configs" / config), "--trainer.logger=false",
            "--data.init_args.val_per_class=0", *overrides]
    return LightningLTCLI(args=args, run=False).model


@pytest.fixture
def plain_argv(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["lightning-lt"])


def test_cifar100_cb_focal_config_starts_at_the_expected_loss(plain_argv):
    torch.manual_seed(0)
    model = cb_focal_model("cifar100_lt/cb_focal.yaml")
    assert model.class_counts == COUNTS_C100 and isinstance(model.loss, ClassBalancedLoss)
    assert model.loss.loss_type == "focal" and model.loss.gamma == 1.0
    torch.testing.assert_close(model.head.bias.detach(), torch.full((100,), -math.log(99)))
    expected = expected_initial_loss(100, 1.0)
    assert expected == pytest.approx(4.5691, abs=1e-4)
    images = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # normalised pixels
    target = torch.arange(100)
    model.train()  # batch statistics in BatchNorm, as in the first training step
    with torch.no_grad():
        features = model.backbone(images)
        at_bias = model.loss(torch.zeros(100, 100) + model.head.bias, target)  # the head's weights at zero
        fresh = model.loss(model.head(features), target)  # the freshly initialised head
    assert at_bias.item() == pytest.approx(expected, rel=1e-5)
    # The head's kaiming-normal weights (LDAM-DRW's init of the CIFAR ResNet's classifier) add logit noise of
    # standard deviation ~2.7 around the bias: 7.7 .. 13.3 over seeds 0-2, the magnitude of the hand value
    assert 0.5 * expected < fresh.item() < 4 * expected, fresh.item()
    # without the prior bias (PyTorch's default, near 0) every one of the 100 sigmoids starts near 1/2
    torch.manual_seed(0)
    plain = cb_focal_model("cifar100_lt/cb_focal.yaml", "--model.init_args.head_bias_init=default")
    with torch.no_grad():
        default_loss = plain.loss(plain(images), target).item()
    assert default_loss > 10 * expected, default_loss  # 95 .. 140 over seeds 0-2


def test_cifar10_cb_focal_config_uses_the_prior_bias(plain_argv):
    model = cb_focal_model("cifar10_lt/cb_focal.yaml")
    torch.testing.assert_close(model.head.bias.detach(), torch.full((10,), -math.log(9)))
