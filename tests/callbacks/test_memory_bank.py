"""TailMemoryBank: pasted pixels, replacement, sampling, checkpoint round trip, resume and DDP."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_lt.callbacks.memory_bank as memory_bank
from lightning_lt.callbacks import TailMemoryBank
from lightning_lt.tasks import SegmentationModule
from tests.helpers import DDP_STRATEGY
from tests.host_syncs import HostSyncCounter
from tests.tasks.seg_toy import IGNORE, NUM_CLASSES, TAIL, ToySegData, TinySegNet, toy_segmentation

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
)


def ready_bank(**kwargs) -> TailMemoryBank:
    kwargs.setdefault("tail_classes", TAIL)
    kwargs.setdefault("ignore_index", IGNORE)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return TailMemoryBank(**kwargs)


def two_image_batch(value: float = 0.7):
    """Image 0 holds tail class 2 (a 3x4 block with pixel value `value`), image 1 holds no tail class."""
    images = torch.zeros(2, 3, 12, 12)
    masks = torch.zeros(2, 12, 12, dtype=torch.long)
    masks[:, :, 6:] = 1
    masks[0, 4:7, 3:7] = 2
    images[0, :, 4:7, 3:7] = value
    masks[1, 0, 0] = IGNORE
    return images, masks


# ------------------------------------------------------------------------------------- pasting


def test_pasted_pixels_carry_the_tail_label_and_the_stored_pixels():
    bank = ready_bank(tail_classes=[2])
    images, masks = two_image_batch()
    original = images[1].clone(), masks[1].clone()
    bank.update_and_paste(images, masks)
    pasted = masks[1] == 2
    assert int(pasted.sum()) == 12  # the 3x4 region, p_resize = 1
    # every pasted label pixel shows the stored image pixels, and every changed pixel is labelled 2
    assert torch.all(images[1][:, pasted] == 0.7)
    changed = (images[1] != original[0]).any(dim=0) | (masks[1] != original[1])
    assert torch.equal(changed, pasted)
    assert pasted[4:7, 3:7].all()  # reference placement, p_resize 1, equal frames: where it was in image 0
    # image 0 already has class 2: unchanged
    assert int((masks[0] == 2).sum()) == 12


def test_only_class_pixels_of_the_bounding_box_are_pasted():
    """An L-shaped region: the crop's bounding box holds non-class pixels, which are not pasted."""
    bank = ready_bank(tail_classes=[3])
    images = torch.zeros(2, 3, 10, 10)
    masks = torch.zeros(2, 10, 10, dtype=torch.long)
    masks[0, 2:6, 2] = 3
    masks[0, 5, 2:6] = 3
    images[0][:, masks[0] == 3] = 0.5
    images[0, :, 2:5, 3:6] = -1.0  # inside the bounding box but not class 3
    bank.update_and_paste(images, masks)
    pasted = masks[1] == 3
    assert int(pasted.sum()) == 7
    assert torch.all(images[1][:, pasted] == 0.5)
    assert not (images[1] == -1.0).any()


