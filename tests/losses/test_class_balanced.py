"""ClassBalancedLoss and class_balanced_weights against loops, torch/torchvision references and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import ClassBalancedLoss, class_balanced_weights
from lightning_lt.losses.functional import class_balanced_loss
from tests.losses.reference import brute_force, cb_weights_loop, log_softmax_row, random_batch, sigmoid, softplus

COUNTS = [500, 120, 40, 9, 3]


def test_weights_hand_computed():
    # counts [1, 2], beta 1/2: raw (1/2)/(1/2) = 1 and (1/2)/(3/4) = 2/3, normalised to sum 2 -> [1.2, 0.8]
    torch.testing.assert_close(class_balanced_weights([1, 2], beta=0.5), torch.tensor([1.2, 0.8]))
    # beta = 0 -> uniform
    assert class_balanced_weights([7, 3, 1], beta=0.0).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_weights_match_loop(beta):
    weights = class_balanced_weights(COUNTS, beta)
    expected = torch.tensor(cb_weights_loop(COUNTS, beta), dtype=torch.float64)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    assert weights.sum().item() == pytest.approx(len(COUNTS))
    assert torch.all(weights[:-1] <= weights[1:])  # rarer class -> larger weight


def test_weights_tend_to_inverse_frequency():
    weights = class_balanced_weights([1000, 10], beta=1 - 1e-9)
    assert (weights[1] / weights[0]).item() == pytest.approx(100.0, rel=1e-4)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=rf"`beta` of ClassBalancedLoss to be in \[0, 1\), got {beta}"):
        ClassBalancedLoss(COUNTS, beta=beta)
    with pytest.raises(ValueError, match=r"`beta` of class_balanced_weights to be in \[0, 1\)"):
        class_balanced_weights(COUNTS, beta)


def test_bad_loss_type_and_gamma():
    with pytest.raises(ValueError, match=r"`loss_type` of ClassBalancedLoss to be one of .*got 'hinge'"):
        ClassBalancedLoss(COUNTS, loss_type="hinge")
    with pytest.raises(ValueError, match=r"`gamma` of ClassBalancedLoss to be a finite number >= 0, got -2"):
        ClassBalancedLoss(COUNTS, loss_type="focal", gamma=-2)


def test_weights_buffer():
    loss = ClassBalancedLoss(COUNTS, beta=0.99)
    torch.testing.assert_close(loss.cb_weight, class_balanced_weights(COUNTS, 0.99))
    assert "cb_weight" in loss.state_dict()
    assert loss.to(torch.float64).cb_weight.dtype == torch.float64


def cb_sample(counts, beta, loss_type, gamma):
    cb = cb_weights_loop(counts, beta)

    def sample(row, y):
        if loss_type == "softmax":
            base = -log_softmax_row(row)[y]
        else:
            base = 0.0
            for c, f in enumerate(row):
                q = sigmoid(f) if c == y else 1.0 - sigmoid(f)
                bce = softplus(-f) if c == y else softplus(f)
                base += ((1.0 - q) ** gamma if loss_type == "focal" else 1.0) * bce
        return cb[y] * base

    return sample


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_brute_force(reduction, loss_type, weighted):
    logits, target = random_batch(num_classes=5, seed=21)
    weight = [1.0, 3.0, 0.5, 2.0, 1.5] if weighted else None
    loss = ClassBalancedLoss(COUNTS, beta=0.999, loss_type=loss_type, gamma=1.5, reduction=reduction)
    loss.set_class_weights(weight)
    expected = brute_force(cb_sample(COUNTS, 0.999, loss_type, 1.5), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


def test_mean_divides_by_batch_size():
    """Without extra weights 'mean' is sum_i cb_{y_i} L_i / B (the authors' normalisation)."""
    logits, target = random_batch(num_classes=5, seed=3)
    loss_sum = ClassBalancedLoss(COUNTS, beta=0.99, reduction="sum")(logits, target)
    loss_mean = ClassBalancedLoss(COUNTS, beta=0.99)(logits, target)
    torch.testing.assert_close(loss_mean, loss_sum / len(target))


def test_softmax_matches_torch_cross_entropy():
    logits, target = random_batch(num_classes=5, seed=5)
    cb = class_balanced_weights(COUNTS, 0.9999)
    ce = F.cross_entropy(logits, target, reduction="none")
    out = ClassBalancedLoss(COUNTS, beta=0.9999, reduction="none")(logits, target)
    torch.testing.assert_close(out, cb[target] * ce)
    # sum equals torch's weighted CE times its weight normaliser
    total = ClassBalancedLoss(COUNTS, beta=0.9999, reduction="sum")(logits, target)
    torch.testing.assert_close(total, F.cross_entropy(logits, target, weight=cb) * cb[target].sum())


def test_sigmoid_matches_torch_bce():
    logits, target = random_batch(num_classes=5, seed=6)
    cb = class_balanced_weights(COUNTS, 0.99)
    one_hot = F.one_hot(target, 5).float()
    per_element_weight = cb[target][:, None].expand(-1, 5)
    expected = F.binary_cross_entropy_with_logits(logits, one_hot, weight=per_element_weight, reduction="sum")
    out = ClassBalancedLoss(COUNTS, beta=0.99, loss_type="sigmoid", reduction="sum")(logits, target)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_torchvision_sigmoid_focal_loss(gamma):
    ops = pytest.importorskip("torchvision.ops")
    logits, target = random_batch(num_classes=5, seed=7)
    cb = class_balanced_weights(COUNTS, 0.999)
    one_hot = F.one_hot(target, 5).float()
    elementwise = ops.sigmoid_focal_loss(logits, one_hot, alpha=-1, gamma=gamma, reduction="none")
    expected = (cb[target] * elementwise.sum(1)).mean()
    out = ClassBalancedLoss(COUNTS, beta=0.999, loss_type="focal", gamma=gamma)(logits, target)
    torch.testing.assert_close(out, expected)


def test_focal_gamma_zero_is_sigmoid():
    logits, target = random_batch(num_classes=5)
    focal = ClassBalancedLoss(COUNTS, loss_type="focal", gamma=0.0)(logits, target)
    sig = ClassBalancedLoss(COUNTS, loss_type="sigmoid")(logits, target)
    torch.testing.assert_close(focal, sig)


def test_hand_computed():
    # counts [1, 2], beta 1/2 -> cb = [1.2, 0.8]; zero logits: softmax CE = log 2, BCE per class = log 2
    logits, target = torch.zeros(2, 2), torch.tensor([0, 1])
    out = ClassBalancedLoss([1, 2], beta=0.5, reduction="none")(logits, target)
    torch.testing.assert_close(out, torch.tensor([1.2, 0.8]) * math.log(2))
    out = ClassBalancedLoss([1, 2], beta=0.5, loss_type="sigmoid", reduction="none")(logits, target)
    torch.testing.assert_close(out, torch.tensor([1.2, 0.8]) * 2 * math.log(2))
    # focal gamma 2: every q = 1/2 -> factor 1/4
    out = ClassBalancedLoss([1, 2], beta=0.5, loss_type="focal", gamma=2.0, reduction="none")(logits, target)
    torch.testing.assert_close(out, torch.tensor([1.2, 0.8]) * 0.5 * math.log(2))


def test_functional_equals_module():
    logits, target = random_batch(num_classes=5)
    loss = ClassBalancedLoss(COUNTS, beta=0.99, loss_type="focal", gamma=1.0)
    torch.testing.assert_close(
        loss(logits, target), class_balanced_loss(logits, target, loss.cb_weight, "focal", 1.0)
    )


def test_gradients_finite_when_saturated():
    logits = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    out = ClassBalancedLoss([5, 4, 3], loss_type="focal", gamma=0.5)(logits, torch.tensor([0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()
