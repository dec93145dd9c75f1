import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

import lightning_lt.metrics.ood as ood_module
from lightning_lt.losses.multilabel import joint_energy
from lightning_lt.metrics import OOD_SCORES, OODDetection, ood_scores
from lightning_lt.metrics.ood import extract_features, oe_dilation_distance, rank_oe_sets
from tests.helpers import DDP_STRATEGY, REPO_ROOT

KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def _sklearn_reference(scores, is_ood, recall_level=0.95, fpr_convention="nearest"):
    """AUROC / AUPR-In / AUPR-Out / FPR at ``recall_level`` TPR from scikit-learn (ID = positive), float64.

    The FPR is read off scikit-learn's ROC points (one per distinct score, after its leading origin point):
    ``"at_least"`` the first with TPR >= ``recall_level``; ``"nearest"`` the one with the TPR nearest
    ``recall_level`` among those up to the first with TPR 1, the last of equally near ones (highest FPR).
    """
    s = np.asarray(scores, dtype=np.float64)
    is_id = 1 - np.asarray(is_ood, dtype=np.int64)
    fpr, tpr, _ = roc_curve(is_id, s, drop_intermediate=False)
    if fpr_convention == "at_least":
        fpr_value = fpr[np.searchsorted(tpr, recall_level, side="left")]
    else:
        fpr, tpr = fpr[1:], tpr[1:]  # the origin (nothing accepted) is not a threshold of the data
        candidates = np.abs(tpr[: np.argmax(tpr == 1) + 1] - recall_level)
        fpr_value = fpr[np.flatnonzero(candidates == candidates.min())[-1]]
    return {
        "auroc": roc_auc_score(is_id, s),
        "aupr_in": average_precision_score(is_id, s),
        "aupr_out": average_precision_score(1 - is_id, -s),
        "fpr95": fpr_value,
    }


def _random_scores(seed, n=300, num_scores=3, ood_share=0.3, ties=False, scale=1.0):
    """Scores ``[n, S]`` where OOD inputs score lower on average, and the OOD flags."""
    g = torch.Generator().manual_seed(seed)
    is_ood = torch.rand(n, generator=g) < ood_share
    scores = torch.randn(n, num_scores, generator=g) + 1.0 * (~is_ood)[:, None]
    if ties:
        scores = torch.round(scores * 10) / 10  # one decimal: many ties, also between ID and OOD
    return scores * scale, is_ood


def _assert_matches_sklearn(result, scores, is_ood, names, recall_level=0.95, fpr_key="fpr95", fpr_convention="nearest"):
    for j, name in enumerate(names):
        reference = _sklearn_reference(scores[:, j], is_ood, recall_level, fpr_convention)
        for key in KEYS:
            out_key = f"{fpr_key if key == 'fpr95' else key}_{name}"
            assert result[out_key].ndim == 0 and result[out_key].dtype == torch.float32, out_key
            assert result[out_key].item() == pytest.approx(reference[key], abs=1e-6), out_key


# ---------------------------------------------------------------------------------------------- ood_scores


def test_ood_scores_against_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3
    result = ood_scores(logits)
    assert list(result) == list(OOD_SCORES)
    f = logits.numpy()
    expected = {
        "jointenergy": np.log1p(np.exp(f)).sum(axis=1),
        "maxlogit": f.max(axis=1),
        "maxsigmoid": (1 / (1 + np.exp(-f))).max(axis=1),
        "energy": np.log(np.exp(f).sum(axis=1)),
    }
    for name, value in expected.items():
        assert result[name].shape == (50,)
        np.testing.assert_allclose(result[name].numpy(), value, rtol=1e-12, err_msg=name)
    torch.testing.assert_close(result["jointenergy"], joint_energy(logits))