def resized_frame(image: torch.Tensor, mask: torch.Tensor, p_resize: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole frame resized as AUCSeg resizes it (int(H * p) x int(W * p), bilinear image, nearest label),
    with torch's own interpolation as an independent computation."""
    size = (int(mask.shape[0] * p_resize), int(mask.shape[1] * p_resize))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def find_paste(pasted: torch.Tensor, frame_mask: torch.Tensor, c: int) -> list[tuple[int, int]]:
    """The offsets (y, x) of the resized frame, within the reference's range (or, for a frame larger than the
    target, the range that makes it cover the target), whose class-``c`` pixels land exactly on ``pasted``."""
    (height, width), (h, w) = pasted.shape, frame_mask.shape
    found = []
    for y in range(min(0, height - h), max(0, height - h) + 1):
        for x in range(min(0, width - w), max(0, width - w) + 1):
            placed = torch.zeros_like(pasted)
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
            placed[y0:y1, x0:x1] = frame_mask[y0 - y : y1 - y, x0 - x : x1 - x] == c
            if torch.equal(placed, pasted):
                found.append((y, x))
    return found


@pytest.mark.parametrize("p_resize", [0.5, 0.4, 2.0, 4.0])
def test_the_whole_frame_is_resized_and_placed_at_a_random_offset(p_resize):
    """The object is pasted as it sits in its resized frame, the frame at an offset in the allowed range
    (larger than the target at p_resize > 1: then it covers the target and is clipped); the pasted pixels are
    the resized frame's at those positions."""
    images, masks = two_image_batch()
    images[0] += torch.linspace(0, 1, 12)[None, None, :]  # a gradient, so that the interpolation shows
    frame_image, frame_mask = resized_frame(images[0], masks[0], p_resize)
    nonempty = 0
    for seed in range(12):
        batch = images.clone(), masks.clone()
        ready_bank(tail_classes=[2], p_resize=p_resize, seed=seed).update_and_paste(*batch)
        pasted = batch[1][1] == 2
        assert torch.equal(batch[0][1][:, ~pasted], images[1][:, ~pasted])
        if not pasted.any():
            continue
        nonempty += 1
        rows, cols = pasted.nonzero().unbind(1)
        offsets = find_paste(pasted, frame_mask, 2)
        assert any(torch.allclose(batch[0][1][:, rows, cols], frame_image[:, rows - y, cols - x]) for y, x in offsets)
    assert nonempty >= 3


def test_random_box_placement_moves_the_object_anywhere_it_fits():
    positions = set()
    for seed in range(8):
        images, masks = two_image_batch()
        ready_bank(tail_classes=[2], placement="random_box", seed=seed).update_and_paste(images, masks)
        rows, cols = (masks[1] == 2).nonzero().unbind(1)
        assert (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)) == (3, 4)
        assert torch.all(images[1][:, masks[1] == 2] == 0.7)
        positions.add((int(rows.min()), int(cols.min())))
    assert len(positions) > 4  # (the reference placement keeps it at (4, 3))


def test_random_box_entry_larger_than_the_image_is_clipped():
    bank = ready_bank(tail_classes=[2], p_resize=4.0, placement="random_box")
    images, masks = two_image_batch()
    bank.update_and_paste(images, masks)
    assert bank.entries[2][0].mask.shape == (12, 16)  # the 3 x 4 box, 4x larger
    assert int((masks[1] == 2).sum()) == 12 * 12  # it covers the whole 12 x 12 image
    assert masks[1].shape == (12, 12)


def test_an_object_that_the_resize_drops_is_an_empty_entry():
    images, masks = torch.zeros(2, 3, 12, 12), torch.zeros(2, 12, 12, dtype=torch.long)
    masks[0, 1, 1] = 2  # nearest resize by 0.5 samples rows and columns 0, 2, 4, ...
    bank = ready_bank(tail_classes=[2], p_resize=0.5)
    bank.update_and_paste(images, masks)
    (entry,) = bank.entries[2]
    assert entry.mask.shape == (0, 0) and entry.pixels.shape == (3, 0, 0)
    assert (entry.frame_height, entry.frame_width) == (6, 6)
    assert not (masks[1] == 2).any()


def test_entries_hold_the_resized_box_and_its_place_in_the_resized_frame():
    bank = ready_bank(tail_classes=[2], p_resize=0.5)
    images, masks = two_image_batch()
    bank.update_and_paste(images, masks)
    (entry,) = bank.entries[2]
    _, frame_mask = resized_frame(images[0], masks[0], 0.5)
    rows, cols = (frame_mask == 2).nonzero().unbind(1)
    assert (entry.top, entry.left, entry.frame_height, entry.frame_width) == (int(rows.min()), int(cols.min()), 6, 6)
    assert torch.equal(entry.mask, frame_mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == 2)


def test_p_sample_pastes_ceil_of_the_absent_fraction():
    tail = [4, 5, 6, 7, 8]
    bank = ready_bank(tail_classes=tail, p_sample=0.5, num_classes=10)
    images = torch.zeros(2, 3, 20, 20)
    masks = torch.zeros(2, 20, 20, dtype=torch.long)
    for k, c in enumerate(tail):  # image 0 holds every tail class in its own 2x2 square
        masks[0, 2 * k : 2 * k + 2, 0:2] = c
    bank.update_and_paste(images, masks)
    pasted_classes = set(masks[1].unique().tolist()) - {0}
    assert len(pasted_classes) == math.ceil(0.5 * len(tail)) == 3
    assert pasted_classes <= set(tail)


def test_non_tail_and_ignored_pixels_never_enter_the_bank():
    bank = ready_bank(tail_classes=[2, 3])
    images, masks = toy_segmentation(8)
    bank.update_and_paste(images, masks)
    assert set(bank.entries) == {2, 3}
    for c, slots in bank.entries.items():
        for entry in slots:
            assert entry.mask.any() and entry.pixels.shape[-2:] == entry.mask.shape
            # channel 0 encodes the label: the stored class pixels are exactly class c
            torch.testing.assert_close(entry.pixels[0][entry.mask], torch.full((int(entry.mask.sum()),), 0.25 * c))


