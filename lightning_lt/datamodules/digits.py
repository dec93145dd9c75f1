"""Long-tailed 8x8 digits: a real data set bundled with scikit-learn, for the no-download quickstart."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_lt.datamodules.base import LongTailDataModule
from lightning_lt.datamodules.profiles import imbalance_counts, long_tailed_indices

__all__ = ["DigitsLT"]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


class DigitsLT(LongTailDataModule):
    """scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes) made long-tailed.

    A balanced test set of ``test_per_class`` images per class is held out (chosen with
    ``imbalance_seed``); the training set is the rest, cut to the counts of the imbalance profile
    ``imbalance_counts(n_max, 10, imbalance_factor, profile)`` exactly as CIFAR-LT is. Images are
    ``[1, 8, 8]`` float tensors in ``[0, 1]``. Nothing is downloaded: the data ships with scikit-learn.

    Args:
        imbalance_factor: ``n_max / n_min`` of the training counts (>= 1).
        profile: ``"exp"`` or ``"step"`` imbalance profile.
        n_max: training images of the most frequent class (at most 134: the smallest digit class has
            174 images, 40 of which are held out by default).
        test_per_class: held-out balanced test images per class.
        imbalance_seed: seed of the test split and of the long-tailed subset.
        batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size:
            see :class:`~lightning_lt.datamodules.base.LongTailDataModule`.

    Validation (``val_fraction > 0``): that share of each class's long-tailed training images is held out as the
    validation split (``floor(val_fraction * n_c + 0.5)`` per class, seeded by ``seed``, the same on every DDP rank;
    see :class:`~lightning_lt.datamodules.base.LongTailDataModule`), and ``class_counts`` counts the rest. With
    ``val_fraction=0`` it validates on the test split.

    Example:
        >>> DigitsLT(imbalance_factor=10).class_counts
        [130, 100, 77, 60, 46, 36, 28, 21, 16, 13]
        >>> DigitsLT(imbalance_factor=10, val_fraction=0.1).class_counts
        [117, 90, 69, 54, 41, 32, 25, 19, 14, 12]
    """

    def __init__(
        self,
        imbalance_factor: float = 10.0,
        profile: Literal["exp", "step"] = "exp",
        n_max: int = 130,
        test_per_class: int = 40,
        imbalance_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        sampler: Optional[Literal["class_balanced", "sqrt"]] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            batch_size, num_workers, sampler, seed, pin_memory, persistent_workers, eval_batch_size,
            val_fraction=val_fraction,
        )
        if test_per_class < 1:
            raise ValueError(f"Expected `test_per_class` >= 1, got {test_per_class}")
        if not 1 <= n_max <= 174 - test_per_class:
            raise ValueError(
                f"Expected 1 <= `n_max` <= {174 - test_per_class} (the smallest digit class has 174 images, "
                f"{test_per_class} held out for testing), got {n_max}"
            )
        self.imbalance_factor = imbalance_factor
        self.profile = profile
        self.n_max = n_max
        self.test_per_class = test_per_class
        self.imbalance_seed = imbalance_seed
        self._profile_counts()  # validate the profile arguments now

    def _profile_counts(self) -> list[int]:
        """Images per class of the long-tailed subset, before the validation hold-out."""
        return imbalance_counts(self.n_max, 10, self.imbalance_factor, self.profile)

    def _pool_targets(self) -> list[int]:
        # long_tailed_indices keeps the images grouped by class in ascending order
        return np.repeat(np.arange(10), self._profile_counts()).tolist()

    def _compute_class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    def _split(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices into the digits of the long-tailed training pool and of the balanced test set."""
        rng = np.random.RandomState(self.imbalance_seed)
        test_idx, pool_idx = [], []
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            rng.shuffle(idx)
            test_idx.append(idx[: self.test_per_class])
            pool_idx.append(idx[self.test_per_class :])
        pool = np.sort(np.concatenate(pool_idx))
        long_tailed = pool[long_tailed_indices(targets[pool], self._profile_counts(), seed=self.imbalance_seed)]
        return long_tailed, np.sort(np.concatenate(test_idx))

    def setup(self, stage: str = "fit") -> None:
        images, targets = _load_digits()
        long_tailed, test_idx = self._split(targets)
        if not np.array_equal(targets[long_tailed], np.asarray(self._pool_targets())):
            raise RuntimeError(f"{type(self).__name__}: the long-tailed subset is not grouped by class")
        train_pos, val_pos = self.split_positions()
        x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(targets)
        train_idx = long_tailed[train_pos]
        self.train_dataset = TensorDataset(x[train_idx], y[train_idx])
        self.train_eval_dataset = self.train_dataset  # no augmentation
        self.test_dataset = TensorDataset(x[test_idx], y[test_idx])
        self.val_dataset = TensorDataset(x[long_tailed[val_pos]], y[long_tailed[val_pos]]) if val_pos.size else None
