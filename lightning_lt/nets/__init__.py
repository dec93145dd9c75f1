"""Backbones and classifier heads (CIFAR ResNets, torchvision feature extractors, MLP)."""

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
from lightning_lt.nets.heads import CosineClassifier, build_head
from lightning_lt.nets.mlp import MLP
from lightning_lt.nets.segmentation import TorchvisionSegmentation, available_segmentation_archs
from lightning_lt.nets.torchvision_nets import TorchvisionBackbone, available_archs

__all__ = [
    "MLP",
    "BasicBlock",
    "CIFARResNet",
    "CosineClassifier",
    "OptionAShortcut",
    "TorchvisionBackbone",
    "TorchvisionSegmentation",
    "available_archs",
    "available_segmentation_archs",
    "build_head",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
