"""LongTailClassifier: heads, post-hoc adjustment, logged metrics against a hand computation, figures, DDP."""

import functools
import math
import os
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn

from lightning_lt.datamodules import DigitsLT
from lightning_lt.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
)
from lightning_lt.nets import MLP, CIFARResNet
from lightning_lt.tasks import LongTailClassifier
from lightning_lt.tasks.plotting import figure_to_array, log_figure, per_class_accuracy_figure
from tests.helpers import DDP_STRATEGY

COUNTS = [130, 100, 77, 60, 46, 36, 28, 21, 16, 13]  # DigitsLT(imbalance_factor=10)


def make_model(**kwargs) -> LongTailClassifier:
    defaults = dict(
        backbone=MLP(64, (32,)),
        num_classes=10,
        class_counts=COUNTS,
        loss=CrossEntropyLoss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        many_threshold=60,
        few_threshold=20,
    )
    defaults.update(kwargs)
    return LongTailClassifier(**defaults)


def make_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


# --------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_heads_give_logits(head):
    model = make_model(head=head)
    logits = model(torch.randn(5, 1, 8, 8))
    assert logits.shape == (5, 10)
    if head == "cosine":
        assert logits.abs().max() <= 1 + 1e-6


def test_head_none_uses_backbone_logits():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = make_model(backbone=backbone, head="none")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), backbone(x))


def test_backbone_without_num_features_is_rejected():
    with pytest.raises(ValueError, match="num_features"):
        make_model(backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 16)))


def test_class_counts_must_match_num_classes():
    with pytest.raises(ValueError, match=r"`class_counts` has 3 entries but `num_classes` is 10"):
        make_model(class_counts=[5, 4, 3])


def test_loss_factory_receives_class_counts():
    model = make_model(loss=functools.partial(LDAMLoss, max_m=0.5, s=30.0), head="cosine")
    margins = model.loss.margins if hasattr(model.loss, "margins") else None
    assert isinstance(model.loss, LDAMLoss)
    if margins is not None:
        expected = torch.tensor(COUNTS, dtype=torch.float) ** -0.25
        torch.testing.assert_close(margins.float(), expected * 0.5 / expected.max())


def test_posthoc_adjustment_subtracts_tau_log_prior():
    model = make_model(posthoc_tau=1.5)
    logits = torch.randn(4, 10)
    prior = torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS)
    torch.testing.assert_close(model.eval_logits(logits), logits - 1.5 * prior.log())
    assert torch.equal(make_model().eval_logits(logits), logits)


def test_posthoc_adjustment_needs_counts():
    with pytest.raises(ValueError, match="posthoc_tau"):
        make_model(class_counts=None, posthoc_tau=1.0)


# ----------------------------------------------------------------------------------- head initialisation
def test_cifar_resnet_linear_head_gets_ldam_drw_init():
    """LDAM-DRW's `_weights_init` gives the classifier `kaiming_normal_` weights; the bias keeps PyTorch's init."""
    torch.manual_seed(0)
    model = make_model(backbone=CIFARResNet(depth=8, width=16), num_classes=100, class_counts=None)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert bias.abs().max() <= 1 / 8 and bias.std() > 0  # uniform(-1/sqrt(64), 1/sqrt(64))
    plain = make_model(backbone=CIFARResNet(depth=8, width=16), head_init="default")
    assert plain.head.weight.abs().max() <= 1 / 8  # PyTorch's uniform init when asked for
    assert make_model().head.weight.abs().max() <= 1 / math.sqrt(32)  # the MLP has no preference: default


