"""Tiny long-tailed image data and multi-expert models for the expert tests (8 x 8 images, a depth-8 network)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import torch
from lightning.pytorch import Trainer
from torch.utils.data import Dataset

from lightning_lt.callbacks.test_time_aggregation import sade_view_augment
from lightning_lt.datamodules import LongTailDataModule
from lightning_lt.nets import MultiExpertCIFARResNet
from lightning_lt.tasks import MultiExpertClassifier

TRAIN_COUNTS = (24, 12, 6)
TEST_PER_CLASS = 8
#: SADE's view augmentation at 8 pixels.
TINY_AUGMENT = sade_view_augment(size=8, padding=1)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """The tiny sets' evaluation transform: ``uint8 [3, H, W]`` to ``float`` in ``[-1, 1]``."""
    return image.float() / 127.5 - 1.0


class TinyImages(Dataset):
    """``(transform(images[i]), targets[i])`` with ``targets`` and ``transform`` attributes (what the test-time
    callbacks need)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform=to_float) -> None:
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def make_images(counts: Sequence[int], seed: int) -> tuple[torch.Tensor, list[int]]:
    """Random 8 x 8 images whose mean colour depends on the class (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    targets = [c for c, n in enumerate(counts) for _ in range(n)]
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[: len(counts)]
    noise = torch.randint(-40, 41, (len(targets), 3, 8, 8), generator=g)
    images = (colours[targets][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return images, targets


class TinyImagesLT(LongTailDataModule):
    """``counts`` training images per class, ``test_per_class`` balanced test images (the test split validates)."""

    def __init__(self, counts: Sequence[int] = TRAIN_COUNTS, test_per_class: int = TEST_PER_CLASS, batch_size: int = 8,
                 eval_batch_size: Optional[int] = 5, seed: int = 0) -> None:  # fmt: skip
        super().__init__(batch_size=batch_size, num_workers=0, seed=seed, eval_batch_size=eval_batch_size)
        self.counts, self.test_per_class = list(counts), test_per_class

    def _compute_class_counts(self) -> list[int]:
        return list(self.counts)

    def train_targets(self) -> list[int]:
        return [c for c, n in enumerate(self.counts) for _ in range(n)]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = TinyImages(*make_images(self.counts, seed=1))
        if self.test_dataset is None:
            self.test_dataset = TinyImages(*make_images([self.test_per_class] * len(self.counts), seed=2))


def expert_model(loss, num_experts: int = 3, num_classes: int = 3, **kwargs) -> MultiExpertClassifier:
    """A depth-8 multi-expert ResNet (one block per stage) with ``loss`` on the tiny data."""
    defaults = dict(
        backbone=functools.partial(MultiExpertCIFARResNet, num_experts=num_experts, depth=8, reduce_dimension=True),
        num_classes=num_classes, class_counts=list(TRAIN_COUNTS)[:num_classes], loss=loss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), many_threshold=20, few_threshold=8,
        plot_per_class=False,
    )  # fmt: skip
    return MultiExpertClassifier(**{**defaults, **kwargs})


def make_trainer(root, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
    )  # fmt: skip
    defaults.update(kwargs)
    return Trainer(**defaults)
