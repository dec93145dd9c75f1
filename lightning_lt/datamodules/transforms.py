"""Standard image transforms of the long-tailed literature.

CIFAR (LDAM-DRW): ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``.
ImageNet-LT / Places-LT / iNaturalist: ``RandomResizedCrop(224)``, ``RandomHorizontalFlip`` for training,
``Resize(256)`` + ``CenterCrop(224)`` for evaluation.

Both recipes are also classes with plain arguments (:class:`CIFARTrainTransform`, :class:`CIFAREvalTransform`,
:class:`ImageNetTrainTransform`, :class:`ImageNetEvalTransform`), so a config can name them by ``class_path`` as the
``train_transform`` / ``eval_transform`` of a DataModule; ``hflip: false`` turns the flip off (digits, text), and a
one-value ``mean`` / ``std`` normalises 1-channel images (``image_mode: L``). Any other callable works as well, e.g.
a ``torchvision.transforms.v2.Compose`` of v2 transforms written out in the YAML (``class_path`` / ``init_args`` per
transform, ``dtype: torch.float32`` for ``ToDtype``). :func:`check_transform_output` checks what a user's transform
returns (tensors of one size) on the first samples of a data set.

The ``*_tensor_*`` variants (:class:`TensorCIFARAugment`) take ``uint8`` ``[3, H, W]`` tensors
(images decoded once and kept in memory) and give the same output as the PIL versions for the same
torch RNG state: they draw crop offsets and flips like torchvision, pad with zeros, and scale by 1/255
like ``ToTensor`` before normalising. :meth:`TensorCIFARAugment.apply_batch` does the same to a whole
batch gathered from an image tensor on any device, for given per-sample draws (the device-resident path,
:mod:`lightning_lt.datamodules.device`).
"""

from collections.abc import Sequence
from typing import Optional

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = [
    "CIFAREvalTransform",
    "CIFARTrainTransform",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetEvalTransform",
    "ImageNetTrainTransform",
    "TensorCIFARAugment",
    "check_transform_output",
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


class CIFARTrainTransform(T.Compose):
    """CIFAR training augmentation on PIL images: zero-pad ``padding``, random ``size`` crop, flip, normalise.

    ``[Resize((resize, resize))], RandomCrop(size, padding), [RandomHorizontalFlip()], ToTensor(), Normalize(mean,
    std)``: the LDAM-DRW recipe with the defaults. A config names it by ``class_path`` as a ``train_transform``.

    Args:
        size: crop size (32 for CIFAR).
        padding: zero padding on each side before cropping (4 for CIFAR).
        hflip: random horizontal flip (turn it off for digits, text and other images that flipping changes).
        resize: if set, first resize to ``(resize, resize)`` (for folders of other image sizes).
        mean: per-channel mean subtracted after scaling to [0, 1] (one value for 1-channel images).
        std: per-channel standard deviation.

    Example:
        >>> from PIL import Image
        >>> CIFARTrainTransform()(Image.new("RGB", (32, 32))).shape
        torch.Size([3, 32, 32])
        >>> CIFARTrainTransform(hflip=False, resize=32, mean=[0.5], std=[0.5])(Image.new("L", (28, 28))).shape
        torch.Size([1, 32, 32])
    """

    def __init__(
        self,
        size: int = 32,
        padding: int = 4,
        hflip: bool = True,
        resize: Optional[int] = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        flip = [T.RandomHorizontalFlip()] if hflip else []
        super().__init__(
            _resize(resize) + [T.RandomCrop(size, padding=padding)] + flip + [T.ToTensor(), T.Normalize(mean, std)]
        )


class CIFAREvalTransform(T.Compose):
    """CIFAR evaluation transform on PIL images: ``[Resize((resize, resize))], ToTensor(), Normalize(mean, std)``.

    Example:
        >>> from PIL import Image
        >>> x = CIFAREvalTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(Image.new("RGB", (32, 32), "white"))
        >>> float(x.min()), tuple(x.shape)
        (1.0, (3, 32, 32))
    """

    def __init__(
        self, resize: Optional[int] = None, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
    ) -> None:
        super().__init__(_resize(resize) + [T.ToTensor(), T.Normalize(mean, std)])


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: int = 32,
    padding: int = 4,
    resize: Optional[int] = None,
) -> CIFARTrainTransform:
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
    return CIFARTrainTransform(size=size, padding=padding, resize=resize, mean=mean, std=std)


def cifar_eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, resize: Optional[int] = None
) -> CIFAREvalTransform:
    """CIFAR evaluation transform on PIL images: ``ToTensor`` + ``Normalize`` (after an optional resize).

    Example:
        >>> from PIL import Image
        >>> x = cifar_eval_transform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(Image.new("RGB", (32, 32), "white"))
        >>> float(x.min()), tuple(x.shape)
        (1.0, (3, 32, 32))
    """
    return CIFAREvalTransform(resize=resize, mean=mean, std=std)


