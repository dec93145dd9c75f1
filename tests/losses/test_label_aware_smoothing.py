"""LabelAwareSmoothingLoss: per-class epsilons by shape, the loss against per-sample loops, reductions, errors.

The transcription of MiSLAS's own code is in tests/reference/test_mislas.py."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from lightning_lt.losses import CrossEntropyLoss, LabelAwareSmoothingLoss
from lightning_lt.losses import label_aware_smoothing as las_module
from lightning_lt.losses.functional import label_aware_smoothing, label_aware_smoothing_epsilons
from tests.losses.reference import brute_force, log_softmax_row, random_batch

COUNTS = [40, 20, 10, 5, 1]


def las_sample(eps):
    def sample(row, y):
        logp = log_softmax_row(row)
        return -(1 - eps[y]) * logp[y] - eps[y] * sum(logp) / len(row)

    return sample


def test_doctests():
    assert doctest.testmod(las_module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("shape, power", [("concave", None), ("linear", None), ("convex", None), ("exp", 2.0)])
def test_epsilons_run_from_tail_to_head(shape, power):
    eps = label_aware_smoothing_epsilons(COUNTS, smooth_head=0.4, smooth_tail=0.1, shape=shape, power=power)
    assert eps[0].item() == pytest.approx(0.4) and eps[-1].item() == pytest.approx(0.1)
    assert torch.all(eps[:-1] >= eps[1:])  # more samples, more smoothing


def test_epsilons_by_hand():
    counts = [9, 5, 1]  # t = 1, 0.5, 0
    concave = label_aware_smoothing_epsilons(counts, 0.3, 0.0, "concave").tolist()
    assert concave == pytest.approx([0.3, 0.3 * math.sin(math.pi / 4), 0.0])
    convex = label_aware_smoothing_epsilons(counts, 0.3, 0.0, "convex").tolist()
    assert convex == pytest.approx([0.3, 0.3 + 0.3 * math.sin(1.75 * math.pi), 0.0], abs=1e-7)
    assert label_aware_smoothing_epsilons(counts, 0.3, 0.0, "exp", power=3.0).tolist() == pytest.approx([0.3, 0.0375, 0.0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_per_sample_loops(reduction, weighted):
    logits, target = random_batch(num_classes=5, seed=3)
    loss = LabelAwareSmoothingLoss(COUNTS, smooth_head=0.4, smooth_tail=0.1, reduction=reduction)
    weight = torch.tensor([0.3, 1.0, 2.0, 0.1, 5.0]) if weighted else None
    loss.set_class_weights(weight)
    expected = brute_force(las_sample(loss.epsilons.double().tolist()), logits, target, weight, reduction)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-6, atol=1e-6)


def test_equal_head_and_tail_is_label_smoothing():
    logits, target = random_batch(num_classes=5, seed=1)
    las = LabelAwareSmoothingLoss(COUNTS, smooth_head=0.2, smooth_tail=0.2)
    torch.testing.assert_close(las(logits, target), CrossEntropyLoss(COUNTS, label_smoothing=0.2)(logits, target))


def test_functional_and_buffers_follow_the_module():
    logits, target = random_batch(num_classes=5, seed=2)
    loss = LabelAwareSmoothingLoss(COUNTS).double()
    assert loss.epsilons.dtype == torch.float64
    torch.testing.assert_close(loss(logits.double(), target), label_aware_smoothing(logits.double(), target, loss.epsilons))
    assert "epsilons" in loss.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(smooth_head=1.5), r"`smooth_head` .* \[0, 1\], got 1.5"),
        (dict(smooth_tail=-0.1), r"`smooth_tail` .* \[0, 1\], got -0.1"),
        (dict(shape="cubic"), r"`shape` .* one of .*'concave'.*got 'cubic'"),
        (dict(shape="exp"), r"`shape='exp'` .* needs a finite `power` > 0.*HINT"),
        (dict(shape="exp", power=-1.0), r"needs a finite `power` > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelAwareSmoothingLoss(COUNTS, **kwargs)


def test_balanced_counts_and_missing_counts_are_refused():
    with pytest.raises(ValueError, match=r"every class has 7 training samples.*HINT: .*label_smoothing"):
        LabelAwareSmoothingLoss([7, 7, 7])
    with pytest.raises(ValueError, match="`class_counts` is required for LabelAwareSmoothingLoss"):
        LabelAwareSmoothingLoss(None)
