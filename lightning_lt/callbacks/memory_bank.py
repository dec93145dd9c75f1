"""AUCSeg's Tail-Classes Memory Bank (T-Memory Bank) as a Lightning callback that works on the batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_lt.metrics.segmentation import pixel_tail_classes, validate_tail_classes

__all__ = ["TailMemoryBank", "split_segmentation_batch"]

Placement = Literal["reference", "random_box"]
_PLACEMENTS = ("reference", "random_box")


class Entry(NamedTuple):
    """One stored object of a tail class, already resized by ``p_resize``.

    ``pixels`` ``[C, h, w]`` and ``mask`` ``[h, w]`` (the class's pixels) cover the class's bounding box in
    the resized frame, which sits at ``(top, left)`` of the resized frame of size
    ``(frame_height, frame_width)``. An object that the resize leaves without a pixel has ``h = w = 0``.
    """

    pixels: Tensor
    mask: Tensor
    top: int
    left: int
    frame_height: int
    frame_width: int

    def to(self, device: torch.device | str) -> Entry:
        return self._replace(pixels=self.pixels.to(device), mask=self.mask.to(device))


class TailMemoryBank(Callback):
    """Store objects of tail classes seen in training and paste them into images that lack them.

    AUCSeg's Tail-Classes Memory Bank (Han et al., NeurIPS 2024), run on the training batch in
    ``on_train_batch_start`` (after the data loader's augmentation, before the forward pass):

    1. **Update.** For every image and every tail class ``c`` present in its mask, the image's frame holding
       ``c``'s pixels becomes an entry of ``c``. A class keeps at most ``memory_size`` entries; when full, a
       uniformly random slot is replaced.
    2. **Paste.** For every image, of the tail classes absent from its mask, ``ceil(p_sample * #absent)``
       are drawn without replacement (in random order); for each one that has entries, a random entry is
       pasted: only its class pixels, with the class id written into the label at exactly those pixels
       (later pastes cover earlier ones).

    **Placement** (``placement="reference"``, the default, as AUCSeg's ``TMemoryBank`` transform): the whole
    stored ``H x W`` frame is resized to ``h' x w' = int(H * p_resize) x int(W * p_resize)`` (bilinear image,
    nearest label; OpenCV's ``INTER_LINEAR`` / ``INTER_NEAREST``: half-pixel centres, no antialiasing) and
    placed at the offset ``x ~ U{0, ..., W_t - w'}``, then ``y ~ U{0, ..., H_t - h'}`` in the target image
    ``H_t x W_t``. At ``p_resize = 1`` on equal-size frames (fixed-size training crops) the offset is 0: an
    object is pasted exactly where it was in its own image. A resized frame larger than the target (the
    reference fails there) is placed at an offset in ``{W_t - w', ..., 0}`` (likewise for ``y``), so that
    it covers the target, and clipped. ``placement="random_box"`` resizes the same way but places the
    object's bounding box at a uniformly random offset where it fits in the target (clipped if larger), so
    objects move around the image: this library's earlier behaviour.

    **What is stored**: the reference keeps whole frames (the image and the positions of the class's
    pixels) and resizes them at every paste. The bank keeps, per entry, the resized pixels and mask of the
    class's bounding box, its position in the resized frame and the frame's size, which reproduces the
    reference's pastes exactly in a fraction of the memory: whole frames would take ``memory_size x
    #tail classes x C x H x W`` values (ADE20K, 124 tail classes at 512 x 512: 1.9 GB in float32). The
    bounding box is resized when an entry is made, not at each paste. Entries are copies taken before any
    pasting: the reference stores the frame tensor itself, which its own pastes of the same call then
    modify (a tail object can carry pixels of a class pasted over it); that side effect is not reproduced.

    The whole batch updates the bank before any pasting, and an image's own classes are never pasted into
    it (only absent classes are), so an entry may come from another image of the same batch. (In the
    reference each data-loader worker has its own bank, filled sample by sample.) The reference draws its
    random numbers from Python's ``random`` module; the bank uses seeded ``torch.Generator`` streams with the
    same draws in the same order (slot, class subset, entry, ``x``, ``y``).

    **Tail classes**: ``tail_classes`` if given; otherwise the LightningModule's resolved ``tail_classes``
    attribute if it has one (e.g. :class:`~lightning_lt.tasks.SegmentationModule` with an explicit list);
    otherwise :func:`~lightning_lt.metrics.segmentation.pixel_tail_classes` on the data module's (or the
    module's) pixel ``class_counts`` with ``tail_share``: a class is tail when its share of the labelled
    training pixels is below ``tail_share / num_classes``. The segmentation task reports head/tail mIoU
    over these classes.

    **DDP: the ranks share one bank.** Every rank applies the same updates, in rank order, with the same
    random numbers, so the banks stay identical, the bank sees the whole training stream rather than one
    rank's shard, and checkpoints (written by rank 0) hold the complete bank: it equals the bank one process
    builds from the ranks' batches concatenated in rank order. Only what the step keeps is exchanged: (1) each
    rank's frame header, then one row per tail object of its batch (image, class, bounding box), by
    ``all_gather`` of small integer tensors; (2) from these, every rank decides the slots of all new entries with the shared
    generator, so every rank knows which entries survive the step (an entry that a later one of the same
    step overwrites is never cropped nor sent); (3) each rank crops only its own surviving entries and sends
    them once, as one byte buffer ``broadcast`` from that rank: the pixels in the images' dtype, the masks as
    bytes. Pasting uses a per-rank random stream, so ranks paste different entries. Random numbers come from
    ``seed``, the number of batches seen so far and the rank (for pasting), so a resumed run continues with the
    same bank and the same random decisions as an uninterrupted one.

    **Host synchronisation**: once per step, the boxes of the tail classes in the batch (``[B, T, 4]``
    integers, found on the device) are copied to the host (``Tensor.tolist`` in :meth:`update_and_paste`;
    under DDP the gathered header and object rows instead, two copies, one if no rank has a tail object).
    This cannot be avoided: the bank is a host-side list of crops whose sizes are the objects' sizes, and
    which slots the new entries take depends on which classes the batch holds. Everything else (slot
    decisions, cropping and resizing the kept boxes, the byte exchange, pasting) runs on host integers and
    device kernels without another synchronisation; the random decisions are drawn from CPU
    ``torch.Generator`` s (host values: no device involved).

    **Checkpointing**: the entries (on CPU), the batch counter and the tail classes are in the callback's
    ``state_dict``. Entries are kept on the batch's device during training (moved there once after a resume).

    The batch must be ``(images, masks, ...)`` (tuple or list) or a dict holding them under ``image_key`` and
    ``mask_key``: images float ``[B, C, H, W]`` and masks integer ``[B, H, W]``; both are modified in place.

    Args:
        tail_classes: tail class ids; ``None`` resolves them at setup as described above.
        tail_share: the automatic rule's threshold (see above), in ``(0, 1]``.
        memory_size: entries kept per tail class (AUCSeg: 5).
        p_sample: fraction of the absent tail classes pasted into each image, in ``(0, 1]`` (AUCSeg: 1 on
            Cityscapes, 0.05 on ADE20K and COCO-Stuff).
        p_resize: scale factor of the stored frames, ``> 0`` (AUCSeg: 1 on Cityscapes, 0.4 on ADE20K, 0.1 on
            COCO-Stuff).
        placement: ``"reference"`` (AUCSeg's whole-frame placement) or ``"random_box"`` (see above).
        ignore_index: label of unlabelled pixels (never a tail class); ``None`` takes the module's or data
            module's ``ignore_index`` at setup.
        seed: seed of the bank's random decisions.
        num_classes: number of classes; ``None`` takes the module's or data module's ``num_classes`` (or the
            module's ``num_classes`` hyperparameter) at setup. Needed (with ``tail_classes``) to use the bank
            outside a Trainer via :meth:`update_and_paste`.
        image_key: key of the images in dict batches.
        mask_key: key of the masks in dict batches.

    Raises:
        ValueError: on invalid arguments; at setup, if the number of classes cannot be found, or the tail
            classes are empty, out of range, or cannot be resolved (no list and no pixel class counts); on a
            dict batch without ``image_key`` or ``mask_key``.

    Example:
        >>> import torch
        >>> bank = TailMemoryBank(tail_classes=[2], ignore_index=255, num_classes=3)
        >>> images, masks = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
        >>> masks[0, 2:4, 2:6] = 2                     # image 0 contains tail class 2
        >>> images[0, :, 2:4, 2:6] = 1.0
        >>> bank.update_and_paste(images, masks)       # image 1 lacks it: it gets a copy, at the same place
        >>> print(torch.equal(masks[1], masks[0]), torch.equal(images[1], images[0]))
        True True
    """

    def __init__(
        self,
        tail_classes: Optional[Sequence[int]] = None,
        tail_share: float = 0.1,
        memory_size: int = 5,
        p_sample: float = 1.0,
        p_resize: float = 1.0,
        placement: Placement = "reference",
        ignore_index: Optional[int] = None,
        seed: int = 0,
        num_classes: Optional[int] = None,
        image_key: str = "image",
        mask_key: str = "mask",
    ) -> None:
        super().__init__()
        if not isinstance(memory_size, int) or isinstance(memory_size, bool) or memory_size < 1:
            raise ValueError(f"Expected `memory_size` to be an integer >= 1 (entries per tail class), got {memory_size!r}")
        if not 0.0 < p_sample <= 1.0:
            raise ValueError(f"Expected `p_sample` in (0, 1] (fraction of absent tail classes pasted), got {p_sample}")
        if not p_resize > 0.0:
            raise ValueError(f"Expected `p_resize` > 0 (scale of a stored frame), got {p_resize}")
        if not 0.0 < tail_share <= 1.0:
            raise ValueError(f"Expected `tail_share` in (0, 1], got {tail_share}")
        if placement not in _PLACEMENTS:
            raise ValueError(f"Expected `placement` to be one of {_PLACEMENTS}, got {placement!r}")
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
        self.placement = placement
        self.ignore_index = ignore_index
        self.seed = int(seed)
        self.num_classes: Optional[int] = num_classes
        self.image_key = image_key
        self.mask_key = mask_key
        self.tail_classes: Optional[list[int]] = self.requested_tail_classes
        if num_classes is not None and tail_classes is not None:
            self.tail_classes = validate_tail_classes(tail_classes, num_classes)
        self.entries: dict[int, list[Entry]] = {}
        self.batches_seen = 0
        self._entries_device: Optional[torch.device] = None
        self._resizes: dict[tuple[tuple[int, ...], torch.device], _FrameResize] = {}
        self._tail_index: dict[torch.device, Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(memory_size=self.memory_size, p_sample=self.p_sample, p_resize=self.p_resize)

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        found = _first_attr("num_classes", pl_module, getattr(pl_module, "hparams", None), datamodule)
        if self.num_classes is not None and found is not None and found != self.num_classes:
            raise ValueError(
                f"TailMemoryBank(num_classes={self.num_classes}) but the model has {found} classes. HINT: leave "
                "`num_classes` unset in a Trainer; it is taken from the model."
            )
        self.num_classes = self.num_classes if found is None else int(found)
        if self.num_classes is None:
            raise ValueError(
                "TailMemoryBank needs the number of classes, and neither the LightningModule (attribute or "
                "hyperparameter `num_classes`) nor the data module has one. HINT: pass "
                "`TailMemoryBank(num_classes=...)`."
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
        self._tail_index = {}
        self.entries = {c: self.entries.get(c, []) for c in tail}
        rank_zero_info(f"TailMemoryBank: {len(tail)} tail classes {tail}")

    # ---------------------------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        images, masks = split_segmentation_batch(batch, self.image_key, self.mask_key, owner="TailMemoryBank")
        world_size = int(getattr(trainer, "world_size", 1))
        rank = int(getattr(trainer, "global_rank", 0))
        self.update_and_paste(images, masks, world_size=world_size, rank=rank)

    @torch.no_grad()
    def update_and_paste(self, images: Tensor, masks: Tensor, world_size: int = 1, rank: int = 0) -> None:
        """Update the bank with the batch (with every rank's batch when ``world_size > 1``), then paste absent
        tail classes into ``images`` / ``masks`` in place.

        The one host synchronisation of the step is the copy of the boxes of the batch's tail classes to the
        host (see the class's docstring)."""
        if self.tail_classes is None or self.num_classes is None:
            raise RuntimeError("TailMemoryBank is not set up: add it to the Trainer's callbacks, or pass "
                               "`tail_classes` and `num_classes` to use `update_and_paste` outside a Trainer.")
        if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"TailMemoryBank expects images [B, C, H, W] and masks [B, H, W] of the same size, got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        self._move_entries(images.device)
        resize = self._resize(masks.shape[-2:], images.device)
        boxes = self._boxes(masks, resize)
        distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed:
            frames = _gather_frames(images, boxes, resize.out_size, world_size)
        else:  # the step's host synchronisation
            objects = [(b, t, box) for b, row in enumerate(boxes.tolist()) for t, box in enumerate(row) if box[0] >= 0]
            frames = [_Frames(objects, images.shape[0], images.shape[1], images.dtype, resize.out_size)]
        # the step's new entries in rank, image, tail-class order: (source rank, image, tail index, box)
        new = [(r, b, t, box) for r, frame in enumerate(frames) for b, t, box in frame.objects]
        update_generator, paste_generator = self._generators(rank)
        kept = self._plan([self.tail_classes[t] for _, _, t, _ in new], update_generator)
        survivors = sorted(set(kept.values()))
        made: dict[int, Entry] = {}
        for i in survivors:  # only this rank's objects that the step keeps are cropped
            source, b, t, box = new[i]
            if source == rank:
                made[i] = resize.entry(images[b], masks[b], self.tail_classes[t], box)
        if distributed:
            made = _share_entries(made, [(i, new[i][0], new[i][3]) for i in survivors], frames, rank, images.device)
        self._store(kept, made)
        self._paste(images, masks, frames[rank].absent(len(self.tail_classes)), paste_generator)
        self.batches_seen += 1

    def _generators(self, rank: int) -> tuple[torch.Generator, torch.Generator]:
        """The step's generators: of the update (the same on every rank) and of the pasting (per rank)."""
        step_seed = self.seed * 1_000_003 + self.batches_seen
        return (torch.Generator().manual_seed(step_seed),
                torch.Generator().manual_seed(step_seed * 7919 + 104_729 * (rank + 1)))

    def _move_entries(self, device: torch.device) -> None:
        """Entries live on the batch's device; those restored from a checkpoint (CPU) move there once."""
        if self._entries_device != device:
            self.entries = {c: [entry.to(device) for entry in slots] for c, slots in self.entries.items()}
            self._entries_device = device

    def _resize(self, size: Sequence[int], device: torch.device) -> _FrameResize:
        key = (tuple(size), device)
        if key not in self._resizes:
            if len(self._resizes) >= 16:  # batches of ever new sizes: keep the cache small
                self._resizes.clear()
            self._resizes[key] = _FrameResize(size, self.p_resize, device)
        return self._resizes[key]

    def _boxes(self, masks: Tensor, resize: _FrameResize) -> Tensor:
        """``[B, T, 4]`` int32 ``(top, left, bottom, right)`` of each tail class's pixels in each resized frame:
        ``-1`` where the class is absent, ``0`` where only the resize dropped its pixels (an empty entry). On the
        masks' device, without host synchronisation."""
        device = masks.device
        if device not in self._tail_index:  # built once per device: a host-to-device copy at every step would sync
            self._tail_index[device] = torch.tensor(self.tail_classes, device=device)
        tail = self._tail_index[device]
        labels = _class_index(resize.labels(masks), self.num_classes)
        row_hits = _hits(labels, self.num_classes)[..., tail]  # [B, h, T]: class t in row y
        col_hits = _hits(labels.transpose(1, 2), self.num_classes)[..., tail]  # [B, w, T]
        (top, bottom), (left, right) = _span(row_hits), _span(col_hits)
        if resize.identity:
            present = row_hits.any(dim=1)
        else:  # present before the resize: an object that the resize drops is an empty entry
            present = _hits(_class_index(masks, self.num_classes).flatten(1)[:, None], self.num_classes)[:, 0, tail]
        box = torch.stack([top, left, bottom, right], dim=-1)
        return torch.where(present[..., None], box, -1).to(torch.int32)

    def _plan(self, classes: list[int], generator: torch.Generator) -> dict[tuple[int, int], int]:
        """Where the step's new entries of classes ``classes`` end up: ``{(class, slot): i}``, ``i`` the index in
        ``classes`` of the last entry written to that slot. Entries are written in order: appended while their
        class has fewer than ``memory_size``, else into a uniformly random slot (one draw each), so a later
        entry can overwrite an earlier one of the same step."""
        filled = {c: len(self.entries.get(c, [])) for c in set(classes)}
        kept: dict[tuple[int, int], int] = {}
        for i, c in enumerate(classes):
            if filled[c] < self.memory_size:
                slot = filled[c]
                filled[c] += 1
            else:
                slot = _randint(0, self.memory_size - 1, generator)
            kept[(c, slot)] = i
        return kept

    def _store(self, kept: dict[tuple[int, int], int], made: dict[int, Entry]) -> None:
        """Write the entries ``made[i]`` into the slots that :meth:`_plan` gave them."""
        for (c, slot), i in sorted(kept.items()):
            slots = self.entries.setdefault(c, [])
            if slot < len(slots):
                slots[slot] = made[i]
            else:  # planned slots of a class that is not full follow its last one
                slots.append(made[i])

    def _paste(self, images: Tensor, masks: Tensor, absent: list[list[int]], generator: torch.Generator) -> None:
        """Paste into each image ``b`` entries of the tail classes ``absent[b]`` (indices into ``tail_classes``)."""
        height, width = masks.shape[-2:]
        for b, missing in enumerate(absent):
            if not missing:
                continue
            for i in _sample(len(missing), math.ceil(len(missing) * self.p_sample), generator):
                c = self.tail_classes[missing[i]]
                slots = self.entries.get(c)
                if not slots:
                    continue
                entry = slots[_randint(0, len(slots) - 1, generator)]
                if self.placement == "reference":  # the whole resized frame is placed, x first (as the reference)
                    left = _offset(width, entry.frame_width, generator) + entry.left
                    top = _offset(height, entry.frame_height, generator) + entry.top
                else:  # the object's bounding box is placed
                    left = _offset(width, entry.mask.shape[1], generator)
                    top = _offset(height, entry.mask.shape[0], generator)
                _paste_entry(images[b], masks[b], entry, top, left, c)

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": {c: [list(entry.to("cpu")) for entry in slots] for c, slots in self.entries.items()},
            "batches_seen": self.batches_seen,
            "tail_classes": self.tail_classes,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        entries: dict[int, list[Entry]] = {}
        stale = 0
        for c, slots in state_dict.get("entries", {}).items():
            kept = [Entry(*slot[:2], *map(int, slot[2:])) for slot in slots if len(slot) == len(Entry._fields)]
            stale += len(slots) - len(kept)
            entries[int(c)] = kept
        if stale:
            rank_zero_warn(
                f"TailMemoryBank: {stale} checkpoint entries are bounding-box crops without their frame position "
                "(written by an earlier version of lightning-lt); they are dropped and the bank refills from the "
                "training stream."
            )
        if self.tail_classes is not None:
            dropped = sorted(set(entries) - set(self.tail_classes))
            if dropped:
                rank_zero_warn(
                    f"TailMemoryBank: the checkpoint has entries of classes {dropped} that are not tail classes "
                    f"of this run ({self.tail_classes}); they are dropped."
                )
            entries = {c: entries.get(c, [])[: self.memory_size] for c in self.tail_classes}
        self.entries = entries
        self._entries_device = None

    def num_entries(self) -> dict[int, int]:
        """Stored entries per tail class."""
        return {c: len(slots) for c, slots in self.entries.items()}


class _FrameResize:
    """The resize of ``H x W`` frames to ``int(H * p) x int(W * p)`` as the reference's ``cv2.resize`` does it.

    Label: ``INTER_NEAREST``, source index ``floor(i * (1 / (out / in)))`` in double precision. Image:
    ``INTER_LINEAR``, source position ``(i + 0.5) * (1 / (out / in)) - 0.5`` in double precision, taps at its
    floor and the next pixel, edge-clamped (weight 0 outside), horizontal pass first, float32 weights. That is
    what OpenCV's x86-64 wheels compute (through Intel IPP); OpenCV's own code path rounds the position to
    float32 first, which moves values by up to about 1e-4 of their range. At ``p = 1`` both are the identity.
    """

    def __init__(self, size: Sequence[int], p_resize: float, device: torch.device) -> None:
        self.in_size = (int(size[0]), int(size[1]))
        self.out_size = tuple(max(1, int(n * p_resize)) for n in self.in_size)
        self.identity = self.out_size == self.in_size
        if not self.identity:
            self.nearest = [_nearest_index(o, i, device) for o, i in zip(self.out_size, self.in_size)]
            self.linear = [_linear_taps(o, i, device) for o, i in zip(self.out_size, self.in_size)]

    def labels(self, masks: Tensor) -> Tensor:
        """The label frames ``[B, H, W]`` resized (nearest), ``[B, h', w']``."""
        if self.identity:
            return masks
        rows, cols = self.nearest
        return masks[:, rows][:, :, cols]

    def entry(self, image: Tensor, mask: Tensor, label: int, box: Sequence[int]) -> Entry:
        """The entry of class ``label`` of one ``image`` ``[C, H, W]`` with label frame ``mask`` ``[H, W]``, whose
        pixels cover ``box = (top, left, bottom, right)`` of the resized frame (``bottom <= top``: none).

        The box's corners are host integers (from ``TailMemoryBank._boxes``): the crop's size depends on the
        object, so it is sliced with host values rather than found on the device here."""
        top, left, bottom, right = box
        if bottom <= top:  # the resize dropped every pixel of the object: an empty entry
            return Entry(image.new_zeros(image.shape[0], 0, 0), mask.new_zeros(0, 0, dtype=torch.bool), 0, 0, *self.out_size)
        if self.identity:
            region = mask[top:bottom, left:right] == label
            pixels = image[:, top:bottom, left:right].clone()
        else:
            rows, cols = self.nearest
            region = mask[rows[top:bottom]][:, cols[left:right]] == label
            (y0, y1, wy), (x0, x1, wx) = (
                tuple(t[a:z] for t in taps) for taps, a, z in zip(self.linear, (top, left), (bottom, right))
            )
            work = image if image.dtype in (torch.float32, torch.float64) else image.float()
            wx, wy = wx.to(work.dtype), wy.to(work.dtype)
            near, far = work[:, y0], work[:, y1]
            near = near[:, :, x0] * (1 - wx) + near[:, :, x1] * wx
            far = far[:, :, x0] * (1 - wx) + far[:, :, x1] * wx
            pixels = (near * (1 - wy)[:, None] + far * wy[:, None]).to(image.dtype)
        return Entry(pixels, region, top, left, *self.out_size)


def _class_index(labels: Tensor, num_classes: int) -> Tensor:
    """Labels as ``int64`` indices, anything outside ``[0, num_classes)`` (ignored pixels) as ``num_classes``."""
    return torch.where((labels >= 0) & (labels < num_classes), labels, num_classes).long()


def _hits(labels: Tensor, num_classes: int) -> Tensor:
    """``hits[b, n, k]``: class ``k`` occurs in ``labels[b, n, :]``, for class indices ``[B, N, M]``: ``[B, N, K + 1]``."""
    hits = torch.zeros(*labels.shape[:2], num_classes + 1, dtype=torch.bool, device=labels.device)
    return hits.scatter_(2, labels, True)


def _span(hits: Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last index along dim 1 of the ``True`` values of ``hits`` ``[B, N, T]`` (0, 0 where none)."""
    found, as_int = hits.any(dim=1), hits.to(torch.uint8)
    first = as_int.argmax(dim=1)  # the first maximum
    end = hits.shape[1] - as_int.flip(1).argmax(dim=1)
    return first * found, end * found


def _nearest_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    step = 1.0 / (out_size / in_size)
    index = torch.floor(torch.arange(out_size, dtype=torch.float64, device=device) * step).long()
    return index.clamp_max(in_size - 1)


def _linear_taps(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices ``i0``, ``i1`` and the weight of ``i1`` (float32) of each output pixel."""
    step = 1.0 / (out_size / in_size)
    position = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * step - 0.5
    start = torch.floor(position)
    weight = (position - start).float()
    start = start.long()
    weight = weight.masked_fill((start < 0) | (start >= in_size - 1), 0.0)
    start = start.clamp(0, in_size - 1)
    return start, (start + 1).clamp_max(in_size - 1), weight


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (both included, as Python's ``random.randint``)."""
    return low + int(torch.randint(high - low + 1, (1,), generator=generator))


def _sample(n: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` of ``range(n)`` without replacement, in random order (as Python's ``random.sample``)."""
    return torch.randperm(n, generator=generator)[:k].tolist()


def _offset(target: int, size: int, generator: torch.Generator) -> int:
    """Offset of a ``size`` span in a ``target`` span: uniform in ``[0, target - size]`` when it fits (the
    reference's ``random.randint(0, target - size)``), else in ``[target - size, 0]``, so that it covers it."""
    return _randint(min(0, target - size), max(0, target - size), generator)


def _paste_entry(image: Tensor, mask: Tensor, entry: Entry, top: int, left: int, label: int) -> None:
    """Write the entry's class pixels at ``(top, left)`` of ``image`` ``[C, H, W]`` and ``mask`` ``[H, W]``
    (in place), clipped to them."""
    h, w = entry.mask.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, mask.shape[0]), min(left + w, mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    region = entry.mask[y0 - top : y1 - top, x0 - left : x1 - left].to(mask.device)
    pixels = entry.pixels[:, y0 - top : y1 - top, x0 - left : x1 - left].to(image.device, image.dtype)
    image_view = image[:, y0:y1, x0:x1]
    image_view.copy_(torch.where(region, pixels, image_view))
    mask[y0:y1, x0:x1].masked_fill_(region, label)


def split_segmentation_batch(
    batch: Any, image_key: str = "image", mask_key: str = "mask", owner: str = "the task"
) -> tuple[Tensor, Tensor]:
    """``(images, masks)`` of a segmentation batch: a tuple/list ``(images, masks, ...)`` or a mapping with
    ``image_key`` and ``mask_key``.

    Raises:
        ValueError: a mapping without those keys (the message lists the keys it has).
        TypeError: any other batch.
    """
    if isinstance(batch, Mapping):
        missing = [key for key in (image_key, mask_key) if key not in batch]
        if not missing:
            return batch[image_key], batch[mask_key]
        raise ValueError(
            f"The segmentation batch is a dict without the key(s) {missing}; its keys are {list(batch)}. HINT: pass "
            f"`image_key=...` and `mask_key=...` to {owner} with the keys of the images and the masks."
        )
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Expected a segmentation batch `(images, masks)` or a dict with {image_key!r} and {mask_key!r} keys, got "
        f"{type(batch).__name__}"
    )


def _first_attr(name: str, *objects: Any) -> Any:
    for obj in objects:
        if isinstance(obj, Mapping):
            value = obj.get(name)
        else:
            value = getattr(obj, name, None) if obj is not None else None
        if value is not None:
            return value
    return None


class _Frames(NamedTuple):
    """One rank's step as every rank sees it: the tail objects ``(image, tail index, box)`` in image, then
    tail-class order (host integers, see ``TailMemoryBank._boxes``), the batch size, the images' channels and
    dtype, and the resized frame size."""

    objects: list[tuple[int, int, list[int]]]
    batch_size: int
    channels: int
    dtype: torch.dtype
    frame_size: tuple[int, int]

    def absent(self, num_tail: int) -> list[list[int]]:
        """Per image, the tail indices it lacks."""
        present = [set() for _ in range(self.batch_size)]
        for b, t, _ in self.objects:
            present[b].add(t)
        return [[t for t in range(num_tail) if t not in held] for held in present]

    def entry_bytes(self, box: Sequence[int]) -> tuple[int, int]:
        """Bytes of the pixels and of the mask of the entry of ``box``."""
        area = max(0, box[2] - box[0]) * max(0, box[3] - box[1])
        return area * self.channels * self.dtype.itemsize, area


#: Image dtypes the DDP exchange can send, by the code it sends for them.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64)


def _gather_frames(images: Tensor, boxes: Tensor, frame_size: tuple[int, int], world_size: int) -> list[_Frames]:
    """Every rank's :class:`_Frames`, in rank order, from two ``all_gather`` s of small integer tensors, each
    copied to the host (the step's synchronisations under DDP): a header (batch size, channels, dtype, frame
    size, number of tail objects), then the tail objects' rows ``(b * T + t, box)``, moved to the front by a
    stable sort on the device and cut to the largest number of objects of a rank."""
    if images.dtype not in _DTYPES:
        raise ValueError(f"TailMemoryBank cannot exchange images of dtype {images.dtype} between ranks. HINT: "
                         f"convert the batch to one of {[str(d) for d in _DTYPES]} (e.g. float32) before the bank.")
    flat = boxes.flatten(0, 1)  # [B * T, 4]
    found = flat[:, 0] >= 0
    header = torch.zeros(6, dtype=torch.int64, device=images.device)  # filled on the device: no host copy
    for i, value in enumerate((boxes.shape[0], images.shape[1], _DTYPES.index(images.dtype), *frame_size)):
        header[i] = value
    header[-1] = found.sum()
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header)
    headers = torch.stack(headers).tolist()
    if len({(channels, dtype) for _, channels, dtype, _, _, _ in headers}) > 1:
        raise ValueError(
            "TailMemoryBank: the ranks' images differ in channels or dtype "
            f"({[(channels, str(_DTYPES[dtype])) for _, channels, dtype, _, _, _ in headers]}), so entries of one "
            "rank cannot be pasted into another's images. HINT: give every rank's data loader the same transforms."
        )
    first = torch.argsort((~found).to(torch.uint8), stable=True)  # the objects first, in their order
    rows = torch.cat([first[:, None].to(boxes.dtype), flat[first]], dim=1)
    most = max(h[-1] for h in headers)
    if most == 0:  # no tail object on any rank
        return [_Frames([], size, channels, _DTYPES[dtype], (height, width))
                for size, channels, dtype, height, width, _ in headers]
    padded = rows.new_full((most, 5), -1)
    padded[: min(most, len(rows))] = rows[:most]
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    every = torch.stack(gathered).tolist()
    num_tail = boxes.shape[1]
    return [
        _Frames([(i // num_tail, i % num_tail, box) for i, *box in every[r][:count]], size, channels, _DTYPES[dtype],
                (height, width))
        for r, (size, channels, dtype, height, width, count) in enumerate(headers)
    ]


def _share_entries(made: dict[int, Entry], kept: list[tuple[int, int, list[int]]], frames: list[_Frames], rank: int,
                   device: torch.device) -> dict[int, Entry]:
    """Every kept entry on every rank: ``kept`` lists ``(i, source rank, box)`` of the step's kept entries, in
    the same order on every rank, ``made`` this rank's own ones. Each rank sends its kept entries once, as one
    uint8 buffer ``broadcast`` from it: the pixels' bytes (the images' dtype), then the masks' bytes. Every
    rank knows every buffer's layout from the boxes, so nothing else is sent and the bytes are read back
    without a host synchronisation."""
    entries = dict(made)
    for source, frame in enumerate(frames):
        items = [(i, box) for i, r, box in kept if r == source and box[2] > box[0]]
        if source != rank:  # objects that the resize dropped: empty entries, nothing to send
            entries.update({i: Entry(torch.empty(frame.channels, 0, 0, dtype=frame.dtype, device=device),
                                     torch.empty(0, 0, dtype=torch.bool, device=device), 0, 0, *frame.frame_size)
                            for i, r, box in kept if r == source and box[2] <= box[0]})
        if not items:  # every rank skips it: they all know the boxes
            continue
        sizes = [frame.entry_bytes(box) for _, box in items]
        pixel_bytes = sum(size for size, _ in sizes)
        if source == rank:
            buffer = torch.cat([torch.cat([made[i].pixels.reshape(-1) for i, _ in items]).view(torch.uint8),
                                torch.cat([made[i].mask.reshape(-1) for i, _ in items]).view(torch.uint8)])
        else:
            buffer = torch.empty(pixel_bytes + sum(area for _, area in sizes), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=source)
        if source == rank:
            continue
        pixels, masks = buffer[:pixel_bytes].view(frame.dtype), buffer[pixel_bytes:].view(torch.bool)
        pixel_at = mask_at = 0
        for (i, (top, left, bottom, right)), (size, area) in zip(items, sizes):
            count, shape = size // frame.dtype.itemsize, (bottom - top, right - left)
            entries[i] = Entry(pixels[pixel_at : pixel_at + count].view(frame.channels, *shape).clone(),
                               masks[mask_at : mask_at + area].view(shape).clone(), top, left, *frame.frame_size)
            pixel_at, mask_at = pixel_at + count, mask_at + area
    return entries
