"""Stage callbacks (SAM family, OptimizerStages, DRW + SAM) resumed from a checkpoint = an uninterrupted run.

For every callback: an uninterrupted fit of ``MAX_EPOCHS`` epochs, and the same fit stopped (``should_stop``)
after epoch ``stop_after`` with a checkpoint every epoch, then resumed by a new Trainer with new callback
instances from that checkpoint. The stage switches at epoch ``SWITCH``; ``stop_after = SWITCH - 1`` resumes
from a checkpoint saved before the switch (the resumed run switches in its first epoch), ``SWITCH + 1`` from
one saved after it (the resumed run must start in the saved stage). The final weights must be bitwise equal,
the stages equal, and every step of the resumed run (its first one included) must see the same optimizer
wrapper radii, SAM-or-plain step (``sam_every``), learning rate and loss weights as the uninterrupted run
did in that step, and the stage saved in the checkpoint must already be in effect at fit start.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.callbacks import SAM, SSESAM, DeferredReweighting, ImbSAM, OptimizerStages
from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.optim import SAM as SAMOptimizer
from lightning_lt.optim import GroupSAM, StepRho
from tests.optim.sam_reference import problem

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
)

CLASS_COUNTS = [50, 50, 5, 5]  # classes 2 and 3 are the tail with tail_threshold=10
MAX_EPOCHS, SWITCH, STEPS_PER_EPOCH = 4, 1, 2


class ResumeModule(L.LightningModule):
    """Linear classifier, 2 fixed batches per epoch (no shuffling), SGD + a MultiStepLR at epoch 3."""

    def __init__(self, protocol: bool):
        super().__init__()
        x, y, params = problem()
        g = torch.Generator().manual_seed(2)
        self.x = torch.cat([x, torch.randn(x.shape, generator=g)])
        self.y = torch.cat([y, y.flip(0)])
        self.weight = nn.Parameter(params[0].clone())
        self.bias = nn.Parameter(params[1].clone())
        self.class_counts = CLASS_COUNTS
        self.loss = CrossEntropyLoss(CLASS_COUNTS)  # DeferredReweighting sets its class weights
        self.protocol = protocol

    def forward(self, x):
        return x @ self.weight + self.bias

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.protocol:  # ImbSAM / SSE-SAM
            per_sample = F.cross_entropy(logits, y, reduction="none")
            return {"loss": per_sample.mean(), "per_sample_loss": per_sample, "target": y}
        return self.loss(logits, y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3], gamma=0.1)]

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.y) // STEPS_PER_EPOCH, shuffle=False)


class Recorder(L.Callback):
    """Records what the trainer trains with: at fit start (after the stage callbacks) and every batch start."""

    def __init__(self) -> None:
        self.fit_start: tuple = ()
        self.steps: list[tuple] = []

    @staticmethod
    def rhos(trainer) -> object:
        optimizer = trainer.optimizers[0]
        return tuple(optimizer.rhos) if isinstance(optimizer, GroupSAM) else type(optimizer).__name__

    @staticmethod
    def loss_weight(pl_module) -> object:
        return None if pl_module.loss.weight is None else tuple(pl_module.loss.weight.tolist())

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = (self.rhos(trainer), self.loss_weight(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        sam_step = isinstance(optimizer, GroupSAM) and optimizer.is_sam_step()
        lr = optimizer.param_groups[0]["lr"]
        self.steps.append((trainer.current_epoch, self.rhos(trainer), sam_step, lr, self.loss_weight(pl_module)))


class StopAfter(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


# name -> (callbacks factory, per-sample protocol, the wrapper's rhos in the stage before / after SWITCH)
CASES = {
    "sam_step_rho": (
        lambda: [SAM(rho_schedule=StepRho(values=[0.05, 0.2], milestones=[SWITCH]))],
        False,
        ((0.05,), (0.2,)),
    ),
    "imbsam": (lambda: [ImbSAM(rho=0.1, tail_threshold=10)], True, ((0.0, 0.1), (0.0, 0.1))),
    "ssesam": (  # stage 2 from epoch ceil(0.25 * 4) = 1
        lambda: [SSESAM(rho_head=0.05, rho_tail=0.1, tail_threshold=10, gamma=SWITCH / MAX_EPOCHS)],
        True,
        ((0.05, 0.1), (0.0, 0.1)),
    ),
    "optimizer_stages_sgd_then_sam": (
        lambda: [OptimizerStages({0: None, SWITCH: functools.partial(SAMOptimizer, rho=0.1)})],
        False,
        ("SGD", (0.1,)),
    ),
    # a SAM step every 3rd step, 2 steps an epoch: which steps are SAM steps must survive the resume
    "sam_every_3": (lambda: [SAM(rho=0.1, sam_every=3)], False, ((0.1,), (0.1,))),
    "optimizer_stages_sgd_then_sam_every_3": (
        lambda: [OptimizerStages({0: None, SWITCH: functools.partial(SAMOptimizer, rho=0.1, sam_every=3)})],
        False,
        ("SGD", (0.1,)),
    ),
    "drw_with_sam": (
        lambda: [DeferredReweighting(start_epoch=SWITCH, beta=0.9), SAM(rho=0.1)],
        False,
        ((0.1,), (0.1,)),
    ),
}


def run(root: Path, make_callbacks, protocol: bool, extra=(), ckpt_path=None):
    module = ResumeModule(protocol)
    callbacks, recorder = make_callbacks(), Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=MAX_EPOCHS, callbacks=[*callbacks, recorder, *extra],
        logger=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
    )
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    # after fit the trainer holds the base optimizer again (the one the LR scheduler drives)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert "training_step" not in vars(module)  # the group-loss patch is undone
    return module, callbacks, recorder, trainer


@pytest.mark.parametrize("stop_after", [SWITCH - 1, SWITCH + 1], ids=["before_switch", "after_switch"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted_run(tmp_path, case, stop_after):
    make_callbacks, protocol, (rhos_before, rhos_after) = CASES[case]
    full, full_callbacks, full_recorder, _ = run(tmp_path / "full", make_callbacks, protocol)
    assert [step[1] for step in full_recorder.steps] == (
        [rhos_before] * STEPS_PER_EPOCH * SWITCH + [rhos_after] * STEPS_PER_EPOCH * (MAX_EPOCHS - SWITCH)
    )

    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    _, stopped_callbacks, stopped_recorder, stopped = run(
        tmp_path / "stopped", make_callbacks, protocol, extra=[checkpoint, StopAfter(stop_after)]
    )
    assert stopped.current_epoch == stop_after + 1  # really interrupted
    assert len(stopped_recorder.steps) == STEPS_PER_EPOCH * (stop_after + 1)
    ckpt_path = ckpt_dir / f"epoch={stop_after}.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)
    # the checkpoint holds the base optimizer's state: SGD momentum buffers of both parameters
    (optimizer_state,) = saved["optimizer_states"]
    assert sorted(optimizer_state["state"]) == [0, 1]
    assert all("momentum_buffer" in s for s in optimizer_state["state"].values())
    assert optimizer_state["param_groups"][0]["momentum"] == 0.9
    for callback in stopped_callbacks:
        assert saved["callbacks"][callback.state_key]["stage"] == callback.stage

    resumed, resumed_callbacks, resumed_recorder, _ = run(
        tmp_path / "resumed", make_callbacks, protocol, ckpt_path=ckpt_path
    )
    # every step of the resumed run, the first one included, trains as the uninterrupted run did
    first = STEPS_PER_EPOCH * (stop_after + 1)
    assert resumed_recorder.steps == full_recorder.steps[first:]
    assert resumed_recorder.steps[0][1] == (rhos_before if stop_after + 1 < SWITCH else rhos_after)
    # the saved stage is already in effect at fit start (before Lightning restores current_epoch)
    _, last_rhos, _, _, last_loss_weight = full_recorder.steps[first - 1]  # the checkpoint's last step
    assert resumed_recorder.fit_start == (last_rhos, last_loss_weight)
    assert last_rhos == (rhos_after if stop_after >= SWITCH else rhos_before)
    for resumed_callback, full_callback in zip(resumed_callbacks, full_callbacks):
        assert resumed_callback.stage == full_callback.stage
    # the same arithmetic in the same order: bitwise equal weights
    assert torch.equal(resumed.weight, full.weight)
    assert torch.equal(resumed.bias, full.bias)
    # (and training moved the weights at all, so the equality is not trivial)
    assert not torch.equal(resumed.weight, ResumeModule(protocol).weight)