@pytest.mark.parametrize(
    ("loss", "head_bias_init", "expected"),
    [
        (functools.partial(ClassBalancedLoss, loss_type="focal"), "auto", -math.log(9)),
        (functools.partial(ClassBalancedLoss, loss_type="sigmoid"), "auto", -math.log(9)),
        (CrossEntropyLoss, "sigmoid_prior", -math.log(9)),
        (functools.partial(ClassBalancedLoss, loss_type="focal"), "zero", 0.0),
    ],
)
def test_head_bias_init(loss, head_bias_init, expected):
    model = make_model(loss=loss, head_bias_init=head_bias_init)
    torch.testing.assert_close(model.head.bias.detach(), torch.full((10,), expected))
    assert model.hparams.head_bias_init == head_bias_init


def test_head_bias_init_needs_a_bias():
    with pytest.raises(ValueError, match="cosine head has no bias.*HINT: use a linear head"):
        make_model(head="cosine", head_bias_init="sigmoid_prior")


# ------------------------------------------------------------------------------------ traps made errors
@pytest.mark.parametrize(("head", "match"), [("Linear", "Did you mean 'linear'"), ("mlp", "'linear', 'cosine', 'none'")])
def test_head_typo_lists_the_valid_names(head, match):
    with pytest.raises(ValueError, match=rf"Unknown `head` {head!r}.*{match}"):
        make_model(head=head)
    with pytest.raises(ValueError, match=r"Unknown `head_bias_init` 'prior'.*'sigmoid_prior'"):
        make_model(head_bias_init="prior")


def test_ldam_with_a_linear_head_is_refused():
    """LDAM's s = 30 on unbounded linear logits trains to chance (0.10 vs 0.73 with the cosine head)."""
    with pytest.raises(ValueError, match=r"LDAMLoss multiplies the logits by s=30.0.*HINT: use `head='cosine'`"):
        make_model(loss=LDAMLoss, head="linear")
    assert isinstance(make_model(loss=LDAMLoss, head="cosine").loss, LDAMLoss)
    assert isinstance(make_model(loss=functools.partial(LDAMLoss, s=1.0), head="linear").loss, LDAMLoss)


@pytest.mark.parametrize("loss", [LogitAdjustedLoss, BalancedSoftmaxLoss])
def test_posthoc_adjustment_of_a_logit_adjusted_loss_is_refused(loss):
    with pytest.raises(ValueError, match=r"adjusts the logits twice.*HINT: drop `posthoc_tau`.*CrossEntropyLoss"):
        make_model(loss=loss, posthoc_tau=1.0)
    assert make_model(loss=loss).posthoc_tau is None


def test_loss_instance_instead_of_factory_is_refused():
    with pytest.raises(ValueError, match=r"`loss` .* must be a factory .* got an instance of LDAMLoss.*functools.partial"):
        make_model(loss=LDAMLoss(COUNTS), head="cosine")
    with pytest.raises(ValueError, match=r"`optimizer` .* must be a factory .* got an instance of SGD"):
        make_model(optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))


@pytest.mark.parametrize("loss", [CrossEntropyLoss, lambda counts: nn.CrossEntropyLoss()])
def test_target_out_of_range_names_value_and_classes(loss):
    model = make_model(loss=loss)
    x = torch.randn(4, 1, 8, 8)
    for labels, shown in (([0, 12, 3, 12], "12"), ([0, -1, 3, 2], "-1")):
        with pytest.raises(ValueError, match=rf"target value\(s\) {shown} outside \[0, 10\) for 10 classes.*HINT"):
            model.training_step((x, torch.tensor(labels)), 0)
        with pytest.raises(ValueError, match=rf"target value\(s\) {shown} outside \[0, 10\)"):
            model.validation_step((x, torch.tensor(labels)), 0)


def test_loss_config_dict_in_python():
    model = make_model(loss={"class_path": "lightning_lt.losses.FocalLoss", "init_args": {"gamma": 3.0}})
    assert isinstance(model.loss, FocalLoss) and model.loss.gamma == 3.0
    with pytest.raises(ValueError, match=r"names 'os.system', which is not a subclass of Module.*HINT: pass `loss=`"):
        make_model(loss={"class_path": "os.system", "init_args": {"command": "true"}})
    with pytest.raises(ValueError, match=r"'lightning_lt.losses.NoSuchLoss', which cannot be imported"):
        make_model(loss={"class_path": "lightning_lt.losses.NoSuchLoss"})