class TensorCIFARAugment:
    """Random crop with zero padding, horizontal flip and normalisation of a ``uint8 [3, H, W]`` tensor.

    The lean equivalent of ``Compose([RandomCrop(size, padding), RandomHorizontalFlip(),
    ConvertImageDtype(float32), Normalize(mean, std)])`` (several times faster per image): it draws
    the crop offsets and the flip from the torch RNG exactly as torchvision does (``randint`` for the
    row, ``randint`` for the column, ``rand(1) < 0.5`` for the flip), so for the same RNG state it returns
    the same tensor as :func:`cifar_train_transform` applied to the PIL image.
    With ``train=False`` it only converts and normalises.

    Batched form (the device-resident path): :meth:`draw` draws the crop offsets and flips of ``n`` samples
    from a generator, and :meth:`apply_batch` gathers, crops, flips and normalises a batch of them in a few
    tensor operations on the images' device. For the same draws the output equals the PIL transform's.
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
        self._device_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def draw(self, n: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Crop offsets and flips of ``n`` samples of ``height`` x ``width`` images, as a ``[3, n]`` int64 tensor.

        Row ``0`` is the crop's top and row ``1`` its left edge in the zero-padded image (uniform in
        ``[0, height + 2 * padding - size]`` and ``[0, width + 2 * padding - size]``, as torchvision's
        ``RandomCrop.get_params``), row ``2`` is 1 where the crop is flipped (``rand < 0.5``, as
        ``RandomHorizontalFlip``). Drawn on the CPU from ``generator`` (torch's global one if ``None``).

        Raises:
            ValueError: the crop is larger than the padded image.

        Example:
            >>> draws = TensorCIFARAugment().draw(4, 32, 32, torch.Generator().manual_seed(0))
            >>> draws.shape, bool(draws[:2].max() <= 8), sorted(set(draws[2].tolist())) <= [0, 1]
            (torch.Size([3, 4]), True, True)
        """
        rows, cols = height + 2 * self.padding - self.size + 1, width + 2 * self.padding - self.size + 1
        if rows < 1 or cols < 1:
            raise ValueError(
                f"Crop size {self.size} is larger than the padded image {(height + 2 * self.padding, width + 2 * self.padding)}"
            )
        top = torch.randint(0, rows, (n,), generator=generator)
        left = torch.randint(0, cols, (n,), generator=generator)
        flip = (torch.rand(n, generator=generator) < 0.5).long()
        return torch.stack([top, left, flip])

    def apply_batch(
        self, images: torch.Tensor, index: torch.Tensor, draws: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The transform of ``images[index]`` for the given ``draws``, as one batch: ``float32 [B, C, size, size]``.

        The batch is gathered, zero-padded by ``p = padding``, and output pixel ``(a, b)`` of sample ``k`` is pixel
        ``(top + a, left + b')`` of its padded image (``b' = size - 1 - b`` when flipped, ``b`` otherwise), then
        ``(x / 255 - mean) / std``: a handful of tensor operations on the device of ``images``. With
        ``train=False`` only the gather and the normalisation.

        Args:
            images: ``uint8 [N, C, H, W]``, all images of the data set (on any device).
            index: ``int64 [B]`` rows of ``images`` (on the same device).
            draws: ``int64 [3, B]`` from :meth:`draw` (on the same device); required when ``train``.

        Example:
            >>> images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
            >>> augment = TensorCIFARAugment((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size=4, padding=1)
            >>> no_move = torch.tensor([[1], [1], [0]])  # top 1, left 1 in the padded image: the image itself
            >>> torch.equal(augment.apply_batch(images, torch.tensor([1]), no_move), images[1:].float() / 255)
            True
            >>> flipped = augment.apply_batch(images, torch.tensor([0]), torch.tensor([[0], [1], [1]]))  # one row up
            >>> (flipped[0, 0, 0] * 255).tolist(), (flipped[0, 0, 1] * 255).round().tolist()
            ([0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0])
        """
        mean, std = self._stats_on(images.device)
        batch = images.index_select(0, index)
        if self.train:
            if draws is None:
                raise ValueError("`draws` (from `draw()`) are required to augment a training batch")
            p, size = self.padding, self.size
            batch = torch.nn.functional.pad(batch, (p, p, p, p))  # zeros, as RandomCrop(padding=p)
            n, channels, _, width = batch.shape
            offsets = torch.arange(size, device=images.device)
            rows = draws[0, :, None] + offsets  # [B, size] rows of the crop in the padded image
            cols = draws[1, :, None] + torch.where(draws[2, :, None].bool(), size - 1 - offsets, offsets)
            batch = batch.gather(2, rows[:, None, :, None].expand(n, channels, size, width))
            batch = batch.gather(3, cols[:, None, None, :].expand(n, channels, size, size))
        return batch.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` on ``device`` (copied once per device)."""
        if device not in self._device_stats:
            self._device_stats[device] = (self.mean.to(device), self.std.to(device))
        return self._device_stats[device]

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


class ImageNetTrainTransform(T.Compose):
    """ImageNet-style training augmentation for large images: ``RandomResizedCrop(size, scale, ratio)``, flip,
    ``ToTensor``, ``Normalize``.

    Args:
        size: side of the output crop.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio.
        hflip: random horizontal flip.
        mean: per-channel mean (ImageNet's; one value for 1-channel images).
        std: per-channel standard deviation.

    Example:
        >>> from PIL import Image
        >>> ImageNetTrainTransform(64, scale=(0.5, 1.0))(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        flip = [T.RandomHorizontalFlip()] if hflip else []
        crop = T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)
        super().__init__([crop] + flip + [T.ToTensor(), T.Normalize(mean, std)])


class ImageNetEvalTransform(T.Compose):
    """ImageNet-style evaluation: ``Resize(resize)`` (the shorter side), ``CenterCrop(size)``, ``ToTensor``, ``Normalize``.

    Args:
        size: side of the centre crop.
        resize: shorter side before cropping (default ``round(size * 256 / 224)``, 256 at 224).
        mean: per-channel mean (ImageNet's).
        std: per-channel standard deviation.

    Example:
        >>> from PIL import Image
        >>> ImageNetEvalTransform(224)(Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        size: int = 224,
        resize: Optional[int] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        resize = round(size * 256 / 224) if resize is None else resize
        super().__init__([T.Resize(resize, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def imagenet_train_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> ImageNetTrainTransform:
    """ImageNet-style training augmentation: ``RandomResizedCrop(size)``, flip, ``ToTensor``, ``Normalize``.

    Example:
        >>> from PIL import Image
        >>> imagenet_train_transform(64)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    return ImageNetTrainTransform(size, mean=mean, std=std)


def imagenet_eval_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> ImageNetEvalTransform:
    """ImageNet-style evaluation: ``Resize(round(size * 256 / 224))``, ``CenterCrop(size)``, ``ToTensor``, ``Normalize``.

    Example:
        >>> from PIL import Image
        >>> imagenet_eval_transform(224)(Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """
    return ImageNetEvalTransform(size, mean=mean, std=std)


_SIZE_FIX = (
    "HINT: make the transform end in one size: torchvision.transforms.v2.Resize((s, s)), or Resize(s) + CenterCrop(s) "
    "for evaluation and RandomResizedCrop(s) for training (lightning_lt.datamodules.transforms.ImageNetTrainTransform / "
    "ImageNetEvalTransform), before ToImage / ToTensor."
)
_TENSOR_FIX = (
    "HINT: end the transform with torchvision.transforms.v2.ToImage() and ToDtype(torch.float32, scale=True) (or "
    "ToTensor()), then Normalize(mean, std)."
)


def check_transform_output(dataset: Dataset, name: str, transform: object = None, samples: int = 2) -> None:
    """Check that a data set's transform returns image tensors of one size, on its first and last samples.

    The samples are loaded with the global random state saved and restored (a random transform leaves the training
    draws alone). A batch of images of different sizes cannot be stacked; checked once at ``setup()`` it is an
    error that names the transform instead of a collate error in a worker.

    Args:
        dataset: returns ``(image, label)``; an empty one is not checked.
        name: the argument that set the transform (``"train_transform"``), named in the message.
        transform: the transform, shown in the message (default: ``dataset.transform``).
        samples: how many samples to load (the first one and the last ``samples - 1``).

    Raises:
        ValueError: an image that is not a tensor, or images of different shapes (names the transform and the fix).
    """
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        return
    transform = getattr(dataset, "transform", None) if transform is None else transform
    indices = sorted({0, *range(max(size - samples + 1, 1), size)})
    shapes = {}
    with torch.random.fork_rng(devices=[]):
        for index in indices:
            image = dataset[index][0]
            if not isinstance(image, torch.Tensor):
                raise ValueError(
                    f"`{name}` returns a {type(image).__module__}.{type(image).__name__}, not a tensor (sample {index}); "
                    f"a batch needs image tensors. {_TENSOR_FIX} The transform: {transform!r}"
                )
            shapes[index] = tuple(image.shape)
    if len(set(shapes.values())) > 1:
        found = ", ".join(f"{shape} for sample {index}" for index, shape in shapes.items())
        raise ValueError(
            f"`{name}` returns image tensors of different sizes ({found}): a batch needs one size. {_SIZE_FIX} "
            f"The transform: {transform!r}"
        )
