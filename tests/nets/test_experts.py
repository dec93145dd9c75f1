"""Multi-expert backbones: the official RIDE / SADE CIFAR layout, shared vs per-expert parts, output scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lt.nets import CosineClassifier, MultiExpertCIFARResNet, MultiExpertTorchvisionResNet


def official_parameter_count(num_experts: int, n: int, dim2: int, dim3: int, num_classes: int) -> int:
    """Parameters of ``ResNet_s`` (SADE ``model/ldam_drw_resnets/expert_resnet_cifar.py``, RIDE
    ``ride_resnet_cifar.py``) with ``NormedLinear`` classifiers: conv weights (no bias), BatchNorm weight + bias,
    option-A shortcuts without parameters, ``[dim3, C]`` classifier weights."""

    def block(cin: int, cout: int) -> int:
        return 9 * cin * cout + 9 * cout * cout + 4 * cout

    def stage(cin: int, cout: int) -> int:
        return block(cin, cout) + (n - 1) * block(cout, cout)

    shared = 9 * 3 * 16 + 2 * 16 + stage(16, 16)
    expert = stage(16, dim2) + stage(dim2, dim3) + dim3 * num_classes
    return shared + num_experts * expert


@pytest.mark.parametrize("reduce_dimension, dims", [(True, (24, 48)), (False, (32, 64))])
def test_cifar_layout_matches_official(reduce_dimension, dims):
    net = MultiExpertCIFARResNet(100, num_experts=3, depth=32, reduce_dimension=reduce_dimension)
    assert sum(p.numel() for p in net.parameters()) == official_parameter_count(3, 5, *dims, 100)
    assert net.num_features == dims[1] and len(net.layer2s) == len(net.layer3s) == len(net.linears) == 3
    assert all(isinstance(head, CosineClassifier) for head in net.linears)
    assert net.layer2s[0][0].conv1.out_channels == dims[0]


def test_experts_share_only_the_early_layers():
    torch.manual_seed(0)
    net = MultiExpertCIFARResNet(5, num_experts=3, depth=8)
    out = net(torch.randn(4, 3, 16, 16))
    assert out.shape == (3, 4, 5)
    out[1].sum().backward()
    assert net.layer1[0].conv1.weight.grad.abs().sum() > 0  # shared
    assert net.layer3s[1][0].conv1.weight.grad.abs().sum() > 0
    for e in (0, 2):  # other experts untouched
        params = list(net.layer2s[e].parameters()) + list(net.linears[e].parameters())
        assert all(p.grad is None or not p.grad.any() for p in params)


def test_cosine_logits_are_scaled_by_s_and_linear_heads_are_not():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    cosine = MultiExpertCIFARResNet(4, num_experts=2, depth=8, s=30.0)(x)
    assert cosine.abs().max() <= 30.0 + 1e-4 and cosine.abs().max() > 1.0
    linear = MultiExpertCIFARResNet(4, num_experts=2, depth=8, use_norm=False)
    assert linear.s == 1.0 and isinstance(linear.linears[0], nn.Linear)


def test_torchvision_experts_split_after_layer2():
    net = MultiExpertTorchvisionResNet(7, arch="resnet18", num_experts=2, reduce_dimension=True)
    out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2, 7) and net.num_features == 384
    assert net.layer3s[0][0].conv1.out_channels == 192 and net.layer3s[0][0].conv1.in_channels == 128
    assert not hasattr(net, "fc") and len(net.layer4s) == 2


def test_bad_expert_counts_and_arch():
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="num_experts` >= 2.*HINT"):
            MultiExpertCIFARResNet(10, num_experts=bad)
    with pytest.raises(ValueError, match="num_experts` >= 2"):
        MultiExpertTorchvisionResNet(10, arch="resnet18", num_experts=1)
    with pytest.raises(ValueError, match="Unknown `arch`.*HINT"):
        MultiExpertTorchvisionResNet(10, arch="vit_b_16")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        MultiExpertCIFARResNet(10, depth=30)