# ------------------------------------------------------------------------------------ logged metrics
def _hand_metrics(model: LongTailClassifier, dm: DigitsLT) -> dict[str, float]:
    """Accuracies computed directly from the model's predictions with numpy."""
    model.eval()
    x, y = dm.test_dataset.tensors
    with torch.no_grad():
        preds = model.eval_logits(model(x)).argmax(-1).numpy()
    y = y.numpy()
    per_class = np.array([(preds[y == c] == c).mean() for c in range(10)])
    counts = np.array(COUNTS)
    return {
        "acc": float((preds == y).mean()),
        "balanced_acc": float(per_class.mean()),
        "acc_many": float(per_class[counts > 60].mean()),
        "acc_medium": float(per_class[(counts >= 20) & (counts <= 60)].mean()),
        "acc_few": float(per_class[counts < 20].mean()),
        **{f"class_acc/{c}": float(per_class[c]) for c in range(10)},
    }


@pytest.mark.parametrize("posthoc_tau", [None, 1.0])
def test_validation_metrics_equal_hand_computation(tmp_path, posthoc_tau):
    seed_everything(0)
    dm = DigitsLT(imbalance_factor=10)
    model = make_model(posthoc_tau=posthoc_tau)
    trainer = make_trainer(tmp_path)
    trainer.fit(model, dm)
    assert "train/loss_epoch" in trainer.callback_metrics
    logged = trainer.validate(model, dm, verbose=False)[0]
    expected = _hand_metrics(model, dm)
    for key, value in expected.items():
        assert logged[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
    assert "val/loss" in logged
    assert model.hparams.class_counts == COUNTS


def test_test_stage_logs_the_same_keys(tmp_path):
    dm = DigitsLT()
    model = make_model()
    results = make_trainer(tmp_path).test(model, dm, verbose=False)[0]
    assert {"test/acc", "test/balanced_acc", "test/acc_many", "test/acc_medium", "test/acc_few"} <= set(results)


def test_empty_few_group_is_nan_with_warning(tmp_path):
    dm = DigitsLT()
    model = make_model(few_threshold=5, plot_per_class=False)  # no class has fewer than 5 images
    with pytest.warns(UserWarning, match="few"):
        results = make_trainer(tmp_path).validate(model, dm, verbose=False)[0]
    assert math.isnan(results["val/acc_few"])
    assert not math.isnan(results["val/acc_many"])


def test_without_class_counts_only_overall_metrics(tmp_path):
    dm = DigitsLT()
    model = make_model(class_counts=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = make_trainer(tmp_path).validate(model, dm, verbose=False)[0]
    assert "val/acc" in results and "val/acc_few" not in results
    assert not [w for w in caught if "group" in str(w.message)]  # no empty-group noise without counts


def test_predict_returns_probabilities(tmp_path):
    dm = DigitsLT()
    out = make_trainer(tmp_path).predict(make_model(), dm)
    probs = torch.cat([o["probs"] for o in out])
    assert probs.shape == (400, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(400))


# ------------------------------------------------------------------------------------------- figures
def test_figure_renders_with_nan_classes():
    figure = per_class_accuracy_figure(COUNTS, [0.5] * 9 + [float("nan")], 100, 20)
    image = figure_to_array(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"few", "medium", "many"}
    assert len(ax.collections[-1].get_offsets()) == 9  # the nan class is not drawn


def test_figure_is_logged_as_png_by_csv_logger(tmp_path):
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = make_trainer(tmp_path, logger=logger, max_epochs=1)
    trainer.fit(make_model(), DigitsLT())
    figures = os.listdir(os.path.join(logger.log_dir, "figures"))
    assert figures == ["val_per_class_accuracy_step000009.png"]


def test_figure_is_logged_as_image_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, logger=logger, max_epochs=1)
    trainer.fit(make_model(), DigitsLT())
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "val/per_class_accuracy" in events.Tags()["images"]
    assert "val/acc_medium" in events.Tags()["scalars"]


def test_figure_goes_to_wandb_log_image(monkeypatch):
    logger = WandbLogger.__new__(WandbLogger)  # no run is started: only the dispatch is under test
    calls = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, **kw: calls.append((key, images)))
    log_figure(logger, "val/per_class_accuracy", per_class_accuracy_figure(COUNTS, [0.5] * 10))
    assert calls[0][0] == "val/per_class_accuracy"
    assert calls[0][1][0].ndim == 3


