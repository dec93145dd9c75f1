import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

import lightning_lt.metrics.ood as ood_module
from lightning_lt.losses.multilabel import joint_energy
from lightning_lt.metrics import OOD_SCORES, OODDetection, ood_scores
from tests.helpers import DDP_STRATEGY

KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def _sklearn_reference(scores, is_ood, recall_level=0.95):
    """AUROC / AUPR-In / AUPR-Out / FPR at ``recall_level`` TPR from scikit-learn (ID = positive), float64."""
    s = np.asarray(scores, dtype=np.float64)
    is_id = 1 - np.asarray(is_ood, dtype=np.int64)
    fpr, tpr, _ = roc_curve(is_id, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(is_id, s),
        "aupr_in": average_precision_score(is_id, s),
        "aupr_out": average_precision_score(1 - is_id, -s),
        "fpr95": fpr[np.searchsorted(tpr, recall_level, side="left")],
    }


def _random_scores(seed, n=300, num_scores=3, ood_share=0.3, ties=False, scale=1.0):
    """Scores ``[n, S]`` where OOD inputs score lower on average, and the OOD flags."""
    g = torch.Generator().manual_seed(seed)
    is_ood = torch.rand(n, generator=g) < ood_share
    scores = torch.randn(n, num_scores, generator=g) + 1.0 * (~is_ood)[:, None]
    if ties:
        scores = torch.round(scores * 10) / 10  # one decimal: many ties, also between ID and OOD
    return scores * scale, is_ood


def _assert_matches_sklearn(result, scores, is_ood, names, recall_level=0.95, fpr_key="fpr95"):
    for j, name in enumerate(names):
        reference = _sklearn_reference(scores[:, j], is_ood, recall_level)
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


def test_fpr95_by_hand():
    # 20 ID inputs scoring 1..20 and 4 OOD inputs. 95% of 20 is 19: the highest threshold that accepts 19 ID
    # inputs is t = 2 (TPR = 19/20 = 0.95 exactly, which counts), and it accepts the OOD inputs 10.5 and 2.5.
    id_scores = torch.arange(1.0, 21.0)
    ood = torch.tensor([10.5, 2.5, 1.5, 0.5])
    scores = torch.cat([id_scores, ood])
    is_ood = torch.cat([torch.zeros(20), torch.ones(4)]).bool()
    metric = OODDetection(["s"])
    metric.update({"s": scores}, is_ood)
    result = metric.compute()
    assert result["fpr95_s"].item() == 2 / 4
    assert _sklearn_reference(scores, is_ood)["fpr95"] == 2 / 4
    # AUROC by pairs: OOD 10.5 is beaten by 10 ID inputs, 2.5 by 18, 1.5 by 19, 0.5 by 20
    assert result["auroc_s"].item() == pytest.approx((10 + 18 + 19 + 20) / 80)

    # a tie at the threshold: the OOD input tied with the 19th ID input is accepted with it
    metric = OODDetection(["s"])
    metric.update({"s": torch.cat([id_scores, torch.tensor([2.0, 0.0])])}, torch.tensor([0] * 20 + [1, 1]))
    assert metric.compute()["fpr95_s"].item() == 1 / 2

    # 10 ID inputs: 9 / 10 = 0.9 < 0.95, so all 10 must be accepted (t = 1), and so is the OOD input 1.5
    metric = OODDetection(["s"])
    metric.update({"s": torch.tensor([*range(1, 11), 1.5, 0.5])}, torch.tensor([0] * 10 + [1, 1]))
    assert metric.compute()["fpr95_s"].item() == 1 / 2


def test_fpr95_at_an_exact_boundary_with_tied_id_inputs():
    """TPR = 57/60 = 0.95 exactly, reached at a threshold shared by three tied ID inputs (float32 0.95 as a float64
    would be 0.9499999881, just below: the comparison must stay in float64, as in scikit-learn)."""
    scores = torch.arange(1.0, 21.0).repeat(3)  # 60 ID inputs in triples of ties
    scores = torch.cat([scores, torch.tensor([1.5, 2.5, 3.5])])
    is_ood = torch.tensor([0] * 60 + [1] * 3)
    metric = OODDetection(["s"])
    metric.update(scores[:, None], is_ood)
    reference = _sklearn_reference(scores, is_ood)
    assert reference["fpr95"] == 2 / 3  # t = 2: TPR 57/60 = 0.95, OOD 2.5 and 3.5 accepted
    assert metric.compute()["fpr95_s"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn_on_random_data(seed, ties):
    scores, is_ood = _random_scores(seed, ties=ties)
    if ties:
        assert len(torch.unique(scores[:, 0])) < scores.shape[0] // 4
    names = ["a", "b", "c"]
    metric = OODDetection(names)
    metric.update(scores, is_ood.int())
    result = metric.compute()
    assert list(result) == [f"{key}_{name}" for name in names for key in KEYS]
    _assert_matches_sklearn(result, scores, is_ood, names)


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
    assert result.attempted >= 7 and result.failed == 0


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
