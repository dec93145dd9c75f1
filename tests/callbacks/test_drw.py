"""DeferredReweighting: switch epoch, resume from checkpoints, state_dict, errors and DDP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.callbacks import DeferredReweighting
from lightning_lt.losses import CrossEntropyLoss, LDAMLoss
from tests.helpers import DDP_STRATEGY

COUNTS = [12, 8, 4]
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",  # Lightning internals vs. new torch
)


def expected_weights(counts, beta):
    """Class-balanced weights written out independently of the package."""
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [r / sum(raw) * len(counts) for r in raw]


class TinyModule(LightningModule):
    """Linear classifier on a fixed imbalanced data set; records the loss weights it trains with."""

    def __init__(self, class_counts=COUNTS, record_dir: Optional[str] = None):
        super().__init__()
        self.class_counts = list(class_counts)
        self.layer = nn.Linear(4, len(class_counts))
        self.loss = CrossEntropyLoss(class_counts)
        self.record_dir = record_dir
        self.fit_start_weight: Optional[list] = None
        self.epoch_weights: dict[int, Optional[list]] = {}
        self.gathered: dict[int, list] = {}

    @staticmethod
    def _weights(loss) -> Optional[list]:
        return None if loss.weight is None else loss.weight.tolist()

    def on_fit_start(self):  # runs after the callbacks' on_fit_start
        self.fit_start_weight = self._weights(self.loss)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.epoch_weights[self.current_epoch] = self._weights(self.loss)
        return self.loss(self.layer(x), y)

    def on_train_epoch_end(self):
        active = torch.tensor([0.0 if self.loss.weight is None else 1.0])
        self.gathered[self.current_epoch] = self.all_gather(active).flatten().tolist()

    def on_train_end(self):
        if self.record_dir is not None:
            record = {"epoch_weights": self.epoch_weights, "gathered": self.gathered}
            Path(self.record_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(self.class_counts)])
        x = torch.randn(len(y), 4, generator=g) + y[:, None].float()
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, max_epochs, callbacks, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        **kwargs,
    )


# ---------------------------------------------------------------- switch epoch


@pytest.mark.parametrize("start_epoch", [0, 1, 3, 10])
def test_switch_happens_exactly_at_start_epoch(tmp_path, start_epoch):
    model = TinyModule()
    drw = DeferredReweighting(start_epoch=start_epoch, beta=0.9)
    make_trainer(tmp_path, 4, [drw]).fit(model)
    weights = pytest.approx(expected_weights(COUNTS, 0.9), rel=1e-6)
    for epoch in range(4):
        if epoch < start_epoch:
            assert model.epoch_weights[epoch] is None, epoch
        else:
            assert model.epoch_weights[epoch] == weights, epoch
    assert drw.active is (start_epoch < 4)
    assert model.fit_start_weight == (weights if start_epoch == 0 else None)


def test_weighted_training_loss_is_weighted_mean(tmp_path):
    """After the switch the loss the module optimises is sum w_y l / sum w_y."""
    model = TinyModule()
    drw = DeferredReweighting(start_epoch=0, beta=0.99)
    drw.on_train_epoch_start(SimpleNamespace(current_epoch=0), model)
    x, y = next(iter(model.train_dataloader()))
    logits = model.layer(x)
    w = torch.tensor(expected_weights(COUNTS, 0.99))
    torch.testing.assert_close(model.loss(logits, y), nn.functional.cross_entropy(logits, y, weight=w))


def test_works_with_ldam_and_custom_loss_attr():
    module = SimpleNamespace(class_counts=torch.tensor([30, 3]), criterion=LDAMLoss([30, 3]))
    drw = DeferredReweighting(start_epoch=5, beta=0.999, loss_attr="criterion")
    drw.on_fit_start(SimpleNamespace(current_epoch=0), module)
    assert module.criterion.weight is None
    drw.on_train_epoch_start(SimpleNamespace(current_epoch=5), module)
    assert module.criterion.weight.tolist() == pytest.approx(expected_weights([30, 3], 0.999), rel=1e-6)
    assert "loss_attr" in drw.state_key and "criterion" in drw.state_key


def test_before_start_clears_weights_and_logs_switch(caplog):
    module = SimpleNamespace(class_counts=COUNTS, loss=CrossEntropyLoss(COUNTS))
    module.loss.set_class_weights([5.0, 5.0, 5.0])
    drw = DeferredReweighting(start_epoch=2, beta=0.9)
    drw.on_fit_start(SimpleNamespace(current_epoch=0), module)
    assert module.loss.weight is None and drw.active is False
    with caplog.at_level("INFO"):
        drw.on_train_epoch_start(SimpleNamespace(current_epoch=2), module)
    assert "epoch 2" in caplog.text and "class-balanced weights" in caplog.text


# ---------------------------------------------------------------- resume


def uninterrupted(tmp_path, max_epochs, start_epoch):
    seed_everything(0)
    model = TinyModule()
    make_trainer(tmp_path / "full", max_epochs, [DeferredReweighting(start_epoch=start_epoch, beta=0.9)]).fit(model)
    return model


@pytest.mark.parametrize("resume_epoch", [1, 2])
def test_resume_matches_uninterrupted_run(tmp_path, resume_epoch):
    """Stop after epoch `resume_epoch` (switch at 2), resume from its checkpoint, compare with a full run."""
    start_epoch, max_epochs = 2, 4
    full = uninterrupted(tmp_path, max_epochs, start_epoch)

    seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    first = TinyModule()
    make_trainer(tmp_path / "first", resume_epoch + 1, [DeferredReweighting(start_epoch, 0.9), checkpoint]).fit(first)
    ckpt_path = ckpt_dir / f"epoch={resume_epoch}.ckpt"
    assert ckpt_path.exists(), sorted(p.name for p in ckpt_dir.iterdir())
    saved = torch.load(ckpt_path, weights_only=False)
    drw_state = saved["callbacks"][DeferredReweighting(start_epoch, 0.9).state_key]
    active = resume_epoch >= start_epoch
    assert drw_state == {"stage": active, "active": active, "start_epoch": start_epoch, "beta": 0.9}
    assert ("loss.weight" in saved["state_dict"]) is (resume_epoch >= start_epoch)

    resumed = TinyModule()
    drw = DeferredReweighting(start_epoch, 0.9)
    make_trainer(tmp_path / "second", max_epochs, [drw]).fit(
        resumed, ckpt_path=str(ckpt_path)
    )
    weights = pytest.approx(expected_weights(COUNTS, 0.9), rel=1e-6)
    # already re-weighted at fit start when resuming past the switch (before current_epoch is restored)
    assert resumed.fit_start_weight == (weights if resume_epoch >= start_epoch else None)
    assert sorted(resumed.epoch_weights) == list(range(resume_epoch + 1, max_epochs))
    for epoch, weight in resumed.epoch_weights.items():
        assert weight == full.epoch_weights[epoch] == weights
    assert drw.active
    for p_full, p_resumed in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p_resumed, p_full)


def test_on_fit_start_reapplies_restored_state():
    """The switch survives even if the model's own state (loss.weight) was not restored."""
    drw = DeferredReweighting(start_epoch=3, beta=0.9)
    drw.load_state_dict({"active": True, "start_epoch": 3, "beta": 0.9})
    module = SimpleNamespace(class_counts=COUNTS, loss=CrossEntropyLoss(COUNTS))
    drw.on_fit_start(SimpleNamespace(current_epoch=0), module)  # current_epoch not restored yet
    assert module.loss.weight.tolist() == pytest.approx(expected_weights(COUNTS, 0.9), rel=1e-6)