def test_ood_scores_by_hand_and_higher_means_in_distribution():
    # one confident label vs all labels off
    logits = torch.tensor([[4.0, -4.0], [-4.0, -4.0]])
    result = ood_scores(logits)
    assert result["jointenergy"][0].item() == pytest.approx(math.log1p(math.exp(4)) + math.log1p(math.exp(-4)))
    assert result["energy"][1].item() == pytest.approx(-4 + math.log(2))
    assert result["maxsigmoid"][0].item() == pytest.approx(1 / (1 + math.exp(-4)))
    for name, score in result.items():
        assert score[0] > score[1], name


def test_ood_scores_are_stable_and_upcast_half():
    logits = torch.tensor([[100.0, -100.0, 0.0], [-200.0, -300.0, -150.0]])
    result = ood_scores(logits)
    assert all(torch.isfinite(v).all() for v in result.values())
    assert result["jointenergy"][0].item() == pytest.approx(100.0 + math.log(2))  # log(1 + e^100) = 100 (+ e^-100)
    assert result["energy"][1].item() == pytest.approx(-150.0)
    half = ood_scores(torch.tensor([[20.0, 30.0]], dtype=torch.float16))
    assert all(v.dtype == torch.float32 for v in half.values())
    assert half["energy"].item() == pytest.approx(30 + math.log1p(math.exp(-10)), rel=1e-6)
    assert ood_scores(torch.zeros(2, 3, dtype=torch.bfloat16))["jointenergy"].dtype == torch.float32


def test_ood_scores_subset_in_the_given_order():
    logits = torch.randn(4, 3)
    result = ood_scores(logits, ["energy", "maxlogit"])
    assert list(result) == ["energy", "maxlogit"]
    torch.testing.assert_close(result["maxlogit"], logits.max(dim=1).values)


@pytest.mark.parametrize(
    ("logits", "names", "match"),
    [
        (torch.zeros(2, 3), ["msp"], r"Unknown OOD score 'msp' in `names`: valid names are \['jointenergy', "),
        (torch.zeros(2, 3), "energy", r"got the string 'energy'. HINT: pass a list, e.g. \['energy'\]"),
        (torch.zeros(2, 3), [], "at least one score"),
        (torch.zeros(2, 3), ["energy", "energy"], "'energy' appears more than once"),
        (torch.zeros(3), OOD_SCORES, r"floating tensor \[N, C\] with C >= 1, got shape \(3,\)"),
        (torch.zeros(2, 0), OOD_SCORES, r"got shape \(2, 0\)"),
        (torch.zeros(2, 3, dtype=torch.long), OOD_SCORES, "dtype torch.int64"),
        ([[0.0, 1.0]], OOD_SCORES, "got list"),
    ],
)
def test_ood_scores_validation(logits, names, match):
    with pytest.raises(ValueError, match=match):
        ood_scores(logits, names)


# ---------------------------------------------------------------------------------------------- OODDetection


def _fpr(scores, is_ood, fpr_convention="nearest"):
    metric = OODDetection(["s"], fpr_convention=fpr_convention)
    metric.update({"s": torch.as_tensor(scores, dtype=torch.float32)}, torch.as_tensor(is_ood))
    return metric.compute()["fpr95_s"].item()


