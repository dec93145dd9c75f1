"""DirMixE's loss, its Dirichlet draws and its semi-variance switch against transcriptions of the authors' code.

Reference: github:scongl/DirMixE, read, not imported:

- ``model/loss.py``, ``LogitAdjustExpertLoss``: ``prior = n / sum(n)`` (float32; ``.cuda()`` there, dropped here);
  ``generate_weights`` (CIFAR: the prior, the uniform distribution and ``inverse_prior(prior)``, each normalised);
  ``generate_weights_pool`` (``trials * batch_num`` draws, each ``k = np.random.randint(3)`` then
  ``np.random.dirichlet(weights[k] * alpha_sum)``, cast to float32); ``start_new_epoch`` (``flag = epoch <=
  int(0.8 * total_epoch)``, pool reshuffled); ``forward`` (per draw ``score = z_k - log(w^p / prior^p + 1e-9)``,
  ``nn.CrossEntropyLoss``; the semi-variance loop over the losses above their mean divided by ``max(cnt - 1, 1)``;
  ``mean`` while ``flag``, else ``mean + lambda_var * var``);
- ``trainer/trainer.py``: ``_train_epoch(epoch, self.epochs + 1)`` with 1-based epochs (``base/base_trainer.py``), so
  ``total_epoch = epochs + 1``;
- ``configs/train/cifar10.json`` / ``cifar100.json``: ``power`` 1.3, ``lambda_var`` 15 / 5; ``alpha_sum`` and
  ``trials`` keep the constructor defaults 10000 and 60.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from lightning_lt.datamodules.profiles import imbalance_counts
from lightning_lt.losses import DirMixELoss
from lightning_lt.losses.experts import dirichlet_meta_draws, dirmixe_loss, semi_variance

COUNTS_C10 = imbalance_counts(5000, 10, 100.0)


def official_inverse_prior(prior):
    value, idx0 = torch.sort(prior)
    _, idx1 = torch.sort(idx0)
    idx2 = prior.shape[0] - 1 - idx1
    return value.index_select(0, idx2)


class OfficialLogitAdjustExpertLoss:
    """``model/loss.py``, ``LogitAdjustExpertLoss`` (CIFAR, ``loss_type='LA'``), transcribed on the CPU."""

    def __init__(self, cls_num_list, lambda_var=1.0, power=1.0, trials=60, alpha_sum=10000):
        self.prior = torch.tensor(cls_num_list).float()
        self.prior = self.prior / self.prior.sum()
        self.C_number = len(cls_num_list)
        self.power, self.lambda_var, self.trials, self.alpha_sum = power, lambda_var, trials, alpha_sum
        self.loss = nn.CrossEntropyLoss()

    def start_new_epoch(self, epoch, total_epoch):
        self.flag = epoch <= int(0.8 * total_epoch)

    def generate_weights(self):
        weight = torch.tensor([1 / self.C_number] * self.C_number).float()
        self.weights1 = self.prior.clone()
        self.weights2 = weight
        self.weights3 = official_inverse_prior(self.prior)
        self.weights1 = self.weights1 / self.weights1.sum()
        self.weights2 = self.weights2 / self.weights2.sum()
        self.weights3 = self.weights3 / self.weights3.sum()

    def generate_weights_pool(self, batch_num):
        size = self.trials * batch_num
        self.generate_weights()
        self.pool = []
        weight_list = [self.weights1.numpy(), self.weights2.numpy(), self.weights3.numpy()]
        for _ in range(size):
            k = np.random.randint(len(weight_list))
            alpha_temp = weight_list[k] * self.alpha_sum
            dirichlet = np.random.dirichlet(alpha_temp)
            self.pool.append((torch.tensor(dirichlet).float(), k))

    def forward(self, t_list, target, expert_logits):
        index, diri = [t[1] for t in t_list], [t[0] for t in t_list]
        loss_list = []
        for i, w in zip(index, diri):
            pi_ratio = w**self.power / self.prior**self.power
            score = expert_logits[i] - torch.log(pi_ratio + 1e-9)
            loss_list.append(self.loss(score, target))
        loss_tensor = torch.stack(loss_list)
        loss_mean = loss_tensor.mean()
        loss_var = 0.0
        cnt = 0
        for i in range(loss_tensor.size(0)):
            loss_tmp = loss_tensor[i]
            if loss_tmp > loss_mean:
                loss_var += (loss_tmp - loss_mean) ** 2
                cnt += 1
        loss_var = loss_var / max(cnt - 1, 1)
        if self.flag:
            return loss_tensor.mean()
        return loss_tensor.mean() + self.lambda_var * loss_var


def _value_and_grad(fn, logits):
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("flag", [True, False], ids=["before_switch", "after_switch"])
@pytest.mark.parametrize("power, lambda_var", [(1.3, 15.0), (1.3, 5.0), (1.0, 1.0)])
def test_dirmixe_loss_matches_official(flag, power, lambda_var):
    np.random.seed(0)
    torch.manual_seed(0)
    official = OfficialLogitAdjustExpertLoss(COUNTS_C10, lambda_var=lambda_var, power=power, trials=12)
    official.generate_weights_pool(batch_num=2)
    official.flag = flag
    t_list = official.pool[:12]
    logits, target = torch.randn(3, 32, 10) * 8.0, torch.randint(0, 10, (32,))
    draws = torch.stack([t[0] for t in t_list])
    experts = torch.tensor([t[1] for t in t_list])
    prior = DirMixELoss(COUNTS_C10).prior
    assert torch.equal(prior, official.prior)
    expected, expected_grad = _value_and_grad(lambda z: official.forward(t_list, target, z), logits)
    got, got_grad = _value_and_grad(
        lambda z: dirmixe_loss(z, target, prior, draws, experts, power, lambda_var, use_semi_variance=not flag), logits
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_semi_variance_without_losses_above_the_mean_is_zero():
    assert semi_variance(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert semi_variance(torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(4.0)  # one above: divided by 1


def test_draws_follow_the_official_pool_construction():
    np.random.seed(7)
    official = OfficialLogitAdjustExpertLoss(COUNTS_C10, trials=5)
    official.generate_weights_pool(batch_num=3)
    loss = DirMixELoss(COUNTS_C10, trials=5, seed=7)
    loss.set_epoch(0, max_epochs=10, batches_per_epoch=3)
    torch.testing.assert_close(loss.centres, torch.stack([official.weights1, official.weights2, official.weights3]))
    assert loss.pool_experts.tolist() == [k for _, k in official.pool]
    torch.testing.assert_close(loss.pool_draws, torch.stack([w for w, _ in official.pool]), atol=0, rtol=0)
    # As the official per-epoch shuffle of the pool: each draw is used exactly once per epoch, in a new order.
    used = [loss.batch_draws(b)[0] for b in range(3)]
    order = torch.cat(used)
    assert sorted(map(tuple, order.tolist())) == sorted(map(tuple, loss.pool_draws.tolist()))
    loss.set_epoch(1, max_epochs=10, batches_per_epoch=3)
    assert not torch.equal(torch.cat([loss.batch_draws(b)[0] for b in range(3)]), order)


def test_draws_are_reproducible_from_the_seed():
    a, b = dirichlet_meta_draws(torch.eye(3) * 0.5 + 0.5 / 3, 1e4, 6, np.random.RandomState(3)), None
    b = dirichlet_meta_draws(torch.eye(3) * 0.5 + 0.5 / 3, 1e4, 6, np.random.RandomState(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("epochs", [200, 10, 7])
def test_semi_variance_switch_matches_official_schedule(epochs):
    official = OfficialLogitAdjustExpertLoss(COUNTS_C10)
    ours = DirMixELoss(COUNTS_C10, trials=1)
    for epoch in range(epochs):
        official.start_new_epoch(epoch + 1, epochs + 1)  # 1-based epochs, total = epochs + 1
        ours.set_epoch(epoch, max_epochs=epochs, batches_per_epoch=1)
        assert bool(ours.semi_variance_active) == (not official.flag), epoch
    if epochs == 200:
        assert ours.semi_variance_epoch(200) == 160


def test_dirmixe_bad_inputs():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="Dirichlet concentration.*HINT"):
            DirMixELoss(COUNTS_C10, alpha_sum=bad)
    with pytest.raises(ValueError, match="exactly 3 experts"):
        DirMixELoss(COUNTS_C10)(torch.zeros(2, 4, 10), torch.zeros(4, dtype=torch.long))
    loss = DirMixELoss(COUNTS_C10)
    with pytest.raises(ValueError, match="max_epochs.*HINT"):
        loss.set_epoch(0, max_epochs=None)
    with pytest.raises(RuntimeError, match="set_epoch"):
        loss(torch.zeros(3, 4, 10), torch.zeros(4, dtype=torch.long))
