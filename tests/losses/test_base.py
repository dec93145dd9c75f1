"""Behaviour shared by every loss: buffers, state_dict, weights, reductions and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_lt.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    LongTailLoss,
)
from lightning_lt.losses.base import as_class_counts, weighted_reduce
from tests.losses.reference import random_batch, reduce_loop

COUNTS = [50, 20, 10, 5, 2]

LOSSES = {
    "ce": lambda counts, **kw: CrossEntropyLoss(counts, **kw),
    "ce_smooth": lambda counts, **kw: CrossEntropyLoss(counts, label_smoothing=0.1, **kw),
    "focal": lambda counts, **kw: FocalLoss(counts, gamma=2.0, alpha=0.5, **kw),
    "cb_softmax": lambda counts, **kw: ClassBalancedLoss(counts, beta=0.99, **kw),
    "cb_sigmoid": lambda counts, **kw: ClassBalancedLoss(counts, beta=0.99, loss_type="sigmoid", **kw),
    "cb_focal": lambda counts, **kw: ClassBalancedLoss(counts, beta=0.99, loss_type="focal", **kw),
    "ldam": lambda counts, **kw: LDAMLoss(counts, **kw),
    "la": lambda counts, **kw: LogitAdjustedLoss(counts, tau=1.5, **kw),
    "bs": lambda counts, **kw: BalancedSoftmaxLoss(counts, **kw),
}
REQUIRE_COUNTS = [ClassBalancedLoss, LDAMLoss, LogitAdjustedLoss, BalancedSoftmaxLoss]
ALL_CLASSES = [CrossEntropyLoss, FocalLoss, *REQUIRE_COUNTS]


# ---------------------------------------------------------------- buffers / state_dict


@pytest.mark.parametrize("name", LOSSES)
def test_priors_and_weights_are_buffers_in_state_dict(name):
    loss = LOSSES[name](COUNTS)
    loss.set_class_weights([1.0, 2.0, 3.0, 4.0, 5.0])
    state = loss.state_dict()
    assert {"class_counts", "log_prior", "weight"} <= set(state)
    assert state["class_counts"].tolist() == [float(c) for c in COUNTS]
    expected_log_prior = [math.log(c / sum(COUNTS)) for c in COUNTS]
    assert state["log_prior"].tolist() == pytest.approx(expected_log_prior, rel=1e-6)
    assert state["weight"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not list(loss.parameters())


@pytest.mark.parametrize("name", LOSSES)
def test_buffers_follow_dtype_and_device(name):
    loss = LOSSES[name](COUNTS)
    loss.set_class_weights(torch.ones(5))
    loss = loss.to(torch.float64)
    for buf_name, buf in loss.named_buffers():
        assert buf.dtype == torch.float64, buf_name
    # weights set after the move take the module's dtype
    loss.set_class_weights([2.0] * 5)
    assert loss.weight.dtype == torch.float64
    logits, target = random_batch(num_classes=5)
    out = loss(logits.double(), target)
    assert out.dtype == torch.float64 and torch.isfinite(out)
    meta = loss.to("meta")
    assert all(buf.device.type == "meta" for _, buf in meta.named_buffers())
    meta.set_class_weights([1.0] * 5)
    assert meta.weight.device.type == "meta"


@pytest.mark.parametrize("name", LOSSES)
def test_state_dict_round_trip_restores_weight_presence(name):
    weighted = LOSSES[name](COUNTS)
    weighted.set_class_weights([0.5, 1.0, 1.5, 2.0, 2.5])
    fresh = LOSSES[name](COUNTS)
    assert fresh.weight is None
    fresh.load_state_dict(weighted.state_dict())  # strict: "weight" must be accepted
    assert torch.equal(fresh.weight, weighted.weight)
    logits, target = random_batch(num_classes=5)
    torch.testing.assert_close(fresh(logits, target), weighted(logits, target))
    # an unweighted state dict clears the weights again
    fresh.load_state_dict(LOSSES[name](COUNTS).state_dict())
    assert fresh.weight is None
    assert "weight" not in fresh.state_dict()


def test_partial_state_dict_keeps_weights():
    loss = CrossEntropyLoss(COUNTS)
    loss.set_class_weights([1.0] * 5)
    result = loss.load_state_dict({}, strict=False)
    assert loss.weight is not None
    assert set(result.missing_keys) == {"class_counts", "log_prior", "weight"}


def test_nested_module_checkpoint_with_weights():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 5)
            self.loss = LDAMLoss(COUNTS)

    saved = Model()
    saved.loss.set_class_weights(torch.arange(1.0, 6.0))
    restored = Model()
    restored.load_state_dict(saved.state_dict())
    assert restored.loss.weight.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


# ---------------------------------------------------------------- reductions and weights


@pytest.mark.parametrize("name", LOSSES)
def test_reductions_and_weight_semantics(name):
    """mean = sum_i w_{y_i} l_i / sum_i w_{y_i}; sum; none = w_{y_i} l_i (checked with loops on 'none')."""
    logits, target = random_batch(num_classes=5, seed=3)
    weight = [0.2, 0.5, 1.0, 3.0, 7.0]
    unweighted = LOSSES[name](COUNTS, reduction="none")(logits, target)
    assert unweighted.shape == (16,)
    per_sample = unweighted.double().tolist()
    ys = target.tolist()
    for w in (None, weight):
        for reduction in ("mean", "sum", "none"):
            loss = LOSSES[name](COUNTS, reduction=reduction)
            loss.set_class_weights(w)
            expected = torch.tensor(reduce_loop(per_sample, ys, w, reduction), dtype=torch.float64)
            torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)
    # clearing the weights restores the unweighted loss
    loss = LOSSES[name](COUNTS)
    loss.set_class_weights(weight)
    loss.set_class_weights(None)
    torch.testing.assert_close(loss(logits, target), unweighted.mean())


def test_weighted_reduce_matches_torch_cross_entropy():
    logits, target = random_batch(num_classes=5, seed=1)
    weight = torch.tensor([0.1, 2.0, 1.0, 0.5, 4.0])
    per_sample = F.cross_entropy(logits, target, reduction="none")
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            weighted_reduce(per_sample, target, weight, reduction),
            F.cross_entropy(logits, target, weight=weight, reduction=reduction),
        )


def test_weighted_reduce_hand_numbers():
    loss = torch.tensor([1.0, 2.0, 4.0])
    target = torch.tensor([0, 1, 1])
    w = torch.tensor([3.0, 0.5])
    assert weighted_reduce(loss, target, w, "none").tolist() == [3.0, 1.0, 2.0]
    assert weighted_reduce(loss, target, w, "sum").item() == 6.0
    assert weighted_reduce(loss, target, w, "mean").item() == pytest.approx(6.0 / 4.0)
    assert weighted_reduce(loss, target, None, "mean").item() == pytest.approx(7.0 / 3.0)


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_are_finite_and_int32_targets_work(name):
    logits, target = random_batch(num_classes=5, scale=30.0)  # saturated softmax
    logits.requires_grad_(True)
    loss = LOSSES[name](COUNTS)
    loss.set_class_weights([1.0, 2.0, 3.0, 4.0, 5.0])
    out = loss(logits, target.int())
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(out, loss(logits, target))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", REQUIRE_COUNTS)
def test_missing_class_counts(cls):
    with pytest.raises(ValueError, match=rf"`class_counts` is required for {cls.__name__}.*got None"):
        cls(None)


@pytest.mark.parametrize("cls", [CrossEntropyLoss, FocalLoss])
def test_class_counts_optional(cls):
    loss = cls()
    assert loss.num_classes is None and loss.class_counts.numel() == 0
    logits, target = random_batch(num_classes=7)
    assert torch.isfinite(loss(logits, target))
    loss.set_class_weights(torch.ones(3))  # length unknown until the logits arrive
    with pytest.raises(ValueError, match=r"`weight` must have one entry per class \(7.*got shape \(3,\)"):
        loss(logits, target)


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([10, 0, 5], r"class 1 has 0"),
        ([10, 5, -3], r"class 2 has -3"),
        ([0, 0, 5], r"class 0 has 0, class 1 has 0"),
        ([], r"non-empty 1-D"),
        ([[1, 2], [3, 4]], r"non-empty 1-D.*shape \(2, 2\)"),
        ([1.0, float("nan")], r"finite"),
        ("abc", r"sequence of per-class sample counts"),
    ],
)
def test_bad_class_counts(cls, counts, message):
    with pytest.raises(ValueError, match=message):
        cls(counts)


def test_zero_count_message_names_loss_and_fix():
    with pytest.raises(ValueError) as err:
        LDAMLoss([3, 0])
    text = str(err.value)
    assert "`class_counts`" in text and "LDAMLoss" in text and "class 1 has 0" in text and "remove the empty" in text


def test_class_counts_accepts_tensor_and_numpy():
    np = pytest.importorskip("numpy")
    assert as_class_counts(np.array([3, 2])).tolist() == [3.0, 2.0]
    assert as_class_counts(torch.tensor([3, 2])).dtype == torch.float64


@pytest.mark.parametrize("name", LOSSES)
def test_wrong_length_weights(name):
    loss = LOSSES[name](COUNTS)
    with pytest.raises(ValueError, match=r"`weight` .* to have 5 entries \(len\(class_counts\)\), got 3"):
        loss.set_class_weights([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`weight` .* 1-D"):
        loss.set_class_weights(torch.ones(5, 1))
    with pytest.raises(ValueError, match=r"`weight` .* finite and >= 0"):
        loss.set_class_weights([1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`weight` .* finite and >= 0"):
        loss.set_class_weights([1.0, float("inf"), 1.0, 1.0, 1.0])
    assert loss.weight is None


@pytest.mark.parametrize("name", LOSSES)
def test_logits_class_dim_must_match_class_counts(name):
    loss = LOSSES[name](COUNTS)
    logits, target = random_batch(num_classes=4)
    with pytest.raises(ValueError, match=r"`logits` with 4 classes .* `class_counts` has 5 entries"):
        loss(logits, target)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_shapes_and_target_dtype(name):
    loss = LOSSES[name](COUNTS)
    logits, target = random_batch(num_classes=5)
    with pytest.raises(ValueError, match=r"`logits` of shape \[batch_size, num_classes\]"):
        loss(logits[None], target)
    with pytest.raises(ValueError, match=r"`target` of shape \[batch_size\] = \[16\]"):
        loss(logits, target[:3])
    with pytest.raises(ValueError, match=r"integer class indices.*torch.float32"):
        loss(logits, target.float())


@pytest.mark.parametrize("name", LOSSES)
def test_target_out_of_range_names_values_and_class_count(name):
    """Before, 5 raised an index error far from its cause and -1 silently read the last class's weight / prior."""
    loss = LOSSES[name](COUNTS)
    loss.set_class_weights(torch.ones(5))
    logits, target = random_batch(num_classes=5)
    for bad, shown in ((5, "5"), (-1, "-1"), (-100, "-100")):
        target = target.clone()
        target[3] = bad
        with pytest.raises(ValueError, match=rf"{type(loss).__name__} got target value\(s\) {shown} outside "
                                             r"\[0, 5\) for 5 classes \(1 of 16 samples\)\. HINT: labels must be"):
            loss(logits, target)
        with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
            loss.per_sample_loss(logits, target)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_bad_reduction(cls):
    with pytest.raises(ValueError, match=r"`reduction` to be one of .*got 'avg'"):
        cls(COUNTS, reduction="avg")


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError, match="_compute"):
        LongTailLoss(COUNTS)(*random_batch(num_classes=5))


def test_repr_shows_hyper_parameters():
    text = repr(LDAMLoss(COUNTS, max_m=0.3, s=10.0))
    assert "num_classes=5" in text and "max_m=0.3" in text and "s=10.0" in text
