"""PixelAUCLoss (AUCSeg) against an O(pairs) brute force written with explicit loops over classes."""

from __future__ import annotations

import doctest
import itertools
import re
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_lt.losses import PixelAUCLoss
from lightning_lt.losses import functional as LF
from lightning_lt.losses import pixel_auc as pixel_auc_module

TRANSFORMS = ("ovo", "ova")
SURROGATES = ("square", "hinge", "exp")
VARIANTS = list(itertools.product(TRANSFORMS, SURROGATES))
IGNORE = 255


def surrogate_of_pairs(diff: Tensor, surrogate: str, gamma: float) -> Tensor:
    """The surrogate of every pair, ``diff = a_p - b_q``."""
    if surrogate == "square":
        return 0.5 * (gamma - diff) ** 2
    if surrogate == "hinge":
        return (gamma - diff).clamp_min(0)  # the real max(0, .): the loss claims the clip never acts
    return torch.exp(-gamma * diff)


def brute_force(
    logits: Tensor, target: Tensor, gamma: float, transform: str, surrogate: str, ignore_index: Optional[int]
) -> Tensor:
    """O(pairs): loops over classes i, j and the full matrix of score differences of each pair of groups."""
    if logits.ndim == 4:
        logits = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        target = target.reshape(-1)
    scores = torch.sigmoid(logits.double())
    if ignore_index is not None:
        keep = target != ignore_index
        scores, target = scores[keep], target[keep]
    num_classes = scores.shape[1]
    present = [c for c in range(num_classes) if (target == c).any()]
    k = len(present)
    total = logits.sum() * 0.0
    if k < 2:
        return total
    for i in present:
        pos = scores[target == i, i]
        if transform == "ovo":
            for j in present:
                if j != i:
                    neg = scores[target == j, i]
                    pair_mean = surrogate_of_pairs(pos[:, None] - neg[None, :], surrogate, gamma).mean()
                    total = total + pair_mean / (k * (k - 1))
        else:
            neg = scores[target != i, i]
            total = total + surrogate_of_pairs(pos[:, None] - neg[None, :], surrogate, gamma).mean()
    return total


def make_inputs(
    seed: int, batch: int = 2, num_classes: int = 7, size: tuple[int, int] = (5, 6),
    classes: Optional[list[int]] = None, ignore_fraction: float = 0.2, dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Random logits and a target drawn from ``classes`` (default: a subset, so some classes are absent),
    with about ``ignore_fraction`` of the pixels set to ``IGNORE``."""
    generator = torch.Generator().manual_seed(seed)
    if classes is None:
        classes = sorted(torch.randperm(num_classes, generator=generator)[: num_classes - 2].tolist())
    logits = scale * torch.randn(batch, num_classes, *size, generator=generator, dtype=dtype)
    choice = torch.randint(0, len(classes), (batch, *size), generator=generator)
    target = torch.tensor(classes)[choice]
    ignored = torch.rand(batch, *size, generator=generator) < ignore_fraction
    return logits, target.masked_fill(ignored, IGNORE)


def value_and_grad(fn, logits: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.detach().requires_grad_(True)
    value = fn(logits)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_matches_brute_force_float64(transform: str, surrogate: str, seed: int) -> None:
    gamma = 1.0 + 0.5 * seed
    logits, target = make_inputs(seed)
    loss = PixelAUCLoss(gamma=gamma, transform=transform, surrogate=surrogate, ignore_index=IGNORE)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    expected, expected_grad = value_and_grad(
        lambda x: brute_force(x, target, gamma, transform, surrogate, IGNORE), logits
    )
    assert value.dtype == torch.float64
    assert value.item() > 0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-10)
    # ignored pixels get no gradient
    assert grad.permute(0, 2, 3, 1)[target == IGNORE].abs().max() == 0


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_matches_brute_force_float32(transform: str, surrogate: str) -> None:
    logits, target = make_inputs(3, batch=2, size=(8, 8), dtype=torch.float32)
    value, grad = value_and_grad(
        lambda x: LF.pixel_auc_loss(x, target, 1.0, transform, surrogate, ignore_index=IGNORE), logits
    )
    expected, expected_grad = value_and_grad(
        lambda x: brute_force(x.double(), target, 1.0, transform, surrogate, IGNORE), logits
    )
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_flat_input_no_ignore_index(transform: str, surrogate: str) -> None:
    """``[P, C]`` logits with ``ignore_index=None``: every pixel counts."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (40,), generator=generator)  # class 4 absent
    value, grad = value_and_grad(lambda x: LF.pixel_auc_loss(x, target, 2.0, transform, surrogate), logits)
    expected, expected_grad = value_and_grad(lambda x: brute_force(x, target, 2.0, transform, surrogate, None), logits)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-10)
    # the same pixels as [1, C, 5, 8] give the same loss
    image = logits.t().reshape(1, 5, 5, 8)
    torch.testing.assert_close(LF.pixel_auc_loss(image, target.reshape(1, 5, 8), 2.0, transform, surrogate), value)


