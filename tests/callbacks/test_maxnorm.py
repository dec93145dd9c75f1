"""MaxNorm: every class row inside the ball after every projection, per step and per epoch, resume, errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_lt.callbacks import MaxNorm
from lightning_lt.callbacks import maxnorm as maxnorm_module
from lightning_lt.datamodules import DigitsLT
from lightning_lt.tasks import LongTailClassifier
from tests.helpers import QUIET_FITS, digits_classifier

pytestmark = pytest.mark.filterwarnings(*QUIET_FITS)


def classifier() -> LongTailClassifier:
    return digits_classifier(lr=0.5, momentum=0.9)


def trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=4, limit_val_batches=0,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


class RowNorms(Callback):
    """The largest row norm of ``head.weight`` after every training batch and at every epoch end (runs after
    MaxNorm, which comes first in the callback list)."""

    def __init__(self) -> None:
        self.after_batch: list[float] = []
        self.after_epoch: list[float] = []
        self.steps: list[int] = []

    def _max(self, pl_module) -> float:
        return float(pl_module.head.weight.detach().norm(dim=1).max())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_batch.append(self._max(pl_module))
        self.steps.append(trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.after_epoch.append(self._max(pl_module))


def test_doctests():
    assert doctest.testmod(maxnorm_module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("relative, threshold", [(True, 0.1), (False, 0.5)])
def test_every_row_is_inside_the_ball_after_every_step(tmp_path, relative, threshold):
    seed_everything(0)
    model = classifier()
    start_max = float(model.head.weight.detach().norm(dim=1).max())
    maxnorm, norms = MaxNorm(threshold=threshold, relative=relative), RowNorms()
    trainer(tmp_path, [maxnorm, norms], accumulate_grad_batches=2).fit(model, datamodule=DigitsLT(batch_size=32))
    assert maxnorm.radius < start_max  # the constraint binds
    if not relative:
        assert maxnorm.radius == threshold
    stepped = [norm for norm, step, previous in zip(norms.after_batch, norms.steps, [0] + norms.steps) if step != previous]
    assert len(stepped) == 4  # 8 batches, one optimizer step per 2
    assert max(stepped) <= maxnorm.radius * (1 + 1e-6)
    assert float(model.head.weight.detach().norm(dim=1).max()) == pytest.approx(maxnorm.radius, rel=1e-5)


def test_epoch_interval_projects_at_epoch_ends_only(tmp_path):
    seed_everything(0)
    maxnorm, norms = MaxNorm(threshold=0.1, interval="epoch"), RowNorms()
    trainer(tmp_path, [maxnorm, norms]).fit(classifier(), datamodule=DigitsLT(batch_size=32))
    assert max(norms.after_epoch) <= maxnorm.radius * (1 + 1e-6)
    assert max(norms.after_batch) > maxnorm.radius  # not projected between epoch ends


def test_resume_keeps_the_radius_of_the_original_start(tmp_path):
    seed_everything(0)
    straight, maxnorm = classifier(), MaxNorm(threshold=0.1)
    trainer(tmp_path / "a", [maxnorm], max_epochs=4).fit(straight, datamodule=DigitsLT(batch_size=32))

    seed_everything(0)
    first, part = classifier(), MaxNorm(threshold=0.1)
    run = trainer(tmp_path / "b", [part], max_epochs=2)
    run.fit(first, datamodule=DigitsLT(batch_size=32))
    run.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_callback = MaxNorm(threshold=0.1)
    resumed = classifier()
    trainer(tmp_path / "c", [resumed_callback], max_epochs=4).fit(
        resumed, datamodule=DigitsLT(batch_size=32), ckpt_path=str(tmp_path / "mid.ckpt")
    )
    assert resumed_callback.radius == part.radius == maxnorm.radius
    torch.testing.assert_close(resumed.head.weight, straight.head.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=0.0), r"`threshold` of MaxNorm to be a finite number > 0, got 0.0.*HINT"),
        (dict(threshold=-1), r"> 0, got -1"),
        (dict(threshold=float("nan")), r"> 0, got nan"),
        (dict(interval="batch"), r"`interval` .* one of \('step', 'epoch'\), got 'batch'"),
        (dict(param=""), r"`param` of MaxNorm to name a parameter"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaxNorm(**kwargs)


@pytest.mark.parametrize(
    "param, match",
    [("head.bias", r"'head.bias' has shape \(10,\).*HINT.*leaves the bias unconstrained"),
     ("classifier.weight", r"has no parameter 'classifier.weight'.*HINT: set `param`.*head.weight")],
)  # fmt: skip
def test_bad_parameter_at_fit_start(param, match):
    with pytest.raises(ValueError, match=match):
        MaxNorm(param=param).on_fit_start(None, classifier())