def test_random_replacement_keeps_memory_size_entries():
    bank = ready_bank(tail_classes=[2], memory_size=3)
    seen = []
    for step in range(12):
        images, masks = two_image_batch(value=float(step + 1))
        bank.update_and_paste(images, masks)
        seen.append(float(step + 1))
        values = [float(entry.pixels.flatten()[0]) for entry in bank.entries[2]]
        assert len(values) == min(step + 1, 3)
        assert set(values) <= set(seen)
        if step < 3:
            assert values == seen  # appended in order until full
    assert values != [1.0, 2.0, 3.0]  # full slots were replaced at random
    assert bank.batches_seen == 12


def test_same_seed_same_decisions():
    def run(seed):
        bank = ready_bank(memory_size=2, seed=seed)
        images, masks = toy_segmentation(12)
        for chunk in range(3):
            bank.update_and_paste(images[4 * chunk : 4 * chunk + 4], masks[4 * chunk : 4 * chunk + 4])
        return masks

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tail_classes": []}, "`tail_classes` is empty"),
        ({"memory_size": 0}, "memory_size"),
        ({"p_sample": 0.0}, "p_sample"),
        ({"p_sample": 1.5}, "p_sample"),
        ({"p_resize": 0.0}, "p_resize"),
        ({"tail_share": 0.0}, "tail_share"),
        ({"placement": "center"}, "placement"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TailMemoryBank(**kwargs)


def test_tail_class_out_of_range_is_reported_at_setup(tmp_path):
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    trainer = make_trainer(tmp_path, [TailMemoryBank(tail_classes=[2, 7])], max_epochs=1)
    with pytest.raises(ValueError, match="7"):
        trainer.fit(module, datamodule=ToySegData())


def test_ignore_index_cannot_be_a_tail_class(tmp_path):
    bank = TailMemoryBank(tail_classes=[1], ignore_index=1)
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="ignore index 1"):
        make_trainer(tmp_path, [bank], max_epochs=1).fit(module, datamodule=ToySegData())


def test_unset_bank_and_num_classes_conflict(tmp_path):
    with pytest.raises(RuntimeError, match="not set up"):
        TailMemoryBank(tail_classes=[2]).update_and_paste(*two_image_batch())
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes=6"):
        make_trainer(tmp_path, [TailMemoryBank(num_classes=6)], max_epochs=1).fit(module, datamodule=ToySegData())


def test_bad_batch_is_rejected():
    bank = ready_bank()
    with pytest.raises(TypeError, match="segmentation batch"):
        bank.on_train_batch_start(None, None, torch.zeros(2, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="same size"):
        bank.update_and_paste(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long))


def test_dict_batches_with_other_keys():
    images, masks = two_image_batch()
    bank = ready_bank(tail_classes=[2], image_key="img", mask_key="gt")
    bank.on_train_batch_start(None, None, {"img": images, "gt": masks, "name": ["a", "b"]}, 0)
    assert int((masks[1] == 2).sum()) == 12
    with pytest.raises(ValueError, match=r"without the key\(s\) \['image', 'mask'\]; its keys are \['img', 'gt'\]\. "
                       r"HINT: pass `image_key=...` and `mask_key=...` to TailMemoryBank"):
        ready_bank().on_train_batch_start(None, None, {"img": images, "gt": masks}, 0)


def test_checkpoint_entries_of_the_earlier_format_are_dropped_with_a_warning():
    bank = ready_bank()
    old = {"entries": {2: [[torch.zeros(3, 2, 2), torch.ones(2, 2, dtype=torch.bool)]]}, "batches_seen": 3}
    with pytest.warns(UserWarning, match="without their frame position .* dropped"):
        bank.load_state_dict(old)
    assert bank.num_entries() == {2: 0, 3: 0} and bank.batches_seen == 3