# -------------------------------------------------------------------------------- checkpoint and DDP
def test_checkpoint_round_trip(tmp_path):
    dm = DigitsLT()
    model = make_model(loss=functools.partial(LogitAdjustedLoss, tau=1.0))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, dm)
    restored = LongTailClassifier.load_from_checkpoint(
        checkpoint.last_model_path, backbone=MLP(64, (32,)), loss=functools.partial(LogitAdjustedLoss, tau=1.0)
    )
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))
    assert restored.class_counts == COUNTS


def fit_and_checkpoint(tmp_path, **kwargs) -> tuple[LongTailClassifier, str]:
    model = make_model(**kwargs)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(model, DigitsLT())
    return model, checkpoint.last_model_path


def test_checkpoint_from_python_rebuilds_the_same_loss_and_optimizer(tmp_path):
    """Factories given as a class or functools.partial are saved as `class_path` / `init_args`; before, they were
    dropped and `load_from_checkpoint` silently built the default CrossEntropyLoss (same buffers as a
    LogitAdjustedLoss, so the state dict loaded without complaint)."""
    model, path = fit_and_checkpoint(
        tmp_path, loss=functools.partial(LogitAdjustedLoss, tau=0.5),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )  # fmt: skip
    assert model.hparams.loss == {
        "class_path": "lightning_lt.losses.logit_adjusted.LogitAdjustedLoss", "init_args": {"tau": 0.5}
    }
    restored = LongTailClassifier.load_from_checkpoint(path, backbone=MLP(64, (32,)))
    assert isinstance(restored.loss, LogitAdjustedLoss) and restored.loss.tau == 0.5
    optimizer = restored.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    x = torch.randn(4, 1, 8, 8)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_checkpoint_from_python_names_what_it_cannot_rebuild(tmp_path):
    _, path = fit_and_checkpoint(tmp_path, loss=lambda counts: FocalLoss(counts, gamma=3.0))
    with pytest.raises(ValueError, match=r"`backbone` of LongTailClassifier was not saved in the checkpoint: .* "
                                         r"an instance of MLP.*load_from_checkpoint\(path, backbone=...\)"):
        LongTailClassifier.load_from_checkpoint(path)
    with pytest.raises(ValueError, match=r"`loss` of LongTailClassifier was not saved .* a lambda.*loss=\.\.\."):
        LongTailClassifier.load_from_checkpoint(path, backbone=MLP(64, (32,)))
    restored = LongTailClassifier.load_from_checkpoint(
        path, backbone=MLP(64, (32,)), loss=functools.partial(FocalLoss, gamma=3.0)
    )
    assert isinstance(restored.loss, FocalLoss) and restored.loss.gamma == 3.0


@pytest.mark.ddp
def test_ddp_validation_equals_single_process(tmp_path):
    seed_everything(0)
    dm = DigitsLT()
    model = make_model(plot_per_class=False)
    make_trainer(tmp_path, max_epochs=1).fit(model, dm)
    single = make_trainer(tmp_path).validate(model, dm, verbose=False)[0]
    ddp = make_trainer(tmp_path, devices=2, strategy=DDP_STRATEGY).validate(model, dm, verbose=False)[0]
    for key in ("val/acc", "val/balanced_acc", "val/acc_many", "val/acc_medium", "val/acc_few"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