def test_fpr95_by_hand():
    # 20 ID inputs scoring 1..20 and 4 OOD inputs. 95% of 20 is 19: TPR = 19/20 = 0.95 exactly holds at the
    # thresholds t = 2 (OOD 10.5 and 2.5 accepted) and t = 1.5 (OOD 1.5 too). "nearest" (the JointEnergy / EDGE
    # code) takes the lower threshold of equally near points, "at_least" (scikit-learn's searchsorted) the higher.
    id_scores = torch.arange(1.0, 21.0)
    ood = torch.tensor([10.5, 2.5, 1.5, 0.5])
    scores = torch.cat([id_scores, ood])
    is_ood = torch.cat([torch.zeros(20), torch.ones(4)]).bool()
    metric = OODDetection(["s"])
    metric.update({"s": scores}, is_ood)
    result = metric.compute()
    assert result["fpr95_s"].item() == 3 / 4
    assert _sklearn_reference(scores, is_ood)["fpr95"] == 3 / 4
    assert _fpr(scores, is_ood, "at_least") == 2 / 4
    assert _sklearn_reference(scores, is_ood, fpr_convention="at_least")["fpr95"] == 2 / 4
    # AUROC by pairs: OOD 10.5 is beaten by 10 ID inputs, 2.5 by 18, 1.5 by 19, 0.5 by 20
    assert result["auroc_s"].item() == pytest.approx((10 + 18 + 19 + 20) / 80)

    # a tie at the threshold: the OOD input tied with the 19th ID input is accepted with it (both conventions)
    scores, is_ood = torch.cat([id_scores, torch.tensor([2.0, 0.0])]), torch.tensor([0] * 20 + [1, 1])
    assert _fpr(scores, is_ood) == _fpr(scores, is_ood, "at_least") == 1 / 2

    # 10 ID inputs and OOD 9.5, 0.5: "at_least" must accept all 10 ID inputs (9 / 10 = 0.9 < 0.95), "nearest"
    # stops at 9 (|0.9 - 0.95| < |1.0 - 0.95| in float64); OOD 9.5 is accepted either way
    scores, is_ood = torch.tensor([*range(1, 11), 9.5, 0.5]), torch.tensor([0] * 10 + [1, 1])
    assert _fpr(scores, is_ood) == _fpr(scores, is_ood, "at_least") == 1 / 2
    # ... and with OOD 1.5 in place of 9.5: "at_least" accepts it at t = 1, "nearest" at t = 1.5 (the lowest
    # threshold with TPR 0.9)
    scores = torch.tensor([*range(1, 11), 1.5, 0.5])
    assert _fpr(scores, is_ood) == _fpr(scores, is_ood, "at_least") == 1 / 2
    # 30 ID inputs 1..30, OOD 2.5 and 1.5: TPR 28/30 (t = 3 and 2.5) and 29/30 (t = 2 and 1.5) are both 1/60 from
    # 0.95, but 28/30 is nearer in float64, so "nearest" takes t = 2.5 (FPR 1/2) below 95% TPR; "at_least" t = 2
    assert abs(28 / 30 - 0.95) < abs(29 / 30 - 0.95)
    scores, is_ood = torch.tensor([*range(1, 31), 2.5, 1.5]), torch.tensor([0] * 30 + [1, 1])
    assert _fpr(scores, is_ood) == _sklearn_reference(scores, is_ood)["fpr95"] == 1 / 2
    assert _fpr(scores, is_ood, "at_least") == 1 / 2


def test_fpr95_at_an_exact_boundary_with_tied_id_inputs():
    """TPR = 57/60 = 0.95 exactly, reached at a threshold shared by three tied ID inputs (float32 0.95 as a float64
    would be 0.9499999881, just below: the comparison must stay in float64, as in scikit-learn and numpy)."""
    scores = torch.arange(1.0, 21.0).repeat(3)  # 60 ID inputs in triples of ties
    scores = torch.cat([scores, torch.tensor([1.5, 2.5, 3.5])])
    is_ood = torch.tensor([0] * 60 + [1] * 3)
    # t = 2: TPR 57/60 = 0.95, OOD 2.5 and 3.5 accepted; t = 1.5 has the same TPR and accepts OOD 1.5 too
    assert _sklearn_reference(scores, is_ood, fpr_convention="at_least")["fpr95"] == 2 / 3
    assert _fpr(scores, is_ood, "at_least") == pytest.approx(2 / 3)
    assert _sklearn_reference(scores, is_ood)["fpr95"] == 1.0
    assert _fpr(scores, is_ood) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn_on_random_data(seed, ties):
    scores, is_ood = _random_scores(seed, ties=ties)
    if ties:
        assert len(torch.unique(scores[:, 0])) < scores.shape[0] // 4
    names = ["a", "b", "c"]
    for convention in ("nearest", "at_least"):
        metric = OODDetection(names, fpr_convention=convention)
        metric.update(scores, is_ood.int())
        result = metric.compute()
        assert list(result) == [f"{key}_{name}" for name in names for key in KEYS]
        _assert_matches_sklearn(result, scores, is_ood, names, fpr_convention=convention)


