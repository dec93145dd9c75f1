"""Backbones and classifier heads (CIFAR ResNets, torchvision feature extractors, pretrained EfficientNet-Lite, MLP)."""

from lightning_lt.nets.cifar_resnet import (
    BasicBlock,
    CIFARResNet,
    OptionAShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lightning_lt.nets.efficientnet import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EfficientNetLite,
    EfficientNetLiteSegmentation,
    available_efficientnet_lite,
    efficientnet_lite_fpn,
    efficientnet_lite_weights_path,
)
from lightning_lt.nets.experts import MultiExpertCIFARResNet, MultiExpertTorchvisionResNet, expert_resnet_archs
from lightning_lt.nets.heads import CosineClassifier, build_head
from lightning_lt.nets.mlp import MLP
from lightning_lt.nets.segmentation import TorchvisionSegmentation, available_segmentation_archs
from lightning_lt.nets.torchvision_nets import TorchvisionBackbone, available_archs

__all__ = [
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "MLP",
    "MultiExpertCIFARResNet",
    "MultiExpertTorchvisionResNet",
    "BasicBlock",
    "CIFARResNet",
    "CosineClassifier",
    "EfficientNetLite",
    "EfficientNetLiteSegmentation",
    "OptionAShortcut",
    "TorchvisionBackbone",
    "TorchvisionSegmentation",
    "available_archs",
    "available_efficientnet_lite",
    "available_segmentation_archs",
    "build_head",
    "efficientnet_lite_fpn",
    "efficientnet_lite_weights_path",
    "expert_resnet_archs",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
