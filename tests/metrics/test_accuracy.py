import json
import math
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.metrics import LongTailAccuracy, PerClassAccuracy, shot_groups
from tests.helpers import DDP_STRATEGY

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
KEYS = ["acc", "balanced_acc", "acc_many", "acc_medium", "acc_few"]


def _reference(counts, y_true, y_pred, many=100, few=20):
    """Independent reference: scikit-learn for overall / balanced / per-class, numpy for the groups."""
    C = len(counts)
    per_class = recall_score(y_true, y_pred, labels=list(range(C)), average=None, zero_division=np.nan)
    seen = np.bincount(y_true, minlength=C) > 0
    counts = np.asarray(counts)
    groups = {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}
    ref = {"acc": accuracy_score(y_true, y_pred), "balanced_acc": balanced_accuracy_score(y_true, y_pred)}
    for name, in_group in groups.items():
        mask = in_group & seen
        ref[f"acc_{name}"] = per_class[mask].mean() if mask.any() else math.nan
    return ref, per_class


def _assert_matches(result, ref):
    assert list(result) == KEYS
    for key in KEYS:
        assert result[key].ndim == 0, key
        if math.isnan(ref[key]):
            assert torch.isnan(result[key]), key
        else:
            assert result[key].item() == pytest.approx(ref[key], abs=1e-6), key


# ---------------------------------------------------------------------------------------------- PerClassAccuracy


def test_per_class_hand_computation():
    metric = PerClassAccuracy(num_classes=4)
    # class 0: 3/4 correct, class 1: 1/1, class 2: 0/2, class 3: no samples
    metric.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
    metric.update(torch.tensor([0, 3]), torch.tensor([2, 2]))
    metric.update(torch.tensor([0]), torch.tensor([0]))
    acc = metric.compute()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc[:3], torch.tensor([3 / 4, 1.0, 0.0]))
    assert torch.isnan(acc[3])
    assert metric.correct.tolist() == [3, 1, 0, 0]
    assert metric.total.tolist() == [4, 1, 2, 0]
    torch.testing.assert_close(metric.per_class(), acc, equal_nan=True)


def test_logits_and_indices_give_the_same_result():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 6, generator=g)
    target = torch.randint(0, 6, (50,), generator=g)
    a, b = PerClassAccuracy(6), PerClassAccuracy(6)
    a.update(logits, target)
    b.update(logits.argmax(1), target.int())
    torch.testing.assert_close(a.compute(), b.compute(), equal_nan=True)


def test_reset_and_empty_batch():
    metric = PerClassAccuracy(3)
    metric.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert metric.total.sum() == 0
    metric.update(torch.tensor([1]), torch.tensor([1]))
    metric.reset()
    assert metric.total.sum() == 0 and metric.correct.sum() == 0


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.zeros(2, 5), torch.tensor([0, 1]), r"logits `preds` of shape \[B, num_classes=4\], got \(2, 5\)"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), r"`target` labels in \[0, 4\), found min 0 and max 4"),
        (torch.zeros(2, 4), torch.tensor([-1, 0]), r"`target` labels in \[0, 4\), found min -1"),
        (torch.zeros(3, 4), torch.tensor([0, 1]), "same batch size, got 3 and 2"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), "integer class indices"),
        (torch.zeros(2, 4), torch.tensor([[0], [1]]), "1-D tensor"),
        (torch.tensor([0.2, 0.8]), torch.tensor([0, 1]), "integer class indices, got dtype torch.float32"),
        (torch.tensor([0, 7]), torch.tensor([0, 1]), r"predicted class indices `preds` in \[0, 4\)"),
        (torch.zeros(2, 4, 1), torch.tensor([0, 1]), "logits"),
        ([0, 1], torch.tensor([0, 1]), "tensors"),
    ],
)
def test_update_validation(preds, target, match):
    metric = PerClassAccuracy(4)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, target)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        PerClassAccuracy(num_classes)


# ---------------------------------------------------------------------------------------------- LongTailAccuracy