def test_large_scores_keep_their_order():
    """torchmetrics applies a sigmoid to scores outside [0, 1], which ties every score above ~17 in float32."""
    scores, is_ood = _random_scores(3, num_scores=1)
    scores = scores * 5 + 60  # scores in about [40, 80]: all sigmoid to 1.0
    assert binary_auroc(scores[:, 0], (~is_ood).long()).item() == 0.5  # the naive call loses the ranking
    metric = OODDetection(["s"])
    metric.update(scores, is_ood)
    result = metric.compute()
    assert result["auroc_s"].item() > 0.7
    _assert_matches_sklearn(result, scores, is_ood, ["s"])


def test_float64_scores_are_not_rounded():
    scores = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 1.0 + 3e-12], dtype=torch.float64)  # ties in float32
    is_ood = torch.tensor([1, 0, 1, 0])
    metric = OODDetection(["s"])
    metric.update(scores[:, None], is_ood)
    result = metric.compute()
    _assert_matches_sklearn(result, scores[:, None].numpy(), is_ood, ["s"])
    assert result["auroc_s"].item() == pytest.approx(3 / 4)


def test_other_recall_level_and_key():
    scores, is_ood = _random_scores(4, num_scores=1, ties=True)
    metric = OODDetection(["s"], recall_level=0.9)
    metric.update(scores, is_ood)
    result = metric.compute()
    assert "fpr90_s" in result and "fpr95_s" not in result
    _assert_matches_sklearn(result, scores, is_ood, ["s"], recall_level=0.9, fpr_key="fpr90")
    assert OODDetection(["s"], recall_level=0.975).fpr_key == "fpr97.5"
    assert OODDetection(["s"], recall_level=1).fpr_key == "fpr100"


def test_dict_tensor_and_flag_forms_agree():
    logits = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    is_ood = torch.arange(40) % 3 == 0
    a, b = OODDetection(), OODDetection()
    a.update(ood_scores(logits), is_ood)
    b.update(torch.stack(list(ood_scores(logits).values()), dim=1), is_ood.long())
    r_a, r_b = a.compute(), b.compute()
    assert list(r_a) == [f"{key}_{name}" for name in OOD_SCORES for key in KEYS]
    for key in r_a:
        assert r_a[key].item() == r_b[key].item(), key
    one = OODDetection(["energy"])
    one.update(ood_scores(logits)["energy"], is_ood)  # a single score as a 1-D tensor
    assert one.compute()["auroc_energy"].item() == r_a["auroc_energy"].item()


def test_accumulation_equals_one_update_on_the_concatenation():
    scores, is_ood = _random_scores(6, n=200, ties=True)
    many, one = OODDetection(["a", "b", "c"]), OODDetection(["a", "b", "c"])
    for chunk in torch.tensor_split(torch.arange(200), [7, 50, 51, 120]):
        many.update(scores[chunk], is_ood[chunk])
    one.update(scores, is_ood)
    r_many, r_one = many.compute(), one.compute()
    for key in r_one:
        assert r_many[key].item() == r_one[key].item(), key
    many.reset()
    assert many.scores == [] and many.is_ood == []


@pytest.mark.parametrize("flags", [[0, 0, 0], [1, 1, 1]])
def test_without_id_or_ood_inputs_is_nan_with_warning(flags):
    metric = OODDetection(["a", "b"])
    metric.update(torch.randn(3, 2), torch.tensor(flags))
    with pytest.warns(UserWarning, match="need both, so they are nan"):
        result = metric.compute()
    assert len(result) == 8 and all(torch.isnan(v) for v in result.values())


def test_compute_without_data_is_nan_never_zero():
    metric = OODDetection(["a"])
    with pytest.warns(UserWarning):  # torchmetrics' "compute before update" and ours
        result = metric.compute()
    assert all(torch.isnan(v) for v in result.values())


def test_warning_free_on_normal_data():
    scores, is_ood = _random_scores(7)
    metric = OODDetection(["a", "b", "c"])
    metric.update(scores, is_ood)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()


