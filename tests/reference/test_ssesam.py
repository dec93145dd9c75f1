"""SSE-SAM against a transcription of the official training step (Zemdalk/SSE-SAM), through the stage switch.

The transcription below follows, step for step, ``utils/trainval.py::forbackward`` (``optim_mode ==
'ssesam'``), the end-of-epoch ``optimizer.update_rho()`` of ``utils/trainval.py::train_model`` and
``ssesam.py::SSESAM`` (``compute_and_add_epsilon``, ``compute_grad_sum_and_restore_p``, ``update``,
``update_rho``) of github.com/Zemdalk/SSE-SAM (commit 819ca92), with the base optimizer of
``scripts/train.py`` (``optim.SGD(..., momentum=0.9, weight_decay=...)``) and its CE loss
(``nn.CrossEntropyLoss(reduction='none')``). It does not use lightning_lt.

What the official step computes, per batch of size ``B`` (model in training mode, 4 forward passes):

1. forward at ``w``; ``head_loss = l[~tail].sum() / B`` (no factor), backward; ``e_h = g * rho_h /
   (||g|| + 1e-16)``, ``w += e_h``, zero the gradients;
2. forward at ``w + e_h``; head loss, backward; ``grad_sum = g_h(w + e_h)``; ``w -= e_h``; zero;
3. forward at ``w``; ``tail_loss = CE(logits[tail], y[tail]).sum() / B`` (no factor), backward;
   ``e_t = g * rho_t / (||g|| + 1e-16)``, ``w += e_t``, zero;
4. forward at ``w + e_t``; tail loss, backward; ``grad_sum += g_t(w + e_t)``; ``w -= e_t``; zero;
5. ``p.grad = grad_sum``; SGD step (momentum, weight decay).

Stage switch: after every training epoch ``update_rho`` counts the epoch and sets ``rho_h = 0`` once the
count reaches ``cut_epoch = total_epochs * gamma``. Here one step per epoch, 5 epochs, gamma 0.6: steps 0-2
are stage 1, steps 3-4 stage 2 (where step 1 perturbs by ``0 * g``: the head gradient at ``w``).

BatchNorm: every forward is in training mode (batch statistics); the parameters do not depend on the running
statistics, which the official code updates in all 4 passes and the library in the first only.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_lt.callbacks import SSESAM
from lightning_lt.optim import SSESAM as SSESAMOptimizer
from tests.reference.test_imbsam import (
    CLASS_COUNTS,
    LR,
    MOMENTUM,
    STEPS,
    TAIL_CLASSES,
    WEIGHT_DECAY,
    ListDataset,
    ProtocolModule,
    assert_same_parameters,
    make_batches,
    make_model,
    max_difference,
)

RHO_HEAD, RHO_TAIL, GAMMA = 0.05, 0.10, 0.6  # stage 2 from epoch ceil(0.6 * 5) = 3
STAGES = [1, 1, 1, 2, 2]


# ------------------------------------------------------------------------- the official step, transcribed


class OfficialSSESAM:
    """``ssesam.py::SSESAM`` of Zemdalk/SSE-SAM, transcribed."""

    def __init__(self, optimizer, model, head_rho, tail_rho, gamma=0, total_epochs=200) -> None:
        self.optimizer = optimizer
        self.model = model
        self.rho_is = [head_rho, tail_rho]
        self.state: dict = defaultdict(dict)
        self.total_epochs = total_epochs
        if gamma > 0 and gamma < 1:
            self.epoch_count = 0
            self.cut_epoch = total_epochs * gamma

    @torch.no_grad()
    def compute_and_add_epsilon(self, n_i: int) -> None:
        # e_i = g * rho_i / (||g|| + 1e-16), w <- w + e_i
        norms = [torch.norm(p.grad, p=2) for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.norm(torch.stack(norms), p=2) + 1.0e-16
        for p in self.model.parameters():
            if p.grad is None:
                continue
            eps = self.state[p].get("eps")
            if eps is None:
                eps = torch.clone(p).detach()
                self.state[p]["eps"] = eps
            eps[...] = p.grad[...]
            eps.mul_(self.rho_is[n_i] / grad_norm)
            self.state[p]["eps"] = eps
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self) -> None:
        # grad_sum += g(w + e_i); w <- w - e_i
        for p in self.model.parameters():
            if p.grad is None:
                continue
            grad_sum = self.state[p].get("grad_sum")
            if grad_sum is None:
                grad_sum = torch.clone(p.grad).detach()
            else:
                grad_sum[...] += p.grad[...]
            self.state[p]["grad_sum"] = grad_sum
            p.sub_(self.state[p]["eps"])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def update(self) -> None:
        for p in self.model.parameters():
            p.grad = torch.clone(self.state[p].get("grad_sum")).detach()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.clear()

    @torch.no_grad()
    def update_rho(self) -> None:
        self.epoch_count += 1
        if self.cut_epoch > 0 and self.epoch_count >= self.cut_epoch:
            self.rho_is[0] = 0


def official_forbackward(model, loss_func, optimizer, tail_classes, images, targets) -> torch.Tensor:
    """``train_model``'s forward + ``forbackward(..., optim_mode='ssesam', ...)`` of ``utils/trainval.py``."""
    logits = model(images)
    loss = loss_func(logits, targets)
    tail_mask = torch.where((targets[:, None] == tail_classes[None, :].to(targets.device)).sum(1) == 1, True, False)

    head_loss = loss[~tail_mask].sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=0)

    logits = model(images)
    head_loss = loss_func(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()

    logits = model(images)
    tail_loss = loss_func(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=1)

    logits = model(images)
    tail_loss = loss_func(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()

    optimizer.update()
    return head_loss + tail_loss


def official_run(model: nn.Module, batches, gamma: float = GAMMA) -> nn.Module:
    """One batch per epoch, ``update_rho`` at the end of every epoch (``train_model``)."""
    model = copy.deepcopy(model).train()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = OfficialSSESAM(base, model, head_rho=RHO_HEAD, tail_rho=RHO_TAIL, gamma=gamma, total_epochs=STEPS)
    loss_func = nn.CrossEntropyLoss(reduction="none")
    rho_heads = []
    for images, targets in batches:
        rho_heads.append(optimizer.rho_is[0])
        official_forbackward(model, loss_func, optimizer, torch.tensor(TAIL_CLASSES), images, targets)
        optimizer.update_rho()
    assert rho_heads == [RHO_HEAD if stage == 1 else 0 for stage in STAGES]
    return model


# ----------------------------------------------------------------------------------------- the library


def wrapper_run(model: nn.Module, batches, stages=STAGES, **kwargs) -> nn.Module:
    model = copy.deepcopy(model).train()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = SSESAMOptimizer(base, tail_classes=TAIL_CLASSES, rho_head=RHO_HEAD, rho_tail=RHO_TAIL, model=model,
                                **kwargs)
    for (x, y), stage in zip(batches, stages):
        optimizer.set_stage(stage)
        optimizer.step(lambda: (F.cross_entropy(model(x), y, reduction="none"), y))
    return model


class EpochBatchModule(ProtocolModule):
    """Epoch ``e`` trains on batch ``e`` alone (the loader is rebuilt every epoch)."""

    def train_dataloader(self):
        return DataLoader(ListDataset([self.batches[self.current_epoch]]), batch_size=None, shuffle=False)


def callback_run(model: nn.Module, batches, tmp_path) -> tuple[nn.Module, list[int]]:
    module = EpochBatchModule(model, batches)
    callback = SSESAM(rho_head=RHO_HEAD, rho_tail=RHO_TAIL, tail_threshold=20, gamma=GAMMA)
    stages = []

    class StageSpy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stages.append(callback.stage)

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=STEPS, callbacks=[callback, StageSpy()],
        reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    assert trainer.global_step == STEPS
    return module.net, stages


pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning", "ignore:.*GPU available but not used:UserWarning"
)


@pytest.fixture(scope="module")
def official():
    model, batches = make_model(), make_batches()
    return model, batches, official_run(model, batches)


def test_optimizer_wrapper_equals_the_official_step_in_both_stages(official):
    model, batches, expected = official
    assert max_difference(model, expected) > 1e-2
    assert_same_parameters(wrapper_run(model, batches), expected)


def test_callback_equals_the_official_step_and_switch(official, tmp_path):
    model, batches, expected = official
    net, stages = callback_run(model, batches, tmp_path)
    assert stages == STAGES
    assert_same_parameters(net, expected)


def test_the_comparison_sees_the_tail_weight_and_the_switch(official):
    """Controls: ImbSAM's doubled tail loss, or no stage switch, move the weights well beyond 1e-6."""
    model, batches, expected = official
    assert max_difference(wrapper_run(model, batches, tail_weight=2.0), expected) > 1e-3
    assert max_difference(wrapper_run(model, batches, stages=[1] * STEPS), expected) > 1e-4
    assert CLASS_COUNTS[3] < 20 <= CLASS_COUNTS[2]  # tail_threshold=20 makes classes 3 and 4 the tail
