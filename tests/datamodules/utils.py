"""Tiny data for the datamodule tests: an in-memory long-tailed DataModule and generated image folders."""

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightning_lt.datamodules import LongTailDataModule


class IndexedDataset(Dataset):
    """``(x, label, index)`` with ``x = [index]``, so a model can record which indices it received."""

    def __init__(self, targets: Sequence[int]) -> None:
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]), self.targets[index], index


class ToyLT(LongTailDataModule):
    """In-memory DataModule: ``counts[c]`` samples of class ``c`` (labels grouped by class)."""

    def __init__(
        self,
        counts: Sequence[int] = (40, 15, 8),
        batch_size: int = 8,
        num_workers: int = 0,
        sampler: Optional[str] = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            sampler=sampler,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            eval_batch_size=eval_batch_size,
        )
        self.counts = list(counts)
        self.compute_calls = 0

    def _compute_class_counts(self) -> list[int]:
        self.compute_calls += 1
        return list(self.counts)

    def train_targets(self) -> list[int]:
        return [c for c, n in enumerate(self.counts) for _ in range(n)]

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_dataset = IndexedDataset(self.train_targets())
        self.test_dataset = IndexedDataset([c for c in range(len(self.counts)) for _ in range(4)])


def write_image_folder(
    root: str, counts: dict[str, int], size: tuple[int, int] = (32, 32), seed: int = 0, ext: str = ".jpg"
) -> None:
    """Write ``counts[name]`` random RGB images to ``root/<name>/NNNN<ext>``."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}{ext}"))


def write_digit_folder(
    root: str, train_counts: Sequence[int], test_per_class: int = 3, size: int = 28, seed: int = 0
) -> None:
    """An MNIST-style folder: ``root/{train,test}/<digit>/NNNN.png``, 1-channel (grayscale) PNGs of ``size`` x ``size``,
    ``train_counts[c]`` training and ``test_per_class`` test images of class ``c``. Each image is noise around a
    class-specific grey level, so that a small network can learn something in an epoch or two."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", train_counts), ("test", [test_per_class] * len(train_counts))):
        for c, n in enumerate(counts):
            folder = os.path.join(root, split, str(c))
            os.makedirs(folder, exist_ok=True)
            level = 255 * c / max(len(counts) - 1, 1)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 20, size=(size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
