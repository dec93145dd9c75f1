"""Mixup / CutMix: batches against hand computations, the mixed loss in LongTailClassifier, resume, errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lt.callbacks import CutMix, Mixup
from lightning_lt.callbacks import mixup as mixup_module
from lightning_lt.datamodules import DigitsLT
from lightning_lt.losses import MixedTarget
from lightning_lt.tasks import LongTailClassifier
from tests.helpers import QUIET_FITS, digits_classifier

pytestmark = pytest.mark.filterwarnings(
    *QUIET_FITS,
    "ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning",
    "ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference",
)


def classifier() -> LongTailClassifier:
    return digits_classifier(lr=0.1)


class Recording(Mixup):
    """Mixup that records the draws ``(lam, perm)`` of every mixed batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.draws: list[tuple[float, list[int]]] = []

    def mix(self, x, perm, lam):
        self.draws.append((lam, perm.tolist()))
        return super().mix(x, perm, lam)


def test_doctests():
    assert doctest.testmod(mixup_module, raise_on_error=True).attempted > 0


def test_mixup_batch_by_hand():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    mixed, target = Mixup(lam=0.25, seed=0)(x, torch.tensor([0, 1, 2]))
    perm = target.y_b.tolist()  # y = arange, so y[perm] = perm
    assert sorted(perm) == [0, 1, 2] and target.y_a.tolist() == [0, 1, 2] and target.lam == 0.25
    expected = [[0.25 * x[i, j].item() + 0.75 * x[perm[i], j].item() for j in range(2)] for i in range(3)]
    torch.testing.assert_close(mixed, torch.tensor(expected))


def test_mixup_draws_lambda_from_beta_and_the_permutation_with_its_generator():
    rng = np.random.default_rng(5)  # the draw order: prob check, lambda, permutation
    rng.random()
    lam, perm = rng.beta(0.4, 0.4), rng.permutation(6)
    x = torch.randn(6, 3)
    mixed, target = Mixup(alpha=0.4, seed=5)(x, torch.arange(6))
    assert target.lam == pytest.approx(lam) and target.y_b.tolist() == perm.tolist()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[torch.from_numpy(perm)])


def test_cutmix_batch_by_hand():
    rng = np.random.default_rng(3)
    rng.random()
    perm = rng.permutation(2)
    cx, cy = int(rng.integers(8)), int(rng.integers(6))
    x = torch.stack([torch.zeros(3, 8, 6), torch.ones(3, 8, 6)])
    mixed, target = CutMix(lam=0.5, seed=3)(x, torch.arange(2))
    # rand_bbox: W = size[2] = 8, H = size[3] = 6, cut = int(side * sqrt(0.5)) = 5 and 4, box = centre +- cut // 2
    x1, x2 = max(cx - 2, 0), min(cx + 2, 8)
    y1, y2 = max(cy - 2, 0), min(cy + 2, 6)
    expected = x.clone()
    for i in range(2):
        expected[i, :, x1:x2, y1:y2] = x[perm[i], :, x1:x2, y1:y2]
    assert target.y_b.tolist() == perm.tolist()
    assert torch.equal(mixed, expected)
    assert target.lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / 48)


def test_prob_mixes_that_fraction_of_batches():
    mixup = Mixup(prob=0.3, seed=0)
    mixed = [isinstance(mixup(torch.zeros(4, 2), torch.arange(4))[1], MixedTarget) for _ in range(2000)]
    assert sum(mixed) / len(mixed) == pytest.approx(0.3, abs=0.04)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (Mixup, dict(alpha=0.0), r"`alpha` of Mixup to be a finite number > 0 .* got 0.0.*HINT"),
        (CutMix, dict(alpha=-1.0), r"`alpha` of CutMix .* got -1.0"),
        (Mixup, dict(prob=0.0), r"`prob` of Mixup to be in \(0, 1\]"),
        (Mixup, dict(lam=1.5), r"`lam` of Mixup .* \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_mixing_twice_and_cutmix_on_vectors_are_refused():
    x, target = Mixup(seed=0)(torch.randn(4, 3, 4, 4), torch.arange(4))
    with pytest.raises(ValueError, match="already mixed.*HINT: use one mixing transform"):
        CutMix(seed=0)(x, target)
    with pytest.raises(ValueError, match=r"CutMix cuts boxes from images \[B, C, H, W\]"):
        CutMix(seed=0)(torch.randn(4, 3), torch.arange(4))


def test_training_step_scores_both_labels_with_class_weights():
    model = classifier()
    model.loss.set_class_weights(torch.linspace(0.5, 2.0, 10))
    model.batch_transforms.append(Mixup(lam=0.3, seed=0))
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    batch = [x, y]
    loss = model.training_step(batch, 0)
    _, target = Mixup(lam=0.3, seed=0)(x, y)
    logits = model(0.3 * x + 0.7 * x[target.y_b])
    w = model.loss.weight
    expected = 0.3 * F.cross_entropy(logits, y, weight=w) + 0.7 * F.cross_entropy(logits, target.y_b, weight=w)
    torch.testing.assert_close(loss, expected)
    # the SAM-family callbacks call training_step again on the same batch: the same mix
    torch.testing.assert_close(model.training_step(batch, 0), loss)
    assert not torch.allclose(model.training_step([x, y], 0), loss)  # a new batch draws again


def run(tmp_path, mixup, max_epochs, ckpt_path=None, **kwargs):
    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
        callbacks=[mixup, *kwargs.pop("callbacks", [])], **kwargs,
    )  # fmt: skip
    model = classifier()
    trainer.fit(model, datamodule=DigitsLT(batch_size=16), ckpt_path=ckpt_path)
    return model


def test_callback_registers_for_the_fit_only(tmp_path):
    mixup = Recording(seed=1)
    model = run(tmp_path, mixup, max_epochs=1, enable_checkpointing=False)
    assert len(mixup.draws) == 4 and model.batch_transforms == []


def test_resume_repeats_the_draws_of_the_uninterrupted_run(tmp_path):
    straight = Recording(seed=1)
    run(tmp_path / "straight", straight, max_epochs=3, enable_checkpointing=False)
    assert len(straight.draws) == 12 and straight.draws[:4] != straight.draws[4:8]
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    run(tmp_path / "first", Recording(seed=1), max_epochs=2, callbacks=[every_step])
    for step in (4, 6):  # an epoch boundary, then the middle of the second epoch
        resumed = Recording(seed=1)
        run(tmp_path / f"resumed{step}", resumed, max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"),
            enable_checkpointing=False)  # fmt: skip
        assert resumed.draws[-4:] == straight.draws[-4:]  # the third epoch
        if step == 6:  # the rest of the second epoch (Lightning restarts its loader, so the images differ)
            assert resumed.draws[:2] == straight.draws[6:8]


def test_setup_refuses_modules_without_batch_transforms_or_with_cached_features():
    class Plain(LightningModule):
        pass

    with pytest.raises(ValueError, match="`batch_transforms` list, which Plain does not have.*HINT"):
        Mixup().setup(None, Plain(), "fit")
    model = classifier()
    model.cache_features = True
    with pytest.raises(ValueError, match="trains on cached features.*HINT: set `cache_features=False`"):
        CutMix().setup(None, model, "fit")
    assert math.isfinite(Mixup().alpha)
