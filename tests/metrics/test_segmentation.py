import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score, recall_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lt.metrics.segmentation as segmentation_module
from lightning_lt.metrics import SegmentationIoU, pixel_tail_classes, validate_tail_classes
from tests.helpers import DDP_STRATEGY

CAMVID_PIXELS = [10682767, 14750079, 623349, 20076880, 2845085, 6166762, 743859, 714595, 3719877, 405385, 184967]
SCALARS = ["miou", "miou_head", "miou_tail", "pixel_acc", "macc"]


def _random_batch(seed, C=6, B=3, H=9, W=11, ignore_index=255, absent=(), accuracy=0.6):
    """Logits, their argmax and targets with ~10 % ignored pixels; classes in ``absent`` never occur anywhere."""
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([c for c in range(C) if c not in absent])
    target = present[torch.randint(0, len(present), (B, H, W), generator=g)]
    logits = torch.randn(B, C, H, W, generator=g)
    logits.scatter_add_(1, target[:, None], torch.full((B, 1, H, W), 2.0 * accuracy))
    logits[:, list(absent)] = -1e4
    if ignore_index is not None:
        target = torch.where(torch.rand(B, H, W, generator=g) < 0.1, torch.tensor(ignore_index), target)
    return logits, logits.argmax(1), target


def _sklearn_reference(preds, target, C, ignore_index=255):
    """IoU / accuracy from scikit-learn on the labelled pixels, independent of the metric's confusion matrix."""
    keep = target != ignore_index
    y_true, y_pred = target[keep].numpy(), preds[keep].numpy()
    cm = confusion_matrix(y_true, y_pred, labels=list(range(C)))
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    iou = np.full(C, np.nan)
    iou[present] = jaccard_score(y_true, y_pred, labels=present, average=None)
    per_class_acc = recall_score(y_true, y_pred, labels=list(range(C)), average=None, zero_division=np.nan)
    return cm, iou, accuracy_score(y_true, y_pred), np.nanmean(per_class_acc)


