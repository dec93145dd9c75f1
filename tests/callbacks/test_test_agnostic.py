"""Test-time aggregation (SADE) and the test-distribution evaluation: weights, stop rule, same draw, DDP, any model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_lt.callbacks import TestDistributions, TestTimeAggregation
from lightning_lt.losses import CrossEntropyLoss, SADELoss
from lightning_lt.nets import CIFARResNet
from lightning_lt.tasks import LongTailClassifier
from tests.helpers import DDP_STRATEGY
from tests.tasks.expert_toy import TINY_AUGMENT, TinyImagesLT, expert_model, make_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*is empty because:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SADE model trained for 2 epochs on the tiny data (its state dict)."""
    seed_everything(0)
    model = expert_model(SADELoss)
    make_trainer(tmp_path_factory.mktemp("fit"), max_epochs=2, limit_val_batches=0).fit(model, datamodule=TinyImagesLT())
    return model.state_dict()


def sade_model(state) -> torch.nn.Module:
    model = expert_model(SADELoss)
    model.load_state_dict(state)
    return model


def tta(**kwargs) -> TestTimeAggregation:
    return TestTimeAggregation(**{**dict(batch_size=8, augment=TINY_AUGMENT), **kwargs})


def test_weights_sum_to_one_and_are_reproducible(trained):
    dm = TinyImagesLT()
    dm.setup("test")
    model = sade_model(trained)
    first = tta(epochs=3, lr=0.5).adapt(model, dm.test_dataset)
    again = tta(epochs=3, lr=0.5).adapt(model, dm.test_dataset)
    other = tta(epochs=3, lr=0.5, seed=1).adapt(model, dm.test_dataset)
    assert first.weights.sum().item() == pytest.approx(1.0, abs=1e-6) and (first.weights > 0).all()
    assert all(sum(w) == pytest.approx(1.0, abs=1e-6) for w in first.history)
    assert torch.equal(first.weights, again.weights) and not torch.equal(first.weights, other.weights)
    assert not torch.allclose(first.weights, torch.full((3,), 1 / 3))  # it learned something
    assert model.equal_weights  # adapt() does not set the weights


def test_stop_rule_ends_after_the_epoch_a_weight_falls_below_005(trained):
    dm = TinyImagesLT()
    dm.setup("test")
    model = sade_model(trained)
    fast = tta(epochs=5, lr=500.0).adapt(model, dm.test_dataset)  # the weights saturate in the first epoch
    assert len(fast.history) < 5 and fast.stopped_early
    assert (np.round(np.array(fast.history[-1]), 2) < 0.05).any()
    assert all((np.round(np.array(h), 2) >= 0.05).all() for h in fast.history[:-1])
    slow = tta(epochs=3, lr=1e-4).adapt(model, dm.test_dataset)  # the weights barely move: every epoch runs
    assert len(slow.history) == 3 and not slow.stopped_early


def test_aggregation_refuses_a_model_without_experts():
    model = LongTailClassifier(CIFARResNet(depth=8), num_classes=3, class_counts=[24, 12, 6])
    dm = TinyImagesLT()
    dm.setup("test")
    with pytest.raises(ValueError, match="has no experts.*HINT"):
        tta().adapt(model, dm.test_dataset)
    with pytest.raises(ValueError, match="has no experts.*HINT"):
        TestDistributions(ratios=(2,), aggregation=True).on_test_epoch_end(SimpleNamespace(datamodule=dm), model)
    with pytest.raises(ValueError, match="has no experts.*HINT"):
        tta().on_test_start(SimpleNamespace(datamodule=dm), model)


