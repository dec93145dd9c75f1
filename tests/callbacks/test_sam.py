"""SAM-family callbacks inside Trainer.fit: the same updates as the reference, quiet extra passes, checks."""

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from lightning_lt.callbacks import SAM, SSESAM, ImbSAM, OptimizerStages
from lightning_lt.optim import SAM as SAMOptimizer
from lightning_lt.optim import ImbSAM as ImbSAMOptimizer
from lightning_lt.optim import StepRho
from tests.optim.sam_reference import problem, reference_run

# class 2 and 3 are the tail with tail_threshold=10
CLASS_COUNTS = [50, 50, 5, 5]


class LinearModule(L.LightningModule):
    """The reference problem as a LightningModule: 3 identical batches per epoch unless told otherwise."""

    def __init__(self, protocol: bool = True, batches: int = 3, batchnorm: bool = False):
        super().__init__()
        x, y, params = problem()
        self.x, self.y, self.batches = x, y, batches
        self.weight = nn.Parameter(params[0].clone())
        self.bias = nn.Parameter(params[1].clone())
        self.bn = nn.BatchNorm1d(x.shape[1]) if batchnorm else None
        self.protocol = protocol
        self.class_counts = CLASS_COUNTS
        self.mean_loss = MeanMetric()
        self.first_pass_losses: list[float] = []
        self.training_step_calls = 0

    def forward(self, x):
        if self.bn is not None:
            x = self.bn(x)
        return x @ self.weight + self.bias

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        x, y = batch
        per_sample = F.cross_entropy(self(x), y, reduction="none")
        loss = per_sample.mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        self.mean_loss.update(loss)
        if self.protocol:
            return {"loss": loss, "per_sample_loss": per_sample, "target": y}
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self.bn is not None:  # a forward here would move the running statistics under test
            return
        with torch.no_grad():
            self.first_pass_losses.append(F.cross_entropy(self(batch[0]), batch[1]).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    def train_dataloader(self):
        dataset = TensorDataset(self.x.repeat(self.batches, 1), self.y.repeat(self.batches))
        return DataLoader(dataset, batch_size=self.x.shape[0], shuffle=False)


def fit(module, callback, max_epochs=1, tmp_path=None, **kwargs):
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        default_root_dir=str(tmp_path) if tmp_path else None, **kwargs,
    )
    trainer.fit(module)
    return trainer


