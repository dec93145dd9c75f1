"""MultiLabelOODModule: losses against hand computations, the gap switch, evaluation metrics, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.losses.multilabel import (
    AsymmetricLoss,
    asymmetric_loss,
    energy_gap_loss,
    joint_energy,
    outlier_confidence_loss,
)
from lightning_lt.tasks import MultiLabelOODModule
from tests.helpers import DDP_STRATEGY

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
)

C = 4


# ------------------------------------------------------------------------------ losses by hand


def test_joint_energy_and_confidence_loss_by_hand():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    expected = [sum(math.log1p(math.exp(v)) for v in row) for row in logits.tolist()]
    torch.testing.assert_close(joint_energy(logits), torch.tensor(expected))
    conf = sum(-math.log(1 - 1 / (1 + math.exp(-v))) for row in logits.tolist() for v in row) / 6
    torch.testing.assert_close(outlier_confidence_loss(logits), torch.tensor(conf))


def test_gap_loss_by_hand():
    torch.manual_seed(0)
    id_logits, oe_logits = torch.randn(6, 3) * 2, torch.randn(4, 3)
    k, m = 3, 1.0
    s_id = [sum(math.log1p(math.exp(v)) for v in row) for row in id_logits.tolist()]
    s_oe = [sum(math.log1p(math.exp(v)) for v in row) for row in oe_logits.tolist()]
    bottom = sorted(s_id)[:k]
    expected = sum(max(0.0, o - j + m) for o in s_oe for j in bottom) / (len(s_oe) * k)
    assert energy_gap_loss(id_logits, oe_logits, k=k, margin=m).item() == pytest.approx(expected, rel=1e-5)
    # k larger than the batch: all in-distribution samples
    expected_all = sum(max(0.0, o - j + m) for o in s_oe for j in s_id) / (len(s_oe) * len(s_id))
    assert energy_gap_loss(id_logits, oe_logits, k=50, margin=m).item() == pytest.approx(expected_all, rel=1e-5)
    with pytest.raises(ValueError, match="k"):
        energy_gap_loss(id_logits, oe_logits, k=0)


def test_asymmetric_loss_by_hand_and_reduces_to_bce():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 2
    torch.testing.assert_close(asymmetric_loss(logits, target, 0.0, 0.0, 0.0), bce)
    p = torch.sigmoid(logits)
    pm = (p - 0.05).clamp_min(0)
    manual = -(
        target * (1 - p) ** 1.0 * torch.log(p) + (1 - target) * pm**4 * torch.log(1 - pm)
    ).sum() / 2
    torch.testing.assert_close(AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05)(logits, target), manual)
    with pytest.raises(ValueError, match="clip"):
        AsymmetricLoss(clip=1.0)


# ------------------------------------------------------------------------------ the module


class ToyMultiLabel(LightningDataModule):
    """ID images whose label set is visible in the input, OE/OOD images far from them."""

    num_classes = C
    class_names = ["a", "b", "c", "d"]
    tail_labels = [2, 3]

    def __init__(self, n: int = 32, oe: bool = True, batch_size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.targets = (torch.rand(n, C, generator=g) < torch.tensor([0.6, 0.5, 0.15, 0.1])).float()
        self.x = self.targets * 2 + 0.3 * torch.randn(n, C, generator=g)
        self.x_oe = -2 + 0.3 * torch.randn(n, C, generator=g)
        self.x_ood = -2.5 + 0.3 * torch.randn(n // 2, C, generator=g)
        self.oe, self.batch_size = oe, batch_size

    @property
    def class_counts(self) -> list[int]:
        return self.targets.sum(0).int().tolist()

    def train_dataloader(self):
        id_loader = DataLoader(TensorDataset(self.x, self.targets), batch_size=self.batch_size)
        if not self.oe:
            return id_loader
        oe_loader = DataLoader(TensorDataset(self.x_oe, torch.zeros_like(self.x_oe)), batch_size=self.batch_size)
        return CombinedLoader({"id": id_loader, "oe": oe_loader}, mode="max_size_cycle")

    def val_dataloader(self):
        x = torch.cat([self.x, self.x_ood])
        y = torch.cat([self.targets, torch.zeros(len(self.x_ood), C)])
        is_ood = torch.cat([torch.zeros(len(self.x)), torch.ones(len(self.x_ood))]).long()
        return DataLoader(TensorDataset(x, y, is_ood), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class Linear(nn.Module):
    """Features = inputs; the module adds a learnable linear head (``num_features``)."""

    num_features = C

    def forward(self, x):
        return x


class Logits(nn.Module):
    """The inputs are the logits (no head): evaluation can be checked against the inputs directly."""

    def forward(self, x):
        return x


def make_module(**kwargs) -> MultiLabelOODModule:
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.5))
    return MultiLabelOODModule(Linear(), num_classes=C, **kwargs)


def make_trainer(tmp_path, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(accelerator="cpu", max_epochs=kwargs.pop("max_epochs", 1), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                   num_sanity_val_steps=0, **kwargs)


def test_training_loss_is_id_plus_alpha_conf_plus_beta_gap():
    module = make_module(alpha=0.7, beta=0.3, gap_start_epoch=0, gap_k=3, gap_margin=2.0)
    torch.manual_seed(1)
    id_logits, oe_logits, targets = torch.randn(5, C), torch.randn(3, C), (torch.rand(5, C) > 0.5).float()
    losses = module.compute_losses(id_logits, targets, oe_logits)
    expected = (
        F.binary_cross_entropy_with_logits(id_logits, targets)
        + 0.7 * outlier_confidence_loss(oe_logits)
        + 0.3 * energy_gap_loss(id_logits, oe_logits, 3, 2.0)
    )
    torch.testing.assert_close(losses["loss"], expected)
    assert set(losses) == {"loss", "loss_id", "loss_conf", "loss_gap"}
    assert set(module.compute_losses(id_logits, targets, None)) == {"loss", "loss_id"}


class GapRecorder(MultiLabelOODModule):
    def on_train_epoch_start(self):
        self.record = getattr(self, "record", {})
        self.record[self.current_epoch] = self.gap_active()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen_keys = set(self.trainer.callback_metrics)
        return loss


def test_gap_term_is_off_before_start(tmp_path):
    module = GapRecorder(Linear(), num_classes=C, gap_start_epoch=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = make_trainer(tmp_path, max_epochs=4, limit_val_batches=0)
    trainer.fit(module, datamodule=ToyMultiLabel())
    assert module.record == {0: False, 1: False, 2: True, 3: True}
    assert "train/loss_gap_epoch" in trainer.callback_metrics
    # logged only from epoch 2 on: 4 batches x 2 epochs
    module2 = GapRecorder(Linear(), num_classes=C, gap_start_epoch=5, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer2 = make_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer2.fit(module2, datamodule=ToyMultiLabel())
    assert "train/loss_gap_epoch" not in trainer2.callback_metrics
    assert "train/loss_conf_epoch" in trainer2.callback_metrics


def test_evaluation_matches_sklearn(tmp_path):
    data = ToyMultiLabel()
    module = MultiLabelOODModule(Logits(), num_classes=C)
    trainer = make_trainer(tmp_path)
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    logits, ood_logits = data.x, data.x_ood
    aps = [average_precision_score(data.targets[:, c], logits[:, c]) for c in range(C)]
    assert result["val/map"] == pytest.approx(np.mean(aps), rel=1e-5)
    assert result["val/map_tail"] == pytest.approx(np.mean(aps[2:]), rel=1e-5)
    assert result["val/map_head"] == pytest.approx(np.mean(aps[:2]), rel=1e-5)
    is_id = np.r_[np.ones(len(logits)), np.zeros(len(ood_logits))]
    all_logits = torch.cat([logits, ood_logits])
    scores = {
        "jointenergy": F.softplus(all_logits).sum(1),
        "maxlogit": all_logits.max(1).values,
        "maxsigmoid": all_logits.sigmoid().max(1).values,
        "energy": torch.logsumexp(all_logits, 1),
    }
    for name, score in scores.items():
        assert result[f"val/auroc_{name}"] == pytest.approx(roc_auc_score(is_id, score), rel=1e-5), name
        assert f"val/fpr95_{name}" in result and f"val/aupr_in_{name}" in result


def test_fit_logs_and_writes_the_histogram(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    module = make_module(gap_start_epoch=1)
    trainer = make_trainer(tmp_path, logger=logger, max_epochs=3, log_every_n_steps=1)
    trainer.fit(module, datamodule=ToyMultiLabel())
    metrics = trainer.callback_metrics
    assert metrics["val/auroc_jointenergy"] > 0.9  # outlier exposure separates the toy OOD
    assert {"val/map", "val/map_head", "val/map_tail", "val/ap/0", "train/loss_conf_epoch"} <= set(metrics)
    assert len(list(Path(logger.log_dir, "figures").glob("val_ood_histogram_jointenergy*.png"))) == 3


def test_plain_batches_train_with_bce_only(tmp_path):
    module = make_module()
    make_trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=ToyMultiLabel(oe=False))
    assert "train/loss_conf_epoch" not in module.trainer.callback_metrics


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"gap_k": 0}, "gap_k"),
        ({"ood_score_names": ["msp"]}, "msp"),
        ({"histogram_score": "energy", "ood_score_names": ["jointenergy"]}, "histogram_score"),
        ({"class_counts": [1, 2]}, "class_counts"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_wrong_output_size(tmp_path):
    module = MultiLabelOODModule(nn.Linear(C, 3), num_classes=C)
    with pytest.raises(ValueError, match="expected \\[batch, 4\\]"):
        make_trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=ToyMultiLabel())


class Recorder(MultiLabelOODModule):
    def on_validation_epoch_end(self):
        values = {**self.val_map.compute(), **self.val_ood.compute()}
        Path(self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        Path(self.trainer.default_root_dir, f"rank{self.global_rank}.json").write_text(
            json.dumps({k: v.tolist() for k, v in values.items()})
        )
        super().on_validation_epoch_end()


@pytest.mark.ddp
def test_ddp_validation_equals_single_process(tmp_path):
    data = ToyMultiLabel(n=32)
    one = Recorder(Logits(), num_classes=C)
    make_trainer(tmp_path / "one").validate(one, datamodule=data, verbose=False)
    two = Recorder(Logits(), num_classes=C)
    make_trainer(tmp_path / "two", devices=2, strategy=DDP_STRATEGY).validate(two, datamodule=data, verbose=False)
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        ddp = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, nan_ok=True), key


def test_gap_switch_holds_after_resume(tmp_path):
    """Checkpoint after epoch 1, gap from epoch 2: the resumed run has the gap on from its first epoch on,
    and ends with the same weights as an uninterrupted run."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, max_epochs, ckpt_path=None, callbacks=()):
        seed_everything(0)
        module = GapRecorder(Linear(), num_classes=C, gap_start_epoch=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        trainer = Trainer(accelerator="cpu", max_epochs=max_epochs, enable_progress_bar=False, logger=False,
                          enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                          limit_val_batches=0, callbacks=list(callbacks),
                          enable_checkpointing=bool(callbacks))
        trainer.fit(module, datamodule=ToyMultiLabel(), ckpt_path=ckpt_path)
        return module

    full = fit(tmp_path / "full", 4)
    fit(tmp_path / "first", 2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed = fit(tmp_path / "second", 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.record == {2: True, 3: True}
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)


# ------------------------------------------------------------------------------ the gap loss under DDP

GAP_STEPS, GAP_B, GAP_B_OE = 3, 4, 3  # per-process ID / OE batch; the global batch is twice as large


class GlobalBatchData(LightningDataModule):
    """``GAP_STEPS`` global batches of 2 * GAP_B ID and 2 * GAP_B_OE OE inputs. With ``world_size`` 2, rank r gets
    half r of every global batch; with 1, the single process gets the whole global batch."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        n, n_oe = GAP_STEPS * 2 * GAP_B, GAP_STEPS * 2 * GAP_B_OE
        self.targets = (torch.rand(n, C, generator=g) < 0.4).float()
        self.x = self.targets + 0.5 * torch.randn(n, C, generator=g)
        self.x_oe = 0.3 + 0.5 * torch.randn(n_oe, C, generator=g)
        self.world_size = world_size

    def _half(self, n_per_rank: int, rank: int) -> torch.Tensor:
        steps = torch.arange(GAP_STEPS)[:, None] * 2 * n_per_rank
        return (steps + rank * n_per_rank + torch.arange(n_per_rank)).flatten()

    def train_dataloader(self):
        if self.world_size == 1:
            idx, idx_oe, b, b_oe = torch.arange(len(self.x)), torch.arange(len(self.x_oe)), 2 * GAP_B, 2 * GAP_B_OE
        else:
            rank = self.trainer.global_rank
            idx, idx_oe, b, b_oe = self._half(GAP_B, rank), self._half(GAP_B_OE, rank), GAP_B, GAP_B_OE
        id_loader = DataLoader(TensorDataset(self.x[idx], self.targets[idx]), batch_size=b)
        oe_loader = DataLoader(TensorDataset(self.x_oe[idx_oe], torch.zeros(len(idx_oe), C)), batch_size=b_oe)
        return CombinedLoader({"id": id_loader, "oe": oe_loader}, mode="min_size")


class WeightsWriter(MultiLabelOODModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.gaps = getattr(self, "gaps", []) + [float(self.trainer.callback_metrics["train/loss_gap_step"])]
        return loss

    def on_train_end(self):
        record = {"params": [p.detach().flatten().tolist() for p in self.parameters()], "gaps": self.gaps,
                  "world_size": self.trainer.world_size}
        Path(self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        Path(self.trainer.default_root_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_ddp_gap_loss_equals_single_process_on_the_global_batch(tmp_path):
    """gap_k = 3 is smaller than a process's 4 ID inputs: the bottom-3 of each process's half differs from the
    bottom-3 of the global batch, so only gathering the JointEnergies makes the two runs agree."""
    from lightning.pytorch import seed_everything

    def fit(root, devices):
        seed_everything(0)
        module = WeightsWriter(Linear(), num_classes=C, alpha=1.0, beta=1.0, gap_start_epoch=0, gap_k=3,
                               gap_margin=1.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        kwargs = {"devices": 2, "strategy": DDP_STRATEGY, "use_distributed_sampler": False} if devices == 2 else {}
        make_trainer(root, limit_val_batches=0, **kwargs).fit(module, datamodule=GlobalBatchData(devices))
        return [json.loads(path.read_text()) for path in sorted(Path(root).glob("rank*.json"))]

    (single,) = fit(tmp_path / "one", 1)
    ddp = fit(tmp_path / "two", 2)
    assert [r["world_size"] for r in ddp] == [2, 2] and len(single["gaps"]) == GAP_STEPS
    for record in ddp:
        assert record["gaps"] == pytest.approx(single["gaps"], rel=1e-5)  # every process logs the global loss
        for p, q in zip(record["params"], single["params"]):
            assert p == pytest.approx(q, rel=1e-5, abs=1e-6)