def test_test_distributions_adapt_and_score_the_same_draw(trained, tmp_path):
    model = sade_model(trained)
    callback = TestDistributions(ratios=(4, 1), dirichlet_draws=1, dirichlet_ratio=4, aggregation=tta(epochs=2))
    trainer = make_trainer(tmp_path, callbacks=[callback], logger=CSVLogger(tmp_path))
    metrics = trainer.test(model, datamodule=TinyImagesLT(), verbose=False)[0]
    names = [d.name for d in callback.distributions]
    assert names == ["forward4", "uniform", "backward4", "dirichlet_uniform_0", "dirichlet_forward4_0", "dirichlet_backward4_0"]
    dm = TinyImagesLT()
    dm.setup("test")
    targets = np.asarray(dm.test_dataset.targets)
    for dist in callback.distributions:
        adapted = callback.adapted_indices[dist.name]
        np.testing.assert_array_equal(np.sort(adapted), np.sort(dist.indices))  # adapted on the draw ...
        assert np.bincount(targets[adapted], minlength=3).tolist() == dist.counts
        assert callback.scored_counts[dist.name] == dist.counts  # ... and scored on the same draw
        row = callback.results[dist.name]
        assert sum(row[f"expert{e}/weight"] for e in range(3)) == pytest.approx(1.0, abs=1e-6)
        assert f"test_dist/{dist.name}/acc" in metrics and f"test_dist/{dist.name}/equal_weights/acc" in metrics
    assert callback.distributions[0].counts == [8, 4, 2] and callback.distributions[2].counts == [2, 4, 8]
    accs = [callback.results[n]["acc"] for n in names]
    assert metrics["test_dist/acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6)
    assert metrics["test_dist/acc_std"] == pytest.approx(np.std(accs), abs=1e-6)
    assert model.equal_weights  # restored after the per-distribution adaptation
    assert list((tmp_path / "lightning_logs").rglob("test_dist_accuracy*.png"))


def test_test_distributions_work_for_a_single_model(tmp_path):
    seed_everything(0)
    model = LongTailClassifier(CIFARResNet(depth=8), num_classes=3, class_counts=[24, 12, 6], loss=CrossEntropyLoss,
                               posthoc_tau=1.0, many_threshold=20, few_threshold=8, plot_per_class=False)  # fmt: skip
    callback = TestDistributions(ratios=(4, 2, 1))
    metrics = make_trainer(tmp_path, callbacks=[callback]).test(model, datamodule=TinyImagesLT(), verbose=False)[0]
    assert [d.name for d in callback.distributions] == ["forward4", "forward2", "uniform", "backward2", "backward4"]
    for name in ("forward4", "uniform", "backward4"):
        for key in ("acc", "acc_many", "acc_medium", "acc_few"):
            assert f"test_dist/{name}/{key}" in metrics
    # The uniform distribution is the whole balanced test set: the same accuracy as the test loop's.
    assert metrics["test_dist/uniform/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_tta_callback_sets_the_weights_and_logs_before_and_after(trained, tmp_path):
    model = sade_model(trained)
    metrics = make_trainer(tmp_path, callbacks=[tta(epochs=2)]).test(model, datamodule=TinyImagesLT(), verbose=False)[0]
    assert not model.equal_weights
    assert "test/acc" in metrics and "test/equal_weights/acc" in metrics
    assert sum(metrics[f"test/expert{e}/weight"] for e in range(3)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(model.expert_weights, torch.tensor([metrics[f"test/expert{e}/weight"] for e in range(3)]))


@pytest.mark.ddp
def test_two_process_ddp_equals_one_process(trained, tmp_path):
    results = []
    for devices in (1, 2):
        model = sade_model(trained)
        callbacks = [tta(epochs=2), TestDistributions(ratios=(4, 1), aggregation=tta(epochs=2), plot=False)]
        kwargs = dict(devices=devices, strategy=DDP_STRATEGY) if devices > 1 else {}
        trainer = make_trainer(tmp_path / str(devices), callbacks=callbacks, **kwargs)
        results.append(trainer.test(model, datamodule=TinyImagesLT(eval_batch_size=3), verbose=False)[0])
    single, ddp = results
    assert set(single) == set(ddp) and "test/expert0/weight" in single and "test_dist/backward4/acc" in single
    for key, value in single.items():
        if not np.isnan(value):
            assert ddp[key] == pytest.approx(value, abs=1e-6), key
