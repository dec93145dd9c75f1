"""AUCSeg's Tail-Classes Memory Bank (T-Memory Bank) as a Lightning callback that works on the batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_lt.metrics.segmentation import pixel_tail_classes, validate_tail_classes

__all__ = ["TailMemoryBank", "split_segmentation_batch"]

#: One stored entry: the bounding-box crop of a tail class in a training image, ``[3, h, w]``, and the
#: boolean mask of that class's pixels inside the crop, ``[h, w]``.
Entry = tuple[Tensor, Tensor]


class TailMemoryBank(Callback):
    """Store regions of tail classes seen in training and paste them into images that lack them.

    AUCSeg's Tail-Classes Memory Bank (Han et al., NeurIPS 2024), run on the training batch in
    ``on_train_batch_start`` (after the data loader's augmentation, before the forward pass):

    1. **Update.** For every image and every tail class ``c`` present in its mask, the bounding box of
       ``c``'s pixels (image crop + mask of ``c`` inside it) becomes an entry of ``c``. A class keeps at most
       ``memory_size`` entries; when full, a uniformly random slot is replaced.
    2. **Paste.** For every image, of the tail classes absent from its mask, ``ceil(p_sample * #absent)``
       are drawn without replacement; for each one that has entries, a random entry is resized by
       ``p_resize`` (bilinear image, nearest mask) and its class pixels are pasted at a uniformly random
       offset into the image, with the class id written into the label at exactly those pixels.

    The whole batch updates the bank before any pasting, and an image's own classes are never pasted into
    it (only absent classes are), so an entry may come from another image of the same batch. The bank
    stores bounding-box crops instead of the reference's whole images: the pasted pixels are the same
    (the reference masks everything but the class), the memory is much smaller, and entries are copies,
    so later pastes never alter stored entries.

    **Tail classes**: ``tail_classes`` if given; otherwise the LightningModule's resolved ``tail_classes``
    attribute if it has one (e.g. :class:`~lightning_lt.tasks.SegmentationModule` with an explicit list);
    otherwise :func:`~lightning_lt.metrics.segmentation.pixel_tail_classes` on the data module's (or the
    module's) pixel ``class_counts`` with ``tail_share``: a class is tail when its share of the labelled
    training pixels is below ``tail_share / num_classes``. The segmentation task reports head/tail mIoU
    over these classes.

    **DDP: the ranks share one bank.** Every step, the new entries of all ranks are gathered
    (``all_gather_object``) and every rank applies the same updates in rank order with the same random
    numbers, so the banks stay identical and the bank sees the whole training stream, not one rank's
    shard; checkpoints (written by rank 0) therefore hold the complete bank. Pasting uses a per-rank
    random stream, so ranks paste different entries. Random numbers come from ``seed``, the number of
    batches seen so far and the rank (for pasting), so a resumed run continues with the same bank and the
    same random decisions as an uninterrupted one.

    **Checkpointing**: the entries (on CPU), the batch counter and the tail classes are in the callback's
    ``state_dict``. Entries are kept on the batch's device during training.

    The batch must be ``(images, masks, ...)`` (tuple or list) or a dict with ``"image"`` and ``"mask"``
    keys: images float ``[B, 3, H, W]`` and masks integer ``[B, H, W]``; both are modified in place.

    Args:
        tail_classes: tail class ids; ``None`` resolves them at setup as described above.
        tail_share: the automatic rule's threshold (see above), in ``(0, 1]``.
        memory_size: entries kept per tail class (AUCSeg: 5).
        p_sample: fraction of the absent tail classes pasted into each image, in ``(0, 1]`` (AUCSeg: 1 on
            Cityscapes, 0.05 on ADE20K and COCO-Stuff).
        p_resize: scale factor of a pasted entry, ``> 0`` (AUCSeg: 1 on Cityscapes, 0.4 on ADE20K, 0.1 on
            COCO-Stuff). Entries that end up larger than the image are cropped to it.
        ignore_index: label of unlabelled pixels (never a tail class); ``None`` takes the module's or data
            module's ``ignore_index`` at setup.
        seed: seed of the bank's random decisions.
        num_classes: number of classes; ``None`` takes the module's or data module's ``num_classes`` at setup.
            Needed (with ``tail_classes``) only to use the bank outside a Trainer via :meth:`update_and_paste`.

    Raises:
        ValueError: on invalid arguments; at setup, if the tail classes are empty, out of range, or cannot
            be resolved (no list and no pixel class counts).

    Example:
        >>> import torch
        >>> bank = TailMemoryBank(tail_classes=[2], ignore_index=255, num_classes=3)
        >>> images, masks = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
        >>> masks[0, 2:4, 2:6] = 2                     # image 0 contains tail class 2
        >>> images[0, :, 2:4, 2:6] = 1.0
        >>> bank.update_and_paste(images, masks)       # image 1 lacks it: it gets a copy pasted
        >>> print(int((masks[1] == 2).sum()), float(images[1][:, masks[1] == 2].min()))
        8 1.0
    """

    def __init__(
        self,
        tail_classes: Optional[Sequence[int]] = None,
        tail_share: float = 0.1,
        memory_size: int = 5,
        p_sample: float = 1.0,
        p_resize: float = 1.0,
        ignore_index: Optional[int] = None,
        seed: int = 0,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(memory_size, int) or isinstance(memory_size, bool) or memory_size < 1:
            raise ValueError(f"Expected `memory_size` to be an integer >= 1 (entries per tail class), got {memory_size!r}")
        if not 0.0 < p_sample <= 1.0:
            raise ValueError(f"Expected `p_sample` in (0, 1] (fraction of absent tail classes pasted), got {p_sample}")
        if not p_resize > 0.0:
            raise ValueError(f"Expected `p_resize` > 0 (scale of a pasted entry), got {p_resize}")
        if not 0.0 < tail_share <= 1.0:
            raise ValueError(f"Expected `tail_share` in (0, 1], got {tail_share}")
        if tail_classes is not None and len(tail_classes) == 0:
            raise ValueError(
                "`tail_classes` is empty. HINT: list the tail class ids, or leave it unset to choose them from "
                "the training pixel frequencies."
            )
        self.requested_tail_classes = None if tail_classes is None else [int(c) for c in tail_classes]
        self.tail_share = float(tail_share)
        self.memory_size = memory_size
        self.p_sample = float(p_sample)
        self.p_resize = float(p_resize)
        self.ignore_index = ignore_index
        self.seed = int(seed)
        self.num_classes: Optional[int] = num_classes
        self.tail_classes: Optional[list[int]] = self.requested_tail_classes
        if num_classes is not None and tail_classes is not None:
            self.tail_classes = validate_tail_classes(tail_classes, num_classes)
        self.entries: dict[int, list[Entry]] = {}
        self.batches_seen = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(memory_size=self.memory_size, p_sample=self.p_sample, p_resize=self.p_resize)

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        found = _first_attr("num_classes", pl_module, datamodule)
        if self.num_classes is not None and found is not None and found != self.num_classes:
            raise ValueError(
                f"TailMemoryBank(num_classes={self.num_classes}) but the model has {found} classes. HINT: leave "
                "`num_classes` unset in a Trainer; it is taken from the model."
            )
        self.num_classes = self.num_classes if found is None else found
        if self.num_classes is None:
            raise ValueError(
                "TailMemoryBank needs the number of classes: neither the LightningModule nor the data module "
                "has a `num_classes` attribute."
            )
        if self.ignore_index is None:
            self.ignore_index = _first_attr("ignore_index", pl_module, datamodule)
        if self.requested_tail_classes is not None:
            tail = validate_tail_classes(self.requested_tail_classes, self.num_classes)
        elif getattr(pl_module, "tail_classes", None):
            tail = validate_tail_classes(pl_module.tail_classes, self.num_classes)
        else:
            counts = _first_attr("class_counts", datamodule, pl_module)
            if counts is None:
                raise ValueError(
                    "TailMemoryBank cannot choose tail classes: `tail_classes` is not set and neither the data "
                    "module nor the LightningModule has pixel `class_counts`. HINT: pass "
                    "`tail_classes=[...]`."
                )
            tail = pixel_tail_classes(counts, self.tail_share)
        if self.ignore_index is not None and self.ignore_index in tail:
            raise ValueError(f"The ignore index {self.ignore_index} cannot be a tail class (tail classes: {tail}).")
        self.tail_classes = tail
        self.entries = {c: self.entries.get(c, []) for c in tail}
        rank_zero_info(f"TailMemoryBank: {len(tail)} tail classes {tail}")

    # ---------------------------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        images, masks = split_segmentation_batch(batch)
        world_size = int(getattr(trainer, "world_size", 1))
        rank = int(getattr(trainer, "global_rank", 0))
        self.update_and_paste(images, masks, world_size=world_size, rank=rank)

    @torch.no_grad()
    def update_and_paste(self, images: Tensor, masks: Tensor, world_size: int = 1, rank: int = 0) -> None:
        """Update the bank with the batch (gathering all ranks' entries when ``world_size > 1``), then paste
        absent tail classes into ``images`` / ``masks`` in place."""
        if self.tail_classes is None or self.num_classes is None:
            raise RuntimeError("TailMemoryBank is not set up: add it to the Trainer's callbacks, or pass "
                               "`tail_classes` and `num_classes` to use `update_and_paste` outside a Trainer.")
        if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"TailMemoryBank expects images [B, C, H, W] and masks [B, H, W] of the same size, got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        present = self._presence(masks)  # [B, T] bool
        new_entries = self._extract(images, masks, present)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            new_entries = _gather_entries(new_entries, images.device, world_size)
        step_seed = self.seed * 1_000_003 + self.batches_seen
        self._update(new_entries, torch.Generator().manual_seed(step_seed))
        self._paste(images, masks, present, torch.Generator().manual_seed(step_seed * 7919 + 104_729 * (rank + 1)))
        self.batches_seen += 1

    def _presence(self, masks: Tensor) -> Tensor:
        tail = torch.tensor(self.tail_classes, device=masks.device)
        flat = masks.reshape(masks.shape[0], -1)
        hits = torch.zeros(masks.shape[0], self.num_classes + 1, dtype=torch.bool, device=masks.device)
        valid = (flat >= 0) & (flat < self.num_classes)
        hits.scatter_(1, torch.where(valid, flat, self.num_classes).long(), True)
        return hits[:, tail].cpu()

    def _extract(self, images: Tensor, masks: Tensor, present: Tensor) -> list[tuple[int, Tensor, Tensor]]:
        entries = []
        for b, t in present.nonzero().tolist():
            c = self.tail_classes[t]
            region = masks[b] == c
            rows = region.any(dim=1).nonzero()
            cols = region.any(dim=0).nonzero()
            top, bottom = int(rows[0]), int(rows[-1]) + 1
            left, right = int(cols[0]), int(cols[-1]) + 1
            entries.append((c, images[b, :, top:bottom, left:right].clone(), region[top:bottom, left:right].clone()))
        return entries

    def _update(self, new_entries: list[tuple[int, Tensor, Tensor]], generator: torch.Generator) -> None:
        for c, image, region in new_entries:
            slots = self.entries.setdefault(c, [])
            if len(slots) < self.memory_size:
                slots.append((image, region))
            else:
                slots[int(torch.randint(self.memory_size, (1,), generator=generator))] = (image, region)

    def _paste(self, images: Tensor, masks: Tensor, present: Tensor, generator: torch.Generator) -> None:
        height, width = masks.shape[-2:]
        for b in range(images.shape[0]):
            absent = [c for t, c in enumerate(self.tail_classes) if not present[b, t]]
            if not absent:
                continue
            n_pick = math.ceil(len(absent) * self.p_sample)
            order = torch.randperm(len(absent), generator=generator)[:n_pick].tolist()
            for i in order:
                c = absent[i]
                slots = self.entries.get(c)
                if not slots:
                    continue
                crop, region = slots[int(torch.randint(len(slots), (1,), generator=generator))]
                crop, region = self._resize(crop.to(images.device, images.dtype), region.to(images.device))
                h, w = min(region.shape[0], height), min(region.shape[1], width)
                crop, region = crop[:, :h, :w], region[:h, :w]
                top = int(torch.randint(height - h + 1, (1,), generator=generator))
                left = int(torch.randint(width - w + 1, (1,), generator=generator))
                image_view = images[b, :, top : top + h, left : left + w]
                mask_view = masks[b, top : top + h, left : left + w]
                image_view.copy_(torch.where(region, crop, image_view))
                mask_view.masked_fill_(region, c)

    def _resize(self, crop: Tensor, region: Tensor) -> Entry:
        if self.p_resize == 1.0:
            return crop, region
        h = max(1, int(region.shape[0] * self.p_resize))
        w = max(1, int(region.shape[1] * self.p_resize))
        crop = F.interpolate(crop[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0].to(crop.dtype)
        region = F.interpolate(region[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
        return crop, region

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": {c: [[image.cpu(), region.cpu()] for image, region in slots] for c, slots in self.entries.items()},
            "batches_seen": self.batches_seen,
            "tail_classes": self.tail_classes,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        entries = {int(c): [(image, region) for image, region in slots] for c, slots in state_dict.get("entries", {}).items()}
        if self.tail_classes is not None:
            dropped = sorted(set(entries) - set(self.tail_classes))
            if dropped:
                rank_zero_warn(
                    f"TailMemoryBank: the checkpoint has entries of classes {dropped} that are not tail classes "
                    f"of this run ({self.tail_classes}); they are dropped."
                )
            entries = {c: entries.get(c, [])[: self.memory_size] for c in self.tail_classes}
        self.entries = entries

    def num_entries(self) -> dict[int, int]:
        """Stored entries per tail class."""
        return {c: len(slots) for c, slots in self.entries.items()}


def split_segmentation_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(images, masks)`` of a segmentation batch: a tuple/list ``(images, masks, ...)`` or a dict with
    ``"image"`` and ``"mask"`` keys."""
    if isinstance(batch, dict):
        if "image" in batch and "mask" in batch:
            return batch["image"], batch["mask"]
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "Expected a segmentation batch `(images, masks)` or a dict with 'image' and 'mask' keys, got "
        f"{type(batch).__name__}"
    )


def _first_attr(name: str, *objects: Any) -> Any:
    for obj in objects:
        value = getattr(obj, name, None) if obj is not None else None
        if value is not None:
            return value
    return None


def _gather_entries(entries: list[tuple[int, Tensor, Tensor]], device: torch.device, world_size: int) -> list:
    """All ranks' new entries, in rank order, on ``device``."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, [(c, image.cpu(), region.cpu()) for c, image, region in entries])
    return [(c, image.to(device), region.to(device)) for part in gathered for c, image, region in part]
