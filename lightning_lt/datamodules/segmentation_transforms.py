"""Joint image / mask transforms for semantic segmentation (``torchvision.transforms.v2``).

The image is a :class:`~torchvision.tv_tensors.Image` (``uint8 [3, H, W]``), the label map a
:class:`~torchvision.tv_tensors.Mask` (integer ``[H, W]``); one v2 pipeline draws every random
parameter once and applies it to both, so the geometry of the two always agrees. Images are resized
bilinearly (with antialiasing); masks always with ``nearest-exact`` interpolation (the same half-pixel
grid as the bilinear image, so a label moves with its pixels), which never mixes label values and keeps
the mask's integer dtype. Padding fills the image with 0 and the mask with the ignore index.

Training (MMSegmentation's recipe): :class:`RandomScale` (a factor drawn uniformly from
``scale_range``, relative to ``base_size`` or the native size) -> :class:`PadToSize` (bottom / right up
to the crop size) -> ``RandomCrop(crop_size)`` -> ``RandomHorizontalFlip(hflip)`` -> ``float32``
image scaled to [0, 1] and normalised, ``int64`` mask. Evaluation: an optional :class:`SegmentationResize`
-> the same conversion.
"""

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_lt.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "PadToSize",
    "RandomScale",
    "SegmentationResize",
    "check_size",
    "segmentation_eval_transform",
    "segmentation_train_transform",
]


def check_size(value: Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` tuple of positive ints.

    Raises:
        ValueError: not two values, or a value < 1 (names the argument).

    Example:
        >>> check_size([360, 480], "crop_size")
        (360, 480)
    """
    size = tuple(value)
    if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
        raise ValueError(f"Expected `{name}` to be two positive integers (height, width), got {value!r}")
    return int(size[0]), int(size[1])


def _resize(inpt: Any, size: list[int], antialias: bool) -> Any:
    if isinstance(inpt, tv_tensors.Mask):
        return F.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return F.resize(inpt, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=antialias)


class RandomScale(v2.Transform):
    """Resize image and mask by a factor drawn uniformly from ``scale_range``.

    The factor is relative to ``base_size`` (``(H, W)``; the image is scaled, keeping its aspect ratio, to
    the largest size that fits in it) or, when ``base_size`` is ``None``, to the native size. The image is
    resized bilinearly, the mask with ``nearest-exact``.

    Example:
        >>> image = tv_tensors.Image(torch.zeros(3, 10, 20, dtype=torch.uint8))
        >>> mask = tv_tensors.Mask(torch.zeros(10, 20, dtype=torch.uint8))
        >>> [tuple(t.shape) for t in RandomScale((2.0, 2.0))(image, mask)]
        [(3, 20, 40), (20, 40)]
        >>> [tuple(t.shape) for t in RandomScale((0.5, 0.5), base_size=(40, 40))(image, mask)]
        [(3, 10, 20), (10, 20)]
    """

    def __init__(
        self, scale_range: tuple[float, float], base_size: Optional[tuple[int, int]] = None, antialias: bool = True
    ) -> None:
        super().__init__()
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"Expected `scale_range` = (low, high) with 0 < low <= high, got {scale_range!r}")
        self.scale_range = (low, high)
        self.base_size = check_size(base_size, "base_size") if base_size is not None else None
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + float(torch.rand(())) * (high - low)
        if self.base_size is not None:
            scale *= min(self.base_size[0] / height, self.base_size[1] / width)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"], self.antialias)


class SegmentationResize(v2.Transform):
    """Resize image (bilinear) and mask (``nearest-exact``) to a fixed ``(H, W)``.

    Example:
        >>> mask = tv_tensors.Mask(torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8))
        >>> SegmentationResize((4, 4))(mask).tolist()[0]
        [0, 0, 1, 1]
    """

    def __init__(self, size: tuple[int, int], antialias: bool = True) -> None:
        super().__init__()
        self.size = list(check_size(size, "size"))
        self.antialias = antialias

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, self.size, self.antialias)


class PadToSize(v2.Transform):
    """Pad at the bottom and right up to at least ``size`` = ``(H, W)``: image with ``fill``, mask with ``mask_fill``.

    Inputs already that large are returned unchanged.

    Example:
        >>> mask = tv_tensors.Mask(torch.zeros(1, 2, dtype=torch.uint8))
        >>> PadToSize((2, 3), mask_fill=255)(mask).tolist()
        [[0, 0, 255], [255, 255, 255]]
    """

    def __init__(self, size: tuple[int, int], fill: float = 0, mask_fill: int = 255) -> None:
        super().__init__()
        self.size = check_size(size, "size")
        self.fill = fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        bottom, right = max(0, self.size[0] - height), max(0, self.size[1] - width)
        return {"padding": [0, 0, right, bottom], "needs_pad": bottom > 0 or right > 0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["needs_pad"]:
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return F.pad(inpt, params["padding"], fill=fill)


def _to_tensors(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]


def segmentation_train_transform(
    crop_size: tuple[int, int],
    ignore_index: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: Optional[tuple[int, int]] = None,
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Training pipeline: random scale -> pad (mask with ``ignore_index``) -> random crop -> flip -> normalise.

    Called as ``transform(image, mask)`` with a ``tv_tensors.Image`` and a ``tv_tensors.Mask``; returns
    ``float32 [3, *crop_size]`` and ``int64 [*crop_size]`` plain tensors.

    Args:
        crop_size: ``(H, W)`` of the output.
        ignore_index: mask value of padded pixels.
        scale_range: ``(low, high)``, 0 < low <= high: range of the random scale factor.
        base_size: ``(H, W)`` the scale factor is relative to (aspect ratio kept); ``None``: native size.
        hflip: probability of a horizontal flip, in [0, 1].
        mean: normalisation mean (of the image scaled to [0, 1]).
        std: normalisation standard deviation.

    Raises:
        ValueError: a size that is not two positive integers, a bad ``scale_range``, ``hflip`` outside [0, 1].

    Example:
        >>> image = tv_tensors.Image(torch.zeros(3, 24, 32, dtype=torch.uint8))
        >>> mask = tv_tensors.Mask(torch.zeros(24, 32, dtype=torch.uint8))
        >>> x, y = segmentation_train_transform((16, 16), ignore_index=255)(image, mask)
        >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
        ((3, 16, 16), torch.float32, (16, 16), torch.int64)
    """
    crop_size = check_size(crop_size, "crop_size")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"Expected `hflip` (a probability) in [0, 1], got {hflip}")
    return v2.Compose(
        [
            RandomScale(scale_range, base_size),
            PadToSize(crop_size, fill=0, mask_fill=ignore_index),
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(p=hflip),
            *_to_tensors(mean, std),
        ]
    )


def segmentation_eval_transform(
    size: Optional[tuple[int, int]] = None, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Evaluation pipeline: optional resize to ``size`` (image bilinear, mask nearest) -> normalise.

    Example:
        >>> image = tv_tensors.Image(torch.zeros(3, 24, 32, dtype=torch.uint8))
        >>> mask = tv_tensors.Mask(torch.zeros(24, 32, dtype=torch.uint8))
        >>> [tuple(t.shape) for t in segmentation_eval_transform((12, 16))(image, mask)]
        [(3, 12, 16), (12, 16)]
    """
    resize = [SegmentationResize(size)] if size is not None else []
    return v2.Compose(resize + _to_tensors(mean, std))