def test_many_classes_brute_force() -> None:
    """171 channels (COCO-Stuff), few pixels: most classes absent, many present."""
    logits, target = make_inputs(5, batch=2, num_classes=171, size=(6, 6), classes=list(range(171)),
                                 ignore_fraction=0.1)
    value, grad = value_and_grad(lambda x: LF.pixel_auc_loss(x, target, ignore_index=IGNORE), logits)
    expected, expected_grad = value_and_grad(lambda x: brute_force(x, target, 1.0, "ovo", "square", IGNORE), logits)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_many_classes_large_image_runs(transform: str, surrogate: str) -> None:
    """C = 171 on 4 x 64 x 64 pixels (~2.8M scores): finite value and gradient, all classes present."""
    logits, target = make_inputs(6, batch=4, num_classes=171, size=(64, 64), classes=list(range(171)),
                                 dtype=torch.float32)
    value, grad = value_and_grad(lambda x: LF.pixel_auc_loss(x, target, 1.0, transform, surrogate, IGNORE), logits)
    assert torch.isfinite(value) and value > 0
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_number_of_tensor_ops_does_not_grow_with_classes(transform: str, surrogate: str) -> None:
    """No Python loop over classes: 3 and 60 classes run the same number of torch calls."""
    calls = []
    for num_classes in (3, 60):
        logits, target = make_inputs(14, num_classes=num_classes, size=(8, 8), classes=list(range(num_classes)))
        logits.requires_grad_(True)
        with _CountCalls() as counter:
            LF.pixel_auc_loss(logits, target, 1.0, transform, surrogate, IGNORE).backward()
        calls.append(counter.calls)
    assert calls[0] == calls[1]


def test_hand_computed_two_classes() -> None:
    # sigmoid(log 3) = 3/4. Pixels (s_0, s_1): (1/2, 1/2), (3/4, 1/2), (1/2, 3/4); labels 0, 0, 1; gamma = 1.
    # class 0: a in {1/2, 3/4}, b = 1/2: pairs (1 - 0)^2 / 2 = 1/2 and (1 - 1/4)^2 / 2 = 9/32 -> mean 25/64
    # class 1: a = 3/4, b in {1/2, 1/2}: both (1 - 1/4)^2 / 2 = 9/32 -> mean 9/32
    # ovo: (25/64 + 18/64) / (K (K - 1) = 2) = 43/128
    log3 = torch.tensor(3.0, dtype=torch.float64).log().item()
    logits = torch.tensor([[0.0, 0.0], [log3, 0.0], [0.0, log3]], dtype=torch.float64)
    target = torch.tensor([0, 0, 1])
    assert LF.pixel_auc_loss(logits, target).item() == pytest.approx(43 / 128, rel=1e-12)
    # ova with two classes: the same pairs, summed without the 1 / K: 25/64 + 9/32 = 43/64
    assert LF.pixel_auc_loss(logits, target, transform="ova").item() == pytest.approx(43 / 64, rel=1e-12)