def _assert_close(result, expected):
    for key, value in expected.items():
        if isinstance(value, (list, np.ndarray)):
            np.testing.assert_allclose(result[key].numpy(), np.asarray(value, dtype=float), rtol=1e-6, err_msg=key)
        elif math.isnan(value):
            assert torch.isnan(result[key]), key
        else:
            assert result[key].item() == pytest.approx(value, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- hand computation


def test_hand_computation_with_ignore_and_absent_class():
    # 4 classes; class 3 never predicted nor labelled; two ignored pixels (predicted as 2, must not count)
    preds = torch.tensor([[[0, 0, 1, 1], [2, 2, 0, 1], [2, 2, 1, 0]]])
    target = torch.tensor([[[0, 0, 1, 0], [2, 1, 0, 1], [255, 255, 1, 2]]])
    metric = SegmentationIoU(num_classes=4, tail_classes=[2, 3])
    metric.update(preds, target)
    # labelled pixels (target, pred): (0,0) x3, (1,1) x3, (0,1), (2,2), (1,2), (2,0)
    expected_cm = [[3, 1, 0, 0], [0, 3, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert metric.confmat.tolist() == expected_cm
    # IoU: c0 3/(4+4-3)=3/5, c1 3/(4+4-3)=3/5, c2 1/(2+2-1)=1/3, c3 0/0 = nan
    iou = [3 / 5, 3 / 5, 1 / 3, math.nan]
    result = metric.compute()
    assert list(result) == ["iou", *SCALARS]
    assert result["iou"].dtype == torch.float32 and all(result[k].ndim == 0 for k in SCALARS)
    _assert_close(
        result,
        {
            "iou": iou,
            "miou": (3 / 5 + 3 / 5 + 1 / 3) / 3,  # nan (class 3) left out of the mean
            "miou_head": 3 / 5,
            "miou_tail": 1 / 3,  # tail = {2, 3}, class 3 has no IoU
            "pixel_acc": 7 / 10,
            "macc": (3 / 4 + 3 / 4 + 1 / 2) / 3,
        },
    )


def test_class_predicted_but_absent_from_target_counts_as_zero():
    metric = SegmentationIoU(num_classes=3, ignore_index=None, tail_classes=[2])
    metric.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    result = metric.compute()
    _assert_close(result, {"iou": [0.5, math.nan, 0.0], "miou": 0.25, "pixel_acc": 0.5, "macc": 0.5})


@pytest.mark.filterwarnings("ignore:.*tail_classes` is None")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed):
    C = 7
    logits, preds, target = _random_batch(seed, C=C, absent=(5, 6))  # 5 and 6 never labelled
    preds[0, 0, :3] = 6  # class 6 is predicted though: IoU 0, not nan
    logits[0, 6, 0, :3] = 1e4
    metric = SegmentationIoU(num_classes=C)
    metric.update(logits if seed % 2 else preds, target)
    cm, iou, pixel_acc, macc = _sklearn_reference(preds, target, C)
    np.testing.assert_array_equal(metric.confmat.numpy(), cm)
    result = metric.compute()
    assert torch.isnan(result["iou"][5]) and result["iou"][6] == 0.0
    _assert_close(result, {"iou": iou, "miou": np.nanmean(iou), "pixel_acc": pixel_acc, "macc": macc})


def test_ignored_pixels_do_not_count():
    logits, preds, target = _random_batch(3, ignore_index=255)
    ignored = target == 255
    assert ignored.any()
    other = preds.clone()
    other[ignored] = (other[ignored] + 1) % 6  # different predictions on ignored pixels only
    a, b = SegmentationIoU(6), SegmentationIoU(6)
    a.update(preds, target)
    b.update(other, target)
    assert torch.equal(a.confmat, b.confmat)
    assert a.confmat.sum() == (~ignored).sum()


def test_other_ignore_index_and_none():
    _, preds, target = _random_batch(4, ignore_index=-1)
    metric = SegmentationIoU(6, ignore_index=-1)
    metric.update(preds, target)
    assert metric.confmat.sum() == (target != -1).sum()
    metric = SegmentationIoU(6, ignore_index=None)
    with pytest.raises(ValueError, match=r"`target` labels in \[0, 6\), found \[-1\]"):
        metric.update(preds, target)  # -1 is not ignored now


def test_logits_and_labels_give_the_same_result():
    logits, preds, target = _random_batch(5)
    a, b = SegmentationIoU(6, tail_classes=[4, 5]), SegmentationIoU(6, tail_classes=[4, 5])
    a.update(logits, target)
    b.update(preds.int(), target.to(torch.uint8))  # 255 fits in uint8
    assert torch.equal(a.confmat, b.confmat)
    for key, value in a.compute().items():
        torch.testing.assert_close(value, b.compute()[key], equal_nan=True)


def test_accumulation_equals_one_update_on_the_concatenation():
    batches = [_random_batch(seed, B=b) for seed, b in zip(range(10, 14), [1, 3, 2, 4])]
    many, one = SegmentationIoU(6, tail_classes=[0]), SegmentationIoU(6, tail_classes=[0])
    for logits, _, target in batches:
        many.update(logits, target)
    one.update(torch.cat([b[0] for b in batches]), torch.cat([b[2] for b in batches]))
    assert torch.equal(many.confmat, one.confmat)
    r_many, r_one = many.compute(), one.compute()
    for key in r_one:
        torch.testing.assert_close(r_many[key], r_one[key], equal_nan=True)


def test_forward_returns_batch_value_and_accumulates():
    metric = SegmentationIoU(3, tail_classes=[2])
    batch = metric(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 0, 2]]]))
    assert batch["pixel_acc"].item() == pytest.approx(2 / 3) and batch["miou_tail"].item() == 1.0
    batch = metric(torch.tensor([[[2, 2, 0]]]), torch.tensor([[[2, 2, 0]]]))
    assert batch["pixel_acc"].item() == 1.0
    assert metric.compute()["pixel_acc"].item() == pytest.approx(5 / 6)
    metric.reset()
    assert metric.confmat.sum() == 0


def test_update_never_writes_into_existing_state_tensors():
    metric = SegmentationIoU(3)
    initial = metric.confmat
    metric.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    assert initial.sum() == 0 and metric.confmat.sum() == 2


def test_dtype_cast_keeps_integer_counts():
    metric = SegmentationIoU(3, tail_classes=[2]).to(torch.float64)
    logits = torch.eye(3, dtype=torch.float64)[None, :, :, None].expand(1, 3, 3, 2)  # row h predicts class h
    metric.update(logits, torch.tensor([[[0, 0], [1, 1], [2, 2]]]))
    assert metric.confmat.dtype == torch.long
    assert metric.compute()["miou"].item() == 1.0


# ---------------------------------------------------------------------------------------------- head / tail


def test_head_tail_means_on_random_data():
    C = 8
    tail = [3, 6, 7]
    logits, preds, target = _random_batch(7, C=C, absent=(7,))
    metric = SegmentationIoU(C, tail_classes=tail)
    metric.update(logits, target)
    _, iou, _, _ = _sklearn_reference(preds, target, C)
    head = [c for c in range(C) if c not in tail]
    _assert_close(
        metric.compute(), {"miou_head": np.nanmean(iou[head]), "miou_tail": np.nanmean(iou[tail])}  # 7: nan, left out
    )