def test_long_tail_hand_computation():
    # classes 0, 1 many-shot; 2 medium; 3, 4 few (class 4 absent from the evaluated data)
    metric = LongTailAccuracy([1000, 200, 50, 10, 5])
    preds = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3, 3, 2])
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    metric.update(preds, target)
    # per-class: c0 2/3, c1 2/2, c2 1/2, c3 2/3, c4 absent
    per_class = [2 / 3, 1.0, 0.5, 2 / 3]
    expected = {
        "acc": 7 / 10,
        "balanced_acc": sum(per_class) / 4,
        "acc_many": (2 / 3 + 1.0) / 2,
        "acc_medium": 0.5,
        "acc_few": 2 / 3,  # mean over the few-shot classes that occur (class 4 does not)
    }
    _assert_matches(metric.compute(), expected)
    pc = metric.per_class()
    torch.testing.assert_close(pc[:4], torch.tensor(per_class))
    assert torch.isnan(pc[4])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # intended: class C-1 is never a target
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    C = 12
    counts = sorted(rng.integers(1, 400, size=C).tolist(), reverse=True)
    counts[:2], counts[5], counts[-2:] = [900, 500], 50, [7, 3]  # every group is non-empty
    target = rng.integers(0, C - 1, size=300)  # class C-1 never occurs in the evaluated data
    logits = torch.from_numpy(rng.normal(size=(300, C))).float()
    logits[torch.arange(300), torch.from_numpy(target)] += 1.0  # better than chance
    metric = LongTailAccuracy(counts)
    for chunk in np.array_split(np.arange(300), 7):  # several updates of unequal size
        metric.update(logits[chunk], torch.from_numpy(target[chunk]))
    y_pred = logits.argmax(1).numpy()
    ref, ref_per_class = _reference(counts, target, y_pred)
    _assert_matches(metric.compute(), ref)
    np.testing.assert_allclose(metric.per_class().numpy(), ref_per_class, rtol=1e-6)
    # balanced accuracy equals the mean of sklearn's per-class recall over the classes that occur
    assert metric.compute()["balanced_acc"].item() == pytest.approx(np.nanmean(ref_per_class), abs=1e-6)


def test_custom_thresholds_match_reference():
    rng = np.random.default_rng(5)
    counts = [60, 40, 30, 12, 8, 2]
    target = rng.integers(0, 6, size=200)
    y_pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, 6, size=200))
    metric = LongTailAccuracy(counts, many_threshold=35, few_threshold=10)
    metric.update(torch.from_numpy(y_pred), torch.from_numpy(target))
    ref, _ = _reference(counts, target, y_pred, many=35, few=10)
    _assert_matches(metric.compute(), ref)


def test_empty_few_group_is_nan_with_warning():
    """CIFAR-10-LT with IF=100 has no few-shot class: acc_few must be nan (never 0) and a warning names it."""
    metric = LongTailAccuracy(CIFAR10_LT_IF100)
    target = torch.arange(10).repeat(3)
    metric.update(target, target)
    with pytest.warns(UserWarning, match=r"'few' group.*n_c < 20.*many_threshold=100 and few_threshold=20") as rec:
        result = metric.compute()
    assert len(rec) == 1
    assert "training counts have no such class" in str(rec[0].message)
    assert torch.isnan(result["acc_few"])
    assert result["acc"] == 1.0 and result["acc_many"] == 1.0 and result["acc_medium"] == 1.0


def test_group_absent_from_eval_data_is_nan_with_warning():
    metric = LongTailAccuracy([500, 50, 5])
    metric.update(torch.tensor([0, 2]), torch.tensor([0, 2]))  # no medium-shot class evaluated
    with pytest.warns(UserWarning, match=r"'medium' group.*20 <= n_c <= 100.*none of its classes occurs"):
        result = metric.compute()
    assert torch.isnan(result["acc_medium"])
    assert result["acc_few"] == 1.0


def test_no_warning_when_all_groups_present():
    metric = LongTailAccuracy([500, 50, 5])
    metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metric.compute()
    assert result["acc_few"] == 0.0  # a real 0 (class seen, never right) stays 0


def test_forward_returns_batch_value_and_accumulates():
    metric = LongTailAccuracy([500, 50, 5])
    batch = metric(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert batch["acc"].item() == pytest.approx(2 / 3)
    batch = metric(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]))
    assert batch["acc"].item() == pytest.approx(2 / 3) and batch["acc_few"].item() == 1.0
    result = metric.compute()
    assert result["acc"].item() == pytest.approx(4 / 6)
    assert result["acc_medium"].item() == pytest.approx(1 / 2)


