"""DecoupledClassifier: stage 2 from a stage-1 checkpoint (cRT, LWS, tau-norm, WB, MiSLAS options), acceptance
identities, freezing, cached features (one and two processes), tau selection and checkpoints, bad input."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_lt.callbacks import MaxNorm
from lightning_lt.datamodules import DigitsLT
from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.nets import MLP
from lightning_lt.tasks import DecoupledClassifier, LongTailClassifier
from lightning_lt.tasks.decoupling import tau_normalized_weight
from tests.helpers import DDP_STRATEGY, QUIET_FITS

pytestmark = pytest.mark.filterwarnings(
    *QUIET_FITS,
    "ignore:.*is empty because:UserWarning",
    "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning",
)
COUNTS = DigitsLT().class_counts


class BNNet(nn.Module):
    """A small backbone with BatchNorm (to see its statistics frozen or shifted)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


class Digits(DigitsLT):
    """DigitsLT with a validation split (the even test images) and ``train_eval_dataloader()`` (DigitsLT has no
    augmentation, so its training images are already those of the evaluation transform)."""

    def setup(self, stage: str = "fit") -> None:
        super().setup(stage)
        full = self.test_dataset
        self.val_dataset = Subset(full, range(0, len(full), 2))
        self.test_dataset = Subset(full, range(1, len(full), 2))

    def train_eval_dataloader(self) -> DataLoader:
        return self._eval_loader(self.train_dataset)


def make_trainer(root, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=str(root))  # fmt: skip
    defaults.update(kwargs)
    return Trainer(**defaults)


def stage2(init_from, **kwargs) -> DecoupledClassifier:
    defaults = dict(backbone=BNNet(), num_classes=10, class_counts=COUNTS, loss=CrossEntropyLoss,
                    optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), many_threshold=60,
                    few_threshold=20, plot_per_class=False, log_per_class=False,
                    init_from=None if init_from is None else str(init_from))  # fmt: skip
    defaults.update(kwargs)
    return DecoupledClassifier(**defaults)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, LongTailClassifier]:
    """A CE stage-1 run (3 epochs) and its checkpoint."""
    root = tmp_path_factory.mktemp("stage1")
    seed_everything(0)
    model = LongTailClassifier(BNNet(), 10, COUNTS, loss=CrossEntropyLoss, many_threshold=60, few_threshold=20,
                               optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), plot_per_class=False)  # fmt: skip
    trainer = make_trainer(root, max_epochs=3)
    trainer.fit(model, datamodule=Digits(batch_size=32))
    trainer.save_checkpoint(root / "stage1.ckpt")
    return root / "stage1.ckpt", model.eval()


def loaded(stage1, **kwargs) -> DecoupledClassifier:
    model = stage2(stage1[0], **kwargs)
    model.load_init_from()
    return model.eval()


# ----------------------------------------------------------------------------------- acceptance identities
def test_lws_with_unit_scales_equals_the_stage1_model(stage1):
    model = loaded(stage1, freeze_head=True, learnable_scales=True)
    assert torch.equal(model.logit_scales.detach(), torch.ones(10))
    x = torch.randn(20, 1, 8, 8)
    torch.testing.assert_close(model(x), stage1[1](x), rtol=0, atol=1e-6)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["logit_scales"]


@pytest.mark.parametrize("bias", ["keep", "drop"])
def test_tau_zero_leaves_the_logits_unchanged(stage1, bias):
    model = loaded(stage1, freeze_head=True, tau_norm=True, tau_norm_bias=bias)
    features = model.backbone(torch.randn(20, 1, 8, 8))
    expected = model.head(features) if bias == "keep" else model.head(features) - model.head.bias  # official: drop
    torch.testing.assert_close(model.tau_normalized_logits(features, 0.0), expected, rtol=0, atol=1e-6)


