"""Base class of the long-tailed DataModules."""

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from lightning_lt.datamodules.device import DeviceDataLoader
from lightning_lt.datamodules.profiles import held_out_counts, stratified_holdout
from lightning_lt.datamodules.samplers import ResampledSampler, derive_seed

__all__ = [  # derive_seed is re-exported from samplers
    "VAL_SPLIT_KEY",
    "EpochSeededDataLoader",
    "LongTailDataModule",
    "collate_images",
    "derive_seed",
]

_SAMPLERS = (None, "class_balanced", "sqrt")

#: ``derive_seed(seed, VAL_SPLIT_KEY)`` seeds the held-out validation split, independently of the sampler's
#: ``(seed, epoch)`` streams.
VAL_SPLIT_KEY = 0x76616C  # "val"


def collate_images(batch: list) -> Any:
    """PyTorch's ``default_collate`` for ``(image, label)`` samples, with an error that names the fix when the images
    of a batch are not tensors of one size (a ``train_transform`` / ``eval_transform`` without a final resize or
    crop, or without ``ToImage`` / ``ToTensor``).

    Raises:
        ValueError: images of different sizes or not tensors (with the ``default_collate`` error as its cause).

    Example:
        >>> x, y = collate_images([(torch.zeros(3, 4, 4), 0), (torch.ones(3, 4, 4), 1)])
        >>> tuple(x.shape), y.tolist()
        ((2, 3, 4, 4), [0, 1])
    """
    try:
        return default_collate(batch)
    except (RuntimeError, TypeError) as error:
        text = str(error)
        if "equal size" in text:
            shapes = sorted({tuple(sample[0].shape) for sample in batch if isinstance(sample[0], torch.Tensor)})
            raise ValueError(
                f"A batch holds images of different sizes {shapes[:4]}: the data module's transform (`train_transform` /"
                " `eval_transform`) must return one size. HINT: add torchvision.transforms.v2.Resize((s, s)), or "
                "Resize(s) + CenterCrop(s) (RandomResizedCrop(s) for training), before ToImage / ToTensor."
            ) from error
        if "PIL" in text or "found <class" in text:
            raise ValueError(
                f"A batch holds images that are not tensors ({text}). HINT: end `train_transform` / `eval_transform` "
                "with torchvision.transforms.v2.ToImage() and ToDtype(torch.float32, scale=True) (or ToTensor()), "
                "then Normalize(mean, std)."
            ) from error
        raise


class EpochSeededDataLoader(DataLoader):
    """A ``DataLoader`` whose workers' base seed depends only on ``(worker_seed, sampler.epoch)``.

    PyTorch draws the base seed of an epoch's workers (worker ``w`` seeds torch, ``random`` and numpy from
    ``base + w``, or Lightning's ``worker_init_fn`` mixes in the global rank) from ``generator`` whenever an
    iterator is created. This loader reseeds ``generator`` with :func:`derive_seed` of ``worker_seed`` and the
    sampler's epoch first, so that a run resumed at epoch ``k`` gives its workers the seeds of the uninterrupted
    run's epoch ``k`` (with ``persistent_workers=False``: persistent workers are seeded once per fit).

    Args:
        args, kwargs: those of ``DataLoader``; ``generator`` is created when not given.
        worker_seed: base of the per-epoch seeds; ``None`` leaves ``generator`` alone (plain ``DataLoader``).
    """

    def __init__(self, *args: Any, worker_seed: Optional[int] = None, **kwargs: Any) -> None:
        if worker_seed is not None and kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self.worker_seed = worker_seed

    def __iter__(self) -> Iterator:
        if self.worker_seed is not None:
            self.generator.manual_seed(derive_seed(self.worker_seed, getattr(self.sampler, "epoch", 0)))
        return super().__iter__()


