import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from sklearn.metrics import average_precision_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multilabel_average_precision

import lightning_lt.metrics.multilabel as multilabel_module
from lightning_lt.metrics import MultilabelAP, label_tail_groups
from tests.helpers import DDP_STRATEGY

SCALARS = ("map", "map_head", "map_tail")


def _random_batch(seed, n=120, C=6, ties=False, no_positive=(), scale=1.0):
    """Logits ``[n, C]`` that favour the positives a little, and multi-hot targets with rarer high labels."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.5, 0.05, C)
    target = (torch.rand(n, C, generator=g) < rates).long()
    target[:, list(no_positive)] = 0
    logits = torch.randn(n, C, generator=g) + 1.2 * target
    if ties:
        logits = torch.round(logits * 10) / 10  # one decimal: many ties, also between positives and negatives
    return logits * scale, target


def _sklearn_ap(preds, target):
    """Per-label AP from scikit-learn, nan for labels without a positive."""
    preds, target = np.asarray(preds, dtype=np.float64), np.asarray(target)
    return np.array(
        [
            average_precision_score(target[:, c], preds[:, c]) if target[:, c].any() else np.nan
            for c in range(target.shape[1])
        ]
    )


def _check(result, ap, tail=None):
    np.testing.assert_allclose(result["ap"].numpy(), ap, rtol=1e-6, atol=1e-7)
    assert result["ap"].dtype == torch.float32 and all(result[k].ndim == 0 for k in SCALARS)
    assert result["map"].item() == pytest.approx(np.nanmean(ap), abs=1e-6)
    if tail is not None:
        head = [c for c in range(len(ap)) if c not in tail]
        assert result["map_head"].item() == pytest.approx(np.nanmean(ap[head]), abs=1e-6)
        assert result["map_tail"].item() == pytest.approx(np.nanmean(ap[tail]), abs=1e-6)


# ---------------------------------------------------------------------------------------------- values


def test_hand_computation_with_a_label_without_positives():
    preds = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.6, 0.8, 0.5, 0.7], [0.4, 0.3, 0.5, 0.1], [0.2, 0.9, 0.1, 0.3]])
    target = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    metric = MultilabelAP(4, tail_labels=[2, 3])
    metric.update(preds, target)
    result = metric.compute()
    # label 0: ranking 1 0 1 0 -> (1/2) 1 + (1/2)(2/3) = 5/6
    # label 1: ranking 0 (0.9), 1 (0.8) -> precision 1/2 at recall 1 -> 1/2
    # label 2: three tied at 0.5 (two positives) form one threshold: precision 2/3 at recall 1 -> 2/3
    # label 3: no positive -> nan, left out of map and map_tail
    ap = np.array([5 / 6, 1 / 2, 2 / 3, math.nan])
    _check(result, ap, tail=[2, 3])
    assert result["map"].item() == pytest.approx((5 / 6 + 1 / 2 + 2 / 3) / 3)
    assert result["map_head"].item() == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert result["map_tail"].item() == pytest.approx(2 / 3)
    np.testing.assert_allclose(_sklearn_ap(preds, target)[:3], ap[:3])


@pytest.mark.filterwarnings("ignore:.*tail_labels` is None")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn_per_label(seed, ties):
    logits, target = _random_batch(seed, ties=ties, no_positive=(4,))
    if ties:
        assert len(torch.unique(logits[:, 0])) < logits.shape[0] // 2
    metric = MultilabelAP(6)
    metric.update(logits, target)
    result = metric.compute()
    ap = _sklearn_ap(logits, target)
    assert np.isnan(ap[4]) and torch.isnan(result["ap"][4])
    _check(result, ap)
    assert list(result) == ["ap", *SCALARS]


def test_logits_and_probabilities_give_the_same_ap():
    logits, target = _random_batch(3, scale=8.0)  # logits up to ~30: sigmoid ties some of them in float32
    a, b = MultilabelAP(6, tail_labels=[5]), MultilabelAP(6, tail_labels=[5])
    a.update(logits.double(), target)
    b.update(logits.double().sigmoid(), target)
    for key, value in a.compute().items():
        torch.testing.assert_close(value, b.compute()[key], equal_nan=True)
    _check(a.compute(), _sklearn_ap(logits.double(), target), tail=[5])


def test_large_logits_keep_their_order():
    """torchmetrics applies a sigmoid to scores outside [0, 1], which ties every logit above ~17 in float32."""
    logits, target = _random_batch(4, C=3)
    logits = logits * 5 + 60
    naive = multilabel_average_precision(logits, target, num_labels=3, average=None, thresholds=None)
    assert not np.allclose(naive.numpy(), _sklearn_ap(logits, target), atol=1e-3)  # the sigmoid's ties
    metric = MultilabelAP(3, tail_labels=[2])
    metric.update(logits, target)
    _check(metric.compute(), _sklearn_ap(logits, target), tail=[2])


def test_target_dtypes_are_equivalent():
    logits, target = _random_batch(5)
    results = []
    for t in (target, target.bool(), target.float(), target.to(torch.uint8)):
        metric = MultilabelAP(6, tail_labels=[5])
        metric.update(logits, t)
        results.append(metric.compute())
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, equal_nan=True)


def test_accumulation_equals_one_update_on_the_concatenation():
    logits, target = _random_batch(6, n=90, ties=True)
    many, one = MultilabelAP(6, tail_labels=[4, 5]), MultilabelAP(6, tail_labels=[4, 5])
    for chunk in torch.tensor_split(torch.arange(90), [1, 30, 31, 77]):
        many.update(logits[chunk], target[chunk])
    one.update(logits, target)
    r_many, r_one = many.compute(), one.compute()
    for key in r_one:
        torch.testing.assert_close(r_many[key], r_one[key], equal_nan=True, rtol=0, atol=0)
    many.reset()
    assert many.preds == [] and many.target == []


def test_half_precision_scores():
    logits, target = _random_batch(7)
    metric = MultilabelAP(6, tail_labels=[5])
    metric.update(logits.half(), target)
    assert metric.preds[0].dtype == torch.float32
    _check(metric.compute(), _sklearn_ap(logits.half().float(), target), tail=[5])


# ---------------------------------------------------------------------------------------------- head / tail


def test_head_tail_means_by_hand():
    metric = MultilabelAP(3)
    # label 0: AP 1; label 1: positive ranked second -> 1/2; label 2: positive ranked last of three -> 1/3
    metric.update(
        torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.9, 0.2], [0.2, 0.3, 0.0]]),
        torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]]),
    )
    metric.tail_labels = torch.tensor([2, 1])
    assert metric.tail_labels == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metric.compute()
    _check(result, np.array([1.0, 1 / 2, 1 / 3]), tail=[1, 2])
    assert result["map_tail"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["map_head"].item() == 1.0


def test_no_tail_labels_gives_nan_and_warns_once():
    logits, target = _random_batch(8)
    metric = MultilabelAP(6)
    metric.update(logits, target)
    with pytest.warns(UserWarning, match="`tail_labels` is None") as record:
        result = metric.compute()
    assert len(record) == 1
    assert torch.isnan(result["map_head"]) and torch.isnan(result["map_tail"])
    assert not torch.isnan(result["map"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()  # once per metric


def test_tail_group_without_positives_is_nan_with_warning():
    logits, target = _random_batch(9, no_positive=(4, 5))
    metric = MultilabelAP(6, tail_labels=[4, 5])
    metric.update(logits, target)
    with pytest.warns(UserWarning, match=r"tail group \(tail_labels=\[4, 5\]\).*none of its labels has a positive"):
        result = metric.compute()
    assert torch.isnan(result["map_tail"])
    assert result["map_head"].item() == pytest.approx(result["map"].item())


def test_every_label_tail_makes_the_head_group_nan():
    metric = MultilabelAP(2, tail_labels=[0, 1])
    metric.update(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([[1, 0], [0, 1]]))
    with pytest.warns(UserWarning, match="head group.*every label is a tail label"):
        result = metric.compute()
    assert torch.isnan(result["map_head"]) and result["map_tail"].item() == 1.0


def test_compute_without_positives_or_data_is_nan_never_zero():
    metric = MultilabelAP(3, tail_labels=[2])
    metric.update(torch.rand(4, 3), torch.zeros(4, 3))
    with pytest.warns(UserWarning) as record:
        result = metric.compute()
    messages = [str(w.message) for w in record]
    assert any("no label has a positive" in m for m in messages)
    assert sum("group (tail_labels=[2]) is empty because none of its labels has a positive" in m for m in messages) == 2
    assert all(torch.isnan(result[k]) for k in SCALARS) and torch.isnan(result["ap"]).all()
    metric = MultilabelAP(3, tail_labels=[2])
    with pytest.warns(UserWarning):  # torchmetrics' "compute before update" and ours
        result = metric.compute()
    assert all(torch.isnan(result[k]) for k in SCALARS) and result["ap"].shape == (3,)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.zeros(2, 4), torch.zeros(2, 4), r"`preds` of shape \[N, num_labels=3\], got \(2, 4\)"),
        (torch.zeros(2), torch.zeros(2), r"num_labels=3\], got \(2,\)"),
        (torch.zeros(2, 3), torch.zeros(3, 3), r"same shape as `preds` \(2, 3\) .*got \(3, 3\)"),
        (torch.zeros(2, 3), torch.zeros(2), r"got \(2,\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "floating-point scores `preds`"),
        (torch.zeros(2, 3), torch.tensor([[0, 1, 2], [0, 0, 5]]), r"binary `target` .*found \[2, 5\]. HINT"),
        (torch.zeros(2, 3), torch.tensor([[0.0, 0.5, 1.0], [0, 0, 0]]), r"found \[0.5\]"),
        (torch.tensor([[0.0, float("nan"), 0.0], [0, 0, 0]]), torch.zeros(2, 3), r"nan in `preds` for labels \[1\]"),
        ([[0.0, 0.0, 0.0]], torch.zeros(1, 3), "tensors"),
    ],
)
def test_update_validation(preds, target, match):
    metric = MultilabelAP(3)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, target)
    assert metric.preds == []


@pytest.mark.parametrize("num_labels", [0, -1, 2.0, True, None])
def test_invalid_num_labels(num_labels):
    with pytest.raises(ValueError, match="`num_labels` to be an integer >= 1"):
        MultilabelAP(num_labels)


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        ([], "non-empty. HINT: leave it None"),
        ([1, 5], r"Tail label id 5 in `tail_labels` is out of range: valid ids are \[0, 5\)"),
        ([-1], r"Tail label id -1 .*\[0, 5\)"),
        ([2, 3, 2], "Tail label id 2 appears more than once"),
        ([1.0], "integer label ids, got 1.0"),
        ("3", "sequence of label ids"),
        (torch.tensor([[1]]), "1-D"),
    ],
)
def test_invalid_tail_labels(tail, match):
    with pytest.raises(ValueError, match=match):
        MultilabelAP(5, tail_labels=tail)
    metric = MultilabelAP(5, tail_labels=[4])
    with pytest.raises(ValueError, match=match):
        metric.tail_labels = tail
    assert metric.tail_labels == [4]  # unchanged by the failed assignment


# ---------------------------------------------------------------------------------------------- label_tail_groups


def test_label_tail_groups_rule_and_boundary():
    counts = [1200, 45, 300, 8, 99, 100]
    assert label_tail_groups(counts, tail_threshold=100) == [1, 3, 4]  # 100 is not fewer than 100: head
    assert label_tail_groups(counts, tail_threshold=101) == [1, 3, 4, 5]
    assert label_tail_groups(np.array(counts), tail_threshold=9) == [3]
    assert label_tail_groups(torch.tensor([0, 5]), tail_threshold=1) == [0]  # a label never present is tail
    rng = np.random.default_rng(0)
    counts = (rng.pareto(1.0, size=80) * 50).astype(int) + 1
    assert label_tail_groups(counts, 40) == np.flatnonzero(counts < 40).tolist()


@pytest.mark.parametrize(
    ("counts", "threshold", "match"),
    [
        ([500, 300], 100, r"No tail label: .*the rarest has 300\)\. Raise `tail_threshold` above 300"),
        ([5, 50], 51, r"Every label has fewer than tail_threshold=51 .*Lower `tail_threshold` to at most 50"),
        ([5, 50], 0, "`tail_threshold` to be an integer >= 1, got 0"),
        ([5, 50], 10.0, "integer"),
        ([5, 50], True, "integer"),
        ([], 10, "non-empty"),
        ([5, -1], 10, "non-negative"),
    ],
)
def test_label_tail_groups_errors(counts, threshold, match):
    with pytest.raises(ValueError, match=match):
        label_tail_groups(counts, threshold)


def test_docstring_examples():
    result = doctest.testmod(multilabel_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


# ---------------------------------------------------------------------------------------------- DDP

DDP_C = 5
DDP_TAIL = [3, 4]
DDP_N = 50
RANK0_SHARD = 33  # uneven, rank-dependent shards


def _ddp_data():
    return _random_batch(12, n=DDP_N, C=DDP_C, ties=True)


class _ShardedEval(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.dummy = nn.Linear(1, 1)  # DDP needs a parameter
        self.metric = MultilabelAP(DDP_C, tail_labels=DDP_TAIL)
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
        local = sum(len(p) for p in self.metric.preds)  # before compute() syncs them
        result = {k: v.tolist() for k, v in self.metric.compute().items()}
        record = {"world_size": self.trainer.world_size, "seen": self.seen, "local": local, "result": result}
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
    assert records[0]["seen"] == list(range(RANK0_SHARD))
    assert records[1]["seen"] == list(range(RANK0_SHARD, DDP_N))
    assert [r["local"] for r in records] == [RANK0_SHARD, DDP_N - RANK0_SHARD]

    logits, target = _ddp_data()
    single = MultilabelAP(DDP_C, tail_labels=DDP_TAIL)
    single.update(logits, target)
    expected = single.compute()
    ap = _sklearn_ap(logits, target)
    for record in records:  # every rank sees the synced (global) value
        result = {k: torch.tensor(v) for k, v in record["result"].items()}
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, equal_nan=True)
        _check(result, ap, tail=DDP_TAIL)
    # the local shard alone gives different numbers, so the equality above comes from syncing
    shard0 = MultilabelAP(DDP_C, tail_labels=DDP_TAIL)
    shard0.update(logits[:RANK0_SHARD], target[:RANK0_SHARD])
    assert shard0.compute()["map"].item() != pytest.approx(expected["map"].item())
