"""SADE's diverse-expert loss and test-time aggregation objective against transcriptions of the authors' code.

Reference: github:Vanint/SADE-AgnosticLT, read, not imported:

- ``model/loss.py``, ``DiverseExpertLoss``: ``prior = n / sum(n)`` (numpy, then ``.float()``; ``.cuda()`` there,
  dropped here), ``inverse_prior`` (sort, rank, reversed rank), the three cross-entropies summed with
  ``log(prior + 1e-9)`` and ``tau * log(inverse_prior + 1e-9)``;
- ``test_training_cifar.py``, ``test_training``: ``softmax(aggregation_weight)`` (implicit dim 0 on a 1-D tensor),
  the weighted sum of the three experts' logits for each view, ``softmax`` over classes and
  ``-CosineSimilarity(dim=1, eps=1e-6)(...).mean()`` as the loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_lt.callbacks.test_time_aggregation import prediction_stability
from lightning_lt.datamodules.profiles import imbalance_counts
from lightning_lt.losses import SADELoss
from lightning_lt.losses.experts import inverse_prior

COUNTS_C10 = imbalance_counts(5000, 10, 100.0)
COUNTS_C100 = imbalance_counts(500, 100, 100.0)


def official_inverse_prior(prior):
    """``DiverseExpertLoss.inverse_prior``."""
    value, idx0 = torch.sort(prior)
    _, idx1 = torch.sort(idx0)
    idx2 = prior.shape[0] - 1 - idx1
    return value.index_select(0, idx2)


def official_diverse_expert_loss(cls_num_list, tau, expert_logits, target):
    """``DiverseExpertLoss.__init__`` + ``forward`` with ``extra_info['logits'] = expert_logits``."""
    prior = np.array(cls_num_list) / np.sum(cls_num_list)
    prior = torch.tensor(prior).float()
    loss = 0
    expert1_logits, expert2_logits, expert3_logits = expert_logits[0], expert_logits[1], expert_logits[2]
    loss += F.cross_entropy(expert1_logits, target)
    expert2_logits = expert2_logits + torch.log(prior + 1e-9)
    loss += F.cross_entropy(expert2_logits, target)
    inverse = official_inverse_prior(prior)
    expert3_logits = expert3_logits + torch.log(prior + 1e-9) - tau * torch.log(inverse + 1e-9)
    loss += F.cross_entropy(expert3_logits, target)
    return loss


def _value_and_grad(fn, logits):
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("counts", [COUNTS_C10, [7, 300, 41, 2, 90]], ids=["c10", "shuffled"])
@pytest.mark.parametrize("tau", [2.0, 1.0, 0.0])
def test_sade_loss_matches_official(counts, tau):
    torch.manual_seed(0)
    num_classes = len(counts)
    logits, target = torch.randn(3, 32, num_classes) * 10.0, torch.randint(0, num_classes, (32,))
    loss = SADELoss(counts, tau=tau)
    expected, expected_grad = _value_and_grad(lambda z: official_diverse_expert_loss(counts, tau, z, target), logits)
    got, got_grad = _value_and_grad(lambda z: loss(z, target), logits)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_inverse_prior_reverses_ranks():
    prior = torch.tensor([0.5, 0.05, 0.3, 0.15])
    torch.testing.assert_close(inverse_prior(prior), official_inverse_prior(prior))
    assert inverse_prior(prior).tolist() == pytest.approx([0.05, 0.5, 0.15, 0.3])


def test_inverse_prior_with_tied_counts_is_the_mirror():
    """CIFAR-100-LT (IF 100) has classes with equal counts; the official unstable sort hands the reversed values out
    in an implementation-defined order among them. Ours is the mirror; both give each group of tied classes the same
    values (only their order inside the group can differ)."""
    prior = torch.tensor(np.array(COUNTS_C100) / np.sum(COUNTS_C100)).float()
    ours, official = inverse_prior(prior), official_inverse_prior(prior)
    assert torch.equal(ours, prior.flip(0))
    for value in prior.unique():
        group = prior == value
        assert sorted(ours[group].tolist()) == sorted(official[group].tolist())
    assert len(set(COUNTS_C100)) < len(COUNTS_C100)  # there are ties


def official_ssl_loss(aggregation_weight, output0, output1):
    """``test_training``: ``output['logits']`` is ``[B, 3, C]`` there; ``loss = -cos_similarity``."""
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    aggregation_softmax = torch.nn.functional.softmax(aggregation_weight, dim=0)
    out0 = sum(aggregation_softmax[e] * output0[:, e, :] for e in range(3))
    out1 = sum(aggregation_softmax[e] * output1[:, e, :] for e in range(3))
    return -cos(F.softmax(out0, dim=1), F.softmax(out1, dim=1)).mean()


def test_prediction_stability_matches_official():
    torch.manual_seed(0)
    z0, z1 = torch.randn(3, 20, 7) * 5.0, torch.randn(3, 20, 7) * 5.0
    raw = torch.tensor([0.2, -0.4, 0.9])
    expected, expected_grad = _value_and_grad(lambda w: official_ssl_loss(w, z0.transpose(0, 1), z1.transpose(0, 1)), raw)
    got, got_grad = _value_and_grad(lambda w: -prediction_stability(z0, z1, w), raw)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_sade_loss_bad_inputs():
    with pytest.raises(ValueError, match="exactly 3 experts.*HINT"):
        SADELoss(COUNTS_C10)(torch.zeros(4, 2, 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_counts"):
        SADELoss(None)
