"""CrossEntropyLoss against torch's cross-entropy, per-sample loops and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.losses.functional import cross_entropy
from tests.losses.reference import brute_force, log_softmax_row, random_batch

COUNTS = [40, 20, 10, 5, 1]


def smoothed_ce(eps: float):
    def sample(row, y):
        logp = log_softmax_row(row)
        return -(1 - eps) * logp[y] - eps / len(row) * sum(logp)

    return sample


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_without_smoothing(reduction):
    logits, target = random_batch(num_classes=5)
    weight = torch.tensor([0.3, 1.0, 2.0, 0.1, 5.0])
    loss = CrossEntropyLoss(COUNTS, reduction=reduction)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, reduction=reduction))
    loss.set_class_weights(weight)
    torch.testing.assert_close(
        loss(logits, target), F.cross_entropy(logits, target, weight=weight, reduction=reduction)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_brute_force(reduction, eps, weighted):
    logits, target = random_batch(num_classes=5, seed=7)
    weight = [0.3, 1.0, 2.0, 0.1, 5.0] if weighted else None
    loss = CrossEntropyLoss(COUNTS, reduction=reduction, label_smoothing=eps)
    loss.set_class_weights(weight)
    expected = brute_force(smoothed_ce(eps), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


def test_unweighted_smoothing_matches_torch():
    logits, target = random_batch(num_classes=5, seed=2)
    torch.testing.assert_close(
        CrossEntropyLoss(label_smoothing=0.2)(logits, target), F.cross_entropy(logits, target, label_smoothing=0.2)
    )


def test_hand_computed():
    # logits [0, 0]: log 2 whatever the smoothing; logits [ln 3, 0], target 0: p = 3/4.
    assert CrossEntropyLoss(label_smoothing=0.3)(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(
        math.log(2)
    )
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert CrossEntropyLoss()(logits, torch.tensor([0])).item() == pytest.approx(-math.log(0.75))
    # eps = 0.5: 0.5 * (-log 3/4) + 0.25 * (-log 3/4 - log 1/4)
    expected = 0.5 * -math.log(0.75) + 0.25 * (-math.log(0.75) - math.log(0.25))
    assert CrossEntropyLoss(label_smoothing=0.5)(logits, torch.tensor([0])).item() == pytest.approx(expected)


def test_functional_equals_module():
    logits, target = random_batch(num_classes=5)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    loss = CrossEntropyLoss(COUNTS, reduction="sum", label_smoothing=0.1)
    loss.set_class_weights(w)
    torch.testing.assert_close(loss(logits, target), cross_entropy(logits, target, w, "sum", 0.1))


@pytest.mark.parametrize("eps", [-0.1, 1.5, True])
def test_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match=r"`label_smoothing` of CrossEntropyLoss to be in \[0, 1\]"):
        CrossEntropyLoss(COUNTS, label_smoothing=eps)
    with pytest.raises(ValueError, match=r"`label_smoothing`"):
        cross_entropy(*random_batch(), label_smoothing=eps)