def test_tau_one_gives_unit_norm_class_weights(stage1):
    model = loaded(stage1, freeze_head=True, tau_norm=True)
    weight = model.head.weight.detach()
    assert weight.norm(dim=1).std() > 0.01  # stage 1 left unequal norms
    normalized = tau_normalized_weight(weight, 1.0)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)
    features = torch.randn(4, 16)
    torch.testing.assert_close(model.tau_normalized_logits(features, 1.0), features @ normalized.t(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- stage-2 training
@pytest.mark.parametrize("bn_shift", [False, True])
def test_frozen_backbone_keeps_its_weights_and_bn_statistics_unless_bn_shift(stage1, tmp_path, bn_shift):
    model = stage2(stage1[0], reinit_head=True, bn_shift=bn_shift)
    make_trainer(tmp_path).fit(model, datamodule=Digits(batch_size=32, sampler="class_balanced"))
    reference = stage1[1]
    for key, value in reference.backbone.state_dict().items():
        same = torch.equal(model.backbone.state_dict()[key], value)
        assert same if "running" not in key and "num_batches" not in key else same is not bn_shift, key
    assert not torch.allclose(model.head.weight, reference.head.weight)


def test_crt_starts_from_a_fresh_head_and_lws_from_the_stage1_head(stage1):
    crt, lws = loaded(stage1, reinit_head=True), loaded(stage1, freeze_head=True, learnable_scales=True)
    assert not torch.allclose(crt.head.weight, stage1[1].head.weight)
    assert torch.equal(lws.head.weight, stage1[1].head.weight)


class HeadRecord(Callback):
    """Each rank's head weight and the logged scales at fit end, to ``default_root_dir/rank<r>.pt``."""

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {"head": pl_module.head.weight.detach().clone(), "cached": "train_dataloader" in vars(trainer.datamodule)}
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("sampler", [None, "class_balanced"])
def test_cached_features_train_like_the_image_path(stage1, tmp_path, sampler):
    heads = []
    for cache in (False, True):
        seed_everything(0)
        model = stage2(stage1[0], reinit_head=True, cache_features=cache)
        dm = Digits(batch_size=32, sampler=sampler)
        make_trainer(tmp_path / str(cache), max_epochs=3).fit(model, datamodule=dm)
        assert "train_dataloader" not in vars(dm)  # the data module's own loader is back
        heads.append(model.head.weight.detach())
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=1e-6)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*ddp_fork.*:UserWarning")
def test_ddp_cached_features_with_maxnorm_equal_the_image_path(stage1, tmp_path):
    """Two processes: each computes the features of its shard, the shards are all-gathered, and the classifier then
    trains exactly as on the images (same sampler shards, DDP-averaged gradients); MaxNorm holds on both ranks."""
    records, radii = {}, {}
    for cache in (False, True):
        seed_everything(0)
        root = tmp_path / f"cache{cache}"
        maxnorm = MaxNorm(threshold=0.1)
        trainer = make_trainer(root, max_epochs=2, devices=2, strategy=DDP_STRATEGY, callbacks=[maxnorm, HeadRecord()])
        trainer.fit(stage2(stage1[0], cache_features=cache), datamodule=Digits(batch_size=16, sampler="class_balanced"))
        records[cache] = [torch.load(root / f"rank{r}.pt") for r in (0, 1)]
        start = stage1[1].head.weight.detach().norm(dim=1)
        radii[cache] = float(start.min() + 0.1 * (start.max() - start.min()))
    for cache in (False, True):
        rank0, rank1 = records[cache]
        torch.testing.assert_close(rank0["head"], rank1["head"], rtol=0, atol=0)
        assert float(rank0["head"].norm(dim=1).max()) <= radii[cache] * (1 + 1e-6)
        assert not rank0["cached"]  # restored before on_fit_end
    torch.testing.assert_close(records[True][0]["head"], records[False][0]["head"], rtol=0, atol=1e-6)


def test_lws_scales_survive_checkpoint_and_resume(stage1, tmp_path):
    def fit(max_epochs, root, ckpt_path=None):
        seed_everything(0)
        model = stage2(stage1[0], freeze_head=True, learnable_scales=True, cache_features=True)
        trainer = make_trainer(root, max_epochs=max_epochs)
        trainer.fit(model, datamodule=Digits(batch_size=32, sampler="class_balanced"), ckpt_path=ckpt_path)
        return model, trainer

    straight, _ = fit(4, tmp_path / "straight")
    first, trainer = fit(2, tmp_path / "first")
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    assert not torch.equal(first.logit_scales.detach(), torch.ones(10))
    resumed, _ = fit(4, tmp_path / "resumed", ckpt_path=str(tmp_path / "half.ckpt"))
    torch.testing.assert_close(resumed.logit_scales, straight.logit_scales, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- tau selection
def hand_curve(model: DecoupledClassifier, dm: Digits, taus) -> list[float]:
    dm.setup("validate")
    x = torch.stack([dm.val_dataset[i][0] for i in range(len(dm.val_dataset))])
    y = torch.tensor([int(dm.val_dataset[i][1]) for i in range(len(dm.val_dataset))])
    with torch.no_grad():
        features, weight = model.backbone(x), model.head.weight
    curve = []
    for tau in taus:
        preds = (features @ (weight / weight.norm(dim=1, keepdim=True) ** tau).t()).argmax(1)
        curve.append(float(np.mean([(preds[y == c] == c).float().mean().item() for c in range(10)])))
    return curve


def test_tau_is_chosen_on_validation_logged_plotted_and_checkpointed(stage1, tmp_path):
    model = stage2(stage1[0], freeze_head=True, tau_norm=True)
    dm = Digits(batch_size=32)
    trainer = make_trainer(tmp_path, logger=CSVLogger(tmp_path, name="tau"), limit_val_batches=None)
    with pytest.raises(RuntimeError, match="has not chosen tau yet.*HINT: run `trainer.validate"):
        trainer.test(model, datamodule=dm, verbose=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    curve = hand_curve(model, Digits(batch_size=32), model.tau_grid)
    best = int(np.argmax(curve))
    assert metrics["val/tau"] == pytest.approx(model.tau_grid[best]) == pytest.approx(float(model.chosen_tau))
    assert metrics["val/balanced_acc"] == pytest.approx(curve[best], abs=1e-6)
    assert [b for _, b in model.tau_curve] == pytest.approx(curve, abs=1e-6)
    assert list(tmp_path.rglob("val_tau_curve*.png"))
    tested = trainer.test(model, datamodule=dm, verbose=False)[0]
    trainer.save_checkpoint(tmp_path / "tau.ckpt")
    restored = DecoupledClassifier.load_from_checkpoint(tmp_path / "tau.ckpt", backbone=BNNet(), init_from="gone.ckpt")
    assert float(restored.chosen_tau) == float(model.chosen_tau)
    again = make_trainer(tmp_path).test(restored, datamodule=dm, verbose=False)[0]  # no init_from reload
    assert again["test/balanced_acc"] == pytest.approx(tested["test/balanced_acc"], abs=1e-6)


def test_fixed_tau_and_a_test_split_warning(stage1, tmp_path):
    model = stage2(stage1[0], freeze_head=True, tau_norm=True, tau=1.0)
    with pytest.warns(UserWarning, match="is the test split.*HINT: give the data module a validation split"):
        metrics = make_trainer(tmp_path, limit_val_batches=None).validate(
            stage2(stage1[0], freeze_head=True, tau_norm=True), datamodule=DigitsLT(batch_size=32), verbose=False
        )[0]  # fmt: skip
    assert math.isfinite(metrics["val/tau"])
    fixed = make_trainer(tmp_path, limit_val_batches=None).validate(model, datamodule=Digits(batch_size=32), verbose=False)[0]
    assert fixed["val/tau"] == 1.0 and math.isnan(float(model.chosen_tau))


# ----------------------------------------------------------------------------------- bad input
def test_without_init_from_the_message_says_how_to_pass_it():
    with pytest.raises(ValueError, match=r"starts from a stage-1 checkpoint, but `init_from` is not set.*HINT: .*"
                                         r"--model.init_args.init_from=PATH"):  # fmt: skip
        stage2(None)


def test_checkpoint_with_another_number_of_classes_names_both(stage1, tmp_path):
    model = stage2(stage1[0], num_classes=5, class_counts=COUNTS[:5])
    with pytest.raises(ValueError, match=rf"checkpoint '{stage1[0]}' has 10 classes, but this model has num_classes=5"):
        model.load_init_from()


def test_missing_file_and_foreign_files(stage1, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`init_from`='nowhere.ckpt' does not exist.*HINT"):
        stage2("nowhere.ckpt").setup("fit")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        stage2(tmp_path / "plain.pt").load_init_from()
    other = stage2(stage1[0], backbone=MLP(64, (16,)))  # no BatchNorm
    with pytest.raises(ValueError, match=r"backbone of the stage-1 checkpoint .* does not fit .*unexpected.*HINT: build"):
        other.load_init_from()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head="none"), "`head='none'` has none"),
        (dict(freeze_backbone=False, bn_shift=True), r"`bn_shift=True` re-estimates .*\*frozen\* backbone"),
        (dict(freeze_backbone=False, cache_features=True), "`cache_features=True` needs a frozen backbone"),
        (dict(bn_shift=True, cache_features=True), "changes them every batch"),
        (dict(reinit_head=True, freeze_head=True), "would keep a random classifier"),
        (dict(tau_norm=True, head="cosine"), "`tau_norm=True` rescales the rows of a linear classifier"),
        (dict(tau_norm=True, learnable_scales=True), "two alternative ways"),
        (dict(tau_norm=True, posthoc_tau=1.0), "rebalance the logits twice"),
        (dict(head_lr_factor=0.0), "`head_lr_factor` of DecoupledClassifier to be > 0"),
        (dict(head_lr_factor=0.5, freeze_head=True), "does not train. HINT"),
        (dict(tau_norm=True, tau_grid=[]), "non-empty `tau_grid`"),
    ],
)
def test_contradicting_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stage2("stage1.ckpt", **kwargs)


def test_fit_with_nothing_to_train_points_to_validate(stage1, tmp_path):
    with pytest.raises(ValueError, match="nothing to train.*HINT: tau-normalisation needs no training: run `lightning-lt validate`"):
        make_trainer(tmp_path).fit(stage2(stage1[0], freeze_head=True, tau_norm=True), datamodule=Digits())


def test_cached_features_need_train_eval_dataloader(stage1, tmp_path):
    class Plain(LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 10), batch_size=4)

    with pytest.raises(ValueError, match=r"from the data module's `train_eval_dataloader\(\)`.*Plain, which has no.*HINT"):
        make_trainer(tmp_path).fit(stage2(stage1[0], cache_features=True), datamodule=Plain())
