import io
import math

import pytest
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.optim import WarmupCosineLR, WarmupMultiStepLR

BASE_LR = 0.1


def _optimizer(lr=BASE_LR, groups=1):
    params = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _run(scheduler, optimizer, epochs, group=0):
    """Learning rate in use during each epoch: read it, train the epoch, step the scheduler once."""
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[group]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _ldam_drw_lr(epoch, base=BASE_LR):
    """LDAM-DRW's CIFAR schedule as written there, with 1-based E = epoch + 1."""
    E = epoch + 1
    if E <= 5:
        return base * E / 5
    if E > 180:
        return base * 0.0001
    if E > 160:
        return base * 0.01
    return base


def _hand_table_200():
    table = [BASE_LR * (e + 1) / 5 for e in range(5)]  # 0.02, 0.04, 0.06, 0.08, 0.1
    table += [BASE_LR] * (160 - 5)  # epochs 5..159
    table += [BASE_LR * 0.01] * 20  # epochs 160..179
    table += [BASE_LR * 0.0001] * 20  # epochs 180..199
    return table


def test_warmup_multistep_200_epochs_matches_hand_table():
    opt = _optimizer()
    lrs = _run(WarmupMultiStepLR(opt), opt, 200)
    table = _hand_table_200()
    assert len(table) == 200
    assert lrs == pytest.approx(table, rel=1e-12)
    assert lrs == pytest.approx([_ldam_drw_lr(e) for e in range(200)], rel=1e-12)
    assert lrs[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert (lrs[159], lrs[160], lrs[179], lrs[180], lrs[199]) == pytest.approx((0.1, 1e-3, 1e-3, 1e-5, 1e-5))


def test_warmup_multistep_past_planned_length():
    opt = _optimizer()
    sched = WarmupMultiStepLR(opt)
    lrs = _run(sched, opt, 350)
    assert lrs[200:] == pytest.approx([1e-5] * 150)
    assert sched.get_last_lr() == pytest.approx([1e-5])
    assert sched.factor(10_000) == pytest.approx(1e-4)


def test_warmup_multistep_every_param_group():
    opt = _optimizer(groups=2)  # base lrs 0.1 and 0.2
    sched = WarmupMultiStepLR(opt)
    lrs1 = _run(sched, opt, 200, group=1)
    assert lrs1 == pytest.approx([2 * lr for lr in _hand_table_200()], rel=1e-12)


def test_warmup_multistep_options():
    opt = _optimizer()
    lrs = _run(WarmupMultiStepLR(opt, warmup_epochs=0, milestones=(2, 4), gamma=0.1), opt, 6)
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    opt = _optimizer()
    lrs = _run(WarmupMultiStepLR(opt, warmup_epochs=2, milestones=(), gamma=0.1), opt, 4)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1])


def _cosine_hand(epoch, max_epochs, warmup, ratio, base=BASE_LR):
    if epoch < warmup:
        return base * (epoch + 1) / warmup
    t = min(epoch - warmup, max_epochs - warmup) / (max_epochs - warmup)
    return base * (ratio + (1 - ratio) * (1 + math.cos(math.pi * t)) / 2)


@pytest.mark.parametrize(("warmup", "ratio"), [(0, 0.0), (5, 0.0), (5, 0.01)])
def test_warmup_cosine_200_epochs_and_beyond(warmup, ratio):
    opt = _optimizer()
    lrs = _run(WarmupCosineLR(opt, max_epochs=200, warmup_epochs=warmup, eta_min_ratio=ratio), opt, 260)
    assert lrs == pytest.approx([_cosine_hand(e, 200, warmup, ratio) for e in range(260)], rel=1e-9, abs=1e-15)
    assert lrs[warmup] == pytest.approx(BASE_LR)
    assert lrs[200:] == pytest.approx([BASE_LR * ratio] * 60, abs=1e-15)  # stays at the minimum, never rises
    if warmup:
        assert lrs[:warmup] == pytest.approx([BASE_LR * (e + 1) / warmup for e in range(warmup)])


def test_warmup_cosine_without_warmup_equals_torch_cosine_annealing():
    opt_a, opt_b = _optimizer(), _optimizer()
    ours = _run(WarmupCosineLR(opt_a, max_epochs=50, eta_min_ratio=0.1), opt_a, 51)
    ref = _run(torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=50, eta_min=0.1 * BASE_LR), opt_b, 51)
    assert ours == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(
    ("make", "epochs"),
    [
        (lambda opt: WarmupMultiStepLR(opt), 200),
        (lambda opt: WarmupCosineLR(opt, max_epochs=200, warmup_epochs=5, eta_min_ratio=0.01), 200),
    ],
)
def test_state_dict_round_trip_resumes_the_schedule(make, epochs):
    opt = _optimizer()
    uninterrupted = _run(make(opt), opt, epochs + 20)

    opt = _optimizer()
    sched = make(opt)
    first = _run(sched, opt, 163)
    buffer = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    opt2 = _optimizer()
    sched2 = make(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == 163
    rest = _run(sched2, opt2, epochs + 20 - 163)
    assert first + rest == pytest.approx(uninterrupted, rel=1e-12)


def test_state_dict_carries_the_hyperparameters():
    opt = _optimizer()
    sched = WarmupMultiStepLR(opt, warmup_epochs=3, milestones=(10, 20), gamma=0.5)
    state = sched.state_dict()
    other = WarmupMultiStepLR(_optimizer())
    other.load_state_dict(state)
    assert (other.factor.warmup_epochs, other.factor.milestones, other.factor.gamma) == (3, [10, 20], 0.5)
    assert [other.factor(e) for e in (0, 9, 10, 20)] == pytest.approx([1 / 3, 1.0, 0.5, 0.25])


def test_resume_with_last_epoch():
    opt = _optimizer()
    for group in opt.param_groups:
        group["initial_lr"] = BASE_LR
    sched = WarmupMultiStepLR(opt, last_epoch=170)
    assert opt.param_groups[0]["lr"] == pytest.approx(_ldam_drw_lr(171))
    assert sched.last_epoch == 171


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"milestones": (180, 160)}, "strictly increasing"),
        ({"milestones": (160, 160)}, "strictly increasing"),
        ({"milestones": (-1, 160)}, r"milestones\[0\]"),
        ({"gamma": 0.0}, "gamma"),
        ({"warmup_epochs": 2.5}, "warmup_epochs"),
    ],
)
def test_multistep_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupMultiStepLR(_optimizer(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 5, "warmup_epochs": 5}, "max_epochs` > `warmup_epochs"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": 10, "eta_min_ratio": 1.5}, "eta_min_ratio"),
        ({"max_epochs": 10, "eta_min_ratio": -0.1}, "eta_min_ratio"),
        ({"max_epochs": 10, "warmup_epochs": -1}, "warmup_epochs"),
    ],
)
def test_cosine_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosineLR(_optimizer(), **kwargs)


class _RecordLR(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.lrs = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def on_train_epoch_start(self):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=BASE_LR)
        sched = WarmupMultiStepLR(opt, warmup_epochs=3, milestones=(4, 6), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_epoch_indexing_under_lightning(tmp_path):
    model = _RecordLR()
    trainer = Trainer(
        max_epochs=8,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    # Lightning's trainer.current_epoch e trains with base_lr * factor(e)
    assert model.lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