# ---------------------------------------------------------------- state dict


def test_state_dict_round_trip():
    drw = DeferredReweighting(start_epoch=1, beta=0.99)
    module = SimpleNamespace(class_counts=COUNTS, loss=CrossEntropyLoss(COUNTS))
    drw.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    state = drw.state_dict()
    assert state == {"stage": True, "active": True, "start_epoch": 1, "beta": 0.99}
    other = DeferredReweighting(start_epoch=1, beta=0.99)
    other.load_state_dict(state)
    assert other.active is True and other.state_dict() == state
    legacy = DeferredReweighting(start_epoch=1, beta=0.99)
    legacy.load_state_dict({})  # missing keys fall back to defaults
    assert legacy.active is False


def test_load_state_dict_warns_on_changed_hyper_parameters():
    drw = DeferredReweighting(start_epoch=5, beta=0.99)
    with pytest.warns(UserWarning, match=r"saved with start_epoch=3, beta=0.99 but this callback has start_epoch=5"):
        drw.load_state_dict({"active": True, "start_epoch": 3, "beta": 0.99})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeferredReweighting(start_epoch=5, beta=0.99).load_state_dict({"active": False, "start_epoch": 5, "beta": 0.99})


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start_epoch": -1}, r"`start_epoch` to be an integer >= 0 .*got -1"),
    ({"start_epoch": 1.5}, r"`start_epoch` .*got 1.5"),
    ({"beta": 1.0}, r"`beta` of DeferredReweighting to be in \[0, 1\), got 1.0"),
    ({"beta": -0.5}, r"`beta` of DeferredReweighting to be in \[0, 1\), got -0.5"),
    ({"loss_attr": ""}, r"`loss_attr`"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeferredReweighting(**kwargs)


def test_module_without_class_counts():
    drw = DeferredReweighting(start_epoch=0)
    modules = (SimpleNamespace(loss=CrossEntropyLoss()), SimpleNamespace(loss=CrossEntropyLoss(), class_counts=None))
    for module in modules:
        with pytest.raises(ValueError, match=r"`SimpleNamespace.class_counts`.*LongTailClassifier.*self.class_counts"):
            drw.on_fit_start(SimpleNamespace(current_epoch=0), module)


def test_module_without_class_counts_fails_at_fit_start(tmp_path):
    model = TinyModule()
    del model.class_counts
    with pytest.raises(ValueError, match=r"`TinyModule.class_counts`"):
        make_trainer(tmp_path, 1, [DeferredReweighting(start_epoch=5)]).fit(model)
    assert model.epoch_weights == {}  # failed before training


def test_module_without_loss_or_with_foreign_loss():
    drw = DeferredReweighting(start_epoch=0, loss_attr="criterion")
    with pytest.raises(ValueError, match=r"has no attribute 'criterion'.*Set `loss_attr`"):
        drw.on_fit_start(SimpleNamespace(current_epoch=0), SimpleNamespace(class_counts=COUNTS))
    module = SimpleNamespace(class_counts=COUNTS, criterion=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"`set_class_weights`.*CrossEntropyLoss.*lightning_lt.losses"):
        drw.on_fit_start(SimpleNamespace(current_epoch=0), module)


def test_counts_length_mismatch_with_loss():
    module = SimpleNamespace(class_counts=[5, 4, 3, 2], loss=CrossEntropyLoss(COUNTS))
    with pytest.raises(ValueError, match=r"`weight` .* to have 3 entries"):
        DeferredReweighting(start_epoch=0).on_fit_start(SimpleNamespace(current_epoch=0), module)


# ---------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_ddp_switches_weights_on_both_ranks(tmp_path):
    model = TinyModule(record_dir=str(tmp_path))
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDP_STRATEGY,
        max_epochs=3,
        callbacks=[DeferredReweighting(start_epoch=1, beta=0.9)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    weights = pytest.approx(expected_weights(COUNTS, 0.9), rel=1e-6)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        epochs = {int(k): v for k, v in record["epoch_weights"].items()}
        assert epochs[0] is None, rank
        assert epochs[1] == weights and epochs[2] == weights, rank
        # every rank saw both ranks' state through all_gather
        gathered = {int(k): v for k, v in record["gathered"].items()}
        assert gathered == {0: [0.0, 0.0], 1: [1.0, 1.0], 2: [1.0, 1.0]}, rank
    # the trained weights returned to the main process carry the switched loss weights
    assert model.loss.weight.tolist() == weights