def test_resizes_logits_to_target() -> None:
    logits, target = make_inputs(7, batch=2, size=(8, 10))
    small = logits[:, :, ::2, ::2].contiguous()  # [2, 7, 4, 5]
    resized = F.interpolate(small, size=(8, 10), mode="bilinear", align_corners=False)
    loss = PixelAUCLoss(ignore_index=IGNORE)
    value, grad = value_and_grad(lambda x: loss(x, target), small)
    expected, expected_grad = value_and_grad(
        lambda x: brute_force(F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False), target, 1.0,
                              "ovo", "square", IGNORE), small
    )
    torch.testing.assert_close(value, loss(resized, target))
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
@pytest.mark.parametrize("case", ["one_class", "all_ignored", "no_pixels"])
def test_fewer_than_two_classes_gives_connected_zero(transform: str, surrogate: str, case: str) -> None:
    logits, target = make_inputs(8)
    if case == "one_class":
        target = torch.where(target == IGNORE, target, torch.full_like(target, 3))
    elif case == "all_ignored":
        target = torch.full_like(target, IGNORE)
    else:
        logits, target = logits[:0], target[:0]
    loss = PixelAUCLoss(transform=transform, surrogate=surrogate, ignore_index=IGNORE)
    logits.requires_grad_(True)
    value = loss(logits, target)
    assert value.item() == 0.0
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.equal(grad, torch.zeros_like(logits))


def test_half_precision_is_computed_in_float32() -> None:
    logits, target = make_inputs(9, size=(6, 6), dtype=torch.float32)
    low = logits.to(torch.bfloat16).requires_grad_(True)
    value = PixelAUCLoss(ignore_index=IGNORE)(low, target)
    assert value.dtype == torch.float32
    expected = brute_force(low.detach().double(), target, 1.0, "ovo", "square", IGNORE)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


def test_ignore_index_attribute_set_later() -> None:
    """The segmentation task fills in ``ignore_index`` after construction."""
    logits, target = make_inputs(10)
    loss = PixelAUCLoss()
    with pytest.raises(ValueError, match="255"):
        loss(logits, target)
    loss.ignore_index = IGNORE
    expected = brute_force(logits, target, 1.0, "ovo", "square", IGNORE)
    torch.testing.assert_close(loss(logits, target), expected)
    torch.testing.assert_close(loss(logits, target.to(torch.uint8)), expected)  # uint8 label maps


def test_ignore_index_inside_class_range() -> None:
    """An ignore index that is also a class (here 0) drops that class's pixels."""
    logits, target = make_inputs(11, classes=[0, 1, 2, 4], ignore_fraction=0.0)
    value = LF.pixel_auc_loss(logits, target, transform="ova", surrogate="exp", ignore_index=0)
    torch.testing.assert_close(value, brute_force(logits, target, 1.0, "ova", "exp", 0), rtol=1e-5, atol=0.0)


def test_bad_target_value_raises() -> None:
    logits, target = make_inputs(12)
    target[0, 0, 0] = 7  # == C
    with pytest.raises(ValueError, match=r"7 .*outside \[0, 7\).*ignore_index"):
        PixelAUCLoss(ignore_index=IGNORE)(logits, target)
    target[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"-1 outside .*HINT: if these label unlabelled pixels, set `ignore_index`"):
        LF.pixel_auc_loss(logits, target, ignore_index=IGNORE)


def test_bad_target_value_raises_on_devices_without_async_assertions(monkeypatch) -> None:
    """Devices without ``torch._assert_async`` (e.g. MPS) check on the host, with the same message."""
    monkeypatch.setattr(pixel_auc_module, "_ASYNC_ASSERT_DEVICES", ())
    logits, target = make_inputs(12)
    expected = brute_force(logits, target, 1.0, "ovo", "square", IGNORE)
    torch.testing.assert_close(PixelAUCLoss(ignore_index=IGNORE)(logits, target), expected)
    target[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"9 outside \[0, 7\).*HINT"):
        PixelAUCLoss(ignore_index=IGNORE)(logits, target)


