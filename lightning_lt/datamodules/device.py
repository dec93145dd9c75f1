"""Device-resident data: small-image data sets held on the accelerator and augmented there, batch by batch.

GPU training on CIFAR-sized images is bound by the data loader: decoding, cropping and flipping 128 images
per step in PIL, in worker processes, is slower than ResNet-32's step. For data sets that fit in device
memory (CIFAR-10-LT's 12,406 training images are 38 MB as ``uint8``), :class:`DeviceDataLoader` copies the
decoded ``uint8`` images to the device once and, per batch, gathers the batch's images, crops, flips and
normalises them there (:meth:`~lightning_lt.datamodules.transforms.TensorCIFARAugment.apply_batch`). On the
CPU it is the same code on CPU tensors (an in-memory path without worker processes).

How it plugs into Lightning: :class:`DeviceDataLoader` is a ``DataLoader`` over the in-memory data set,
with the data module's own sampler and ``batch_size``, whose ``__iter__`` takes the index batches of its
``batch_sampler`` (so the epoch plan, the re-sampling and the DDP shards are those of the worker loaders,
literally the same sampler objects, and Lightning's ``set_epoch`` reaches them) and yields ready
``[x, y]`` batches already on the device; Lightning's batch transfer then has nothing left to move. The
alternative, yielding index batches and gathering in the data module's ``on_after_batch_transfer``, was
not taken: overriding that hook in :class:`~lightning_lt.datamodules.base.LongTailDataModule` would make
Lightning ignore the ``on_after_batch_transfer`` of every user's LightningModule (the data module's hook
wins when both define it), with or without the device path, and a loader used outside a Trainer (a plain
loop, a benchmark) would yield indices instead of images.

Randomness: the crop offsets and flips of an epoch are drawn on the CPU, when its iterator starts, from a
``torch.Generator`` seeded with :func:`~lightning_lt.datamodules.samplers.derive_seed` ``(seed, epoch)``
(``seed``: the data module's rank-aware :meth:`~lightning_lt.datamodules.base.LongTailDataModule.worker_seed`),
one draw per position of this process's share of the epoch plan. They depend only on (global seed, rank,
epoch), not on the device, the global random state or what ran before, so a resumed run repeats them, and
CPU and GPU runs of the same seed see the same augmented images. The indices and draws of the whole epoch
go to the device in one copy; each batch then costs a handful of kernels and no host synchronisation.

``num_workers``, ``pin_memory``, ``persistent_workers`` and ``collate_fn`` play no part (batches are built
in the main process, on the device); Lightning's "does not have many workers" hint does not apply.
"""

from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lt.datamodules.samplers import derive_seed
from lightning_lt.datamodules.transforms import TensorCIFARAugment

__all__ = ["DeviceDataLoader", "check_device_dataset", "check_device_memory"]

_FIX = (
    "HINT: decode every image to one size into one tensor (ImageFolderLT resizes them to `image_size`; "
    "lightning_lt.datamodules.folder.InMemoryImageDataset holds them), or set `device_data=False` to load the "
    "images with DataLoader workers."
)


def check_device_dataset(dataset: Dataset) -> None:
    """Check that ``dataset`` can be served from device memory: a ``uint8 [N, C, H, W]`` ``images`` tensor (every
    image decoded to one size), ``N`` ``targets`` and a :class:`~lightning_lt.datamodules.transforms.TensorCIFARAugment`
    ``transform`` (e.g. :class:`~lightning_lt.datamodules.folder.InMemoryImageDataset`).

    Raises:
        ValueError: naming what is missing and the fix.
    """
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    transform = getattr(dataset, "transform", None)
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, torch.Tensor) for i in images):
        sizes = sorted({tuple(i.shape) for i in images})
        problem = f"a list of {len(images)} image tensors" + (f" of several sizes ({sizes[:4]})" if len(sizes) > 1 else "")
    elif not isinstance(images, torch.Tensor):
        problem = "no `images` tensor"
    elif images.dtype != torch.uint8 or images.ndim != 4:
        problem = f"`images` of dtype {images.dtype} and shape {tuple(images.shape)}"
    elif targets is None or len(targets) != images.shape[0]:
        problem = f"{images.shape[0]} images but {'no' if targets is None else len(targets)} `targets`"
    elif not isinstance(transform, TensorCIFARAugment):
        problem = f"the transform {type(transform).__name__}, not a TensorCIFARAugment"
    else:
        return
    raise ValueError(
        f"The device-resident data path (`device_data=True`) cannot serve {type(dataset).__name__}: it has {problem}. "
        "It needs all images decoded to one size in one uint8 tensor `images` [N, C, H, W], one label per image in "
        f"`targets` and a TensorCIFARAugment `transform`. {_FIX}"
    )


