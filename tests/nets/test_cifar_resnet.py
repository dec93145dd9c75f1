import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lt.nets import (
    BasicBlock,
    CIFARResNet,
    OptionAShortcut,
    build_head,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)


def _expected_params(depth: int, width: int = 16) -> int:
    """Parameter count from the architecture: conv3x3 (no bias) + BN (weight, bias) per layer, no head."""
    n = (depth - 2) // 6

    def conv3x3(c_in, c_out):
        return 9 * c_in * c_out

    def bn(c):
        return 2 * c

    total = conv3x3(3, width) + bn(width)
    c_in = width
    for c_out in (width, 2 * width, 4 * width):
        for _ in range(n):  # BasicBlock: two conv3x3 + two BN; option-A shortcut has no parameters
            total += conv3x3(c_in, c_out) + bn(c_out) + conv3x3(c_out, c_out) + bn(c_out)
            c_in = c_out
    return total


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_parameter_count():
    net = resnet32()
    expected = _expected_params(32)
    # stem 432 + 32; stage 1: 5 x (2 x 2304 + 64); stage 2: 13952 + 4 x 18560; stage 3: 55552 + 4 x 73984
    assert expected == 432 + 32 + 5 * 4672 + (13952 + 4 * 18560) + (55552 + 4 * 73984) == 463_504
    assert _n_params(net) == expected
    assert round(_n_params(net) / 1e6, 2) == 0.46
    # with LDAM-DRW's 10-class linear classifier: 0.46M as reported for ResNet-32
    assert _n_params(net) + _n_params(build_head("linear", net.num_features, 10)) == 464_154


@pytest.mark.parametrize(("factory", "depth"), [(resnet20, 20), (resnet32, 32), (resnet44, 44), (resnet56, 56)])
def test_parameter_count_and_layers_by_depth(factory, depth):
    net = factory()
    assert net.depth == depth
    assert _n_params(net) == _expected_params(depth)
    # depth counts the weighted layers: all 3x3 convs plus the (absent here) classifier
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 3 * (depth - 2) // 6


def test_width_changes_features_and_params():
    net = CIFARResNet(depth=20, width=8)
    assert net.num_features == 32
    assert _n_params(net) == _expected_params(20, width=8)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize("size", [32, 16, 40])
def test_output_shape(size):
    net = resnet20().eval()
    out = net(torch.randn(3, 3, size, size))
    assert out.shape == (3, net.num_features) == (3, 64)


def test_forward_is_conv_stages_then_global_average_pool():
    torch.manual_seed(0)
    net = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    h = F.relu(net.bn1(net.conv1(x)))
    h = net.layer3(net.layer2(net.layer1(h)))
    assert h.shape == (2, 64, 8, 8)  # 32 -> 16 -> 8 through the two stride-2 stages
    torch.testing.assert_close(net(x), F.avg_pool2d(h, 8).flatten(1))
    # features are post-ReLU averages: non-negative
    assert (net(x) >= 0).all()


def test_backward_reaches_the_stem():
    net = resnet20()
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_option_a_shortcut_subsamples_and_zero_pads():
    net = resnet20()
    block = net.layer2[0]
    assert isinstance(block.shortcut, OptionAShortcut)
    assert _n_params(block.shortcut) == 0
    assert isinstance(net.layer2[1].shortcut, nn.Identity) and isinstance(net.layer1[0].shortcut, nn.Identity)
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    # 16 -> 32 channels: 8 zero channels, the subsampled input, 8 zero channels
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 16, 16))
    assert torch.equal(out[:, 24:], torch.zeros(2, 8, 16, 16))
    for c in range(16):
        for i in range(16):
            for j in range(16):
                assert out[0, 8 + c, i, j] == x[0, c, 2 * i, 2 * j]


def test_option_a_shortcut_uneven_padding_and_errors():
    out = OptionAShortcut(3, 6, stride=1)(torch.ones(1, 3, 2, 2))
    assert out[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="out_channels"):
        OptionAShortcut(8, 4)


def test_basic_block_output_is_relu_of_residual_sum():
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    residual = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), F.relu(residual + OptionAShortcut(16, 32, 2)(x)))


def test_kaiming_normal_init():
    torch.manual_seed(0)
    net = resnet56()
    # kaiming_normal_ (fan_in, ReLU gain): std = sqrt(2 / fan_in); check on the 64 -> 64 convs (36,864 weights each)
    weights = torch.cat([b.conv2.weight.flatten() for b in net.layer3])
    assert weights.mean().abs() < 0.002
    assert weights.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)
    stem = net.conv1.weight
    assert stem.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_linear_head_init_follows_ldam_drw():
    """LDAM-DRW's `_weights_init` covers the `nn.Linear` classifier too: the backbone asks for the same init."""
    net = resnet32()
    assert net.head_init == "kaiming_normal"
    torch.manual_seed(0)
    head = build_head("linear", net.num_features, 1000, init=net.head_init)
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)


@pytest.mark.parametrize("depth", [31, 30, 10, 2, 0, -4, 32.0, True])
def test_depth_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CIFARResNet(depth=depth)


@pytest.mark.parametrize("width", [0, -16, 1.5])
def test_invalid_width(width):
    with pytest.raises(ValueError, match="width"):
        CIFARResNet(width=width)


def test_smallest_depth():
    net = CIFARResNet(depth=8)
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 3