def test_tail_classes_can_be_set_after_construction():
    metric = SegmentationIoU(3)
    metric.update(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 1, 2]]]))
    metric.tail_classes = torch.tensor([2, 1])
    assert metric.tail_classes == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metric.compute()
    _assert_close(result, {"miou_head": 1.0, "miou_tail": (1 / 2 + 1 / 2) / 2})
    with pytest.raises(ValueError, match=r"Tail class id 3 .* out of range: valid ids are \[0, 3\)"):
        metric.tail_classes = [3]
    assert metric.tail_classes == [1, 2]  # unchanged by the failed assignment
    metric.tail_classes = None
    assert metric.tail_classes is None


def test_no_tail_classes_gives_nan_and_warns_once():
    metric = SegmentationIoU(3)
    metric.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 2]]]))
    with pytest.warns(UserWarning, match="`tail_classes` is None") as record:
        result = metric.compute()
    assert len(record) == 1
    assert torch.isnan(result["miou_head"]) and torch.isnan(result["miou_tail"])
    assert result["miou"].item() == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()  # once per metric


def test_tail_group_absent_from_the_data_is_nan_with_warning():
    metric = SegmentationIoU(4, tail_classes=[3])
    metric.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    with pytest.warns(UserWarning, match=r"tail group \(tail_classes=\[3\]\).*none of its classes occurs"):
        result = metric.compute()
    assert torch.isnan(result["miou_tail"])
    assert result["miou_head"].item() == pytest.approx((1 + 1 / 2 + 0) / 3)  # a real 0 (class 2) stays 0


def test_every_class_tail_makes_the_head_group_nan():
    metric = SegmentationIoU(2, tail_classes=[0, 1])
    metric.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    with pytest.warns(UserWarning, match="head group.*every class is a tail class"):
        result = metric.compute()
    assert torch.isnan(result["miou_head"]) and result["miou_tail"].item() == 1.0


def test_compute_without_data_is_nan_never_zero():
    metric = SegmentationIoU(3, tail_classes=[2])
    with pytest.warns(UserWarning):  # torchmetrics' "compute before update" and the empty groups
        result = metric.compute()
    assert all(torch.isnan(result[k]) for k in SCALARS) and torch.isnan(result["iou"]).all()


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), r"match `target`.*resize the logits"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), r"got \(2, 3, 4, 4\)"),
        (torch.zeros(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), r"num_classes=3, H, W\], got \(1, 5, 4, 4\)"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "integer labels, got dtype torch.float32"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), "same shape"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4), "integer label map"),
        (torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long), r"label map \[B, H, W\]"),
        (torch.zeros(1, 1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "logits"),
        (torch.tensor([[[0, 7]]]), torch.tensor([[[0, 1]]]), r"predicted labels `preds` in \[0, 3\), found \[7\]"),
        (torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 3, 9]]]), r"other than ignore_index=255, found \[3, 9\]"),
        (torch.tensor([[[0, 1]]]), torch.tensor([[[0, -2]]]), r"found \[-2\]"),
        ([[0]], torch.tensor([[[0]]]), "tensors"),
    ],
)
def test_update_validation(preds, target, match):
    metric = SegmentationIoU(3)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, target)
    assert metric.confmat.sum() == 0


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True, None])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationIoU(num_classes)


@pytest.mark.parametrize(
    ("ignore_index", "match"), [(0, r"outside the class ids \[0, 3\)"), (2, "outside"), (1.5, "integer")]
)
def test_invalid_ignore_index(ignore_index, match):
    with pytest.raises(ValueError, match=match):
        SegmentationIoU(3, ignore_index=ignore_index)


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        ([], "non-empty"),
        ([1, 11], r"Tail class id 11 in `tail_classes` is out of range: valid ids are \[0, 11\)"),
        ([-1], r"Tail class id -1 .*\[0, 11\)"),
        ([2, 3, 2], "Tail class id 2 appears more than once"),
        ([1.0], "integer class ids, got 1.0"),
        ([True], "integer class ids"),
        ("9", "sequence of class ids"),
        (torch.tensor([[1]]), "1-D"),
    ],
)
def test_invalid_tail_classes(tail, match):
    with pytest.raises(ValueError, match=match):
        validate_tail_classes(tail, 11)
    with pytest.raises(ValueError, match=match):
        SegmentationIoU(11, tail_classes=tail)


def test_validate_tail_classes_accepts_numpy_and_tensors():
    assert validate_tail_classes(np.array([10, 9]), 11) == [9, 10]
    assert validate_tail_classes(torch.tensor([3]), 11) == [3]
    assert all(type(c) is int for c in validate_tail_classes(np.array([10, 9]), 11))


# ---------------------------------------------------------------------------------------------- pixel_tail_classes


