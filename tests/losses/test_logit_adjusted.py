"""LogitAdjustedLoss / BalancedSoftmaxLoss against torch CE on shifted logits, loops and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import BalancedSoftmaxLoss, LogitAdjustedLoss
from lightning_lt.losses.functional import balanced_softmax_loss, logit_adjusted_cross_entropy
from tests.losses.reference import brute_force, log_softmax_row, random_batch

COUNTS = [400, 100, 30, 8, 2]


def la_sample(counts, tau):
    total = sum(counts)

    def sample(row, y):
        shifted = [f + tau * math.log(n / total) for f, n in zip(row, counts)]
        return -log_softmax_row(shifted)[y]

    return sample


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau", [0.0, 1.0, 2.5, -0.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_logit_adjusted_matches_brute_force(reduction, tau, weighted):
    logits, target = random_batch(num_classes=5, seed=4)
    weight = [1.0, 0.5, 2.0, 3.0, 0.0] if weighted else None
    loss = LogitAdjustedLoss(COUNTS, tau=tau, reduction=reduction)
    loss.set_class_weights(weight)
    expected = brute_force(la_sample(COUNTS, tau), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_adjusted_matches_torch_on_shifted_logits(reduction):
    logits, target = random_batch(num_classes=5, seed=8)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    shifted = (logits.double() + 1.7 * prior.log()).float()
    w = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.7])
    loss = LogitAdjustedLoss(COUNTS, tau=1.7, reduction=reduction)
    loss.set_class_weights(w)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target, weight=w, reduction=reduction))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_balanced_softmax_is_tau_one(reduction):
    logits, target = random_batch(num_classes=5, seed=9)
    bs = BalancedSoftmaxLoss(COUNTS, reduction=reduction)
    la = LogitAdjustedLoss(COUNTS, tau=1.0, reduction=reduction)
    for loss in (bs, la):
        loss.set_class_weights([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(bs(logits, target), la(logits, target))
    expected = brute_force(la_sample(COUNTS, 1.0), logits, target, [1.0, 2.0, 3.0, 4.0, 5.0], reduction)
    torch.testing.assert_close(bs(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


def test_hand_computed():
    # priors 0.9 / 0.1, equal logits: softmax(f + log pi) = pi -> loss = -log pi_y
    logits = torch.zeros(2, 2)
    target = torch.tensor([0, 1])
    out = BalancedSoftmaxLoss([9, 1], reduction="none")(logits, target)
    torch.testing.assert_close(out, torch.tensor([-math.log(0.9), -math.log(0.1)]))
    # tau = 2: weights pi^2 -> 0.81 / 0.01
    out = LogitAdjustedLoss([9, 1], tau=2.0, reduction="none")(logits, target)
    torch.testing.assert_close(out, torch.tensor([-math.log(0.81 / 0.82), -math.log(0.01 / 0.82)]))
    # tau = 0 is plain CE
    assert LogitAdjustedLoss([9, 1], tau=0.0)(logits, target).item() == pytest.approx(math.log(2))


def test_functional_equals_module():
    logits, target = random_batch(num_classes=5)
    loss = LogitAdjustedLoss(COUNTS, tau=0.5)
    torch.testing.assert_close(loss(logits, target), logit_adjusted_cross_entropy(logits, target, loss.log_prior, 0.5))
    bs = BalancedSoftmaxLoss(COUNTS)
    torch.testing.assert_close(bs(logits, target), balanced_softmax_loss(logits, target, bs.log_prior))


def test_functional_checks_log_prior_length():
    logits, target = random_batch(num_classes=5)
    with pytest.raises(ValueError, match=r"`log_prior` must have one entry per class \(5"):
        logit_adjusted_cross_entropy(logits, target, torch.zeros(4))


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), "1"])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match=r"`tau` of LogitAdjustedLoss to be a finite number"):
        LogitAdjustedLoss(COUNTS, tau=tau)