@pytest.mark.parametrize(
    ("scores", "is_ood", "match"),
    [
        ({"a": torch.zeros(3)}, torch.zeros(3), r"missing \['b'\], unexpected \[\]. HINT: .*ood_scores"),
        ({"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.zeros(3)}, torch.zeros(3), r"unexpected \['c'\]"),
        ({"a": torch.zeros(3, 1), "b": torch.zeros(3)}, torch.zeros(3), r"`scores\['a'\]` to be a 1-D tensor"),
        ({"a": torch.zeros(3), "b": torch.zeros(4)}, torch.zeros(3), r"same length, got \[3, 4\]"),
        (torch.zeros(3, 3), torch.zeros(3), r"tensor \[N, 2\] .*got shape \(3, 3\)"),
        (torch.zeros(3), torch.zeros(3), r"\[N, 2\]"),
        ([[0.0, 0.0]], torch.zeros(1), "dict of tensors or a tensor, got list"),
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3), "floating-point `scores`, got dtype torch.int64"),
        (torch.zeros(3, 2), torch.zeros(4), r"`is_ood` to be a tensor \[N\] with N=3 .*got shape \(4,\)"),
        (torch.zeros(3, 2), torch.tensor([0, 2, -1]), r"0 / 1 \(or bool\), found \[-1, 2\]"),
        (torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]), torch.zeros(2), r"nan in the scores \['a'\]"),
    ],
)
def test_update_validation(scores, is_ood, match):
    metric = OODDetection(["a", "b"])
    with pytest.raises(ValueError, match=match):
        metric.update(scores, is_ood)
    assert metric.scores == []