class BareSegModule(LightningModule):
    """A segmentation LightningModule of a user's own: no `num_classes` attribute, optionally as a hyperparameter."""

    def __init__(self, classes: int = NUM_CLASSES, save_num_classes: bool = False) -> None:
        super().__init__()
        if save_num_classes:
            self.save_hyperparameters({"num_classes": classes})
        self.net = TinySegNet(classes)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return F.cross_entropy(self.net(images), masks, ignore_index=IGNORE)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_num_classes_missing_in_a_trainer_names_the_fix(tmp_path):
    loader = ToySegData().train_dataloader()  # plain loaders: no data module to read `num_classes` from
    with pytest.raises(ValueError, match=r"needs the number of classes.*HINT: pass `TailMemoryBank\(num_classes=\.\.\.\)`"):
        make_trainer(tmp_path, [TailMemoryBank(tail_classes=[2])], max_epochs=1).fit(BareSegModule(), loader)
    bank = TailMemoryBank(tail_classes=[2])
    make_trainer(tmp_path, [bank], max_epochs=1, limit_train_batches=1).fit(BareSegModule(save_num_classes=True), loader)
    assert bank.num_classes == NUM_CLASSES  # from the module's hyperparameters
    bank = TailMemoryBank(tail_classes=[2], num_classes=NUM_CLASSES)
    make_trainer(tmp_path, [bank], max_epochs=1, limit_train_batches=1).fit(BareSegModule(), loader)
    assert bank.num_entries()[2] > 0


# ------------------------------------------------------------------------------- with a Trainer


def make_trainer(tmp_path, callbacks, max_epochs=2, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_tail_classes_resolved_from_pixel_counts_and_shared_with_the_metric(tmp_path):
    data = ToySegData()
    bank = TailMemoryBank(tail_share=0.5)
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)  # no counts: the bank decides
    make_trainer(tmp_path, [bank], max_epochs=1, limit_val_batches=1).fit(module, datamodule=data)
    counts = torch.tensor(data.class_counts, dtype=torch.float)
    expected = [c for c in range(NUM_CLASSES) if counts[c] / counts.sum() < 0.5 / NUM_CLASSES]
    assert bank.tail_classes == expected == TAIL
    assert module.tail_classes == TAIL
    assert module.val_metric.tail_classes == TAIL
    assert bank.ignore_index == IGNORE  # taken from the data module
    assert sum(bank.num_entries().values()) > 0


def test_module_tail_list_flows_into_the_bank_and_conflicts_are_errors(tmp_path):
    bank = TailMemoryBank()
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, tail_classes=[3])
    make_trainer(tmp_path, [bank], max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, datamodule=ToySegData()
    )
    assert bank.tail_classes == [3]
    conflicting = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, tail_classes=[3])
    with pytest.raises(ValueError, match="differs from the TailMemoryBank"):
        make_trainer(tmp_path, [TailMemoryBank(tail_classes=[2, 3])], max_epochs=1).fit(
            conflicting, datamodule=ToySegData()
        )


def bank_signature(bank: TailMemoryBank) -> dict:
    """Entries as plain numbers: (source image index from channel 1, class pixels, crop shape)."""
    return {
        str(c): [[round(float(entry.pixels[1, 0, 0]) * 16), int(entry.mask.sum()), list(entry.mask.shape)] for entry in slots]
        for c, slots in sorted(bank.entries.items())
    }


def entries_equal(entry, other) -> bool:
    return torch.equal(entry.pixels, other.pixels) and torch.equal(entry.mask, other.mask) and entry[2:] == other[2:]