def test_pixel_tail_classes_on_camvid():
    # shares x C: c9 = 405385 * 11 / 60913605 = 0.0732, c10 = 0.0334 (< 0.1); c2 0.113, c7 0.129, c6 0.134 (< 0.5);
    # c4 = 0.514 is just above 0.5
    assert pixel_tail_classes(CAMVID_PIXELS) == [9, 10]
    assert pixel_tail_classes(CAMVID_PIXELS, tail_share=0.5) == [2, 6, 7, 9, 10]
    assert pixel_tail_classes(torch.tensor(CAMVID_PIXELS), tail_share=0.52) == [2, 4, 6, 7, 9, 10]


def test_pixel_tail_classes_reference_and_boundary():
    rng = np.random.default_rng(0)
    counts = (rng.pareto(1.0, size=30) * 1000).astype(int) + 1
    share = counts / counts.sum()
    for tail_share in (0.1, 0.3, 0.9):
        assert pixel_tail_classes(counts, tail_share) == np.flatnonzero(share < tail_share / 30).tolist()
    # class 0 has exactly the threshold share 1/10 = 0.2 / 2: not below it, so not tail (exact decimal comparison)
    with pytest.raises(ValueError, match="No tail class"):
        pixel_tail_classes([1, 9], tail_share=0.2)
    assert pixel_tail_classes([1, 9], tail_share=0.2000001) == [0]
    assert pixel_tail_classes([0, 5, 5]) == [0]  # a class without labelled pixels is tail


@pytest.mark.parametrize(
    ("counts", "tail_share", "match"),
    [
        ([100, 100, 100], 0.1, r"No tail class.*0\.1 / 3.*Raise `tail_share` or give `tail_classes` explicitly"),
        ([1, 1, 1000], 3.0, r"Every class.*Lower `tail_share`"),
        ([0, 0], 0.1, "all zeros"),
        ([10, -1], 0.1, "non-negative"),
        ([], 0.1, "non-empty"),
        ([1.5, 2], 0.1, "integers"),
        ([1, 100], 0.0, "`tail_share` to be a finite number > 0"),
        ([1, 100], -0.1, "tail_share"),
        ([1, 100], float("nan"), "tail_share"),
        ([1, 100], True, "tail_share"),
    ],
)
def test_pixel_tail_classes_errors(counts, tail_share, match):
    with pytest.raises(ValueError, match=match):
        pixel_tail_classes(counts, tail_share)


def test_docstring_examples():
    result = doctest.testmod(segmentation_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


# ---------------------------------------------------------------------------------------------- DDP

DDP_C = 5
DDP_TAIL = [3, 4]
DDP_N = 10  # images
RANK0_SHARD = 7  # rank 0 evaluates images [0, 7), rank 1 the other 3: uneven, rank-dependent shards


def _ddp_data():
    logits, _, target = _random_batch(0, C=DDP_C, B=DDP_N, H=6, W=5)
    return logits, target


class _ShardedEval(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.dummy = nn.Linear(1, 1)  # DDP needs a parameter
        self.metric = SegmentationIoU(DDP_C, tail_classes=DDP_TAIL)
        self.seen: list[int] = []

    def val_dataloader(self):
        idx = torch.arange(DDP_N)
        shard = idx[:RANK0_SHARD] if self.global_rank == 0 else idx[RANK0_SHARD:]
        return DataLoader(TensorDataset(shard), batch_size=2)

    def validation_step(self, batch, batch_idx):
        (idx,) = batch
        logits, target = _ddp_data()
        self.seen += idx.tolist()
        self.metric.update(logits[idx], target[idx])

    def on_validation_epoch_end(self):
        local_pixels = int(self.metric.confmat.sum())
        result = {k: v.tolist() for k, v in self.metric.compute().items()}
        record = {"world_size": self.trainer.world_size, "seen": self.seen, "local": local_pixels, "result": result}
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

    logits, target = _ddp_data()
    labelled = target != 255
    assert [r["local"] for r in records] == [int(labelled[:RANK0_SHARD].sum()), int(labelled[RANK0_SHARD:].sum())]
    single = SegmentationIoU(DDP_C, tail_classes=DDP_TAIL)
    single.update(logits, target)
    expected = single.compute()
    _, iou, pixel_acc, macc = _sklearn_reference(logits.argmax(1), target, DDP_C)
    for record in records:  # every rank sees the synced (global) value
        result = {k: torch.tensor(v) for k, v in record["result"].items()}
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, equal_nan=True)
        reference = {"iou": iou, "pixel_acc": pixel_acc, "macc": macc, "miou_tail": np.nanmean(iou[DDP_TAIL])}
        _assert_close(result, reference)
    # the local shards alone give different numbers, so the equality above comes from syncing
    shard0 = SegmentationIoU(DDP_C, tail_classes=DDP_TAIL)
    shard0.update(logits[:RANK0_SHARD], target[:RANK0_SHARD])
    assert shard0.compute()["miou"].item() != pytest.approx(expected["miou"].item())