def test_infinite_scores_are_ranked():
    scores = torch.tensor([float("inf"), 3.0, 1.0, float("-inf"), float("inf")])
    is_ood = torch.tensor([0, 1, 0, 1, 1])
    metric = OODDetection(["s"])
    metric.update(scores, is_ood)
    # pairs (ID, OOD): inf vs {3: win, -inf: win, inf: tie}, 1 vs {3: loss, -inf: win, inf: loss} -> 3.5 / 6
    assert metric.compute()["auroc_s"].item() == pytest.approx(3.5 / 6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score_names": []}, "at least one score"),
        ({"score_names": "energy"}, "HINT: pass a list"),
        ({"score_names": ["a", "a"]}, "'a' appears more than once"),
        ({"score_names": ["a", 3]}, "non-empty strings, got 3"),
        ({"recall_level": 0.0}, r"`recall_level` to be a number in \(0, 1\], got 0.0"),
        ({"recall_level": 95}, "got 95"),
        ({"recall_level": float("nan")}, "recall_level"),
        ({"recall_level": True}, "recall_level"),
        ({"fpr_convention": "sklearn"}, r"Unknown `fpr_convention` 'sklearn': choose 'nearest' .* or 'at_least'"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OODDetection(**kwargs)


def test_custom_score_names_are_allowed():
    metric = OODDetection(["odin", "mahalanobis"])
    assert metric.score_names == ["odin", "mahalanobis"]


def test_docstring_examples():
    result = doctest.testmod(ood_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 14 and result.failed == 0


# ---------------------------------------------------------------------------------------------- DDP

DDP_N = 60
RANK0_SHARD = 41  # uneven, rank-dependent shards
DDP_NAMES = ["a", "b"]


def _ddp_data():
    return _random_scores(11, n=DDP_N, num_scores=2, ties=True)


class _ShardedEval(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.dummy = nn.Linear(1, 1)  # DDP needs a parameter
        self.metric = OODDetection(DDP_NAMES)
        self.seen: list[int] = []

    def val_dataloader(self):
        idx = torch.arange(DDP_N)
        shard = idx[:RANK0_SHARD] if self.global_rank == 0 else idx[RANK0_SHARD:]
        return DataLoader(TensorDataset(shard), batch_size=8)

    def validation_step(self, batch, batch_idx):
        (idx,) = batch
        scores, is_ood = _ddp_data()
        self.seen += idx.tolist()
        self.metric.update({name: scores[idx, j] for j, name in enumerate(DDP_NAMES)}, is_ood[idx])

    def on_validation_epoch_end(self):
        local = sum(len(s) for s in self.metric.scores)  # before compute() syncs them
        result = {k: v.item() for k, v in self.metric.compute().items()}
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

    scores, is_ood = _ddp_data()
    single = OODDetection(DDP_NAMES)
    single.update(scores, is_ood)
    expected = {k: v.item() for k, v in single.compute().items()}
    for record in records:  # every rank sees the synced (global) value
        assert record["result"] == expected
        _assert_matches_sklearn({k: torch.tensor(v) for k, v in record["result"].items()}, scores, is_ood, DDP_NAMES)
    # the local shard alone gives different numbers, so the equality above comes from syncing
    shard0 = OODDetection(DDP_NAMES)
    shard0.update(scores[:RANK0_SHARD], is_ood[:RANK0_SHARD])
    assert shard0.compute()["auroc_a"].item() != pytest.approx(expected["auroc_a"])


# ---------------------------------------------------------------------------------------------- choosing an OE set


def test_oe_dilation_distance_by_hand():
    # batch 1: ID diag(3, 1), OE [[0, 2], [2, 0]] -> singular values (3, 1) and (2, 2)
    # batch 2: ID diag(1, 1) * 5 -> (5, 5), OE diag(4, 0) -> (4, 0); the means: ID (4, 3), OE (3, 1)
    id_batches = [torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 5 * torch.eye(2), torch.ones(2, 2)]  # the 3rd is unpaired
    oe_batches = [torch.tensor([[0.0, 2.0], [2.0, 0.0]]), torch.tensor([[4.0, 0.0], [0.0, 0.0]])]
    assert oe_dilation_distance(id_batches, oe_batches).item() == pytest.approx(math.sqrt(1 + 4))
    assert oe_dilation_distance(id_batches, oe_batches, k=1).item() == pytest.approx(1.0)
    assert oe_dilation_distance(id_batches[:2], oe_batches, k=2).item() == pytest.approx(math.sqrt(5))
    # features [B, C, H, W] are flattened per sample; float64 stays float64; the same sets are at distance 0
    feats = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert oe_dilation_distance([feats], [feats.reshape(4, 12)]).item() == pytest.approx(0.0, abs=1e-12)
    assert oe_dilation_distance([feats], [feats]).dtype == torch.float64


@pytest.mark.parametrize(
    ("id_batches", "oe_batches", "k", "match"),
    [
        (torch.ones(4, 3), [torch.ones(4, 3)], None, r"sequences of feature batches, got a tensor. HINT: pass \[features\]"),
        ([], [torch.ones(4, 3)], None, "at least one ID and one OE feature batch, got 0 and 1"),
        ([torch.ones(4, 3), torch.ones(2, 3)], [torch.ones(4, 3)] * 2, None, r"HINT: .*drop_last=True"),
        ([torch.ones(4, 8)], [torch.ones(3, 8)], None, "ID batches have 4 singular values and the OE batches 3"),
        ([torch.ones(4, 3)], [torch.ones(4, 3)], 4, r"`k` to be None or an integer in \[1, 3\]"),
        ([torch.ones(4, 3)], [torch.ones(4, 3)], 0, "got 0"),
        ([torch.ones(4, 3, dtype=torch.long)], [torch.ones(4, 3)], None, r"`id_features\[0\]` to be a floating"),
        ([torch.ones(4)], [torch.ones(4, 3)], None, r"\[B, \.\.\.\] with B >= 1, got shape \(4,\)"),
    ],
)
def test_oe_dilation_distance_validation(id_batches, oe_batches, k, match):
    with pytest.raises(ValueError, match=match):
        oe_dilation_distance(id_batches, oe_batches, k)


def test_rank_oe_sets_orders_by_distance_and_restores_the_mode():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 4, 4, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5))  # dropout: the features must be taken in eval mode
    model.train()
    id_loader = DataLoader(TensorDataset(images, torch.zeros(12)), batch_size=4)
    candidates = {
        "far": DataLoader(TensorDataset(images * 3.0), batch_size=4),
        "same": DataLoader(TensorDataset(images), batch_size=4),
        "near": [images[:4] * 1.2, images[4:8] * 1.2],  # any iterable of batches; 2 batches: 2 pairs
    }
    ranking = rank_oe_sets(model, id_loader, candidates)
    assert [name for name, _ in ranking] == ["same", "near", "far"]
    assert ranking[0][1] == pytest.approx(0.0, abs=1e-5)
    id_features = extract_features(model, id_loader)
    assert model.training and len(id_features) == 3
    torch.testing.assert_close(id_features[0], images[:4].flatten(1))
    expected = oe_dilation_distance(id_features[:2], [f.flatten(1) for f in candidates["near"]]).item()
    assert dict(ranking)["near"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one candidate"):
        rank_oe_sets(model, id_loader, {})


def _tiny_coco_and_textures(root):
    """8 RGB images in the COCO layout (2 categories) and 2 texture folders of 8 images each."""
    from PIL import Image

    g = np.random.default_rng(0)
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "coco" / "annotations").mkdir()
    images, annotations = [], []
    for i in range(8):
        Image.fromarray(g.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "coco" / "train2017" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg"})
        annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [0, 0, 4, 4]})
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "coco" / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    for name, scale in (("smooth", 30), ("noisy", 255)):
        (root / "tex" / name).mkdir(parents=True)
        for i in range(8):
            pixels = g.integers(0, scale, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "tex" / name / f"{i}.png")


def test_rank_oe_sets_script(tmp_path, capsys):
    """The script on a tiny COCO-layout set with a task checkpoint's backbone equals rank_oe_sets on that
    backbone; bad arguments stop with a message."""
    import importlib.util

    from lightning_lt.datamodules.multilabel import OODImageFolder, multilabel_eval_transform
    from lightning_lt.nets import TorchvisionBackbone
    from lightning_lt.tasks import MultiLabelOODModule

    spec = importlib.util.spec_from_file_location("rank_oe_sets", REPO_ROOT / "scripts" / "rank_oe_sets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _tiny_coco_and_textures(tmp_path)
    torch.manual_seed(0)
    module = MultiLabelOODModule(TorchvisionBackbone("resnet18"), num_classes=2)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "model.ckpt")
    argv = ["--root", str(tmp_path / "coco"), "--oe-root", str(tmp_path / "tex"), "--image-size", "16",
            "--batch-size", "4", "--num-workers", "0"]
    ranking = script.main([*argv, "--checkpoint", str(tmp_path / "model.ckpt"), "--json", str(tmp_path / "r.json")])
    assert sorted(name for name, _ in ranking) == ["noisy", "smooth"]
    assert json.loads((tmp_path / "r.json").read_text())["ranking"] == [list(item) for item in ranking]
    assert "smallest first" in capsys.readouterr().out

    transform = multilabel_eval_transform(16)
    files = sorted((tmp_path / "coco" / "train2017").iterdir(), key=lambda p: int(p.stem))
    id_images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    candidates = {name: DataLoader(OODImageFolder(str(tmp_path / "tex"), [name], 1, transform), batch_size=4,
                                   drop_last=True) for name in ("noisy", "smooth")}
    expected = rank_oe_sets(module.backbone, id_images.split(4), candidates)
    assert [name for name, _ in ranking] == [name for name, _ in expected]
    for (_, a), (_, b) in zip(ranking, expected):
        assert a == pytest.approx(b, rel=1e-5)

    with pytest.raises(SystemExit, match="not a 'resnet34'"):
        script.main([*argv, "--arch", "resnet34", "--checkpoint", str(tmp_path / "model.ckpt")])
    torch.save({"state_dict": {"head.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="no `backbone.\\*` weights"):
        script.main([*argv, "--checkpoint", str(tmp_path / "other.ckpt")])
    with pytest.warns(UserWarning, match="random network"):
        script.main([*argv, "--candidates", "smooth"])