def check_device_memory(nbytes: int, device: torch.device) -> None:
    """Refuse to copy ``nbytes`` to a CUDA ``device`` that has less free memory (nothing to check elsewhere).

    Raises:
        RuntimeError: naming the sizes and the fix.
    """
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise RuntimeError(
            f"The device-resident data path (`device_data=True`) needs {nbytes / 2**30:.2f} GiB on {device} for the "
            f"images, but only {free / 2**30:.2f} GiB of {total / 2**30:.1f} GiB are free. HINT: set "
            "`device_data=False` (DataLoader workers), decode to a smaller `image_size`, or free device memory."
        )


class DeviceDataLoader(DataLoader):
    """A ``DataLoader`` of in-memory images whose batches are gathered, augmented and normalised on ``device``.

    The order is that of the loader's sampler / ``batch_sampler`` (the same objects as for a worker loader).
    Each epoch's iterator draws the augmentation of every sample once (:meth:`epoch_draws`, seeded by
    ``(seed, sampler.epoch)``), copies the indices and draws to ``device`` in one go, and yields
    ``[x, y]``: ``x = dataset.transform.apply_batch(images, index, draws)`` (``float32 [B, C, size, size]``)
    and ``y = targets[index]`` (``int64 [B]``), both on ``device``. The images and labels are copied to
    ``device`` on the first iteration and kept (``N * C * H * W`` bytes; checked against the free memory on
    CUDA). With an evaluation transform (``train=False``) there is nothing to draw.

    Args:
        dataset: images in memory: ``uint8 [N, C, H, W]`` ``images``, ``targets`` and a
            :class:`~lightning_lt.datamodules.transforms.TensorCIFARAugment` ``transform``
            (:class:`~lightning_lt.datamodules.folder.InMemoryImageDataset`); see :func:`check_device_dataset`.
        args, kwargs: those of ``DataLoader`` (``batch_size``, ``sampler``, ...); worker, pinning and collation
            arguments are accepted and unused.
        device: where the images live and the batches are built.
        seed: base of the per-epoch augmentation seeds (the data modules pass their rank-aware
            ``worker_seed()``); ``None``: ``torch.initial_seed()``.

    Raises:
        ValueError: ``dataset`` cannot be served from device memory (see :func:`check_device_dataset`).

    Example:
        >>> from lightning_lt.datamodules.folder import InMemoryImageDataset
        >>> from lightning_lt.datamodules.transforms import cifar_tensor_train_transform
        >>> images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
        >>> dataset = InMemoryImageDataset(images, [0] * 5 + [1] * 5, cifar_tensor_train_transform())
        >>> x, y = next(iter(DeviceDataLoader(dataset, batch_size=4, shuffle=True, seed=0)))
        >>> x.shape, x.dtype, y.tolist() in ([0, 0, 1, 1], y.tolist())
        (torch.Size([4, 3, 32, 32]), torch.float32, True)
    """

    def __init__(
        self, dataset: Dataset, *args: Any, device: Union[str, torch.device] = "cpu", seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        check_device_dataset(dataset)
        super().__init__(dataset, *args, **kwargs)
        self.device = torch.device(device)
        self.seed = seed
        self._tensors: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def device_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The data set's images (``uint8``) and labels (``int64``) on ``device``, copied on the first call."""
        if self._tensors is None:
            images = self.dataset.images
            targets = torch.as_tensor(self.dataset.targets, dtype=torch.long)
            check_device_memory(images.nbytes + targets.nbytes, self.device)
            self._tensors = (images.to(self.device), targets.to(self.device))
        return self._tensors

    def epoch_draws(self, epoch: int, num_samples: int) -> torch.Tensor:
        """The ``[3, num_samples]`` crop offsets and flips (:meth:`TensorCIFARAugment.draw`) of the samples of epoch
        ``epoch``, in the order this loader serves them: drawn from a CPU generator seeded with
        ``derive_seed(seed, epoch)``."""
        seed = self.seed if self.seed is not None else torch.initial_seed()
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        height, width = self.dataset.images.shape[-2:]
        return self.dataset.transform.draw(num_samples, height, width, generator)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:  # type: ignore[override]
        # The body runs at the first `next()`, after Lightning's `set_epoch`: the plan and draws of that epoch.
        batches = [list(batch) for batch in self.batch_sampler]
        if not batches:
            return
        images, targets = self.device_tensors()
        transform: TensorCIFARAugment = self.dataset.transform
        index = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
        if transform.train:
            plan = torch.cat([index[None], self.epoch_draws(getattr(self.sampler, "epoch", 0), len(index))])
        else:
            plan = index[None]
        plan = plan.to(self.device)  # one copy per epoch
        start = 0
        for batch in batches:
            part = plan[:, start : start + len(batch)]
            start += len(batch)
            yield [transform.apply_batch(images, part[0], part[1:] if transform.train else None), targets[part[0]]]
