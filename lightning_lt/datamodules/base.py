"""Base class of the long-tailed DataModules."""

from typing import Literal, Optional

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_lt.datamodules.samplers import ResampledSampler

__all__ = ["LongTailDataModule"]

_SAMPLERS = (None, "class_balanced", "sqrt")


class LongTailDataModule(LightningDataModule):
    """A :class:`~lightning.pytorch.LightningDataModule` with a long-tailed training split and a balanced test split.

    ``class_counts``, ``num_classes`` and ``class_names`` are computed lazily on first access and
    cached, without decoding images, so they are valid right after ``__init__`` (``LightningCLI``
    links ``data.class_counts`` to the model before ``setup()`` runs).

    Subclasses implement:

    - ``_compute_class_counts() -> list[int]`` (cheap: a formula, a directory listing, a list file);
    - ``_compute_class_names() -> list[str]`` (optional; default ``"0" .. "C-1"``);
    - ``setup(stage)`` assigning ``self.train_dataset`` (fit), ``self.test_dataset`` (all stages)
      and optionally ``self.val_dataset`` (defaults to the test split);
    - ``train_targets() -> list[int]``, the label of every index of ``train_dataset``.

    Loaders: ``train_dataloader`` shuffles, or, with ``sampler`` set, draws from a
    :class:`~lightning_lt.datamodules.samplers.ResampledSampler` sharded by ``trainer.world_size`` /
    ``trainer.global_rank`` (1 / 0 without a trainer). ``val_dataloader`` iterates over the validation
    split (the balanced test split unless a subclass has a separate one), ``test_dataloader`` and
    ``predict_dataloader`` over the test split, in order, with ``eval_batch_size``.

    Args:
        batch_size: training batch size per process.
        num_workers: ``DataLoader`` worker processes.
        sampler: ``None`` (instance-balanced shuffling), ``"class_balanced"`` or ``"sqrt"`` re-sampling.
        seed: seed of the re-sampling plan (epoch ``e`` uses ``seed + e``).
        pin_memory: ``DataLoader(pin_memory=...)``.
        persistent_workers: keep workers alive between epochs; only applied when ``num_workers > 0``.
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, ``eval_batch_size < 1``, unknown ``sampler``.
    """

    train_dataset: Optional[Dataset] = None
    val_dataset: Optional[Dataset] = None
    test_dataset: Optional[Dataset] = None

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 4,
        sampler: Optional[Literal["class_balanced", "sqrt"]] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
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
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = sampler
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self._class_counts: Optional[list[int]] = None
        self._class_names: Optional[list[str]] = None

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
        raise NotImplementedError(f"{type(self).__name__} must implement `_compute_class_counts()`")

    def _compute_class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    def train_targets(self) -> list[int]:
        """Labels of the training set, one per index of ``train_dataset`` (used by the re-sampler)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `train_targets()`")

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
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def build_sampler(self) -> ResampledSampler:
        """The re-sampler of ``train_dataloader`` for the current trainer (requires ``sampler`` to be set)."""
        if self.sampler is None:
            raise ValueError("`sampler` is None: the training loader shuffles instead of re-sampling")
        num_replicas, rank = self._replicas()
        return ResampledSampler(
            self.train_targets(), mode=self.sampler, num_replicas=num_replicas, rank=rank, seed=self.seed
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._require("train_dataset")
        if self.sampler is None:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, **self._loader_kwargs())
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.build_sampler(), **self._loader_kwargs())

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_dataset if self.val_dataset is not None else self._require("test_dataset")
        return self._eval_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("test_dataset"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("test_dataset"))
