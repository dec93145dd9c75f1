"""ImbSAM against a transcription of the official training step (cool-xuan/Imbalanced_SAM).

The transcription below follows, step for step, ``utils/trainval.py::forbackward`` (``optim_mode ==
'imbsam'``) and ``imbsam.py::ImbSAM`` (``first_step``, ``second_step``, ``third_step``) of
github.com/cool-xuan/Imbalanced_SAM (commit c65f41e), with the base optimizer of ``scripts/train.py``
(``optim.SGD(..., momentum=0.9, weight_decay=...)``) and its loss (``nn.CrossEntropyLoss(reduction='none')``).
It does not use lightning_lt. The library runs the same 5 steps from the same weights on the same batches,
once as the optimizer wrapper in a plain loop and once as the Lightning callback, and every parameter must
agree to 1e-6.

What the official step computes, per batch of size ``B`` (model in training mode):

1. one forward at ``w``; per-sample CE ``l``; ``tail_mask`` = targets in the tail classes;
2. ``head_loss = l[~tail].sum() / B``, backward (graph retained); ``first_step`` stores ``g_h(w)`` and
   zeroes the gradients;
3. ``tail_loss = l[tail].sum() / B * 2``, backward; ``second_step``: ``e = g_t * rho / (||g_t|| + 1e-16)``
   (2-norm over all parameters), ``w += e``, zero the gradients;
4. a second forward at ``w + e``; ``tail_loss = CE(logits[tail], y[tail]).sum() / B * 2``, backward;
   ``third_step``: ``w -= e``, ``grad += g_h(w)``, SGD step (momentum, weight decay), zero the gradients.

BatchNorm: every forward runs in training mode, so the batch statistics (at ``w`` and at ``w + e``) are used
and the parameters do not depend on the running statistics. (The official code also lets the perturbed
forward update the running statistics; the library keeps them to the first pass, see the optimizer's
docstring. Running statistics are buffers, not parameters, and are not compared here.)
"""

from __future__ import annotations

import copy
from collections import defaultdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lt.callbacks import ImbSAM
from lightning_lt.optim import ImbSAM as ImbSAMOptimizer

STEPS, BATCH, FEATURES, CLASSES = 5, 16, 6, 5
TAIL_CLASSES = [3, 4]
CLASS_COUNTS = [100, 60, 40, 12, 6]  # tail_threshold=20 -> classes 3 and 4
RHO, LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.1, 0.9, 1e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five batches with head and tail samples; the fourth has no tail sample (an empty tail loss)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        x = torch.randn(BATCH, FEATURES, generator=g)
        high = 3 if step == 3 else CLASSES
        y = torch.randint(0, high, (BATCH,), generator=g)
        if step != 3:
            y[:3] = torch.tensor([3, 4, 3])
        batches.append((x, y))
    return batches


# ------------------------------------------------------------------------- the official step, transcribed


class OfficialImbSAM:
    """``imbsam.py::ImbSAM`` of cool-xuan/Imbalanced_SAM, transcribed."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05) -> None:
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self.state: dict = defaultdict(dict)

    @torch.no_grad()
    def first_step(self) -> None:
        # keep the head-loss gradient g_h(w)
        for p in self.model.parameters():
            if p.grad is None:
                continue
            grad_normal = self.state[p].get("grad_normal")
            if grad_normal is None:
                grad_normal = torch.clone(p).detach()
                self.state[p]["grad_normal"] = grad_normal
            grad_normal[...] = p.grad[...]
        self.optimizer.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        # e = g_t * rho / (||g_t|| + 1e-16), w <- w + e
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
            eps.mul_(self.rho / grad_norm)
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def third_step(self) -> None:
        # w <- w - e; grad = g_t(w + e) + g_h(w); base optimizer step
        for p in self.model.parameters():
            if p.grad is None:
                continue
            p.sub_(self.state[p]["eps"])
            p.grad.add_(self.state[p]["grad_normal"])
        self.optimizer.step()
        self.optimizer.zero_grad()


def official_forbackward(model, loss_func, optimizer, tail_classes, images, targets) -> torch.Tensor:
    """``train_model``'s forward + ``forbackward(..., optim_mode='imbsam', ...)`` of ``utils/trainval.py``."""
    logits = model(images)
    loss = loss_func(logits, targets)
    tail_mask = torch.where((targets[:, None] == tail_classes[None, :].to(targets.device)).sum(1) == 1, True, False)

    head_loss = loss[~tail_mask].sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.first_step()

    tail_loss = loss[tail_mask].sum() / targets.size(0) * 2
    tail_loss.backward()
    optimizer.second_step()

    logits = model(images)
    tail_loss = loss_func(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0) * 2
    tail_loss.backward()
    optimizer.third_step()
    return head_loss + tail_loss


def official_run(model: nn.Module, batches) -> nn.Module:
    model = copy.deepcopy(model).train()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = OfficialImbSAM(optimizer=base, model=model, rho=RHO)
    loss_func = nn.CrossEntropyLoss(reduction="none")
    for images, targets in batches:
        official_forbackward(model, loss_func, optimizer, torch.tensor(TAIL_CLASSES), images, targets)
    return model


# ----------------------------------------------------------------------------------------- the library


def wrapper_run(model: nn.Module, batches, **kwargs) -> nn.Module:
    model = copy.deepcopy(model).train()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = ImbSAMOptimizer(base, tail_classes=TAIL_CLASSES, rho=RHO, model=model, **kwargs)
    for x, y in batches:
        optimizer.step(lambda: (F.cross_entropy(model(x), y, reduction="none"), y))
    return model


class ListDataset(Dataset):
    """Yields the prepared batches in order (``batch_size=None``: no collation)."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.batches[index]


class ProtocolModule(L.LightningModule):
    """A LightningModule with LongTailClassifier's ImbSAM / SSE-SAM protocol around ``net``."""

    def __init__(self, net: nn.Module, batches) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)
        self.batches = batches
        self.class_counts = CLASS_COUNTS

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_sample_loss = F.cross_entropy(self(x), y, reduction="none")
        loss = per_sample_loss.mean()
        self.log("train/loss", loss)
        return {"loss": loss, "per_sample_loss": per_sample_loss, "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def train_dataloader(self):
        return DataLoader(ListDataset(self.batches), batch_size=None, shuffle=False)


def callback_run(model: nn.Module, batches, tmp_path, **kwargs) -> nn.Module:
    module = ProtocolModule(model, batches)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=[ImbSAM(rho=RHO, tail_threshold=20, **kwargs)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    assert trainer.global_step == STEPS
    return module.net


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def assert_same_parameters(got: nn.Module, expected: nn.Module) -> None:
    for (name, p), q in zip(got.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning", "ignore:.*GPU available but not used:UserWarning"
)


@pytest.fixture(scope="module")
def official():
    model, batches = make_model(), make_batches()
    return model, batches, official_run(model, batches)


def test_optimizer_wrapper_equals_the_official_step(official):
    model, batches, expected = official
    assert max_difference(model, expected) > 1e-2  # training moved the weights
    assert_same_parameters(wrapper_run(model, batches), expected)


def test_callback_equals_the_official_step(official, tmp_path):
    model, batches, expected = official
    assert_same_parameters(callback_run(model, batches, tmp_path), expected)


def test_the_comparison_sees_the_tail_weight(official):
    """Control: without the official ``* 2`` on the tail loss the weights differ well beyond 1e-6."""
    model, batches, expected = official
    assert max_difference(wrapper_run(model, batches, tail_weight=1.0), expected) > 1e-3
