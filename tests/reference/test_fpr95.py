"""FPR at 95% TPR as the published multi-label OOD code computes it (JointEnergy, EDGE).

The reference is ``fpr_and_fdr_at_recall`` in ``utils/anom_utils.py`` of deeplearning-wisc/multi-label-ood
(JointEnergy, NeurIPS 2021); Yuchen-Sunflower/EDGE (AAAI 2025) ships the same function unchanged. Both call it
through ``get_measures(_pos, _neg)`` as ``get_and_print_results(in_scores, out_scores, ...)`` (``eval.py``), so
the **in-distribution** scores are the positives (label 1), the scores are **higher for in-distribution** (e.g.
JointEnergy ``sum_c log(1 + exp(f_c))``) and ``recall_level`` is 0.95: the FPR is the fraction of OOD inputs
accepted at the point of the ROC curve whose ID recall is nearest 95%.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.metrics import OODDetection
from lightning_lt.metrics.ood import _fpr_at_tpr
from tests.helpers import DDP_STRATEGY


def reference_fpr_at_recall(y_true, y_score, recall_level=0.95):
    """Transcription of ``fpr_and_fdr_at_recall(y_true, y_score, recall_level)`` (deeplearning-wisc/multi-label-ood,
    ``utils/anom_utils.py``; the same function in Yuchen-Sunflower/EDGE), for 0 / 1 labels (``pos_label`` 1),
    returning its FPR (the first of the two values it returns)."""
    y_true = np.asarray(y_true) == 1
    y_score = np.asarray(y_score)
    # scores in decreasing order: a stable ascending sort, reversed
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    # one point per distinct score: the last index of each run of equal scores, and the end of the curve
    threshold_idxs = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]  # their stable_cumsum
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    # keep the points down to the first with full recall, reversed, and append the point (recall 1, fps 0)
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / np.sum(np.logical_not(y_true))


def reference_get_measures_fpr(in_scores, out_scores, recall_level=0.95):
    """Transcription of the FPR part of ``get_measures(_pos, _neg)`` (same file) as ``eval.py`` calls it: the ID
    scores are the positives, stacked before the OOD scores."""
    pos = np.array(in_scores).reshape((-1, 1))
    neg = np.array(out_scores).reshape((-1, 1))
    examples = np.squeeze(np.vstack((pos, neg)))
    labels = np.zeros(len(examples), dtype=np.int32)
    labels[: len(pos)] += 1
    return reference_fpr_at_recall(labels, examples, recall_level)


def _random_case(seed: int, ties: bool):
    """ID and OOD scores (ID higher on average), sizes that make the 95% point fall between ROC points."""
    g = torch.Generator().manual_seed(seed)
    n_id = int(torch.randint(8, 120, (1,), generator=g))
    n_ood = int(torch.randint(5, 120, (1,), generator=g))
    shift = float(torch.rand(1, generator=g)) * 2
    id_scores = torch.randn(n_id, generator=g, dtype=torch.float64) + shift
    ood_scores = torch.randn(n_ood, generator=g, dtype=torch.float64)
    if ties:  # one decimal: many ties, also between ID and OOD inputs
        id_scores, ood_scores = torch.round(id_scores * 4) / 4, torch.round(ood_scores * 4) / 4
    return id_scores, ood_scores


def _library_fpr(id_scores, ood_scores, recall_level=0.95, **kwargs) -> float:
    metric = OODDetection(["s"], recall_level=recall_level, **kwargs)
    scores = torch.cat([id_scores, ood_scores])
    metric.update(scores, torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))]).long())
    return metric.compute()[f"{metric.fpr_key}_s"].item()


def test_transcription_by_hand():
    # 20 ID inputs 1..20, OOD 10.5, 2.5, 1.5, 0.5: recall 19/20 = 0.95 holds at the scores 2 and 1.5; the
    # reference takes the lower one (3 OOD accepted), scikit-learn's searchsorted the higher one (2 accepted)
    in_scores, out_scores = np.arange(1.0, 21.0), np.array([10.5, 2.5, 1.5, 0.5])
    assert reference_get_measures_fpr(in_scores, out_scores) == 3 / 4
    assert _library_fpr(torch.from_numpy(in_scores), torch.from_numpy(out_scores)) == 3 / 4
    assert _library_fpr(torch.from_numpy(in_scores), torch.from_numpy(out_scores), fpr_convention="at_least") == 2 / 4
    # 10 ID inputs: recall 0.9 is nearer 0.95 than 1.0 in float64, so 9 ID inputs are accepted (OOD 9.5 with them)
    in_scores, out_scores = np.arange(1.0, 11.0), np.array([9.5, 0.5])
    assert abs(0.9 - 0.95) < abs(1.0 - 0.95)
    assert reference_get_measures_fpr(in_scores, out_scores) == 1 / 2
    assert _library_fpr(torch.from_numpy(in_scores), torch.from_numpy(out_scores)) == 1 / 2


@pytest.mark.parametrize("ties", [False, True])
def test_metric_equals_reference_on_random_scores(ties):
    differ = 0
    for seed in range(40):
        id_scores, ood_scores = _random_case(seed, ties)
        expected = reference_get_measures_fpr(id_scores.numpy(), ood_scores.numpy())
        assert _library_fpr(id_scores, ood_scores) == pytest.approx(expected, abs=1e-7), seed
        scores = torch.cat([id_scores, ood_scores])
        is_id = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(ood_scores))]).long()
        assert _fpr_at_tpr(scores, is_id, 0.95).item() == expected, seed  # exact in float64
        differ += _library_fpr(id_scores, ood_scores, fpr_convention="at_least") != pytest.approx(expected, abs=1e-7)
    assert differ >= 5  # the two conventions disagree often enough for this test to tell them apart


@pytest.mark.parametrize("recall_level", [0.05, 0.5, 0.8, 0.9, 0.99, 1.0])
def test_other_recall_levels_equal_reference(recall_level):
    for seed in range(10):
        id_scores, ood_scores = _random_case(100 + seed, ties=seed % 2 == 1)
        expected = reference_get_measures_fpr(id_scores.numpy(), ood_scores.numpy(), recall_level)
        assert _library_fpr(id_scores, ood_scores, recall_level) == pytest.approx(expected, abs=1e-7), seed


def test_metric_accumulated_over_batches_equals_reference():
    id_scores, ood_scores = _random_case(7, ties=True)
    scores = torch.cat([id_scores, ood_scores])
    is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))]).long()
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))
    metric = OODDetection(["s"])
    for chunk in torch.tensor_split(perm, 5):
        metric.update(scores[chunk], is_ood[chunk])
    expected = reference_get_measures_fpr(id_scores.numpy(), ood_scores.numpy())
    assert metric.compute()["fpr95_s"].item() == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------------------------------------- DDP

DDP_CASE = 3


class _ShardedFPR(LightningModule):
    """Rank r evaluates its own (uneven) share of one random case; the metric syncs them."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.dummy = nn.Linear(1, 1)
        self.metric = OODDetection(["s"])

    def val_dataloader(self):
        id_scores, ood_scores = _random_case(DDP_CASE, ties=True)
        n = len(id_scores) + len(ood_scores)
        idx = torch.arange(n)
        return DataLoader(TensorDataset(idx[idx % 3 == 0] if self.global_rank == 0 else idx[idx % 3 != 0]),
                          batch_size=16)

    def validation_step(self, batch, batch_idx):
        (idx,) = batch
        id_scores, ood_scores = _random_case(DDP_CASE, ties=True)
        scores = torch.cat([id_scores, ood_scores])
        is_ood = (torch.arange(len(scores)) >= len(id_scores)).long()
        self.metric.update(scores[idx], is_ood[idx])

    def on_validation_epoch_end(self):
        value = self.metric.compute()["fpr95_s"].item()
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"fpr95": value, "world_size": self.trainer.world_size}, f)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_ddp_metric_equals_reference(tmp_path):
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DDP_STRATEGY, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
                      default_root_dir=tmp_path)
    trainer.validate(_ShardedFPR(str(tmp_path)))
    id_scores, ood_scores = _random_case(DDP_CASE, ties=True)
    expected = reference_get_measures_fpr(id_scores.numpy(), ood_scores.numpy())
    assert expected != pytest.approx(_library_fpr(id_scores, ood_scores, fpr_convention="at_least"))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2
        assert record["fpr95"] == pytest.approx(expected, abs=1e-7)