class LongTailDataModule(LightningDataModule):
    """A :class:`~lightning.pytorch.LightningDataModule` with a long-tailed training split and a balanced test split.

    ``class_counts``, ``num_classes`` and ``class_names`` are computed lazily on first access and
    cached, without decoding images, so they are valid right after ``__init__`` (``LightningCLI``
    links ``data.class_counts`` to the model before ``setup()`` runs).

    Subclasses implement:

    - ``_compute_class_counts() -> list[int]`` (cheap: a formula, a directory listing, a list file);
    - ``_compute_class_names() -> list[str]`` (optional; default ``"0" .. "C-1"``);
    - ``setup(stage)`` assigning ``self.train_dataset`` (fit), ``self.test_dataset`` (all stages)
      and optionally ``self.val_dataset`` (defaults to the test split) and ``self.train_eval_dataset``
      (the training images with the evaluation transform, for :meth:`train_eval_dataloader`);
    - ``train_targets() -> list[int]``, the label of every index of ``train_dataset``.

    Held-out validation split (``val_fraction > 0``): subclasses that support it (CIFAR-10-LT / CIFAR-100-LT,
    :class:`~lightning_lt.datamodules.folder.ImageFolderLT`,
    :class:`~lightning_lt.datamodules.list_file.ListFileDataModule`) implement ``_pool_targets()``, the labels of
    their long-tailed training images before the hold-out (the *pool*, listed without decoding). Class ``c`` of the
    pool, with ``n_c`` images, gives ``floor(val_fraction * n_c + 0.5)`` of them (rounded half up:
    :func:`~lightning_lt.datamodules.profiles.held_out_counts`) to the validation split, drawn by
    :func:`~lightning_lt.datamodules.profiles.stratified_holdout` with the seed ``derive_seed(seed, VAL_SPLIT_KEY)``
    (independent of the sampler's streams). The split depends only on the listing and ``seed``: every DDP rank
    computes the same one, with no communication. :meth:`split_positions` gives it; ``class_counts`` and
    ``train_targets()`` then count only the images trained on, and ``setup()`` builds ``val_dataset`` from the
    held-out images with the evaluation transform. A class left without a training image is an error. Those
    subclasses get ``_compute_class_counts`` and ``train_targets`` from here.

    Loaders: ``train_dataloader`` shuffles, or, with ``sampler`` set, draws from a
    :class:`~lightning_lt.datamodules.samplers.ResampledSampler` sharded by ``trainer.world_size`` /
    ``trainer.global_rank`` (1 / 0 without a trainer). ``val_dataloader`` iterates over the validation
    split (the balanced test split unless a subclass has a separate one: :attr:`validates_on_test_split`),
    ``test_dataloader`` and ``predict_dataloader`` over the test split, ``train_eval_dataloader`` over the
    training images with the evaluation transform, all in order, with ``eval_batch_size``.

    Device-resident data (``device_data=True``, for subclasses that support it: CIFAR-10-LT / CIFAR-100-LT,
    :class:`~lightning_lt.datamodules.folder.ImageFolderLT`): every loader is a
    :class:`~lightning_lt.datamodules.device.DeviceDataLoader` over the same datasets and samplers. The decoded
    ``uint8`` images are copied once to the trainer's device (``trainer.strategy.root_device``; the CPU without
    a trainer) and each batch is gathered, cropped, flipped and normalised there; evaluation loaders only
    normalise. The sample order and DDP shards are those of the worker loaders; the augmentation of an epoch
    is drawn from ``(global seed, rank, epoch)`` (:meth:`worker_seed`), so a resumed run repeats it.
    ``num_workers``, ``pin_memory`` and ``persistent_workers`` play no part. Subclasses support it by building,
    in ``setup()``, datasets with a ``uint8 [N, C, H, W]`` ``images`` tensor, ``targets`` and a
    :class:`~lightning_lt.datamodules.transforms.TensorCIFARAugment` ``transform``
    (:class:`~lightning_lt.datamodules.folder.InMemoryImageDataset`) when ``self.device_data`` is set.

    Training randomness under DDP and across a resume: the sample order depends on ``(seed, epoch)`` only (the
    sampler starts at the trainer's epoch); data-loader workers are seeded from ``(global seed, rank, epoch)``
    (:class:`EpochSeededDataLoader`), so ranks draw different augmentations and a run resumed at an epoch
    boundary gives its workers the same seeds as the uninterrupted run. Augmentation in the main process
    (``num_workers=0``) and dropout use the global generators, which the task modules reseed from
    ``(global seed, epoch, rank)`` at every epoch start
    (:func:`~lightning_lt.tasks.base.reseed_for_epoch`).

    Evaluation under DDP counts every sample exactly once: with ``trainer.world_size > 1`` the val / test /
    predict loaders carry an unpadded :class:`~lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`
    (rank ``r`` reads samples ``r, r + W, r + 2W, ...``, no shuffling; see :meth:`eval_sampler`). Being a
    ``DistributedSampler``, Lightning keeps it instead of injecting its own, which would pad the split with
    repeated samples up to a multiple of ``W`` and make the metrics count those samples twice. The ranks
    may then run one batch more or less than each other; this is safe because metrics are synchronised
    once per epoch (torchmetrics states, ``self.log(..., sync_dist=True)`` values reduced at epoch end,
    weighted by ``batch_size``) and DDP's forward in evaluation broadcasts buffers on the first batch
    only, which every rank runs. Per-step collectives in ``validation_step`` / ``test_step`` (e.g.
    ``self.log(..., on_step=True, sync_dist=True)``, ``all_gather``) would hang on the rank with fewer
    batches, as would a key that only some ranks log. A split with fewer samples than processes falls
    back to Lightning's padded sampler, with a warning. Subclasses that override ``_eval_loader`` pass
    ``sampler=self.eval_sampler(dataset)`` to their ``DataLoader``.

    Args:
        batch_size: training batch size per process.
        num_workers: ``DataLoader`` worker processes.
        sampler: ``None`` (instance-balanced shuffling), ``"class_balanced"`` or ``"sqrt"`` re-sampling.
        seed: seed of the re-sampling plan (epoch ``e`` uses ``seed + e``).
        pin_memory: ``DataLoader(pin_memory=...)``.
        persistent_workers: keep workers alive between epochs; only applied when ``num_workers > 0``.
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).
        device_data: serve the images from device memory, augmented per batch on the device (see above).
        val_fraction: per-class fraction of the long-tailed training images held out for validation (see above;
            0 = none, ``val_dataloader`` then uses the subclass's own validation split or the test split).

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, ``eval_batch_size < 1``, unknown ``sampler``,
            ``val_fraction`` outside ``[0, 1)`` or set on a subclass without a held-out split.
    """

    train_dataset: Optional[Dataset] = None
    val_dataset: Optional[Dataset] = None
    test_dataset: Optional[Dataset] = None
    #: The training images (``train_dataset``'s, in its order) with the evaluation transform.
    train_eval_dataset: Optional[Dataset] = None
    #: ``collate_fn`` of every loader (``None``: PyTorch's default); a plain function, not a method.
    batch_collate: Optional[Callable] = None

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 4,
        sampler: Optional[Literal["class_balanced", "sqrt"]] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
        device_data: bool = False,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, got {num_workers}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"Expected `eval_batch_size` >= 1 or None (= `batch_size`), got {eval_batch_size}")
        if sampler not in _SAMPLERS:
            raise ValueError(f"Expected `sampler` to be one of {_SAMPLERS}, got {sampler!r}")
        if isinstance(val_fraction, bool) or not (math.isfinite(float(val_fraction)) and 0 <= val_fraction < 1):
            raise ValueError(
                f"Expected `val_fraction` in [0, 1) (the per-class share of the training images held out for "
                f"validation, e.g. 0.1), got {val_fraction!r}"
            )
        if val_fraction > 0 and not self._has_pool():
            raise ValueError(
                f"{type(self).__name__} has no held-out validation split: `val_fraction` must be 0, got {val_fraction}. "
                "HINT: it validates on its own validation split; leave `val_fraction` out."
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = sampler
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.device_data = bool(device_data)
        self.val_fraction = float(val_fraction)
        self._class_counts: Optional[list[int]] = None
        self._class_names: Optional[list[str]] = None
        self._val_split: Optional[tuple[np.ndarray, np.ndarray]] = None

    # ------------------------------------------------------------------ class statistics (lazy)
    @property
    def class_counts(self) -> list[int]:
        """Training images per class (the long-tailed counts), computed once without decoding images."""
        if self._class_counts is None:
            self._class_counts = [int(c) for c in self._compute_class_counts()]
        return list(self._class_counts)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_counts)``."""
        return len(self.class_counts)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        if self._class_names is None:
            names = [str(n) for n in self._compute_class_names()]
            if len(names) != self.num_classes:
                raise ValueError(
                    f"{type(self).__name__} has {len(names)} class names but {self.num_classes} classes"
                )
            self._class_names = names
        return list(self._class_names)

    def _compute_class_counts(self) -> list[int]:
        if not self._has_pool():
            raise NotImplementedError(f"{type(self).__name__} must implement `_compute_class_counts()`")
        pool = np.asarray(self._pool_targets(), dtype=np.int64)
        return np.bincount(np.asarray(self.train_targets(), dtype=np.int64), minlength=pool.max() + 1).tolist()

    def _compute_class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    def train_targets(self) -> list[int]:
        """Labels of the training set, one per index of ``train_dataset`` (used by the re-sampler)."""
        if not self._has_pool():
            raise NotImplementedError(f"{type(self).__name__} must implement `train_targets()`")
        return np.asarray(self._pool_targets(), dtype=np.int64)[self.split_positions()[0]].tolist()

    # ------------------------------------------------------------------ held-out validation split
    @classmethod
    def _has_pool(cls) -> bool:
        """Whether the subclass implements ``_pool_targets`` (and so supports ``val_fraction``)."""
        return cls._pool_targets is not LongTailDataModule._pool_targets

    def _pool_targets(self) -> Sequence[int]:
        """Labels of the long-tailed training images before the validation hold-out (the pool), in the order the
        subclass lists them; computed without decoding images. Implemented by subclasses with a held-out split."""
        raise NotImplementedError(f"{type(self).__name__} has no held-out validation split (`_pool_targets()`)")

    def _pool_class_names(self) -> Optional[Sequence[str]]:
        """Class names for error messages about the pool (``None``: labels only); must not use ``class_counts``."""
        return None

    def _pool_held_out_counts(self, pool_counts: Sequence[int]) -> list[int]:
        """Images of each class held out of the pool: ``floor(val_fraction * n_c + 0.5)``."""
        return held_out_counts(pool_counts, self.val_fraction)

    def split_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train, val)``: positions in the pool (``_pool_targets()``) of the training and the held-out validation
        images, each ascending, disjoint, together the whole pool; computed once from the listing and ``seed``.

        Raises:
            ValueError: the hold-out leaves a class without a training image (names the class and the fix).
        """
        if self._val_split is None:
            pool = np.asarray(self._pool_targets(), dtype=np.int64)
            pool_counts = np.bincount(pool, minlength=pool.max() + 1 if pool.size else 0).tolist()
            held = self._pool_held_out_counts(pool_counts)
            empty = [c for c, (n, h) in enumerate(zip(pool_counts, held)) if n > 0 and h >= n]
            if empty:
                c, names = empty[0], self._pool_class_names()
                name = f" ({names[c]!r})" if names is not None else ""
                smallest = min(n for n in pool_counts if n > 0)
                raise ValueError(
                    f"{type(self).__name__}: `val_fraction`={self.val_fraction} holds out all {pool_counts[c]} training "
                    f"image(s) of class {c}{name} ({len(empty)} class(es) left without training images: {empty[:10]}). "
                    f"Every class needs at least one training image. HINT: use `val_fraction` < "
                    f"{1 - 0.5 / smallest:.3g} (a class of {smallest} image(s) then keeps one), or give an explicit "
                    f"validation set."
                )
            self._val_split = stratified_holdout(pool, held, derive_seed(self.seed, VAL_SPLIT_KEY))
        return self._val_split

    def _refuse_transforms_on_device(self, **transforms: Optional[Callable]) -> None:
        """With ``device_data``, refuse user transforms (the device path runs only the built-in CIFAR augmentation)."""
        given = " / ".join(f"`{name}`" for name, transform in transforms.items() if transform is not None)
        if self.device_data and given:
            raise ValueError(
                f"{type(self).__name__}: `device_data=True` augments every batch on the device with the built-in CIFAR "
                f"recipe (crop with zero padding, flip, normalisation) and cannot run your {given} (a transform of "
                "PIL images). HINT: set `device_data=false` to use your transform (DataLoader workers), or leave the "
                "transforms out to keep the device path."
            )

    @property
    def validates_on_test_split(self) -> Optional[bool]:
        """Whether ``val_dataloader`` iterates over the test split (no validation split of its own, or the same data
        set object); ``None`` before ``setup()``."""
        if self.test_dataset is None and self.val_dataset is None:
            return None
        return self.val_dataset is None or self.val_dataset is self.test_dataset

    # ------------------------------------------------------------------ loaders
    def _require(self, name: str) -> Dataset:
        dataset = getattr(self, name, None)
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name} is not set: call `setup()` first "
                "(the Trainer does it; outside a Trainer call `dm.setup('fit')`)"
            )
        return dataset

    def _loader_kwargs(self) -> dict:
        return {
            "collate_fn": type(self).batch_collate,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _fit_epoch(self) -> int:
        """The epoch the next training iterator serves: Lightning's processed-epoch counter, restored from a
        checkpoint before the training loader is requested (0 without a trainer)."""
        fit_loop = getattr(self.trainer, "fit_loop", None)
        return 0 if fit_loop is None else int(fit_loop.epoch_progress.current.processed)

    def build_sampler(self) -> ResampledSampler:
        """The re-sampler of ``train_dataloader`` for the current trainer (requires ``sampler`` to be set),
        already at the current epoch (see :meth:`shuffle_sampler`)."""
        if self.sampler is None:
            raise ValueError("`sampler` is None: the training loader shuffles instead of re-sampling")
        num_replicas, rank = self._replicas()
        sampler = ResampledSampler(
            self.train_targets(), mode=self.sampler, num_replicas=num_replicas, rank=rank, seed=self.seed
        )
        sampler.set_epoch(self._fit_epoch())
        return sampler

    def shuffle_sampler(self, dataset: Dataset, seed: Optional[int] = None) -> DistributedSampler:
        """Training shuffling whose order depends only on ``(seed, epoch)`` (Lightning calls ``set_epoch``),
        sharded by ``trainer.world_size`` / ``global_rank``: a run resumed from a checkpoint draws the same
        order as an uninterrupted one, which the global random state cannot guarantee.

        The sampler starts at the trainer's current epoch: Lightning creates the first iterator of a fit (and
        with workers, draws their first indices) before it calls ``set_epoch``, so a sampler left at epoch 0
        would replay epoch 0's order in the first epoch of a resumed run."""
        num_replicas, rank = self._replicas()
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=(self.seed or 0) if seed is None else seed
        )
        sampler.set_epoch(self._fit_epoch())
        return sampler

    def worker_seed(self) -> int:
        """Base of the training workers' seeds: ``derive_seed(s, rank)`` with ``s`` the global seed
        (``seed_everything``, ``PL_GLOBAL_SEED``) or, without one, torch's initial seed. Every rank gets its own
        (a fresh ``torch.Generator()`` would give every rank, and every global seed, the same worker streams)."""
        base = os.environ.get("PL_GLOBAL_SEED")
        return derive_seed(int(base) if base is not None else torch.initial_seed(), self._replicas()[1])

    def train_loader_kwargs(self) -> dict:
        """``DataLoader`` arguments of the training loaders: a private generator seeded with
        :meth:`worker_seed`, so that creating the iterator (which draws the workers' base seed) leaves the global
        random state alone and ranks draw different augmentations in their workers."""
        return {**self._loader_kwargs(), "generator": torch.Generator().manual_seed(self.worker_seed())}

    def data_device(self) -> torch.device:
        """Where the device-resident loaders keep the images and build the batches: the trainer's root device
        (this process's accelerator under DDP), the CPU without a trainer."""
        strategy = getattr(self.trainer, "strategy", None)
        return torch.device("cpu") if strategy is None else strategy.root_device

    def device_loader(
        self, dataset: Dataset, batch_size: int, sampler: Optional[Sampler], seed: Optional[int] = None
    ) -> DeviceDataLoader:
        """The :class:`~lightning_lt.datamodules.device.DeviceDataLoader` of ``dataset`` with ``sampler`` (in order
        when ``None``) on :meth:`data_device`; ``seed``: base of the augmentation seeds (training)."""
        return DeviceDataLoader(dataset, batch_size=batch_size, sampler=sampler, device=self.data_device(), seed=seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or re-sampled) training batches; an :class:`EpochSeededDataLoader`, so the workers' seeds
        depend only on ``(global seed, rank, epoch)`` and a resumed run repeats them. With ``device_data``, a
        :class:`~lightning_lt.datamodules.device.DeviceDataLoader` with the same sampler, whose augmentation is
        seeded from ``(worker_seed(), epoch)``."""
        dataset = self._require("train_dataset")
        sampler = self.shuffle_sampler(dataset) if self.sampler is None else self.build_sampler()
        if self.device_data:
            return self.device_loader(dataset, self.batch_size, sampler, seed=self.worker_seed())
        kwargs = self.train_loader_kwargs()
        return EpochSeededDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, worker_seed=self.worker_seed(), **kwargs
        )

    def eval_sampler(self, dataset: Dataset) -> Optional[Sampler]:
        """The sampler of an evaluation loader: unpadded and sharded under DDP, ``None`` (in order) otherwise.

        With ``trainer.world_size`` ``W > 1``, an
        :class:`~lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler` giving rank ``r``
        the samples ``r, r + W, ...`` of ``dataset`` (each sample on exactly one rank). ``None`` without a
        trainer, with one process, or when ``dataset`` has fewer than ``W`` samples (a rank without any
        batch could hang DDP's buffer broadcast; Lightning then pads the split, with a warning).
        """
        num_replicas, rank = self._replicas()
        if num_replicas <= 1:
            return None
        if len(dataset) < num_replicas:  # type: ignore[arg-type]
            rank_zero_warn(
                f"{type(self).__name__}: an evaluation split of {len(dataset)} samples "  # type: ignore[arg-type]
                f"is smaller than the {num_replicas} processes; Lightning's DistributedSampler pads it, so "
                "some samples are counted more than once. HINT: evaluate with `Trainer(devices=1)`"
            )
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        if self.device_data:
            return self.device_loader(dataset, self.eval_batch_size, self.eval_sampler(dataset))
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=self.eval_sampler(dataset),
            **self._loader_kwargs(),
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_dataset if self.val_dataset is not None else self._require("test_dataset")
        return self._eval_loader(dataset)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images (``train_dataset``'s, without the held-out validation images) with the evaluation
        transform (no augmentation), in order, sharded under DDP like the evaluation loaders (:meth:`eval_sampler`),
        with ``eval_batch_size``: e.g. to compute features of the training set once.

        Raises:
            RuntimeError: before ``setup('fit')``.
            NotImplementedError: the subclass does not build ``train_eval_dataset``.
        """
        if self.train_eval_dataset is None and self.train_dataset is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not provide its training images with the evaluation transform "
                "(`train_eval_dataset`): `train_eval_dataloader()` is for the classification DataModules (CIFAR10LT, "
                "CIFAR100LT, ImageFolderLT, ListFileDataModule, DigitsLT)."
            )
        return self._eval_loader(self._require("train_eval_dataset"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("test_dataset"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("test_dataset"))