@pytest.mark.parametrize(("transform", "surrogate"), VARIANTS)
def test_no_host_syncs(transform: str, surrogate: str) -> None:
    """Forward and backward never copy a value to the host nor size a tensor by the data (what would block the
    host on a GPU): the label check is an asynchronous assertion, the class counts an ``index_add_``."""
    from tests.host_syncs import HostSyncCounter

    logits, target = make_inputs(13, batch=2, size=(9, 7), dtype=torch.float32)
    small = torch.randn(2, 7, 3, 3, requires_grad=True)  # resized to the target inside the loss
    with HostSyncCounter() as syncs:
        PixelAUCLoss(transform=transform, surrogate=surrogate, gamma=1.0, ignore_index=IGNORE)(
            logits.requires_grad_(True), target
        ).backward()
        LF.pixel_auc_loss(small, target[:, :6, :6], 1.0, transform, surrogate, IGNORE).backward()
    assert syncs.calls == [], syncs.report()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_no_host_syncs_on_cuda() -> None:
    logits, target = make_inputs(13, batch=2, size=(9, 7), dtype=torch.float32)
    logits, target = logits.cuda().requires_grad_(True), target.cuda()
    loss = PixelAUCLoss(ignore_index=IGNORE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss(logits, target)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = brute_force(logits.detach().cpu().double(), target.cpu(), 1.0, "ovo", "square", IGNORE)
    torch.testing.assert_close(value.detach().cpu().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"transform": "ova2"}, "transform.*'ova2'"),
        ({"surrogate": "logistic"}, "surrogate.*'logistic'"),
        ({"surrogate": "hinge", "gamma": 0.5}, r"gamma.*>= 1.*hinge.*0\.5"),
        ({"ignore_index": 2.5}, "ignore_index"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PixelAUCLoss(**kwargs)
    logits, target = make_inputs(13, ignore_fraction=0.0)
    with pytest.raises(ValueError, match=match):
        LF.pixel_auc_loss(logits, target, **kwargs)


def test_hinge_with_gamma_one_is_allowed() -> None:
    assert PixelAUCLoss(surrogate="hinge", gamma=1).gamma == 1.0


@pytest.mark.parametrize(
    ("logits_shape", "target_shape", "match"),
    [
        ((2, 3, 4), (2, 4), "shape"),
        ((2, 1, 4, 4), (2, 4, 4), "at least 2 classes"),
        ((2, 3, 4, 4), (2, 4, 4, 1), r"\[batch, height, width\]"),
        ((2, 3, 4, 4), (3, 4, 4), "batch = 2"),
        ((6, 3), (5,), r"\[pixels\] = \[6\]"),
    ],
)
def test_bad_shapes_raise(logits_shape: tuple, target_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PixelAUCLoss()(torch.randn(logits_shape), torch.zeros(target_shape, dtype=torch.long))


@pytest.mark.parametrize(("height", "width"), [(360, 480), (361, 479), (512, 1024), (97, 33)])
@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_logits_of_a_strided_network_are_resized(height: int, width: int, stride: int) -> None:
    """Output sizes of a network (ceil or floor of size / stride) pass the aspect check."""
    target = torch.randint(0, 3, (1, height, width))
    for h, w in {(-(-height // stride), -(-width // stride)), (height // stride, width // stride)}:
        if min(h, w) > 0:
            assert torch.isfinite(PixelAUCLoss()(torch.randn(1, 3, h, w), target))


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"),
    [((2, 16, 12, 5), (2, 16, 12)), ((2, 32, 32, 5), (2, 32, 32)), ((1, 5, 8, 32), (1, 32, 32))],
)
def test_logits_of_another_aspect_ratio_are_refused(logits_shape: tuple, target_shape: tuple) -> None:
    """Channels-last logits [B, H, W, C] would be resized, distorted, to the target: an error names both
    shapes and the layout to pass."""
    logits, target = torch.randn(logits_shape), torch.zeros(target_shape, dtype=torch.long)
    match = (
        rf"`logits` of shape {re.escape(str(logits_shape))}, read as \[batch, classes, height, width\], for a "
        rf"`target` of shape {re.escape(str(target_shape))}.*different aspect ratios.*HINT: pass logits as "
        r"\[batch, classes, height, width\] \(`logits.permute\(0, 3, 1, 2\)`"
    )
    with pytest.raises(ValueError, match=match):
        PixelAUCLoss()(logits, target)
    with pytest.raises(ValueError, match="different aspect ratios"):
        LF.pixel_auc_loss(logits, target)


def test_bad_dtypes_raise() -> None:
    with pytest.raises(ValueError, match="integer class indices"):
        PixelAUCLoss()(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="floating-point"):
        PixelAUCLoss()(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_extra_repr() -> None:
    loss = PixelAUCLoss(gamma=2, transform="ova", surrogate="exp", ignore_index=255)
    assert repr(loss) == "PixelAUCLoss(gamma=2.0, transform='ova', surrogate='exp', ignore_index=255)"


def test_doctests() -> None:
    result = doctest.testmod(pixel_auc_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
