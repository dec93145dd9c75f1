"""LongTailClassifier follows the ImbSAM / SSE-SAM per-sample protocol, and those callbacks train it end to end."""

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_lt.callbacks import SSESAM, DeferredReweighting, ImbSAM
from lightning_lt.datamodules import DigitsLT
from lightning_lt.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    class_balanced_weights,
)
from lightning_lt.nets import MLP
from lightning_lt.optim import ImbSAM as ImbSAMOptimizer
from lightning_lt.optim import SSESAM as SSESAMOptimizer
from lightning_lt.tasks import LongTailClassifier

COUNTS = [130, 100, 77, 60, 46, 36, 28, 21, 16, 13]  # DigitsLT(imbalance_factor=10)

LOSSES = {
    "ce": CrossEntropyLoss,
    "ce_label_smoothing": functools.partial(CrossEntropyLoss, label_smoothing=0.1),
    "focal": functools.partial(FocalLoss, gamma=2.0),
    "focal_alpha": functools.partial(FocalLoss, gamma=1.0, alpha=0.25),
    "ldam": functools.partial(LDAMLoss, max_m=0.5, s=30.0),
    "la": functools.partial(LogitAdjustedLoss, tau=1.0),
    "balanced_softmax": BalancedSoftmaxLoss,
    "cb_softmax": functools.partial(ClassBalancedLoss, beta=0.999, loss_type="softmax"),
    "cb_focal": functools.partial(ClassBalancedLoss, beta=0.999, loss_type="focal", gamma=1.0),
    "cb_sigmoid": functools.partial(ClassBalancedLoss, beta=0.999, loss_type="sigmoid"),
}

WEIGHTS = {
    "unweighted": None,
    "drw": class_balanced_weights(COUNTS, beta=0.9999),  # what DeferredReweighting sets
    "uneven": torch.linspace(0.2, 3.0, len(COUNTS)),
}


def make_model(loss=CrossEntropyLoss, head="linear", **kwargs) -> LongTailClassifier:
    defaults = dict(
        backbone=MLP(64, (32,)), num_classes=10, class_counts=COUNTS, loss=loss, head=head,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        many_threshold=60, few_threshold=20, log_per_class=False, plot_per_class=False,
    )
    defaults.update(kwargs)
    return LongTailClassifier(**defaults)


def a_batch(batch_size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, 8, 8, generator=generator)
    # every class at least twice, so head and tail groups are both non-empty
    y = torch.arange(batch_size) % len(COUNTS)
    return x, y[torch.randperm(batch_size, generator=generator)]


def training_step(model, batch):
    model.log = lambda *args, **kwargs: None  # no Trainer attached
    return model.training_step(batch, 0)