def assert_params(module, expected):
    torch.testing.assert_close(module.weight.detach(), expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(module.bias.detach(), expected[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_sam_callback_three_steps(adaptive, rho):
    module = LinearModule(protocol=False)
    fit(module, SAM(rho=rho, adaptive=adaptive))
    assert_params(module, reference_run("sam", 3, rho=rho, adaptive=adaptive))
    assert module.training_step_calls == 6  # two passes per step


def test_imbsam_callback_three_steps():
    module = LinearModule()
    fit(module, ImbSAM(rho=0.05, tail_threshold=10))
    assert_params(module, reference_run("imbsam", 3, rho=0.05))  # tail weight 2, as published
    assert module.training_step_calls == 9


@pytest.mark.parametrize("make, method", [
    (lambda: ImbSAM(rho=0.05, tail_threshold=10, tail_weight=1.0), "imbsam"),
    (lambda: SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=10, gamma=1.0, tail_weight=2.0), "ssesam"),
])
def test_callback_tail_weight_reaches_every_pass(make, method):
    module = LinearModule()
    callback = make()
    fit(module, callback)
    kwargs = {"rho": 0.05} if method == "imbsam" else {"stages": (1, 1, 1), "rho_head": 0.05, "rho_tail": 0.1}
    assert_params(module, reference_run(method, 3, tail_weight=callback.tail_weight, **kwargs))


def test_callback_sam_every_equals_the_optimizer_wrapper():
    """ImbSAM with sam_every=2 in Trainer.fit = the optimizer wrapper in a plain loop (SAM and plain steps,
    both with the tail weight 2)."""
    module = LinearModule(batches=4)
    fit(module, ImbSAM(rho=0.05, tail_threshold=10, sam_every=2))
    assert module.training_step_calls == 3 + 1 + 3 + 1
    x, y, params = problem()
    weight, bias = nn.Parameter(params[0].clone()), nn.Parameter(params[1].clone())
    wrapper = ImbSAMOptimizer(
        torch.optim.SGD([weight, bias], lr=0.1, momentum=0.9, weight_decay=1e-3), tail_classes=[2, 3], sam_every=2
    )
    for _ in range(4):
        wrapper.step(lambda: (F.cross_entropy(x @ weight + bias, y, reduction="none"), y))
    assert_params(module, [weight.detach(), bias.detach()])


@pytest.mark.parametrize("gamma, stages", [(0.0, (2, 2, 2)), (0.5, (1, 1, 2)), (1.0, (1, 1, 1))])
def test_ssesam_callback_three_steps_both_stages(gamma, stages):
    module = LinearModule(batches=1)
    callback = SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=10, gamma=gamma)
    fit(module, callback, max_epochs=3)  # stage 2 from epoch ceil(gamma * 3)
    assert_params(module, reference_run("ssesam", 3, stages=stages, rho_head=0.05, rho_tail=0.1))
    assert callback.stage == stages[-1]


def test_optimizer_stages_sgd_then_sam():
    module = LinearModule(protocol=False, batches=1)
    callback = OptimizerStages({0: None, 2: functools.partial(SAMOptimizer, rho=0.05)})
    trainer = fit(module, callback, max_epochs=3)
    x, y, _ = problem()
    expected_sgd = reference_run("sgd", 2)
    # two SGD steps, then one SAM step from there with the same momentum buffer
    from tests.optim.sam_reference import ReferenceSGD, gradient, sam_gradient

    params, sgd = problem()[2], ReferenceSGD(0.1, 0.9, 1e-3)
    for _ in range(2):
        params = sgd.step(params, gradient(params, x, y, None))
    torch.testing.assert_close(params[0], expected_sgd[0])
    params = sgd.step(params, sam_gradient(params, x, y, None, 0.05))
    assert_params(module, params)
    assert type(trainer.optimizers[0]).__name__ == "SGD"  # the base optimizer is handed back after fit


def test_rho_schedule_is_applied_per_epoch():
    module = LinearModule(protocol=False, batches=1)
    callback = SAM(rho_schedule=StepRho(values=[0.05, 0.2], milestones=[1]))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(callback.optimizer.rho)

    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, Spy()])
    trainer.fit(module)
    assert seen == [0.05, 0.2, 0.2]


def test_extra_passes_do_not_log_or_update_metrics():
    module = LinearModule()
    trainer = fit(module, ImbSAM(rho=0.05, tail_threshold=10))
    first_pass = torch.tensor(module.first_pass_losses)
    # the epoch value is the mean of the first-pass (unperturbed, whole-batch) losses only
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(first_pass.mean().item(), abs=1e-6)
    assert module.mean_loss._update_count == 3
    assert module.mean_loss.compute().item() == pytest.approx(first_pass.mean().item(), abs=1e-6)


def test_batchnorm_statistics_equal_one_forward():
    module = LinearModule(protocol=False, batches=1, batchnorm=True)
    reference = nn.BatchNorm1d(module.x.shape[1])
    reference(module.x)
    fit(module, SAM(rho=0.5))
    torch.testing.assert_close(module.bn.running_mean, reference.running_mean)
    torch.testing.assert_close(module.bn.running_var, reference.running_var)
    assert module.bn.num_batches_tracked.item() == 1


def test_bf16_mixed_runs():
    module = LinearModule()
    fit(module, SSESAM(tail_threshold=10, gamma=0.5), max_epochs=2, precision="bf16-mixed")
    assert torch.isfinite(module.weight).all()


