"""LDAMLoss against torch CE on margin-shifted logits, per-sample loops and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import LDAMLoss
from lightning_lt.losses.functional import ldam_loss, ldam_margins
from tests.losses.reference import brute_force, log_softmax_row, random_batch

COUNTS = [1000, 300, 81, 16, 1]


def ldam_sample(counts, max_m, s):
    raw = [n**-0.25 for n in counts]
    margins = [max_m * r / max(raw) for r in raw]

    def sample(row, y):
        shifted = [s * (f - (margins[y] if c == y else 0.0)) for c, f in enumerate(row)]
        return -log_softmax_row(shifted)[y]

    return sample


def test_margins_hand_computed():
    # n^(-1/4): 16 -> 1/2, 1 -> 1, 81 -> 1/3; scaled so the largest is max_m
    torch.testing.assert_close(ldam_margins([16, 1, 81], max_m=0.5), torch.tensor([0.25, 0.5, 0.5 / 3]))
    loss = LDAMLoss([16, 1, 81], max_m=1.0)
    torch.testing.assert_close(loss.margins, torch.tensor([0.5, 1.0, 1.0 / 3]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("max_m", "s"), [(0.5, 30.0), (0.3, 1.0), (1.0, 16.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_brute_force(reduction, max_m, s, weighted):
    logits, target = random_batch(num_classes=5, seed=12, scale=0.5)
    logits = logits.clamp(-1, 1)  # cosine logits
    weight = [0.2, 0.6, 1.0, 1.4, 1.8] if weighted else None
    loss = LDAMLoss(COUNTS, max_m=max_m, s=s, reduction=reduction)
    loss.set_class_weights(weight)
    expected = brute_force(ldam_sample(COUNTS, max_m, s), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_cross_entropy_with_weights(reduction):
    logits, target = random_batch(num_classes=5, seed=13, scale=0.5)
    margins = torch.tensor([n**-0.25 for n in COUNTS])
    margins = margins * 0.5 / margins.max()
    shifted = logits - F.one_hot(target, 5) * margins[target][:, None]
    w = torch.tensor([0.2, 0.6, 1.0, 1.4, 1.8])
    loss = LDAMLoss(COUNTS, max_m=0.5, s=30.0, reduction=reduction)
    loss.set_class_weights(w)
    torch.testing.assert_close(
        loss(logits, target), F.cross_entropy(30.0 * shifted, target, weight=w, reduction=reduction)
    )


def test_hand_computed():
    # counts [16, 1]: margins [0.25, 0.5]; logits [0, 0], s = 2
    loss = LDAMLoss([16, 1], max_m=0.5, s=2.0, reduction="none")
    out = loss(torch.zeros(2, 2), torch.tensor([0, 1]))
    # target 0: softmax of [-0.5, 0] -> -log(e^-0.5 / (e^-0.5 + 1)); target 1: [0, -1]
    expected = [math.log1p(math.exp(0.5)), math.log1p(math.exp(1.0))]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_functional_equals_module():
    logits, target = random_batch(num_classes=5, scale=0.5)
    loss = LDAMLoss(COUNTS, max_m=0.4, s=20.0, reduction="sum")
    torch.testing.assert_close(loss(logits, target), ldam_loss(logits, target, loss.margins, 20.0, None, "sum"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"s": 0.0}, r"`s` of LDAMLoss to be a finite number > 0, got 0.0"),
    ({"s": -30.0}, r"`s` of LDAMLoss to be a finite number > 0, got -30.0"),
    ({"max_m": 0.0}, r"`max_m` of LDAMLoss to be a finite number > 0, got 0.0"),
    ({"max_m": -0.5}, r"`max_m` of LDAMLoss"),
    ({"max_m": float("inf")}, r"`max_m` of LDAMLoss"),
])
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LDAMLoss(COUNTS, **kwargs)


def test_functional_errors():
    logits, target = random_batch(num_classes=5)
    with pytest.raises(ValueError, match=r"`s` of ldam_loss"):
        ldam_loss(logits, target, torch.zeros(5), s=0.0)
    with pytest.raises(ValueError, match=r"`margins` must have one entry per class \(5"):
        ldam_loss(logits, target, torch.zeros(3))
    with pytest.raises(ValueError, match=r"`max_m` of ldam_margins"):
        ldam_margins(COUNTS, max_m=0)
    with pytest.raises(ValueError, match=r"`class_counts` is required for ldam_margins"):
        ldam_margins(None)