# ------------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("weights", list(WEIGHTS), ids=str)
@pytest.mark.parametrize("loss_name", list(LOSSES), ids=str)
def test_training_step_returns_the_protocol(loss_name, weights):
    torch.manual_seed(0)
    head = "cosine" if loss_name == "ldam" else "linear"
    model = make_model(LOSSES[loss_name], head=head)
    if WEIGHTS[weights] is not None:
        model.loss.set_class_weights(WEIGHTS[weights])
    x, y = a_batch()
    output = training_step(model, (x, y))

    assert isinstance(output, dict)
    assert set(output) == {"loss", "per_sample_loss", "target"}
    per_sample, loss = output["per_sample_loss"], output["loss"]
    assert per_sample.shape == (x.shape[0],)
    assert torch.equal(output["target"], y)
    assert loss.requires_grad and per_sample.requires_grad
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-6, atol=1e-7)
    # the module's own "mean" reduction: sum_i w_{y_i} l_i / sum_i w_{y_i} when weights are set
    expected = model.loss(model(x), y)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the gradient of the protocol loss is that of the normal loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_grads = torch.autograd.grad(model.loss(model(x), y), list(model.parameters()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", ["unweighted", "drw"])
def test_head_and_tail_group_losses_add_up_to_the_loss(weights):
    model = make_model(LOSSES["ldam"], head="cosine")
    if WEIGHTS[weights] is not None:
        model.loss.set_class_weights(WEIGHTS[weights])
    output = training_step(model, a_batch())
    wrapper = ImbSAMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tail_classes=[8, 9])
    head = wrapper.group_loss(output["per_sample_loss"], output["target"], 0)
    tail = wrapper.group_loss(output["per_sample_loss"], output["target"], 1)
    # ImbSAM's published tail weight 2: L_head + L_tail / 2 is the batch loss
    torch.testing.assert_close(head + tail / 2, output["loss"], rtol=1e-6, atol=1e-7)
    assert head > 0 and tail > 0
    wrapper.tail_weight = 1.0
    tail = wrapper.group_loss(output["per_sample_loss"], output["target"], 1)
    torch.testing.assert_close(head + tail, output["loss"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "loss",
    [
        functools.partial(CrossEntropyLoss, reduction="sum"),  # not a "mean" loss: no per-sample split
        lambda class_counts: nn.CrossEntropyLoss(),  # not a lightning_lt loss
    ],
    ids=["sum_reduction", "torch_loss"],
)
def test_other_losses_return_the_plain_loss(loss):
    model = make_model(loss)
    x, y = a_batch()
    output = training_step(model, (x, y))
    assert isinstance(output, torch.Tensor) and output.ndim == 0
    torch.testing.assert_close(output, model.loss(model(x), y))


def test_imbsam_with_a_non_protocol_loss_gets_a_hint(tmp_path):
    model = make_model(lambda class_counts: nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="per-sample losses and targets.*HINT"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[ImbSAM(tail_threshold=20)]).fit(model, DigitsLT())


# ---------------------------------------------------------------------------------------- end to end


def make_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


class CountingClassifier(LongTailClassifier):
    """Counts training_step calls (one per forward/backward pass)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_step_calls = 0

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        return super().training_step(batch, batch_idx)


class Recorder(Callback):
    """Records, per epoch, the installed wrapper, its radii and the training_step calls and optimizer steps."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._calls, self._steps = pl_module.training_step_calls, trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        wrapper = trainer.optimizers[0]
        self.epochs.append(dict(
            wrapper=wrapper, rhos=wrapper.rhos, tail=wrapper.tail_classes.tolist(),
            calls=pl_module.training_step_calls - self._calls, steps=trainer.global_step - self._steps,
        ))


def counting_model(**kwargs) -> CountingClassifier:
    defaults = dict(
        backbone=MLP(64, (64,)), num_classes=10, class_counts=COUNTS, loss=CrossEntropyLoss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
        many_threshold=60, few_threshold=20, log_per_class=False, plot_per_class=False,
    )
    defaults.update(kwargs)
    return CountingClassifier(**defaults)


def test_imbsam_trains_a_long_tail_classifier(tmp_path):
    seed_everything(0)
    model = counting_model()
    before = [p.detach().clone() for p in model.parameters()]
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[ImbSAM(rho=0.05, tail_threshold=20), recorder])
    trainer.fit(model, DigitsLT(imbalance_factor=10))

    assert len(recorder.epochs) == 2
    for epoch in recorder.epochs:
        assert isinstance(epoch["wrapper"], ImbSAMOptimizer)
        assert epoch["tail"] == [8, 9]  # 16 and 13 training images
        assert epoch["rhos"] == [0.0, 0.05]
        assert epoch["steps"] > 0 and epoch["calls"] == 3 * epoch["steps"]  # head, tail at w, tail at w + e
    assert not isinstance(trainer.optimizers[0], ImbSAMOptimizer)  # the base optimizer is given back
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/acc", "val/balanced_acc", "val/acc_many", "val/acc_medium", "val/acc_few"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])
    assert metrics["val/acc"] > 0.3  # chance is 0.1


def test_ssesam_trains_a_long_tail_classifier_through_both_stages(tmp_path):
    seed_everything(0)
    model = counting_model()
    recorder = Recorder()
    callback = SSESAM(rho_head=0.05, rho_tail=0.10, tail_threshold=50, gamma=0.5)
    trainer = make_trainer(tmp_path, callbacks=[callback, recorder])
    trainer.fit(model, DigitsLT(imbalance_factor=10))

    assert [e["rhos"] for e in recorder.epochs] == [[0.05, 0.10], [0.0, 0.10]]  # stage 2 from ceil(0.5 * 2) = 1
    assert all(isinstance(e["wrapper"], SSESAMOptimizer) for e in recorder.epochs)
    assert all(e["tail"] == [4, 5, 6, 7, 8, 9] for e in recorder.epochs)  # fewer than 50 images: 46 ... 13
    stage1, stage2 = recorder.epochs
    assert stage1["calls"] == 4 * stage1["steps"] and stage2["calls"] == 3 * stage2["steps"]
    assert callback.stage == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["val/acc"] > 0.3


def test_imbsam_with_ldam_drw_end_to_end(tmp_path):
    """The ldam_drw + ImbSAM combination of the configs: DRW switches the weights, the protocol follows them."""
    seed_everything(0)
    model = counting_model(loss=functools.partial(LDAMLoss, max_m=0.5, s=30.0), head="cosine")
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, callbacks=[DeferredReweighting(start_epoch=1, beta=0.9999), ImbSAM(rho=0.05, tail_threshold=20), recorder]
    )
    trainer.fit(model, DigitsLT(imbalance_factor=10))
    torch.testing.assert_close(model.loss.weight, class_balanced_weights(COUNTS, beta=0.9999).to(model.loss.weight))
    assert [e["calls"] == 3 * e["steps"] for e in recorder.epochs] == [True, True]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