def _fp16_with_scaler():
    # precision="16-mixed" on a GPU: a GradScaler steps without a closure (on CPU Lightning uses bf16)
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [
        (_fp16_with_scaler(), "bf16-mixed"),
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ],
)
def test_unsupported_trainer_settings_fail_at_setup(trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(LinearModule(protocol=False), SAM(), **trainer_kwargs)


def test_manual_optimization_is_refused():
    module = LinearModule(protocol=False)
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization"):
        fit(module, SAM())


def test_module_without_the_protocol_gets_a_hint():
    with pytest.raises(ValueError, match="per_sample_loss"):
        fit(LinearModule(protocol=False), ImbSAM(tail_threshold=10))


class WeightedLossModule(LinearModule):
    """A user's training_step that class-weights ``loss`` but returns the unweighted per-sample losses."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        weight = torch.tensor([1.0, 1.0, 5.0, 5.0])
        return {
            "loss": F.cross_entropy(logits, y, weight=weight),
            "per_sample_loss": F.cross_entropy(logits, y, reduction="none"),
            "target": y,
        }


@pytest.mark.parametrize("make", [lambda: ImbSAM(tail_threshold=10), lambda: SSESAM(tail_threshold=10, gamma=0.5)])
def test_loss_that_is_not_the_per_sample_mean_is_refused_at_the_first_step(make):
    module = WeightedLossModule()
    before = module.weight.detach().clone()
    with pytest.raises(ValueError, match=r"(?s)`loss` \(.*\) that is not the mean of its `per_sample_loss`.*"
                                         r"Fix: return per-sample losses whose mean is `loss`"):
        fit(module, make())
    assert torch.equal(module.weight.detach(), before)  # refused before the first update


def test_loss_weighted_from_a_later_epoch_is_refused_in_that_epoch():
    """As a DRW switch would do it: unweighted in epoch 0 (accepted), weighted from epoch 1 (refused)."""

    class LaterWeights(WeightedLossModule):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 0:
                return LinearModule.training_step(self, batch, batch_idx)
            return super().training_step(batch, batch_idx)

    module = LaterWeights(batches=2)
    with pytest.raises(ValueError, match="not the mean of its `per_sample_loss`"):
        fit(module, ImbSAM(tail_threshold=10), max_epochs=2)
    assert module.trainer.current_epoch == 1 and module.trainer.global_step == 2


def test_loss_equal_to_the_per_sample_mean_up_to_rounding_is_accepted():
    class SeparateLoss(LinearModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)  # the mean computed by the loss itself: equal up to rounding
            return {"loss": F.cross_entropy(logits, y), "per_sample_loss": F.cross_entropy(logits, y, reduction="none"),
                    "target": y}

    module = SeparateLoss()
    fit(module, ImbSAM(rho=0.05, tail_threshold=10))
    assert_params(module, reference_run("imbsam", 3, rho=0.05))


def test_module_without_class_counts_gets_a_hint():
    module = LinearModule()
    module.class_counts = None
    with pytest.raises(ValueError, match="class_counts"):
        fit(module, ImbSAM(tail_threshold=10))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SAM(rho=-0.1), "rho"),
        (lambda: SAM(sam_every=0), "sam_every"),
        (lambda: ImbSAM(tail_threshold=0), "tail_threshold"),
        (lambda: SSESAM(gamma=-1), "gamma"),
        (lambda: ImbSAM(tail_weight=0.0), "tail_weight"),
        (lambda: SSESAM(tail_weight=-1.0), "tail_weight"),
        (lambda: OptimizerStages({}), "stages"),
        (lambda: OptimizerStages({-1: None}), "epochs >= 0"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_learning_rate_monitor_logs_the_base_optimizer_once(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class Scheduled(LinearModule):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}

    logger = CSVLogger(str(tmp_path))
    trainer = L.Trainer(max_epochs=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[SAM(rho=0.05), LearningRateMonitor("epoch")])
    trainer.fit(Scheduled(protocol=False))
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("lr-")] == ["lr-SGD"]


@pytest.mark.parametrize("make", [
    lambda: SAM(rho=0.5),
    lambda: ImbSAM(rho=0.5, tail_threshold=10),
    lambda: ImbSAM(rho=0.5, tail_threshold=10, sam_every=2),  # plain steps too: the module's loss, unweighted
    lambda: SSESAM(rho_head=0.5, rho_tail=0.5, tail_threshold=10),
])
def test_on_train_batch_end_gets_the_first_pass_outputs(make):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["loss"].item())

    module = LinearModule()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[make(), Spy()])
    trainer.fit(module)
    assert seen == pytest.approx(module.first_pass_losses, abs=1e-6)
