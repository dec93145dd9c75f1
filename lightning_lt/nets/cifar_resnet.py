"""The CIFAR ResNet of the long-tail literature (ResNet-32 of LDAM-DRW, He et al. 2016, Sec. 4.2)."""

import numbers

import torch.nn.functional as F
from torch import Tensor, nn


class OptionAShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample spatially by ``stride`` and zero-pad the new channels.

    ``out[:, pad_front : pad_front + in_channels] = x[:, :, ::stride, ::stride]``, all other channels 0, with
    ``pad_front = (out_channels - in_channels) // 2`` (for ``16 -> 32``: 8 zero channels on each side).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (``>= in_channels``).
        stride: spatial subsampling factor.

    Example:
        >>> import torch
        >>> out = OptionAShortcut(2, 4, stride=2)(torch.ones(1, 2, 4, 4))
        >>> tuple(out.shape), out[0, :, 0, 0].tolist()
        ((1, 4, 2, 2), [0.0, 1.0, 1.0, 0.0])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"Expected `out_channels` >= `in_channels` for a zero-padding shortcut, "
                f"got {out_channels} < {in_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))`` with an option-A shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the shortcut's subsampling).

    Example:
        >>> import torch
        >>> tuple(BasicBlock(16, 32, stride=2)(torch.zeros(2, 16, 32, 32)).shape)
        (2, 32, 16, 16)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CIFARResNet(nn.Module):
    """CIFAR ResNet backbone (ResNet-20/32/44/56/110) returning pooled features.

    ``conv3x3(3 -> w) -> BN -> ReLU -> 3 stages of n BasicBlocks with w, 2w, 4w channels (strides 1, 2, 2)
    -> global average pool``, ``depth = 6n + 2``, option-A (zero-padding) shortcuts, ``kaiming_normal_``
    initialisation of every ``Conv2d`` weight (BatchNorm: weight 1, bias 0). With ``depth=32`` and
    ``width=16`` this is the ResNet-32 of LDAM-DRW without its classifier (0.46M parameters); attach a head
    (:func:`~lightning_lt.nets.heads.build_head`) on ``num_features = 4 * width`` features. LDAM-DRW's
    ``_weights_init`` also gives its ``nn.Linear`` classifier ``kaiming_normal_`` weights (the bias keeps
    PyTorch's default; its ``NormedLinear`` is not an ``nn.Linear`` and keeps its own init): the class attribute
    ``head_init = "kaiming_normal"`` tells :class:`~lightning_lt.tasks.LongTailClassifier` (``head_init="auto"``)
    to do the same.

    Args:
        depth: total depth ``6n + 2`` (20, 32, 44, 56, 110, ...).
        width: channels of the first stage (16 in the literature).

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2`` with ``n >= 1`` or ``width < 1``.

    Example:
        >>> import torch
        >>> net = CIFARResNet(depth=32)
        >>> net.num_features, tuple(net(torch.zeros(2, 3, 32, 32)).shape)
        (64, (2, 64))
    """

    #: Weight init of a linear classifier on these features (LDAM-DRW's ``_weights_init``), read by
    #: :class:`~lightning_lt.tasks.LongTailClassifier` with ``head_init="auto"``.
    head_init = "kaiming_normal"

    def __init__(self, depth: int = 32, width: int = 16) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"Expected `depth` of the form 6n + 2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}"
            )
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(f"Expected `width` to be a positive integer, got {width!r}")
        self.depth, self.width = int(depth), int(width)
        n = (self.depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_stage(width, width, n, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, n, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, n, stride=2)
        self.num_features = 4 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, num_features]`` of images ``[B, 3, H, W]`` (32 x 32 for CIFAR)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))


def resnet20(width: int = 16) -> CIFARResNet:
    """CIFAR ResNet-20 backbone (``n = 3``).

    Example:
        >>> resnet20().num_features
        64
    """
    return CIFARResNet(20, width)


def resnet32(width: int = 16) -> CIFARResNet:
    """CIFAR ResNet-32 backbone (``n = 5``), the long-tail CIFAR standard.

    Example:
        >>> sum(p.numel() for p in resnet32().parameters())
        463504
    """
    return CIFARResNet(32, width)


def resnet44(width: int = 16) -> CIFARResNet:
    """CIFAR ResNet-44 backbone (``n = 7``).

    Example:
        >>> resnet44().depth
        44
    """
    return CIFARResNet(44, width)


def resnet56(width: int = 16) -> CIFARResNet:
    """CIFAR ResNet-56 backbone (``n = 9``).

    Example:
        >>> resnet56().depth
        56
    """
    return CIFARResNet(56, width)


def resnet110(width: int = 16) -> CIFARResNet:
    """CIFAR ResNet-110 backbone (``n = 18``).

    Example:
        >>> resnet110().depth
        110
    """
    return CIFARResNet(110, width)