def test_groups_buffer_moves_and_is_not_persistent():
    metric = LongTailAccuracy([500, 50, 5])
    assert "groups" not in metric.state_dict()
    torch.testing.assert_close(metric.groups, shot_groups([500, 50, 5]))
    metric = metric.to(torch.float64)  # dtype cast: states stay integer counts
    metric.update(torch.eye(3, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert metric.correct.dtype == torch.long
    assert metric.compute()["acc"].item() == 1.0


@pytest.mark.parametrize(
    ("counts", "match"), [([], "non-empty"), ([10, -1], "non-negative"), ([1.5], "integers"), (None, "sequence")]
)
def test_invalid_class_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        LongTailAccuracy(counts)


def test_logits_with_wrong_class_dim():
    metric = LongTailAccuracy(CIFAR10_LT_IF100)
    with pytest.raises(ValueError, match=r"num_classes=10\], got \(4, 100\)"):
        metric.update(torch.zeros(4, 100), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- DDP

DDP_COUNTS = [300, 150, 90, 40, 20, 10, 5]  # 2 many, 3 medium, 2 few
DDP_N = 64
RANK0_SHARD = 40  # rank 0 evaluates samples [0, 40), rank 1 the remaining 24: uneven, rank-dependent shards


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, len(DDP_COUNTS), (DDP_N,), generator=g)
    logits = torch.randn(DDP_N, len(DDP_COUNTS), generator=g)
    logits[torch.arange(DDP_N), target] += 0.8
    return logits, target


class _ShardedEval(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.dummy = nn.Linear(1, 1)  # DDP needs a parameter
        self.metric = LongTailAccuracy(DDP_COUNTS)
        self.seen: list[int] = []

    def val_dataloader(self):
        idx = torch.arange(DDP_N)
        shard = idx[:RANK0_SHARD] if self.global_rank == 0 else idx[RANK0_SHARD:]
        return DataLoader(TensorDataset(shard), batch_size=8)

    def validation_step(self, batch, batch_idx):
        (idx,) = batch
        logits, target = _ddp_data()
        self.seen += idx.tolist()
        self.metric.update(logits[idx], target[idx])

    def on_validation_epoch_end(self):
        local_total = int(self.metric.total.sum())
        result = {k: v.item() for k, v in self.metric.compute().items()}
        record = {
            "world_size": self.trainer.world_size,
            "seen": self.seen,
            "local_total": local_total,
            "result": result,
            "per_class": self.metric.per_class().tolist(),
        }
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_ddp_sync_equals_single_process(tmp_path):
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDP_STRATEGY,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_ShardedEval(str(tmp_path)))

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    # the shards are disjoint, rank-dependent and cover the data
    assert records[0]["seen"] == list(range(RANK0_SHARD))
    assert records[1]["seen"] == list(range(RANK0_SHARD, DDP_N))
    assert [r["local_total"] for r in records] == [RANK0_SHARD, DDP_N - RANK0_SHARD]

    logits, target = _ddp_data()
    single = LongTailAccuracy(DDP_COUNTS)
    single.update(logits, target)
    expected = {k: v.item() for k, v in single.compute().items()}
    ref, ref_per_class = _reference(DDP_COUNTS, target.numpy(), logits.argmax(1).numpy())
    for record in records:  # every rank sees the synced (global) value
        assert record["result"] == pytest.approx(expected, abs=1e-7)
        assert record["result"] == pytest.approx(ref, abs=1e-6)
        np.testing.assert_allclose(record["per_class"], ref_per_class, rtol=1e-6)
    # the local shards alone give different numbers, so the equality above comes from syncing
    shard0 = LongTailAccuracy(DDP_COUNTS)
    shard0.update(logits[:RANK0_SHARD], target[:RANK0_SHARD])
    assert shard0.compute()["acc"].item() != pytest.approx(expected["acc"])


def test_update_never_writes_into_existing_state_tensors():
    """Under CPU ``ddp_spawn`` the initial states are in memory shared by all ranks: never write into them."""
    metric = LongTailAccuracy([500, 50, 5])
    initial_total, initial_correct = metric.total, metric.correct
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert initial_total.sum() == 0 and initial_correct.sum() == 0
    assert metric.total.sum() == 3


def test_compute_without_data_is_all_nan():
    metric = LongTailAccuracy([500, 50, 5])
    with pytest.warns(UserWarning):  # torchmetrics' "compute before update" and one per empty group
        result = metric.compute()
    assert all(torch.isnan(v) for v in result.values())
