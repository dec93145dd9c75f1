"""AUCSeg's Tail-Classes Memory Bank (T-Memory Bank) as a Lightning callback that works on the batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_lt.metrics.segmentation import pixel_tail_classes, validate_tail_classes

__all__ = ["TailMemoryBank", "split_segmentation_batch"]

Placement = Literal["reference", "random_box"]
_PLACEMENTS = ("reference", "random_box")


class Entry(NamedTuple):
    """One stored object of a tail class, already resized by ``p_resize`` (the bank's checkpoint format and the
    view :attr:`TailMemoryBank.entries`).

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


class _Bank(NamedTuple):
    """The bank on the device: a pool of ``P`` resized frames, each stored once however many of its classes are
    kept, and ``M`` slots for each of ``T`` tail classes pointing into it.

    Frame ``p`` is ``pixels[p, :, :h, :w]`` with ``(h, w) = sizes[p]`` and its class indices ``labels[p]`` (the
    label frame's class ids; ``num_classes`` for ignored pixels and outside the frame: frames of different sizes
    sit in the top-left corner of the largest one seen). Slot ``(t, m)`` is an entry of tail class ``t``: frame
    ``refs[t, m]``, the class's bounding box ``boxes[t, m] = (top, left, bottom, right)`` in it (all 0 for an
    empty entry); ``filled[t]`` slots are in use. ``P >= T x M + frames per step``, so every step finds room for
    its frames among the frames that no slot keeps."""

    pixels: Tensor  # [P, C, H, W], the images' dtype
    labels: Tensor  # [P, H, W], int16 (int32 beyond 32,766 classes)
    sizes: Tensor  # [P, 2] int64
    refs: Tensor  # [T, M] int64
    boxes: Tensor  # [T, M, 4] int64
    filled: Tensor  # [T] int64

    @classmethod
    def empty(cls, tail: int, memory: int, pool: int, channels: int, size: tuple[int, int], dtype: torch.dtype,
              num_classes: int, device: torch.device) -> _Bank:
        label_dtype = torch.int16 if num_classes < 2**15 - 1 else torch.int32
        zeros = torch.zeros
        return cls(zeros(pool, channels, *size, dtype=dtype, device=device),
                   torch.full((pool, *size), num_classes, dtype=label_dtype, device=device),
                   zeros(pool, 2, dtype=torch.long, device=device), zeros(tail, memory, dtype=torch.long, device=device),
                   zeros(tail, memory, 4, dtype=torch.long, device=device), zeros(tail, dtype=torch.long, device=device))

    @property
    def frame(self) -> tuple[int, int]:
        return tuple(self.labels.shape[-2:])  # type: ignore[return-value]

    def fit(self, channels: int, size: Sequence[int], pool: int, dtype: torch.dtype, num_classes: int,
            device: torch.device) -> _Bank:
        """The bank on ``device`` in ``dtype``, its frames grown to hold ``size`` and its pool to ``pool`` frames
        (host values: no synchronisation)."""
        if channels != self.pixels.shape[1]:
            raise ValueError(
                f"TailMemoryBank holds images of {self.pixels.shape[1]} channels, the batch has {channels}. HINT: "
                "give every batch the same channels (the bank pastes its entries into them)."
            )
        bank = self if self.pixels.device == device else _Bank(*(t.to(device) for t in self))
        if bank.pixels.dtype != dtype:
            bank = bank._replace(pixels=bank.pixels.to(dtype))
        grow_h, grow_w = max(0, size[0] - bank.frame[0]), max(0, size[1] - bank.frame[1])
        more = max(0, pool - bank.pixels.shape[0])
        if grow_h or grow_w or more:
            pad = (0, grow_w, 0, grow_h)
            bank = bank._replace(
                pixels=F.pad(F.pad(bank.pixels, pad), (0, 0, 0, 0, 0, 0, 0, more)),
                labels=F.pad(F.pad(bank.labels, pad, value=num_classes), (0, 0, 0, 0, 0, more), value=num_classes),
                sizes=F.pad(bank.sizes, (0, 0, 0, more)),
            )
        return bank

    def unkept(self, writer: Tensor, count: int) -> Tensor:
        """``count`` pool frames that no slot keeps once the step's writes (``writer >= 0``, see :func:`_plan`)
        are done: the first ones in pool order, found on the device."""
        memory = self.refs.shape[1]
        kept = (writer < 0) & (torch.arange(memory, device=writer.device)[None] < self.filled[:, None])
        used = torch.zeros(self.pixels.shape[0] + 1, dtype=torch.uint8, device=writer.device)
        used.scatter_(0, torch.where(kept, self.refs, self.pixels.shape[0]).flatten(), 1)
        return torch.argsort(used[:-1], stable=True)[:count]

    def entries(self, tail_classes: Sequence[int]) -> dict[int, list[Entry]]:
        """The stored entries as bounding-box crops on the CPU (a host copy: for checkpoints and inspection)."""
        filled, refs, boxes = self.filled.tolist(), self.refs.tolist(), self.boxes.tolist()
        sizes, pixels, labels = self.sizes.tolist(), self.pixels.cpu(), self.labels.cpu()
        entries: dict[int, list[Entry]] = {}
        for t, c in enumerate(tail_classes):
            slots = entries[c] = []
            for m in range(filled[t]):
                (top, left, bottom, right), frame = boxes[t][m], refs[t][m]
                slots.append(Entry(pixels[frame, :, top:bottom, left:right].clone(),
                                   labels[frame, top:bottom, left:right] == c, top, left, *sizes[frame]))
        return entries

    def store(self, writes: Sequence[tuple[tuple[int, int], int, Entry, int]], num_classes: int) -> None:
        """Write host-side entries (crops) in place: ``(slot, pool frame, entry, class)`` each. A pool frame is
        cleared before its first crop, so the crops of one source frame (its kept classes) share a pool frame."""
        cleared = set()
        for (t, m), frame, entry, label in writes:
            if frame not in cleared:
                self.labels[frame] = num_classes
                cleared.add(frame)
            self.refs[t, m] = frame
            self.boxes[t, m] = torch.tensor(self._put(frame, entry, label))

    def _put(self, frame: int, entry: Entry, label: int) -> tuple[int, int, int, int]:
        """Write one crop of class ``label`` into pool frame ``frame`` beside what the frame holds; its box."""
        self.sizes[frame] = torch.tensor([entry.frame_height, entry.frame_width])
        h, w = entry.mask.shape
        if not (h and w):
            return 0, 0, 0, 0
        top, left = entry.top, entry.left
        self.pixels[frame, :, top : top + h, left : left + w] = entry.pixels.to(self.pixels.device, self.pixels.dtype)
        region = self.labels[frame, top : top + h, left : left + w]
        region.copy_(torch.where(entry.mask.to(region.device), label, region))
        return top, left, top + h, left + w


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

    **What is stored**: as the reference, whole frames: a pool of resized frames (pixels and class ids) on the
    batch's device, each frame stored once however many of its classes are kept, and per tail class
    ``memory_size`` slots, each naming a frame and the class's bounding box in it. The pool holds
    ``#tail classes x memory_size + B`` frames of ``C x h' x w'`` values in the images' dtype, plus the class ids
    (int16); frames of different sizes sit in the top-left corner of the largest one seen. AUCSeg's ADE20K
    setting (124 tail classes, 16 crops of 512 x 512 per step, ``p_resize`` 0.4) takes 318 MB in float32 and 53 MB
    of class ids; the Cityscapes one (``p_resize`` 1, 512 x 1024 crops) 7.3 MB per pool frame. A frame is resized once, when it
    enters the bank, not at each paste. Entries are copies taken before any pasting: the reference stores the
    frame tensor itself, which its own pastes of the same call then modify (a tail object can carry pixels of
    a class pasted over it); that side effect is not reproduced. Checkpoints hold only the bounding boxes'
    crops (:class:`Entry`).

    The whole batch updates the bank before any pasting, and an image's own classes are never pasted into
    it (only absent classes are), so an entry may come from another image of the same batch. (In the
    reference each data-loader worker has its own bank, filled sample by sample.)

    **Random numbers**: the reference calls Python's ``random`` in its loops, as many times as the data
    asks. The bank draws a fixed set per step instead, uniform in ``[0, 1)`` (float64) from seeded
    ``torch.Generator`` s on the batch's device: per frame and tail class one for the slot an entry replaces
    when its class is full (the update's, the same on every rank), and per image and tail class one key,
    one for the entry and one each for ``x`` and ``y`` (the pasting's, per rank). The reference's
    ``randint(a, b)`` is ``a + floor(u * (b - a + 1))`` of the decision's number, and its ``random.sample``
    of the absent classes is their order by key. Each decision of the reference maps to its own number, so
    the decisions are the reference's for those random numbers (``tests/reference/test_memory_bank.py``
    replays them to a transcription of AUCSeg's code). Seeds come from ``seed``, the number of batches seen
    so far and the rank (for pasting), so a resumed run continues with the same bank and the same random
    decisions as an uninterrupted one.

    **Host synchronisation**: none in one process. Presence and boxes (scatters over the label frames), the
    slots (a cumulative count per class and a ``scatter_reduce``), the pool frames that no slot keeps (an
    ``argsort``), the write of the batch's ``B`` frames into them (``index_copy_``) and the pastes run on the
    device with sizes known on the host. Pasting takes ``ceil(p_sample x #tail classes)`` rounds, each a gather
    and a scatter over a window of the bank's frame size in every image of the batch (the positions where the
    chosen entries can land). When every stored frame has the target's size (``p_resize = 1`` on fixed-size
    crops, AUCSeg's Cityscapes setting) the reference placement's offsets are all 0 and a round is a direct
    ``where`` over the chosen frames, with the same result. Measured in ``benchmarks/results/scale.md``
    (``memory-bank-ddp``) and ``camvid-pretrained.md`` (``tmb_overhead``).

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
    rank's frame header (batch size, channels, dtype, frame size, number of tail objects), then every rank's
    boxes, by ``all_gather`` of small integer tensors; (2) from these, every rank decides the slots of all new
    entries with the shared numbers, so every rank knows which entries survive the step (an entry that a later
    one of the same step overwrites is never cropped nor sent); (3) each rank crops only its own surviving
    entries and sends them once, as one byte buffer ``broadcast`` from that rank: the pixels in the images'
    dtype, the masks as bytes. The buffers' sizes must be known on the host, so under DDP the step copies the
    gathered header and the surviving entries' slots and boxes to the host: two synchronisations (one when no
    rank has a tail object). Pasting uses a per-rank random stream, so ranks paste different entries.

    **Checkpointing**: the entries (bounding-box crops on the CPU, :class:`Entry`), the batch counter and the
    tail classes are in the callback's ``state_dict``. A restored bank is moved to the batch's device once.

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
            dict batch without ``image_key`` or ``mask_key``; on a batch whose channels differ from the bank's.

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
        self.batches_seen = 0
        self._bank: Optional[_Bank] = None
        self._frame_sizes: set[tuple[int, int]] = set()  # sizes of the frames written into the pool (host values)
        self._restored: dict[int, list[Entry]] = {}  # entries of a checkpoint, written into the bank at the next batch
        self._resizes: dict[tuple[tuple[int, ...], torch.device], _FrameResize] = {}
        self._tail_index: dict[torch.device, Tensor] = {}
        self._device_generators: dict[torch.device, torch.Generator] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(memory_size=self.memory_size, p_sample=self.p_sample, p_resize=self.p_resize)

    @property
    def entries(self) -> dict[int, list[Entry]]:
        """The stored entries per tail class, as bounding-box crops on the CPU (copied from the device: for
        checkpoints and inspection, not for the training loop)."""
        if self._bank is None:
            return {c: list(self._restored.get(c, [])) for c in self.tail_classes or []}
        return self._bank.entries(self.tail_classes)

    def num_entries(self) -> dict[int, int]:
        """Stored entries per tail class."""
        return {c: len(slots) for c, slots in self.entries.items()}

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
        if tail != self.tail_classes and self._bank is not None:  # re-indexed by the new list at the next batch
            self._restored, self._bank = self.entries, None
        self.tail_classes = tail
        self._tail_index = {}
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
        tail classes into ``images`` / ``masks`` in place. In one process, without a host synchronisation."""
        if self.tail_classes is None or self.num_classes is None:
            raise RuntimeError("TailMemoryBank is not set up: add it to the Trainer's callbacks, or pass "
                               "`tail_classes` and `num_classes` to use `update_and_paste` outside a Trainer.")
        if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"TailMemoryBank expects images [B, C, H, W] and masks [B, H, W] of the same size, got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        resize = self._resize(masks.shape[-2:], images.device)
        boxes = self._boxes(masks, resize)  # [B, T, 4], -1 where the class is absent
        present = boxes[..., 0] >= 0
        update_generator, paste_generator = self._generators(rank, images.device)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self._update_distributed(images, masks, resize, boxes, update_generator, world_size, rank)
        else:
            bank = self._fit(images, resize.out_size, images.shape[0])
            uniforms = _uniforms(update_generator, present.shape, images.device)
            writer, filled = _plan(present, bank.filled, uniforms, self.memory_size)
            self._bank = self._write(bank, writer, filled, resize, images, masks, boxes)
        self._paste(images, masks, present, _uniforms(paste_generator, (4, *present.shape), images.device))
        self.batches_seen += 1

    def _generators(self, rank: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """The step's generators on ``device``: of the update (the same on every rank) and of the pasting (per
        rank). Seeding is a host operation."""
        step_seed = self.seed * 1_000_003 + self.batches_seen
        if device not in self._device_generators:
            self._device_generators[device] = (torch.Generator(device), torch.Generator(device))
        update, paste = self._device_generators[device]
        return update.manual_seed(step_seed), paste.manual_seed(step_seed * 7919 + 104_729 * (rank + 1))

    def _fit(self, images: Tensor, frame_size: Sequence[int], frames: int) -> _Bank:
        """The bank, made or grown for ``frames`` new frames of ``frame_size`` per step, on the images' device and
        dtype; a checkpoint's entries are written into it here, once (each into a pool frame of its own)."""
        channels, dtype, device = images.shape[1], images.dtype, images.device
        pool = len(self.tail_classes) * self.memory_size + frames
        if self._bank is None:
            restored = [e for slots in self._restored.values() for e in slots]
            size = (max([frame_size[0], *(e.frame_height for e in restored)]),
                    max([frame_size[1], *(e.frame_width for e in restored)]))
            self._bank = _Bank.empty(len(self.tail_classes), self.memory_size, pool, channels, size, dtype,
                                     self.num_classes, device)
            self._frame_sizes = {(e.frame_height, e.frame_width) for e in restored}
            writes = [((t, m), entry, c) for t, c in enumerate(self.tail_classes)
                      for m, entry in enumerate(self._restored.get(c, [])[: self.memory_size])]
            self._bank.store([(slot, frame, entry, c) for frame, (slot, entry, c) in enumerate(writes)],
                             self.num_classes)  # each entry into a pool frame of its own
            for t, c in enumerate(self.tail_classes):
                self._bank.filled[t] = min(len(self._restored.get(c, [])), self.memory_size)
            self._restored = {}
        self._bank = self._bank.fit(channels, frame_size, pool, dtype, self.num_classes, device)
        return self._bank

    def _write(self, bank: _Bank, writer: Tensor, filled: Tensor, resize: _FrameResize, images: Tensor,
               masks: Tensor, boxes: Tensor) -> _Bank:
        """The bank with the batch's resized frames in pool frames that no slot keeps, and slot ``(t, m)`` pointing
        to frame ``writer[t, m]`` of the batch (unchanged where ``-1``): ``B`` frames written, nothing sized by
        the data."""
        frames = resize.images(images)
        labels = _class_index(resize.labels(masks), self.num_classes).to(bank.labels.dtype)
        pad = (0, bank.frame[1] - frames.shape[-1], 0, bank.frame[0] - frames.shape[-2])
        frames, labels = F.pad(frames, pad), F.pad(labels, pad, value=self.num_classes)
        into = bank.unkept(writer, images.shape[0])
        self._frame_sizes.add(resize.out_size)
        bank.pixels.index_copy_(0, into, frames)
        bank.labels.index_copy_(0, into, labels)
        bank.sizes.index_copy_(0, into, resize.out_size_tensor.expand(len(into), 2))
        new, source = writer >= 0, writer.clamp(min=0)
        t_index = torch.arange(writer.shape[0], device=writer.device)[:, None].expand_as(source)
        return bank._replace(refs=torch.where(new, into[source], bank.refs),
                             boxes=torch.where(new[..., None], boxes[source, t_index].long(), bank.boxes),
                             filled=filled)

    def _update_distributed(self, images: Tensor, masks: Tensor, resize: _FrameResize, boxes: Tensor,
                            generator: torch.Generator, world_size: int, rank: int) -> None:
        """The update under DDP (see the class docstring): every rank's boxes gathered, the slots planned on
        every rank alike, then only the surviving entries exchanged, each sent once by the rank that holds it."""
        headers, gathered = _gather_frames(images, boxes, resize.out_size, world_size)
        frame = (max(h[3] for h in headers), max(h[4] for h in headers))
        bank = self._fit(images, frame, sum(h[0] for h in headers))
        if gathered is None:  # no tail object on any rank: the bank stays as it is
            return
        uniforms = _uniforms(generator, gathered.shape[:2], images.device)
        writer, filled = _plan(gathered[..., 0] >= 0, bank.filled, uniforms, self.memory_size)
        source = writer.clamp(min=0)
        t_index = torch.arange(writer.shape[0], device=writer.device)[:, None].expand_as(writer)
        kept = torch.cat([writer[..., None], gathered[source, t_index].long()], dim=-1)  # [T, M, 5]
        into = bank.unkept(writer, gathered.shape[0])
        size = kept.numel()  # the step's second synchronisation: slots, boxes and pool frames, to size the exchange
        flat = torch.cat([kept.flatten(), into]).tolist()
        kept, into = flat[:size], flat[size:]
        starts = [sum(h[0] for h in headers[:r]) for r in range(world_size)]
        survivors = []  # (slot, source rank, image, box) in the same order on every rank
        for i in range(0, len(kept), 5):
            frame_index, box = kept[i], kept[i + 1 : i + 5]
            if frame_index >= 0:
                r = max(r for r in range(world_size) if starts[r] <= frame_index)
                survivors.append((divmod(i // 5, self.memory_size), r, frame_index - starts[r], box))
        own = [(slot, b, box) for slot, r, b, box in survivors if r == rank]
        made = {slot: resize.entry(images[b], masks[b], self.tail_classes[slot[0]], box) for slot, b, box in own}
        entries = self._exchange(made, survivors, headers, rank, images.device)
        self._frame_sizes |= {(h[3], h[4]) for h in headers}
        bank.store([(slot, into[starts[r] + b], entries[slot], self.tail_classes[slot[0]]) for slot, r, b, _ in survivors],
                   self.num_classes)
        self._bank = bank._replace(filled=filled)

    def _exchange(self, made: dict[tuple[int, int], Entry], survivors: list, headers: list[list[int]], rank: int,
                  device: torch.device) -> dict[tuple[int, int], Entry]:
        """Every surviving entry on every rank, from each rank's own ones ``made`` (see :func:`_share_entries`)."""
        return _share_entries(made, survivors, headers, rank, device)

    def _boxes(self, masks: Tensor, resize: _FrameResize) -> Tensor:
        """``[B, T, 4]`` int32 ``(top, left, bottom, right)`` of each tail class's pixels in each resized frame:
        ``-1`` where the class is absent, ``0`` where only the resize dropped its pixels (an empty entry). On the
        masks' device, without host synchronisation."""
        tail = self._tail(masks.device)
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

    def _tail(self, device: torch.device) -> Tensor:
        """The tail class ids on ``device``, built once per device (a host-to-device copy at every step would
        synchronise)."""
        if device not in self._tail_index:
            self._tail_index[device] = torch.tensor(self.tail_classes, device=device)
        return self._tail_index[device]

    def _resize(self, size: Sequence[int], device: torch.device) -> _FrameResize:
        key = (tuple(size), device)
        if key not in self._resizes:
            if len(self._resizes) >= 16:  # batches of ever new sizes: keep the cache small
                self._resizes.clear()
            self._resizes[key] = _FrameResize(size, self.p_resize, device)
        return self._resizes[key]

    def _paste(self, images: Tensor, masks: Tensor, present: Tensor, uniforms: Tensor) -> None:
        """Paste into each image entries of the tail classes it lacks (``~present`` ``[B, T]``), with the step's
        pasting numbers ``uniforms`` ``[4, B, T]`` (key, entry, ``x``, ``y`` of each image's classes).

        Round ``j`` pastes, into every image at once, its ``j``-th class in key order if ``j`` is below its number
        of picks ``ceil(p_sample * #absent)`` and the class has entries. The chosen entry's frame can only land in
        a window of the target as large as the bank's frames (clipped to the target) at a position found on the
        device; the window's pixels are gathered, replaced where the entry's class pixels land, and scattered
        back (the positions are distinct, so the scatter is deterministic)."""
        bank = self._bank
        batch, num_tail = present.shape
        height, width = masks.shape[-2:]
        device = images.device
        picks = torch.ceil((~present).sum(dim=1).double() * self.p_sample).long()
        order = uniforms[0].masked_fill(present, 2.0).argsort(dim=1, stable=True)  # absent classes first, by key
        images_index = torch.arange(batch, device=device)
        frame_h, frame_w = bank.frame
        window_h, window_w = min(frame_h, height), min(frame_w, width)
        rows, cols = torch.arange(window_h, device=device), torch.arange(window_w, device=device)
        tail = self._tail(device)

        def choose(j: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """Round ``j``'s class ``t`` and slot ``m`` per image, its pool frame, and whether it pastes."""
            t = order[:, j]
            count = bank.filled[t]
            m = _randint(0, count - 1, uniforms[1, images_index, t]).clamp(min=0)
            return t, m, bank.refs[t, m], (picks > j) & (count > 0)

        rounds = range(math.ceil(num_tail * self.p_sample))
        if self.placement == "reference" and self._frame_sizes == {(height, width)}:
            # every stored frame has the target's size: the reference's offsets are randint(0, 0), so each entry
            # lands where it was in its own frame, and no window needs to be gathered
            for j in rounds:
                t, _, frame, active = choose(j)
                hit = bank.labels[frame, :height, :width] == tail[t, None, None].to(bank.labels.dtype)
                hit &= active[:, None, None]
                images.copy_(torch.where(hit[:, None], bank.pixels[frame, :, :height, :width].to(images.dtype), images))
                masks.copy_(torch.where(hit, tail[t, None, None].to(masks.dtype), masks))
            return
        work = images if images.is_contiguous() else images.contiguous()
        work_masks = masks if masks.is_contiguous() else masks.contiguous()
        target_pixels, target_labels = work.view(batch, work.shape[1], -1), work_masks.view(batch, -1)
        for j in rounds:
            t, m, frame, active = choose(j)
            box, size = bank.boxes[t, m], bank.sizes[frame]
            if self.placement == "reference":  # the whole resized frame is placed
                span, origin = size, torch.zeros_like(size)
            else:  # the object's bounding box is placed
                span, origin = box[:, 2:] - box[:, :2], box[:, :2]
            x = _offset(width, span[:, 1], uniforms[2, images_index, t])
            y = _offset(height, span[:, 0], uniforms[3, images_index, t])
            window_y = y.clamp(0, height - window_h)[:, None] + rows  # [B, h]: target rows
            window_x = x.clamp(0, width - window_w)[:, None] + cols  # [B, w]
            source_y = window_y - y[:, None] + origin[:, :1]
            source_x = window_x - x[:, None] + origin[:, 1:]
            inside = (((source_y >= 0) & (source_y < size[:, :1]))[:, :, None]
                      & ((source_x >= 0) & (source_x < size[:, 1:]))[:, None, :]).flatten(1)
            source = (source_y.clamp(0, frame_h - 1)[:, :, None] * frame_w
                      + source_x.clamp(0, frame_w - 1)[:, None, :]).flatten(1)  # [B, h * w] in the frame
            spot = (window_y[:, :, None] * width + window_x[:, None, :]).flatten(1)  # [B, h * w] in the target
            hit = bank.labels[frame].flatten(1).gather(1, source) == tail[t, None].to(bank.labels.dtype)
            hit = hit & inside & active[:, None]
            pixels = bank.pixels[frame].flatten(2).gather(2, source[:, None].expand(-1, work.shape[1], -1))
            spot_c = spot[:, None].expand(-1, work.shape[1], -1)
            target_pixels.scatter_(2, spot_c, torch.where(hit[:, None], pixels.to(work.dtype),
                                                          target_pixels.gather(2, spot_c)))
            target_labels.scatter_(1, spot, torch.where(hit, tail[t, None].to(masks.dtype), target_labels.gather(1, spot)))
        if work is not images:
            images.copy_(work)
        if work_masks is not masks:
            masks.copy_(work_masks)

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": {c: [list(entry) for entry in slots] for c, slots in self.entries.items()},
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
        self._restored, self._bank = entries, None


def _uniforms(generator: torch.Generator, shape: Sequence[int], device: torch.device) -> Tensor:
    """The step's random numbers: uniform in ``[0, 1)``, float64, drawn on ``device`` from ``generator``."""
    return torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)


def _randint(low: Any, high: Any, uniform: Tensor) -> Tensor:
    """Python's ``random.randint(low, high)`` (both included) of the number ``uniform`` in ``[0, 1)``:
    ``low + floor(uniform * (high - low + 1))``, elementwise (``high`` where ``high < low``)."""
    value = low + torch.floor(uniform * (high - low + 1)).long()
    return torch.minimum(value, high) if isinstance(high, Tensor) else value.clamp(max=high)


def _offset(target: int, size: Tensor, uniform: Tensor) -> Tensor:
    """Offset of a ``size`` span in a ``target`` span: uniform in ``[0, target - size]`` when it fits (the
    reference's ``random.randint(0, target - size)``), else in ``[target - size, 0]``, so that it covers it."""
    room = target - size
    return _randint(room.clamp(max=0), room.clamp(min=0), uniform)


def _plan(present: Tensor, filled: Tensor, uniforms: Tensor, memory_size: int) -> tuple[Tensor, Tensor]:
    """Where the step's new entries end up, for frames ``present`` ``[N, T]`` (frames in update order) and
    ``filled[t]`` slots in use: ``writer`` ``[T, M]``, the frame whose entry slot ``(t, m)`` holds after the
    step (``-1``: unchanged), and the slots in use after it.

    Entries are written in frame order, as the reference writes them: appended while their class has fewer than
    ``memory_size`` (slot = entries before it), else into slot ``randint(0, M - 1)`` of their own number in
    ``uniforms`` ``[N, T]``; a later entry overwrites an earlier one of the same step, so a slot keeps the last
    frame written to it (``scatter_reduce`` with ``amax``). On the device, without host synchronisation."""
    count = present.long()
    before = filled[None, :] + count.cumsum(dim=0) - count
    slot = torch.where(before < memory_size, before, _randint(0, memory_size - 1, uniforms))
    slot = torch.where(present, slot, memory_size)  # absent: a spare column, dropped below
    frames = torch.arange(present.shape[0], device=present.device)[:, None].expand_as(slot)
    writer = torch.full((present.shape[1], memory_size + 1), -1, dtype=torch.long, device=present.device)
    writer.scatter_reduce_(1, slot.T.contiguous(), frames.T.contiguous(), reduce="amax")
    return writer[:, :memory_size], (filled + count.sum(dim=0)).clamp(max=memory_size)


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
        self.out_size_tensor = torch.tensor(self.out_size, device=device)  # once, not per step (a copy would sync)
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

    def images(self, images: Tensor) -> Tensor:
        """The image frames ``[..., C, H, W]`` resized (bilinear), ``[..., C, h', w']``, in their dtype."""
        if self.identity:
            return images
        (y0, y1, wy), (x0, x1, wx) = self.linear
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        wx, wy = wx.to(work.dtype), wy.to(work.dtype)
        near, far = work[..., y0, :], work[..., y1, :]
        near = near[..., x0] * (1 - wx) + near[..., x1] * wx
        far = far[..., x0] * (1 - wx) + far[..., x1] * wx
        return (near * (1 - wy)[:, None] + far * wy[:, None]).to(images.dtype)

    def entry(self, image: Tensor, mask: Tensor, label: int, box: Sequence[int]) -> Entry:
        """The entry of class ``label`` of one ``image`` ``[C, H, W]`` with label frame ``mask`` ``[H, W]``, whose
        pixels cover ``box = (top, left, bottom, right)`` of the resized frame (``bottom <= top``: none): only the
        box is resized (host integers: the DDP exchange's crops)."""
        top, left, bottom, right = box
        if bottom <= top:  # the resize dropped every pixel of the object: an empty entry
            return Entry(image.new_zeros(image.shape[0], 0, 0), mask.new_zeros(0, 0, dtype=torch.bool), 0, 0, *self.out_size)
        if self.identity:
            return Entry(image[:, top:bottom, left:right].clone(), mask[top:bottom, left:right] == label, top, left,
                         *self.out_size)
        rows, cols = self.nearest
        region = mask[rows[top:bottom]][:, cols[left:right]] == label
        crop = _FrameResize.__new__(_FrameResize)  # the taps of the box's rows and columns
        crop.identity, crop.linear = False, [tuple(t[a:z] for t in taps)
                                             for taps, a, z in zip(self.linear, (top, left), (bottom, right))]
        return Entry(crop.images(image), region, top, left, *self.out_size)


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


#: Image dtypes the DDP exchange can send, by the code it sends for them.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64)


def _gather_frames(images: Tensor, boxes: Tensor, frame_size: tuple[int, int],
                   world_size: int) -> tuple[list[list[int]], Optional[Tensor]]:
    """Every rank's header ``[batch size, channels, dtype code, frame height, frame width, tail objects]`` (copied
    to the host: the step's first synchronisation under DDP) and, unless no rank has a tail object, every rank's
    boxes ``[N, T, 4]`` (frames in rank order, ``-1`` where absent; on the device). Both by ``all_gather`` of
    small integer tensors: the header, then one row ``(b * T + t, box)`` per tail object, moved to the front by a
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
    most = max(h[-1] for h in headers)
    if most == 0:
        return headers, None
    first = torch.argsort((~found).to(torch.uint8), stable=True)  # the objects first, in their order
    rows = torch.cat([first[:, None].to(boxes.dtype), flat[first]], dim=1)
    padded = rows.new_full((most, 5), -1)
    padded[: min(most, len(rows))] = rows[:most]
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    num_tail = boxes.shape[1]
    every = boxes.new_full((sum(h[0] for h in headers), num_tail, 4), -1)
    start = 0
    for part, (size, *_, count) in zip(gathered, headers):
        index = part[:count, 0].long()
        every[start + index // num_tail, index % num_tail] = part[:count, 1:]
        start += size
    return headers, every


def _share_entries(made: dict[tuple[int, int], Entry], survivors: list, headers: list[list[int]], rank: int,
                   device: torch.device) -> dict[tuple[int, int], Entry]:
    """Every surviving entry on every rank: ``survivors`` lists ``(slot, source rank, image, box)`` of the step's
    surviving entries, in the same order on every rank, ``made`` this rank's own ones by slot. Each rank sends
    its survivors once, as one uint8 buffer ``broadcast`` from it: the pixels' bytes (the images' dtype), then
    the masks' bytes. Every rank knows every buffer's layout from the boxes, so nothing else is sent."""
    entries = dict(made)
    for source, (_, channels, code, height, width, _) in enumerate(headers):
        dtype = _DTYPES[code]
        items = [(slot, box) for slot, r, _, box in survivors if r == source and box[2] > box[0]]
        if source != rank:  # objects that the resize dropped: empty entries, nothing to send
            entries.update({slot: Entry(torch.empty(channels, 0, 0, dtype=dtype, device=device),
                                        torch.empty(0, 0, dtype=torch.bool, device=device), 0, 0, height, width)
                            for slot, r, _, box in survivors if r == source and box[2] <= box[0]})
        if not items:  # every rank skips it: they all know the boxes
            continue
        areas = [(box[2] - box[0]) * (box[3] - box[1]) for _, box in items]
        pixel_bytes = sum(areas) * channels * dtype.itemsize
        if source == rank:
            buffer = torch.cat([torch.cat([made[slot].pixels.reshape(-1) for slot, _ in items]).view(torch.uint8),
                                torch.cat([made[slot].mask.reshape(-1) for slot, _ in items]).view(torch.uint8)])
        else:
            buffer = torch.empty(pixel_bytes + sum(areas), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=source)
        if source == rank:
            continue
        pixels, masks = buffer[:pixel_bytes].view(dtype), buffer[pixel_bytes:].view(torch.bool)
        pixel_at = mask_at = 0
        for (slot, (top, left, bottom, right)), area in zip(items, areas):
            shape = (bottom - top, right - left)
            entries[slot] = Entry(pixels[pixel_at : pixel_at + area * channels].view(channels, *shape),
                                  masks[mask_at : mask_at + area].view(shape), top, left, height, width)
            pixel_at, mask_at = pixel_at + area * channels, mask_at + area
    return entries
