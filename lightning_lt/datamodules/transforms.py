"""Standard image transforms of the long-tailed literature.

CIFAR (LDAM-DRW): ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``.
ImageNet-LT / Places-LT / iNaturalist: ``RandomResizedCrop(224)``, ``RandomHorizontalFlip`` for training,
``Resize(256)`` + ``CenterCrop(224)`` for evaluation.

The ``*_tensor_*`` variants (:class:`TensorCIFARAugment`) take ``uint8`` ``[3, H, W]`` tensors
(images decoded once and kept in memory) and give the same output as the PIL versions for the same
torch RNG state: they draw crop offsets and flips like torchvision, pad with zeros, and scale by 1/255
like ``ToTensor`` before normalising.
"""

from collections.abc import Sequence
from typing import Optional

import torch
from torchvision import transforms as T

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TensorCIFARAugment",
    "cifar_eval_transform",
    "cifar_tensor_eval_transform",
    "cifar_tensor_train_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

#: CIFAR-10 channel statistics as used by LDAM-DRW (for CIFAR-10 and CIFAR-100 alike).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
#: CIFAR-100 training-set channel statistics.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(size: Optional[int]) -> list:
    # Resize((s, s)) is the identity for images that already have that size.
    return [] if size is None else [T.Resize((size, size), antialias=True)]


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: int = 32,
    padding: int = 4,
    resize: Optional[int] = None,
) -> T.Compose:
    """CIFAR training augmentation on PIL images: zero-pad ``padding``, random ``size`` crop, flip, normalise.

    Args:
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation.
        size: crop size (32 for CIFAR).
        padding: zero padding on each side before cropping (4 for CIFAR).
        resize: if set, first resize to ``(resize, resize)`` (for folders of other image sizes).

    Example:
        >>> from PIL import Image
        >>> cifar_train_transform()(Image.new("RGB", (32, 32))).shape
        torch.Size([3, 32, 32])
    """
    return T.Compose(
        _resize(resize)
        + [
            T.RandomCrop(size, padding=padding),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def cifar_eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, resize: Optional[int] = None
) -> T.Compose:
    """CIFAR evaluation transform on PIL images: ``ToTensor`` + ``Normalize`` (after an optional resize).

    Example:
        >>> from PIL import Image
        >>> x = cifar_eval_transform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(Image.new("RGB", (32, 32), "white"))
        >>> float(x.min()), tuple(x.shape)
        (1.0, (3, 32, 32))
    """
    return T.Compose(_resize(resize) + [T.ToTensor(), T.Normalize(mean, std)])


class TensorCIFARAugment:
    """Random crop with zero padding, horizontal flip and normalisation of a ``uint8 [3, H, W]`` tensor.

    The lean equivalent of ``Compose([RandomCrop(size, padding), RandomHorizontalFlip(),
    ConvertImageDtype(float32), Normalize(mean, std)])`` (several times faster per image): it draws
    the crop offsets and the flip from the torch RNG exactly as torchvision does (``randint`` for the
    row, ``randint`` for the column, ``rand(1) < 0.5`` for the flip), so for the same RNG state it returns
    the same tensor as :func:`cifar_train_transform` applied to the PIL image.
    With ``train=False`` it only converts and normalises.
    """

    def __init__(
        self,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        size: int = 32,
        padding: int = 4,
        train: bool = True,
    ) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.size = size
        self.padding = padding
        self.train = train

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.train:
            p = self.padding
            if p > 0:
                image = torch.nn.functional.pad(image, (p, p, p, p))
            height, width = image.shape[-2:]
            if height < self.size or width < self.size:
                raise ValueError(f"Crop size {self.size} is larger than the padded image {(height, width)}")
            if height != self.size or width != self.size:
                i = int(torch.randint(0, height - self.size + 1, size=(1,)).item())
                j = int(torch.randint(0, width - self.size + 1, size=(1,)).item())
                image = image[..., i : i + self.size, j : j + self.size]
            if torch.rand(1) < 0.5:
                image = image.flip(-1)
        return image.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
            f"size={self.size}, padding={self.padding}, train={self.train})"
        )


def cifar_tensor_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, size: int = 32, padding: int = 4
) -> TensorCIFARAugment:
    """:func:`cifar_train_transform` for ``uint8`` ``[3, H, W]`` tensors (same random draws, same output).

    Example:
        >>> x = torch.zeros(3, 32, 32, dtype=torch.uint8)
        >>> cifar_tensor_train_transform()(x).dtype
        torch.float32
    """
    return TensorCIFARAugment(mean, std, size=size, padding=padding, train=True)


def cifar_tensor_eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> TensorCIFARAugment:
    """:func:`cifar_eval_transform` for ``uint8`` ``[3, H, W]`` tensors.

    Example:
        >>> x = torch.full((3, 2, 2), 255, dtype=torch.uint8)
        >>> cifar_tensor_eval_transform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(x)[0, 0, 0].item()
        1.0
    """
    return TensorCIFARAugment(mean, std, train=False)


def imagenet_train_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """ImageNet-style training augmentation: ``RandomResizedCrop(size)``, flip, ``ToTensor``, ``Normalize``.

    Example:
        >>> from PIL import Image
        >>> imagenet_train_transform(64)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    return T.Compose(
        [
            T.RandomResizedCrop(size, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def imagenet_eval_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """ImageNet-style evaluation: ``Resize(round(size * 256 / 224))``, ``CenterCrop(size)``, ``ToTensor``, ``Normalize``.

    Example:
        >>> from PIL import Image
        >>> imagenet_eval_transform(224)(Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224), antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
