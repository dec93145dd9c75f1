"""A tiny synthetic segmentation problem (data module + network) for task and callback tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4
IGNORE = 255
TAIL = [2, 3]
SIZE = 16


def toy_segmentation(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[3, 16, 16]`` and masks: left half class 0, right half class 1, a 3x3 square of tail
    class 2 in every third image, a 2x4 bar of tail class 3 in every fourth, an ignored corner.

    Image channel 0 encodes the label (``0.25 * label``), channel 1 the image index (``index / n``),
    channel 2 is noise, so a pasted pixel shows where it came from.
    """
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    masks[:, :, SIZE // 2 :] = 1
    for i in range(n):
        if i % 3 == 0:
            top, left = torch.randint(0, SIZE - 3, (2,), generator=g).tolist()
            masks[i, top : top + 3, left : left + 3] = 2
        if i % 4 == 1:
            top, left = torch.randint(0, SIZE - 4, (2,), generator=g).tolist()
            masks[i, top : top + 2, left : left + 4] = 3
    masks[:, :2, :2] = IGNORE
    images = torch.stack(
        [
            0.25 * masks.clamp(max=NUM_CLASSES).float(),
            (torch.arange(n).float() / n)[:, None, None].expand(n, SIZE, SIZE),
            torch.rand(n, SIZE, SIZE, generator=g),
        ],
        dim=1,
    )
    return images, masks


class ToySegData(LightningDataModule):
    """The toy problem as a data module with the attributes the lightning-lt CLI links."""

    num_classes = NUM_CLASSES
    ignore_index = IGNORE
    class_names = ["a", "b", "tail_c", "tail_d"]

    def __init__(self, n: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        self.images, self.masks = toy_segmentation(n)
        self.batch_size = batch_size

    @property
    def class_counts(self) -> list[int]:
        labelled = self.masks[self.masks != IGNORE]
        return torch.bincount(labelled, minlength=NUM_CLASSES).tolist()

    def train_dataloader(self) -> DataLoader:
        # The bank modifies the batch in place: hand out copies so the data set itself stays pristine.
        return DataLoader(TensorDataset(self.images.clone(), self.masks.clone()), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.masks), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class TinySegNet(nn.Module):
    """Two convolutions; ``num_classes`` first, as the task's ``net`` factory is called."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
