"""MultiExpertClassifier: aggregation, per-expert logging, bad input, and the epoch-dependent losses across a resume."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from lightning_lt.losses import DirMixELoss, RIDELoss, SADELoss
from lightning_lt.nets import CIFARResNet, MultiExpertCIFARResNet
from lightning_lt.tasks import MultiExpertClassifier
from tests.tasks.expert_toy import TinyImagesLT, expert_model, make_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*is empty because:UserWarning",
)


def test_prediction_is_the_weighted_mean_of_the_experts():
    model = expert_model(SADELoss).eval()
    x = torch.randn(4, 3, 8, 8)
    z = model.expert_logits(x)
    assert z.shape == (3, 4, 3)
    torch.testing.assert_close(model(x), z.mean(dim=0))
    model.set_expert_weights([2.0, 1.0, 1.0])  # normalised to sum 1
    torch.testing.assert_close(model.expert_weights, torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(model(x), 0.5 * z[0] + 0.25 * z[1] + 0.25 * z[2])
    assert not model.equal_weights


def test_validation_logs_every_expert_and_the_equal_weight_accuracy(tmp_path):
    seed_everything(0)
    model = expert_model(SADELoss, expert_weights=[0.6, 0.2, 0.2])
    metrics = make_trainer(tmp_path).validate(model, datamodule=TinyImagesLT(), verbose=False)[0]
    for key in ("val/acc", "val/balanced_acc", "val/acc_many", "val/acc_medium", "val/acc_few", "val/loss",
                "val/expert0/acc", "val/expert2/acc_few", "val/equal_weights/acc", "val/class_acc/0"):  # fmt: skip
        assert key in metrics, key
    model.set_expert_weights([1.0, 1.0, 1.0])
    metrics = make_trainer(tmp_path).validate(model, datamodule=TinyImagesLT(), verbose=False)[0]
    assert "val/equal_weights/acc" not in metrics and "val/expert1/acc" in metrics


def test_validation_logs_the_per_class_figure_of_the_aggregated_prediction(tmp_path):
    """As LongTailClassifier: one figure per validation epoch with ``plot_per_class`` and a logger; none without."""
    import os

    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    logger = CSVLogger(str(tmp_path), name="run")
    make_trainer(tmp_path, logger=logger).validate(expert_model(SADELoss, plot_per_class=True), datamodule=TinyImagesLT(),
                                                   verbose=False)  # fmt: skip
    assert os.listdir(os.path.join(logger.log_dir, "figures")) == ["val_per_class_accuracy_step000000.png"]
    quiet = CSVLogger(str(tmp_path), name="quiet")
    make_trainer(tmp_path, logger=quiet).validate(expert_model(SADELoss), datamodule=TinyImagesLT(), verbose=False)
    assert not os.path.exists(os.path.join(quiet.log_dir, "figures"))


def test_bad_input_is_refused_with_hints():
    with pytest.raises(ValueError, match="multi-expert backbone.*HINT"):
        MultiExpertClassifier(backbone=lambda num_classes: CIFARResNet(depth=8), num_classes=3, class_counts=[3, 2, 1])
    with pytest.raises(ValueError, match="SADELoss trains exactly 3 experts but the backbone .* has 2.*HINT"):
        expert_model(SADELoss, num_experts=2)
    with pytest.raises(ValueError, match="DirMixELoss trains exactly 3 experts but the backbone .* has 4"):
        expert_model(DirMixELoss, num_experts=4)
    with pytest.raises(ValueError, match="num_experts` >= 2.*HINT"):
        expert_model(RIDELoss, num_experts=1)
    model = expert_model(RIDELoss, num_experts=2)
    with pytest.raises(ValueError, match="3 expert weights but the backbone has 2 experts.*HINT"):
        model.set_expert_weights([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        model.set_expert_weights([1.0, -1.0])
    with pytest.raises(ValueError, match="must be a factory.*HINT"):
        MultiExpertClassifier(backbone=MultiExpertCIFARResNet(3, depth=8), num_classes=3, class_counts=[3, 2, 1])


class StageRecorder(Callback):
    """The loss's stage at the first training batch of every epoch: ``{epoch: flag}``."""

    def __init__(self, attribute: str) -> None:
        self.attribute, self.stages = attribute, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.stages[trainer.current_epoch] = bool(getattr(pl_module.loss, self.attribute))


class StopAfter(Callback):
    """Save a checkpoint at the end of epoch ``epoch`` and stop (an interrupted run)."""

    def __init__(self, epoch: int, path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


LOSSES = {
    # the second epoch (0-based 1) is the first re-weighted one / the first with the semi-variance term:
    # DirMixE switches at int(0.4 * (3 + 1)) = 1.
    "ride": (functools.partial(RIDELoss, reweight_epoch=1, additional_diversity_factor=-0.45), "reweighted"),
    "dirmixe": (functools.partial(DirMixELoss, trials=4, semi_variance_start=0.4, lambda_var=5.0), "semi_variance_active"),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_epoch_dependent_loss_survives_a_resume(tmp_path, name):
    loss, attribute = LOSSES[name]
    fit = dict(max_epochs=3, limit_train_batches=3, limit_val_batches=0)

    seed_everything(0)
    full = expert_model(loss)
    uninterrupted = StageRecorder(attribute)
    make_trainer(tmp_path / "full", callbacks=[uninterrupted], **fit).fit(full, datamodule=TinyImagesLT())
    assert uninterrupted.stages == {0: False, 1: True, 2: True}

    seed_everything(0)
    first = expert_model(loss)
    ckpt = tmp_path / "epoch1.ckpt"
    make_trainer(tmp_path / "first", callbacks=[StopAfter(1, ckpt)], **fit).fit(first, datamodule=TinyImagesLT())
    seed_everything(0)
    resumed_model = MultiExpertClassifier.load_from_checkpoint(ckpt)  # backbone and loss rebuilt from the checkpoint
    assert bool(getattr(resumed_model.loss, attribute))  # the saved stage comes back with the weights
    resumed = StageRecorder(attribute)
    trainer = make_trainer(tmp_path / "resumed", callbacks=[resumed], **fit)
    trainer.fit(resumed_model, datamodule=TinyImagesLT(), ckpt_path=ckpt)
    assert resumed.stages == {2: True}
    for (key, a), b in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=key)


def test_sade_fit_trains(tmp_path):
    seed_everything(0)
    model = expert_model(SADELoss)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=TinyImagesLT())
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_router_stage_trains_only_the_router_then_routes(tmp_path):
    seed_everything(0)
    model = expert_model(functools.partial(RIDELoss, reweight_epoch=None), router_top_choices=2, train_router=True)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    router = {k: v.clone() for k, v in model.router.state_dict().items()}
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=TinyImagesLT())
    for key, value in model.backbone.state_dict().items():  # frozen experts, BatchNorm statistics included
        assert torch.equal(value, backbone[key]), key
    assert any(not torch.equal(v, router[k]) for k, v in model.router.state_dict().items())
    model.route = True
    metrics = make_trainer(tmp_path).validate(model, datamodule=TinyImagesLT(), verbose=False)[0]
    assert 1.0 <= metrics["val/experts_per_sample"] <= 3.0 and "val/acc" in metrics
    with pytest.raises(ValueError, match="expert router. HINT: set `router_top_choices`"):
        expert_model(RIDELoss, route=True)