def test_entries_survive_a_checkpoint_round_trip(tmp_path):
    bank = TailMemoryBank(tail_classes=TAIL, memory_size=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    make_trainer(tmp_path, [bank, checkpoint], max_epochs=2, limit_val_batches=0).fit(module, datamodule=ToySegData())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain tensors and lists
    state = saved["callbacks"][bank.state_key]
    restored = TailMemoryBank(tail_classes=TAIL, memory_size=3, num_classes=NUM_CLASSES)
    restored.load_state_dict(state)
    assert restored.batches_seen == bank.batches_seen == 8
    assert restored.num_entries() == bank.num_entries() == {2: 3, 3: 3}
    for c in TAIL:
        for entry, entry2 in zip(bank.entries[c], restored.entries[c]):
            assert entries_equal(entry, entry2)


def test_resume_continues_with_the_same_bank(tmp_path):
    """Stop after epoch 1, resume to epoch 3: the same bank and the same weights as an uninterrupted run."""

    def fit(root, max_epochs, ckpt_path=None, checkpoint=None):
        seed_everything(0)
        bank = TailMemoryBank(tail_classes=TAIL, memory_size=2, seed=3)
        module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        callbacks = [bank] + ([checkpoint] if checkpoint else [])
        make_trainer(root, callbacks, max_epochs=max_epochs, limit_val_batches=0).fit(
            module, datamodule=ToySegData(), ckpt_path=ckpt_path
        )
        return bank, module

    full_bank, full_module = fit(tmp_path / "full", 4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", 2, checkpoint=checkpoint)
    resumed_bank, resumed_module = fit(tmp_path / "second", 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_bank.batches_seen == full_bank.batches_seen == 16
    assert bank_signature(resumed_bank) == bank_signature(full_bank)
    for entry, entry2 in zip(full_bank.entries[2], resumed_bank.entries[2]):
        assert entries_equal(entry, entry2)
    for p, q in zip(full_module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(p, q)


class RecordingBank(TailMemoryBank):
    """Writes each rank's bank signature at the end of training."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(bank_signature(self)))


@pytest.mark.ddp
def test_ddp_ranks_share_one_bank_built_from_the_whole_stream(tmp_path):
    """2 CPU processes: both ranks end with the identical bank, holding entries of both ranks' shards, and it
    equals the bank of one process that saw the same images (memory large enough to keep everything)."""
    kwargs = {"tail_classes": TAIL, "memory_size": 64}
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    trainer = make_trainer(
        tmp_path, [RecordingBank(str(tmp_path), **kwargs)], max_epochs=1, limit_val_batches=0,
        devices=2, strategy=DDP_STRATEGY,
    )
    trainer.fit(module, datamodule=ToySegData(batch_size=2))
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    sources = {entry[0] for slots in rank0.values() for entry in slots}
    assert any(s % 2 == 0 for s in sources) and any(s % 2 == 1 for s in sources)  # both shards (interleaved)

    single = ready_bank(**kwargs)
    images, masks = toy_segmentation(16)
    single.update_and_paste(images, masks)
    expected = {c: sorted(map(tuple, map(lambda e: (e[0], e[1], tuple(e[2])), v))) for c, v in bank_signature(single).items()}
    got = {c: sorted((e[0], e[1], tuple(e[2])) for e in v) for c, v in rank0.items()}
    assert got == expected


def test_docstring_example():
    import doctest

    from lightning_lt.callbacks import memory_bank

    assert doctest.testmod(memory_bank, raise_on_error=True).attempted > 0


# ------------------------------------------------------------- kept entries, the DDP exchange, host syncs


def busy_frames(n: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[3, H, W]`` and masks of head classes 0 / 1 holding ragged rectangles of both tail classes
    (so a batch brings more entries of a class than a small bank keeps), ignored pixels, and, in every fourth
    image, tail class 3 as one pixel at (1, 1) alone, which a resize by 0.5 drops (an empty entry)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, height, width, generator=g)
    masks = torch.randint(0, 2, (n, height, width), generator=g)
    for i in range(n):
        for c in TAIL:
            if i % 4 == 3 and c == 3:
                masks[i, 1, 1] = 3
            elif float(torch.rand(1, generator=g)) < 0.8:
                h, w = (int(torch.randint(1, s // 2, (1,), generator=g)) for s in (height, width))
                top, left = int(torch.randint(0, height - h, (1,), generator=g)), int(torch.randint(0, width - w, (1,), generator=g))
                masks[i, top : top + h, left : left + w] = c
        masks[i][(masks[i] > 1) & (torch.rand(height, width, generator=g) < 0.2)] = 1  # ragged objects
    masks[torch.rand(n, height, width, generator=g) < 0.05] = IGNORE
    return images, masks


def entries_written_in_order(steps, memory_size: int, p_resize: float, update_draws: list):
    """The bank as the earlier implementation built it, independently of the library's code: every new entry of a
    step made (frames in order, then tail classes in order) and written in turn, appended while its class has
    fewer than ``memory_size`` entries, else into slot ``randint(0, memory_size - 1)`` of the step's update
    number of that frame and class (``floor(u * memory_size)``).

    ``steps``: per step, the frames ``(source rank, image, mask)`` in update order; ``update_draws``: per step, the
    update numbers ``[frames, T]`` the bank drew (``None``: it drew none). Returns the bank
    ``{class: [(pixels, mask, top, left, frame height, frame width)]}`` and, per step, the ``(source rank, entry)``
    of the entries that the step leaves in the bank."""
    bank: dict = {c: [] for c in TAIL}
    kept_per_step = []
    for frames, draws in zip(steps, update_draws):
        written = {}
        for n, (source, image, mask) in enumerate(frames):
            frame_image, frame_mask = resized_frame(image, mask, p_resize) if p_resize != 1 else (image, mask)
            for t, c in enumerate(TAIL):
                if not (mask == c).any():
                    continue
                hit = frame_mask == c
                if hit.any():
                    rows, cols = hit.nonzero().unbind(1)
                    top, left, bottom, right = int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1
                    entry = (frame_image[:, top:bottom, left:right], hit[top:bottom, left:right], top, left)
                else:
                    entry = (image.new_zeros(3, 0, 0), torch.zeros(0, 0, dtype=torch.bool), 0, 0)
                entry += tuple(frame_mask.shape)
                slots = bank[c]
                if len(slots) < memory_size:
                    slots.append(entry)
                    written[(c, len(slots) - 1)] = (source, entry)
                else:
                    slot = math.floor(float(draws[n, t]) * memory_size)
                    slots[slot] = entry
                    written[(c, slot)] = (source, entry)
        kept_per_step.append(list(written.values()))
    return bank, kept_per_step


def assert_bank_equals(entries: dict, expected: dict) -> None:
    """``entries``: the callback's state (``{class: [[pixels, mask, top, left, height, width]]}``)."""
    assert set(entries) == set(expected)
    for c in expected:
        assert len(entries[c]) == len(expected[c]), c
        for got, want in zip(entries[c], expected[c]):
            assert list(got[2:]) == list(want[2:])
            assert torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


class DrawRecorder:
    """Records the bank's random numbers per step: the update's ``[frames, T]`` and the pasting's ``[4, B, T]``."""

    def __init__(self) -> None:
        self.update: list = []
        self.paste: list = []

    def __call__(self, generator, shape, device):
        values = UNIFORMS(generator, shape, device)
        (self.update if len(shape) == 2 else self.paste).append(values.clone())
        return values


UNIFORMS = memory_bank._uniforms


@pytest.fixture
def draws(monkeypatch) -> DrawRecorder:
    recorder = DrawRecorder()
    monkeypatch.setattr(memory_bank, "_uniforms", recorder)
    return recorder


@pytest.mark.parametrize("p_resize", [1.0, 0.5])
def test_the_bank_is_as_if_every_entry_were_written_in_turn(draws, p_resize):
    """Slots are decided on the device for the whole batch at once (a count per class, ``scatter_reduce``); the bank
    is the one the earlier implementation (every entry made and written in turn) builds, entry for entry, with
    entries of a step overwritten by later ones of the same step."""
    bank = ready_bank(memory_size=2, p_resize=p_resize, seed=4)
    steps = []
    for step in range(4):
        images, masks = busy_frames(6, 16, 14, seed=step)
        steps.append([(0, image.clone(), mask.clone()) for image, mask in zip(images, masks)])
        bank.update_and_paste(images, masks)
    expected, kept = entries_written_in_order(steps, 2, p_resize, draws.update)
    assert_bank_equals(bank.state_dict()["entries"], expected)
    new_entries = sum(int((mask == c).any()) for frames in steps for _, _, mask in frames for c in TAIL)
    assert sum(map(len, kept)) < new_entries  # some were overwritten within their step
    if p_resize != 1:
        assert any(entry[1].numel() == 0 for step in kept for _, entry in step)  # dropped by the resize


def sync_sites(calls) -> list[tuple[str, str]]:
    """``(what, function)`` of host syncs recorded in memory_bank.py."""
    tree = ast.parse(Path(memory_bank.__file__).read_text())
    spans = [(node.lineno, node.end_lineno, node.name) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    sites = []
    for what, where in calls:
        path, line = where.rsplit(":", 1)
        assert Path(path) == Path(memory_bank.__file__).resolve(), f"{what} at {where}"
        sites.append((what, max((s for s in spans if s[0] <= int(line) <= s[1]), key=lambda s: s[0])[2]))
    return sites


@pytest.mark.parametrize("placement", ["reference", "random_box"])
@pytest.mark.parametrize("p_resize", [1.0, 0.4])
def test_a_step_makes_no_host_sync(p_resize, placement):
    """Finding the tail objects, planning the slots, writing the kept entries and pasting run on the device:
    nothing is copied to the host and nothing is sized by the data, in any step (the bank made, filled, full)."""
    bank = ready_bank(memory_size=2, p_resize=p_resize, p_sample=0.5, placement=placement)
    for step in range(3):
        images, masks = busy_frames(4, 20, 20, seed=step)
        before = masks.clone()
        with HostSyncCounter() as syncs:
            bank.update_and_paste(images, masks)
        assert syncs.calls == [], syncs.report()
        assert (masks != before).any()  # it pasted
    assert bank.num_entries() == {2: 2, 3: 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("placement", ["reference", "random_box"])
def test_a_step_makes_no_host_sync_on_cuda(placement):
    """From the second step on (the first makes the bank and the per-device tensors), every step runs with
    ``torch.cuda.set_sync_debug_mode("error")`` (the random numbers come from CUDA's generator, so the entries
    differ from a CPU run's; their number does not)."""
    cuda, cpu = (ready_bank(memory_size=2, p_resize=0.4, p_sample=0.5, placement=placement) for _ in range(2))
    for step in range(4):
        images, masks = busy_frames(4, 20, 20, seed=step)
        on_cuda = images.cuda(), masks.cuda()
        torch.cuda.synchronize()
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            cuda.update_and_paste(*on_cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu.update_and_paste(images, masks)
    assert cuda.num_entries() == cpu.num_entries() == {2: 2, 3: 2}


def test_frames_of_the_targets_size_take_the_direct_paste_with_the_same_result(monkeypatch):
    """When every stored frame has the target's size (p_resize 1 on fixed-size crops), the reference placement's
    offsets are 0 and the bank pastes without gathering windows; the pastes equal the general path's."""
    windowed = []
    original = memory_bank.TailMemoryBank._paste
    direct, general = ready_bank(memory_size=2, p_sample=0.5, seed=2), ready_bank(memory_size=2, p_sample=0.5, seed=2)

    def paste(bank, images, masks, present, uniforms):
        if bank is general:
            bank._frame_sizes.add((0, 0))  # a size the pool never held: the general path
        windowed.append(bank._frame_sizes != {tuple(masks.shape[-2:])})
        return original(bank, images, masks, present, uniforms)

    monkeypatch.setattr(memory_bank.TailMemoryBank, "_paste", paste)
    pasted = 0
    for step in range(4):
        images, masks = busy_frames(4, 16, 14, seed=step)
        batches = (images.clone(), masks.clone()), (images.clone(), masks.clone())
        direct.update_and_paste(*batches[0])
        general.update_and_paste(*batches[1])
        assert torch.equal(batches[0][1], batches[1][1]) and torch.equal(batches[0][0], batches[1][0])
        pasted += int((batches[0][1] != masks).sum())
    assert pasted > 0
    assert windowed == [False, True] * 4


def test_entries_restored_on_the_cpu_are_written_into_the_bank_once():
    bank = ready_bank(tail_classes=[2])
    for value in (0.7, 0.8):
        bank.update_and_paste(*two_image_batch(value))
    restored = ready_bank(tail_classes=[2])
    restored.load_state_dict(bank.state_dict())
    assert restored.num_entries() == {2: 2}
    written = []
    put = memory_bank._Bank._put
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_bank._Bank, "_put", lambda bank, frame, entry, label: written.append((frame, label))
                      or put(bank, frame, entry, label))
        for _ in range(2):
            restored.update_and_paste(*two_image_batch())
    assert written == [(0, 2), (1, 2)]  # each entry into a pool frame of its own, at the first batch only
    for entry, entry2 in zip(bank.entries[2], restored.entries[2]):
        assert entries_equal(entry, entry2)


class ExchangeRecorder(TailMemoryBank):
    """Records, per step and rank: the batch before the bank, the update's random numbers, the bytes the rank
    receives by ``broadcast`` and the host syncs; forbids ``all_gather_object``; saves it all at the end."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.record: dict = {"inputs": [], "update_draws": [], "received": [], "syncs": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch.distributed as dist

        self.record["inputs"].append((batch[0].clone(), batch[1].clone()))
        received = []
        broadcast = dist.broadcast
        recorder = DrawRecorder()

        def counting_broadcast(tensor, src, *args, **kwargs):
            if src != trainer.global_rank:
                received.append(tensor.numel() * tensor.element_size())
            return broadcast(tensor, src, *args, **kwargs)

        def forbidden(*args, **kwargs):
            raise AssertionError("the bank pickles objects (all_gather_object)")

        with pytest.MonkeyPatch.context() as patch, HostSyncCounter() as syncs:
            patch.setattr(dist, "broadcast", counting_broadcast)
            patch.setattr(dist, "all_gather_object", forbidden)
            patch.setattr(memory_bank, "_uniforms", recorder)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.record["received"].append(sum(received))
        self.record["syncs"].append(sync_sites(syncs.calls))
        self.record["update_draws"].append(recorder.update[0] if recorder.update else None)

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["entries"] = self.state_dict()["entries"]
        torch.save(self.record, Path(self.out_dir, f"rank{trainer.global_rank}.pt"))


class RankFrames(LightningDataModule):
    """Each rank its own frames, 4 batches: rank 0 four 16 x 16 images per batch, rank 1 three 12 x 20 ones; the
    last batch of both ranks without any tail object."""

    num_classes = NUM_CLASSES
    ignore_index = IGNORE

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        batch, (height, width) = [(4, (16, 16)), (3, (12, 20))][rank]
        images, masks = busy_frames(4 * batch, height, width, seed=10 + rank)
        masks[3 * batch :][(masks[3 * batch :] == 2) | (masks[3 * batch :] == 3)] = 0
        return DataLoader(TensorDataset(images, masks), batch_size=batch)


@pytest.mark.ddp
def test_ddp_exchange_sends_only_the_kept_entries_and_builds_the_shared_bank(tmp_path):
    """2 CPU processes with batches of different sizes and frames of different sizes, a bank of 2 entries per class
    (so a step overwrites some of its own entries) and p_resize 0.5 (empty entries too): both ranks end with the
    same bank, entry for entry the bank of every entry written in turn in rank order (the earlier
    ``all_gather_object`` exchange's); each rank receives exactly the bytes of the other rank's entries that the
    step keeps; the host syncs are the two copies of the gathered header and of the kept slots per step."""
    kwargs = {"tail_classes": TAIL, "memory_size": 2, "p_resize": 0.5, "seed": 5}
    module = SegmentationModule(TinySegNet, num_classes=NUM_CLASSES)
    trainer = make_trainer(tmp_path, [ExchangeRecorder(str(tmp_path), **kwargs)], max_epochs=1, limit_val_batches=0,
                           devices=2, strategy=DDP_STRATEGY, use_distributed_sampler=False)
    trainer.fit(module, datamodule=RankFrames())
    records = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    draws = records[0]["update_draws"]
    assert draws[3] is None and all(d.shape == (4 + 3, len(TAIL)) for d in draws[:3])
    assert all(torch.equal(d, e) for d, e in zip(draws[:3], records[1]["update_draws"][:3]))  # shared numbers
    steps = [
        [(rank, image, mask) for rank in (0, 1) for image, mask in zip(*records[rank]["inputs"][step])]
        for step in range(4)
    ]
    expected, kept = entries_written_in_order(steps, 2, 0.5, draws)
    for rank in (0, 1):
        assert_bank_equals(records[rank]["entries"], expected)
        for step in range(4):
            other = [entry for source, entry in kept[step] if source != rank]
            assert records[rank]["received"][step] == sum(e[0].numel() * 4 + e[1].numel() for e in other)
        assert records[rank]["syncs"] == [[("Tensor.tolist", "_gather_frames"), ("Tensor.tolist", "_update_distributed")]] * 3 + [
            [("Tensor.tolist", "_gather_frames")]  # no tail object on any rank: the header alone
        ]
    for c in TAIL:  # bitwise identical on both ranks
        for got, other in zip(records[0]["entries"][c], records[1]["entries"][c]):
            assert torch.equal(got[0], other[0]) and torch.equal(got[1], other[1]) and got[2:] == other[2:]
    assert sum(len(frames) for frames in steps) == 4 * (4 + 3) and kept[3] == []
    assert sum(map(len, kept)) < sum(int((m == c).any()) for frames in steps for _, _, m in frames for c in TAIL)
    assert any(entry[1].numel() == 0 for step in kept for _, entry in step)  # an empty entry crossed ranks


def test_ranks_with_different_channels_or_unsendable_images_are_refused(monkeypatch):
    """Checked on the gathered header, before any entry is sent (here rank 1's header is faked: 4 channels)."""
    images, masks = busy_frames(2, 8, 8, seed=0)
    bank = ready_bank()
    boxes = bank._boxes(masks, bank._resize((8, 8), images.device))

    def all_gather(outputs, tensor):
        outputs[0].copy_(tensor)
        outputs[1].copy_(tensor)
        outputs[1][1] = 4

    monkeypatch.setattr(memory_bank.dist, "all_gather", all_gather)
    with pytest.raises(ValueError, match=r"ranks' images differ in channels or dtype \(\[\(3, 'torch.float32'\), "
                       r"\(4, 'torch.float32'\)\]\).*HINT: give every rank's data loader the same transforms"):
        memory_bank._gather_frames(images, boxes, (8, 8), world_size=2)
    with pytest.raises(ValueError, match=r"cannot exchange images of dtype torch.complex64.*HINT: convert the batch"):
        memory_bank._gather_frames(images.to(torch.complex64), boxes, (8, 8), world_size=2)
