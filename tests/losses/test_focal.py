"""FocalLoss (softmax) against per-sample loops and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import FocalLoss
from lightning_lt.losses.functional import focal_loss
from tests.losses.reference import brute_force, log_softmax_row, random_batch

COUNTS = [40, 20, 10, 5, 1]


def focal_sample(gamma, alpha):
    def sample(row, y):
        p = math.exp(log_softmax_row(row)[y])
        return -(1.0 if alpha is None else alpha) * (1.0 - p) ** gamma * math.log(p)

    return sample


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("gamma", "alpha"), [(0.0, None), (0.5, 0.25), (2.0, None), (3.0, 0.75)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_brute_force(reduction, gamma, alpha, weighted):
    logits, target = random_batch(num_classes=5, seed=11)
    weight = [2.0, 1.0, 0.5, 0.25, 4.0] if weighted else None
    loss = FocalLoss(COUNTS, gamma=gamma, alpha=alpha, reduction=reduction)
    loss.set_class_weights(weight)
    expected = brute_force(focal_sample(gamma, alpha), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-7)


def test_gamma_zero_is_cross_entropy():
    logits, target = random_batch(num_classes=5)
    w = torch.tensor([2.0, 1.0, 0.5, 0.25, 4.0])
    loss = FocalLoss(COUNTS, gamma=0.0)
    loss.set_class_weights(w)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, weight=w))


def test_hand_computed():
    # two equal logits: p_t = 1/2 -> alpha * (1/2)^gamma * log 2
    out = FocalLoss(gamma=2.0, alpha=0.25)(torch.zeros(1, 2), torch.tensor([1]))
    assert out.item() == pytest.approx(0.25 * 0.25 * math.log(2))
    # p_t = 3/4 with gamma = 1: (1/4) * -log(3/4)
    out = FocalLoss(gamma=1.0)(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]))
    assert out.item() == pytest.approx(0.25 * -math.log(0.75))


def test_confident_samples_are_down_weighted_and_gradient_finite():
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    out = FocalLoss(gamma=0.5, reduction="none")(logits, target)
    assert out[0].item() == pytest.approx(0.0, abs=1e-12) and out[1].item() > 0
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_gradcheck_double():
    logits, target = random_batch(batch=6, num_classes=4, seed=5)
    logits = logits.double().requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, target, 1.5, 0.5, w), (logits,))


def test_functional_equals_module():
    logits, target = random_batch(num_classes=5)
    loss = FocalLoss(COUNTS, gamma=1.5, alpha=0.3, reduction="none")
    torch.testing.assert_close(loss(logits, target), focal_loss(logits, target, 1.5, 0.3, None, "none"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gamma": -1.0}, r"`gamma` of FocalLoss to be a finite number >= 0, got -1.0"),
    ({"gamma": float("nan")}, r"`gamma` of FocalLoss"),
    ({"alpha": 0.0}, r"`alpha` of FocalLoss to be a finite number > 0, got 0.0"),
    ({"alpha": -0.25}, r"`alpha` of FocalLoss"),
])
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(COUNTS, **kwargs)
    with pytest.raises(ValueError, match=message.replace("FocalLoss", "focal_loss")):
        focal_loss(*random_batch(), **kwargs)
