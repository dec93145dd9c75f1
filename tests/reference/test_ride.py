"""RIDE's loss against a step-for-step transcription of the authors' code.

Reference: github:frank-xwang/RIDE-LongTailRecognition, read, not imported:

- ``model/loss.py``, ``RIDELoss.__init__``: LDAM margins ``1 / n^(1/4)`` scaled to ``max_m``; class-balanced DRW
  weights (beta 0.9999, normalised to sum C); the diversity-temperature factors ``C * pi * r + 1 - r`` divided by
  their maximum (``.cuda()`` there, dropped here);
- ``model/loss.py``, ``RIDELoss._hook_before_epoch``: re-weighting when the **1-based** epoch ``> reweight_epoch``;
- ``model/loss.py``, ``RIDELoss.get_final_output`` / ``forward``: per expert, LDAM on the (already ``s``-scaled)
  logits with ``x - s * m_y`` at the target, ``F.cross_entropy(weight=...)``; the KL term
  ``F.kl_div(log_softmax(z_e / T), softmax(mean / T).detach(), 'batchmean')`` times ``factor * mean(T)^2``; with
  ``additional_diversity_factor == 0`` the LDAM term uses the mean logits (``output_logits``);
- ``trainer/trainer.py``: ``output_logits`` is the backbone's ``final_out``, the mean of the expert logits
  (``model/ldam_drw_resnets/ride_resnet_cifar.py``, ``ResNet_s.forward``), and ``extra_info['logits']`` the list of
  expert logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_lt.datamodules.profiles import imbalance_counts
from lightning_lt.losses import RIDELoss

COUNTS_C10 = imbalance_counts(5000, 10, 100.0)


class OfficialRIDELoss:
    """``model/loss.py``, ``RIDELoss`` (CPU; ``reweight=True``), transcribed."""

    def __init__(self, cls_num_list, base_diversity_temperature=1.0, max_m=0.5, s=30, reweight_epoch=-1,
                 base_loss_factor=1.0, additional_diversity_factor=-0.2, reweight_factor=0.05):  # fmt: skip
        self.base_loss_factor = base_loss_factor
        self.reweight_epoch = reweight_epoch
        m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
        m_list = m_list * (max_m / np.max(m_list))
        self.m_list = torch.tensor(m_list, dtype=torch.float)
        self.s = s
        if reweight_epoch != -1:
            betas = [0, 0.9999]
            effective_num = 1.0 - np.power(betas[1], cls_num_list)
            per_cls_weights = (1.0 - betas[1]) / np.array(effective_num)
            per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
            self.per_cls_weights_enabled = torch.tensor(per_cls_weights, dtype=torch.float)
        else:
            self.per_cls_weights_enabled = None
        cls_num_list = np.array(cls_num_list) / np.sum(cls_num_list)
        C = len(cls_num_list)
        per_cls_weights = C * cls_num_list * reweight_factor + 1 - reweight_factor
        per_cls_weights = per_cls_weights / np.max(per_cls_weights)
        self.per_cls_weights_enabled_diversity = torch.tensor(per_cls_weights, dtype=torch.float)
        self.base_diversity_temperature = base_diversity_temperature
        self.additional_diversity_factor = additional_diversity_factor

    def _hook_before_epoch(self, epoch):  # 1-based epoch
        if self.reweight_epoch != -1:
            if epoch > self.reweight_epoch:
                self.per_cls_weights_base = self.per_cls_weights_enabled
                self.per_cls_weights_diversity = self.per_cls_weights_enabled_diversity
            else:
                self.per_cls_weights_base = None
                self.per_cls_weights_diversity = None

    def get_final_output(self, output_logits, target):
        x = output_logits
        index = torch.zeros_like(x, dtype=torch.uint8)
        index.scatter_(1, target.data.view(-1, 1), 1)
        index_float = index.float()
        batch_m = torch.matmul(self.m_list[None, :], index_float.transpose(0, 1))
        batch_m = batch_m.view((-1, 1))
        x_m = x - batch_m * self.s
        return torch.where(index.bool(), x_m, x)

    def forward(self, output_logits, target, extra_info):
        loss = 0
        for logits_item in extra_info["logits"]:
            ride_loss_logits = output_logits if self.additional_diversity_factor == 0 else logits_item
            final_output = self.get_final_output(ride_loss_logits, target)
            loss += self.base_loss_factor * F.cross_entropy(final_output, target, weight=self.per_cls_weights_base)
            base_diversity_temperature = self.base_diversity_temperature
            if self.per_cls_weights_diversity is not None:
                diversity_temperature = base_diversity_temperature * self.per_cls_weights_diversity.view((1, -1))
                temperature_mean = diversity_temperature.mean().item()
            else:
                diversity_temperature = base_diversity_temperature
                temperature_mean = base_diversity_temperature
            output_dist = F.log_softmax(logits_item / diversity_temperature, dim=1)
            with torch.no_grad():
                mean_output_dist = F.softmax(output_logits / diversity_temperature, dim=1)
            loss += self.additional_diversity_factor * temperature_mean * temperature_mean * F.kl_div(
                output_dist, mean_output_dist, reduction="batchmean"
            )
        return loss


def _value_and_grad(fn, logits):
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("factor", [-0.2, -0.45, 0.0])
@pytest.mark.parametrize("zero_based_epoch", [0, 159, 160, 199])
def test_ride_loss_matches_official(factor, zero_based_epoch):
    torch.manual_seed(0)
    logits = torch.randn(3, 24, 10) * 8.0  # s-scaled cosine logits
    target = torch.randint(0, 10, (24,))
    official = OfficialRIDELoss(COUNTS_C10, reweight_epoch=160, additional_diversity_factor=factor)
    official._hook_before_epoch(zero_based_epoch + 1)  # the official trainer's epochs start at 1
    ours = RIDELoss(COUNTS_C10, reweight_epoch=160, additional_diversity_factor=factor)
    ours.set_epoch(zero_based_epoch)
    assert bool(ours.reweighted) == (zero_based_epoch >= 160)

    def reference(z):
        return official.forward(z.mean(dim=0), target, {"logits": list(z)})

    expected, expected_grad = _value_and_grad(reference, logits)
    got, got_grad = _value_and_grad(lambda z: ours(z, target), logits)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_ride_loss_other_settings_match_official():
    torch.manual_seed(1)
    counts = [300, 120, 40, 9, 3]
    logits, target = torch.randn(4, 16, 5) * 5.0, torch.randint(0, 5, (16,))
    kwargs = dict(max_m=0.3, s=10, base_loss_factor=0.7, additional_diversity_factor=-0.3, reweight_factor=0.2,
                  base_diversity_temperature=2.0)  # fmt: skip
    official = OfficialRIDELoss(counts, reweight_epoch=3, **kwargs)
    official._hook_before_epoch(4)
    ours = RIDELoss(counts, reweight_epoch=3, **kwargs)
    ours.set_epoch(3)
    expected, expected_grad = _value_and_grad(lambda z: official.forward(z.mean(0), target, {"logits": list(z)}), logits)
    got, got_grad = _value_and_grad(lambda z: ours(z, target), logits)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_ride_loss_without_reweighting_stays_unweighted():
    ours = RIDELoss(COUNTS_C10, reweight_epoch=None)
    ours.set_epoch(10_000)
    assert not bool(ours.reweighted) and ours.diversity_temperature == 1.0


def test_ride_loss_bad_inputs():
    with pytest.raises(ValueError, match="reweight_factor.*HINT"):
        RIDELoss([1000, 1], reweight_factor=2.0)
    with pytest.raises(ValueError, match="at least 2 experts"):
        RIDELoss(COUNTS_C10)(torch.zeros(1, 2, 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_experts, batch_size, num_classes"):
        RIDELoss(COUNTS_C10)(torch.zeros(2, 10), torch.tensor([0, 1]))
