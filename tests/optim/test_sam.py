"""SAM-family optimizer wrappers in a plain PyTorch loop, against the re-implementation in sam_reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lt.optim import SAM, SSESAM, ImbSAM, preserve_batchnorm_stats
from tests.optim.sam_reference import TAIL, ReferenceSGD, gradient, problem, reference_run, sam_gradient


class Linear(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.weight = nn.Parameter(params[0].clone())
        self.bias = nn.Parameter(params[1].clone())

    def forward(self, x):
        return x @ self.weight + self.bias


def make(wrapper_cls, **kwargs):
    x, y, params = problem()
    model = Linear(params)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return x, y, model, wrapper_cls(base, **kwargs)


def assert_params(model, expected):
    torch.testing.assert_close(model.weight.detach(), expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.bias.detach(), expected[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_sam_and_asam_three_steps(adaptive, rho):
    x, y, model, optimizer = make(SAM, rho=rho, adaptive=adaptive)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = optimizer.step(closure)
    assert loss is not None
    assert_params(model, reference_run("sam", 3, rho=rho, adaptive=adaptive))
    # and it differs from plain SGD: the test can fail
    assert not torch.allclose(model.weight, reference_run("sgd", 3)[0], atol=1e-4)


def per_sample_closure(model, x, y):
    return lambda: (F.cross_entropy(model(x), y, reduction="none"), y)


def test_imbsam_three_steps():
    x, y, model, optimizer = make(ImbSAM, tail_classes=TAIL.tolist(), rho=0.05)
    for _ in range(3):
        optimizer.step(per_sample_closure(model, x, y))
    assert_params(model, reference_run("imbsam", 3, rho=0.05))
    assert not torch.allclose(model.weight, reference_run("sam", 3, rho=0.05)[0], atol=1e-4)


@pytest.mark.parametrize("stages", [(1, 1, 1), (2, 2, 2), (1, 1, 2)])
def test_ssesam_three_steps_both_stages(stages):
    x, y, model, optimizer = make(SSESAM, tail_classes=TAIL.tolist(), rho_head=0.05, rho_tail=0.1)
    for stage in stages:
        optimizer.set_stage(stage)
        optimizer.step(per_sample_closure(model, x, y))
    assert_params(model, reference_run("ssesam", 3, stages=stages, rho_head=0.05, rho_tail=0.1))


def test_stage_two_equals_imbsam_with_ssesams_tail_weight():
    _, _, _, optimizer = make(SSESAM, tail_classes=[2], rho_head=0.05, rho_tail=0.1)
    optimizer.set_stage(2)
    assert optimizer.rhos == [0.0, 0.1] and optimizer.tail_weight == 1.0
    stage_two = reference_run("ssesam", 2, stages=(2, 2), rho_tail=0.1)[0]
    assert stage_two.allclose(reference_run("imbsam", 2, rho=0.1, tail_weight=1.0)[0])
    # ImbSAM's published tail weight is 2, SSE-SAM's 1: the defaults differ
    assert not stage_two.allclose(reference_run("imbsam", 2, rho=0.1)[0], atol=1e-4)


@pytest.mark.parametrize("wrapper_cls, default", [(ImbSAM, 2.0), (SSESAM, 1.0)])
def test_tail_weight_defaults_and_group_losses(wrapper_cls, default):
    model = nn.Linear(2, 3)
    optimizer = wrapper_cls(torch.optim.SGD(model.parameters(), lr=0.1), tail_classes=[2])
    assert optimizer.tail_weight == default and optimizer.eps == 1e-16
    losses, target = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 2, 1, 2])
    head = optimizer.group_loss(losses, target, 0)
    tail = optimizer.group_loss(losses, target, 1)
    assert head.item() == pytest.approx((1.0 + 3.0) / 4)
    assert tail.item() == pytest.approx(default * (2.0 + 4.0) / 4)
    # a plain step's loss (group None) is L_head + L_tail, with the same tail weight
    assert optimizer.group_loss(losses, target, None).item() == pytest.approx((head + tail).item())


@pytest.mark.parametrize("tail_weight", [1.0, 2.0, 3.5])
def test_imbsam_tail_weight_against_the_reference(tail_weight):
    x, y, model, optimizer = make(ImbSAM, tail_classes=TAIL.tolist(), rho=0.05, tail_weight=tail_weight)
    for _ in range(3):
        optimizer.step(per_sample_closure(model, x, y))
    assert_params(model, reference_run("imbsam", 3, rho=0.05, tail_weight=tail_weight))


def test_plain_steps_of_sam_every_use_the_tail_weight():
    """With ``sam_every=2`` step 1 is an ImbSAM step, step 2 a plain one on ``L_head + 2 L_tail``."""
    x, y, model, optimizer = make(ImbSAM, tail_classes=TAIL.tolist(), rho=0.05, sam_every=2)
    for _ in range(2):
        optimizer.step(per_sample_closure(model, x, y))
    sgd, params = ReferenceSGD(0.1, 0.9, 1e-3), problem()[2]
    head, tail = gradient(params, x, y, "head"), sam_gradient(params, x, y, "tail", 0.05, tail_weight=2.0)
    params = sgd.step(params, [h + t for h, t in zip(head, tail)])
    head, tail = gradient(params, x, y, "head"), gradient(params, x, y, "tail", tail_weight=2.0)
    assert_params(model, sgd.step(params, [h + t for h, t in zip(head, tail)]))


def test_param_groups_and_state_are_shared_with_the_base_optimizer():
    x, y, model, optimizer = make(SAM, rho=0.05)
    base = optimizer.base_optimizer
    assert optimizer.param_groups is base.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    state = optimizer.state_dict()
    assert state.keys() == base.state_dict().keys()
    fresh_x, fresh_y, fresh_model, fresh = make(SAM, rho=0.05)
    fresh.load_state_dict(state)
    momentum = [s["momentum_buffer"] for s in fresh.base_optimizer.state.values()]
    assert len(momentum) == 2 and all(m.abs().sum() > 0 for m in momentum)


def test_sam_every_k_alternates_sam_and_plain_steps():
    x, y, model, optimizer = make(SAM, rho=0.05, sam_every=2)
    passes = []

    def closure():
        passes.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        optimizer.step(closure)
    assert len(passes) == 2 + 1 + 2 + 1


def test_batchnorm_statistics_are_those_of_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    reference(x)  # one forward in training mode
    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 1


def test_preserve_batchnorm_stats_restores():
    bn = nn.BatchNorm1d(2)
    with preserve_batchnorm_stats(bn):
        bn(torch.randn(4, 2) + 5)
    assert bn.running_mean.abs().sum() == 0 and bn.num_batches_tracked.item() == 0


def test_errors_name_the_problem():
    model = nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(base, rho=-1.0)
    with pytest.raises(ValueError, match="sam_every"):
        SAM(base, sam_every=0)
    with pytest.raises(ValueError, match="already a SAM"):
        SAM(SAM(base))
    with pytest.raises(ValueError, match="closure"):
        SAM(base).step()
    imb = ImbSAM(base, tail_classes=[1])
    with pytest.raises(ValueError, match=r"\(per_sample_loss, target\)"):
        imb.step(lambda: F.cross_entropy(model(torch.ones(2, 2)), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="stage"):
        SSESAM(base, tail_classes=[1]).set_stage(3)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="tail_weight.*> 0"):
            ImbSAM(base, tail_classes=[1], tail_weight=bad)
