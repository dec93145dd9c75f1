"""TailMemoryBank against a transcription of AUCSeg's T-Memory Bank, pixel for pixel.

Reference: boyuh/AUCSeg, ``mmseg/datasets/pipelines/t_memory_bank.py``, class ``TMemoryBank`` (methods
``__call__``, ``_transform``, ``_resize_image_and_gt``, ``_add_image_to_image``), the per-sample pipeline
transform of ``aucseg_configs/*.py``. ``ReferenceTMemoryBank`` below follows it step for step on the same
tensors (``img`` ``[3, H, W]`` float32, ``gt_semantic_seg`` ``[1, H, W]`` int64, as mmseg's
``DefaultFormatBundle`` hands them over); its ``cv2.resize`` calls go to ``opencv_resize``, a transcription
of OpenCV's ``cv::resize`` for the two interpolations used (checked against ``cv2`` when it is installed).

Random numbers: the reference calls Python's ``random.randint`` / ``random.sample`` as its loops need them. The
library draws a fixed set of numbers per step (uniform in [0, 1): per frame and tail class one for the slot an
entry replaces, one key, one for the entry, one each for x and y). The test records them, and the transcription's
``rng`` answers each call from the number of that decision: ``randint(a, b)`` is ``a + floor(u * (b - a + 1))``
with the bounds the reference asks for, ``sample`` orders the absent classes by their keys. The transcription
tells its ``rng`` which decision (and class) each call is, through ``rng.decision(...)`` just before it; for
Python's own ``random`` that is a no-op (``SeededRandom``).

The library's one deliberate difference, storing a copy of the frame rather than the frame tensor that the
same call's pastes then modify, is the transcription's ``copy_on_store`` switch (see
``test_the_reference_stores_frames_that_its_own_pastes_modify``).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lightning_lt.callbacks.memory_bank as memory_bank
from lightning_lt.callbacks import TailMemoryBank

INTER_NEAREST, INTER_LINEAR = 0, 1  # cv2's constants, as the reference passes them (interpolation=0 / 1)


# ------------------------------------------------------------------------------------- OpenCV's resize


def opencv_resize(src: np.ndarray, dsize: tuple[int, int], interpolation: int, ipp: bool = True) -> np.ndarray:
    """``cv2.resize(src, dsize=(width, height), interpolation)`` for ``INTER_NEAREST`` (any dtype) and
    ``INTER_LINEAR`` (float32), transcribed from OpenCV's ``modules/imgproc/src/resize.cpp``.

    ``cv::resize``: an output of the input's size is a copy; ``inv_scale = (double)dsize / ssize``,
    ``scale = 1. / inv_scale``. ``resizeNN``: ``sx = cvFloor(dx * (1. / inv_scale_x))``, capped at the last
    column. Linear: ``fx = (float)((dx + 0.5) * scale_x - 0.5)``, ``sx = cvFloor(fx)``, ``fx -= sx``; ``sx < 0``
    gives ``sx = 0, fx = 0`` and ``sx >= width - 1`` gives ``sx = width - 1, fx = 0``; weights
    ``(1.f - fx, fx)``; a horizontal pass per source row, then the vertical one, in float.

    ``ipp=True``: the x86-64 wheels (opencv-python 4.x and 5.x, which mmcv installs) hand float32 linear
    resizes to Intel IPP, whose source positions stay in double precision (``fx`` is not rounded to float
    before its floor is taken); measured against cv2 4.10 and 5.0, ``ipp=False`` equals OpenCV's own path.
    """
    out_w, out_h = dsize
    in_h, in_w = src.shape[:2]
    if (out_h, out_w) == (in_h, in_w):
        return src.copy()
    dst = np.empty((out_h, out_w) + src.shape[2:], dtype=src.dtype)
    if interpolation == INTER_NEAREST:
        ifx, ify = 1.0 / (out_w / in_w), 1.0 / (out_h / in_h)
        for dy in range(out_h):
            sy = min(math.floor(dy * ify), in_h - 1)
            for dx in range(out_w):
                dst[dy, dx] = src[sy, min(math.floor(dx * ifx), in_w - 1)]
        return dst
    assert interpolation == INTER_LINEAR and src.dtype == np.float32

    def taps(d: int, scale: float, size: int) -> tuple[int, np.float32]:
        f = (d + 0.5) * scale - 0.5
        if not ipp:
            f = float(np.float32(f))
        s = math.floor(f)
        f = np.float32(f - s)
        if s < 0:
            s, f = 0, np.float32(0)
        if s >= size - 1:
            s, f = size - 1, np.float32(0)
        return s, f

    one = np.float32(1)
    xs = [taps(dx, 1.0 / (out_w / in_w), in_w) for dx in range(out_w)]
    for dy in range(out_h):
        sy, fy = taps(dy, 1.0 / (out_h / in_h), in_h)
        rows = []
        for y in (sy, min(sy + 1, in_h - 1)):
            rows.append(np.stack([src[y, sx] * (one - fx) + src[y, min(sx + 1, in_w - 1)] * fx for sx, fx in xs]))
        dst[dy] = rows[0] * (one - fy) + rows[1] * fy
    return dst


# ---------------------------------------------------------------------------------- the reference


class ReferenceTMemoryBank:
    """AUCSeg's ``TMemoryBank`` (boyuh/AUCSeg, mmseg/datasets/pipelines/t_memory_bank.py), step for step.

    ``rng`` stands for Python's ``random`` module (with ``decision``, see the module docstring); ``copy_on_store=False`` is the reference as written (it
    stores ``results['img'].data`` itself), ``True`` stores a copy, as the library does.
    """

    def __init__(self, num_classes, small_index, memory_size=5, p_sample=1, p_resize=0.1, rng=random,
                 copy_on_store=False):
        self.num_classes = num_classes
        self.small_index = small_index
        self.memory_size = memory_size
        self.p_sample = p_sample
        self.p_resize = p_resize
        self.rng = rng
        self.copy_on_store = copy_on_store
        # two dicts per class: slot -> image, slot -> the class's pixel positions (torch.where of the label)
        self.class_object_store_img = {i: {} for i in range(num_classes)}
        self.class_object_store_target = {i: {} for i in range(num_classes)}

    def _add_image_to_image(self, img, img2, gt, gt2):
        # offsets: randint(0, W - w) for x first, then y; only the pixels with gt2 != -1 replace the target's
        _, h_img, w_img = img.size()
        _, h_img2, w_img2 = img2.size()
        x_offset = self.rng.randint(0, w_img - w_img2)  # (the caller announced the decision: "paste", class)
        y_offset = self.rng.randint(0, h_img - h_img2)
        mask = gt2 == -1
        unmask = ~mask
        window = (slice(None), slice(y_offset, y_offset + h_img2), slice(x_offset, x_offset + w_img2))
        img2 = torch.mul(img2, unmask) + torch.mul(img[window], mask)
        gt2 = torch.mul(gt2, unmask) + torch.mul(gt[window], mask)
        img[window] = img2
        gt[window] = gt2
        return img, gt

    def _resize_image_and_gt(self, image, gt, p_resize):
        # the whole frame: size int(h * p), int(w * p); image bilinear (1), label nearest (0), via numpy HWC
        _, h, w = image.size()
        h_scale, w_scale = int(h * p_resize), int(w * p_resize)
        resized_image = image.numpy().transpose((1, 2, 0))
        resized_gt = np.squeeze(gt.numpy())
        resized_image = opencv_resize(resized_image, (w_scale, h_scale), interpolation=INTER_LINEAR)
        resized_gt = opencv_resize(resized_gt, (w_scale, h_scale), interpolation=INTER_NEAREST)
        resized_image = resized_image.transpose((2, 0, 1))
        resized_gt = np.expand_dims(resized_gt, axis=0)
        return torch.tensor(resized_image, device=image.device), torch.tensor(resized_gt, device=gt.device)

    def _transform(self, image, gt, target):
        # a label frame of -1 with `target` at the stored positions
        _, h, w = image.size()
        new_gt = torch.full((1, h, w), -1, dtype=torch.int32, device=image.device)
        for i in range(len(gt[0])):
            new_gt[int(gt[0][i]), int(gt[1][i]), int(gt[2][i])] = target
        return image, new_gt

    def __call__(self, results):
        unique_class_index = torch.unique(results["gt_semantic_seg"].data).tolist()
        unique_class_index = [value for value in unique_class_index if value != 255]
        unique_small_index = list(set(unique_class_index).intersection(set(self.small_index)))
        unique_not_small_index = [x for x in self.small_index if x not in unique_class_index]
        if len(unique_small_index) != 0:
            for i in unique_small_index:
                class_i_index = torch.where(results["gt_semantic_seg"].data == i)
                stored = results["img"].data.clone() if self.copy_on_store else results["img"].data
                if len(self.class_object_store_target[i]) == self.memory_size:
                    self.rng.decision("slot", i)
                    del_num = self.rng.randint(0, self.memory_size - 1)
                    self.class_object_store_target[i][del_num] = class_i_index
                    self.class_object_store_img[i][del_num] = stored
                else:
                    self.class_object_store_img[i][len(self.class_object_store_target[i])] = stored
                    self.class_object_store_target[i][len(self.class_object_store_target[i])] = class_i_index
        if len(unique_not_small_index) != 0:
            n_pick = math.ceil(len(unique_not_small_index) * self.p_sample)
            self.rng.decision("sample", unique_not_small_index)
            random_index = self.rng.sample(range(len(unique_not_small_index)), n_pick)
            for i in [unique_not_small_index[k] for k in random_index]:
                if len(self.class_object_store_target[i]) == 0:
                    continue
                self.rng.decision("entry", i)
                add_num = self.rng.randint(0, len(self.class_object_store_target[i]) - 1)
                temp_img = self.class_object_store_img[i][add_num]
                temp_gt = self.class_object_store_target[i][add_num]
                temp_img, temp_gt = self._transform(temp_img, temp_gt, i)
                temp_img, temp_gt = self._resize_image_and_gt(temp_img, temp_gt, self.p_resize)
                self.rng.decision("paste", i)
                temp_img, temp_gt = self._add_image_to_image(
                    results["img"].data, temp_img, results["gt_semantic_seg"].data, temp_gt
                )
                results["img"].data[:, :, :] = temp_img
                results["gt_semantic_seg"].data[:, :, :] = temp_gt
        return results


# ------------------------------------------------------------------------------- driving both


class SeededRandom(random.Random):
    """Python's ``random`` for the transcription, run on its own."""

    def decision(self, *what) -> None:
        pass


class Replay:
    """Python's ``random`` for the transcription, answering from the library's recorded numbers of one image.

    ``update``: ``[T]`` the slot numbers of the image's classes; ``paste``: ``[4, T]`` key, entry, x, y numbers."""

    def __init__(self, update: torch.Tensor, paste: torch.Tensor) -> None:
        self.update, self.paste = update.tolist(), paste.tolist()
        self.what: tuple = ()
        self.calls: list = []

    def decision(self, *what) -> None:
        self.what, self.offsets = what, iter((2, 3))  # a paste draws x, then y

    def randint(self, a: int, b: int) -> int:
        kind, cls = self.what
        row = {"slot": self.update, "entry": self.paste[1]}.get(kind) if kind != "paste" else self.paste[next(self.offsets)]
        u = row[TAIL.index(cls)]
        self.calls.append((kind, cls, a, b))
        return a + min(math.floor(u * (b - a + 1)), b - a)

    def sample(self, population: range, k: int) -> list:
        kind, absent = self.what
        assert kind == "sample" and len(population) == len(absent)
        keys = [self.paste[0][TAIL.index(c)] for c in absent]
        self.calls.append(("sample", tuple(absent), k))
        return [population[i] for i in sorted(range(len(absent)), key=keys.__getitem__)[:k]]


@pytest.fixture
def recorded_draws(monkeypatch):
    """Every set of random numbers the library draws, in order (the update's ``[1, T]``, the pasting's
    ``[4, 1, T]`` per step)."""
    draws: list = []
    uniforms = memory_bank._uniforms

    def recording(generator, shape, device):
        values = uniforms(generator, shape, device)
        draws.append(values.clone())
        return values

    monkeypatch.setattr(memory_bank, "_uniforms", recording)
    return draws


NUM_CLASSES = 8
TAIL = [2, 3, 5, 6, 7]  # ids < 8, so the reference's set iterates them in ascending order, as the library does


def random_frame(g: torch.Generator, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 image and a label of head classes 0/1/4 with 0-2 rectangles of tail classes and ignored pixels."""
    image = torch.randn(3, height, width, generator=g)
    label = torch.tensor([0, 1, 4])[torch.randint(0, 3, (height, width), generator=g)]
    for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
        c = TAIL[int(torch.randint(len(TAIL), (1,), generator=g))]
        h, w = (int(torch.randint(1, max(2, n // 2), (1,), generator=g)) for n in (height, width))
        top, left = int(torch.randint(height - h + 1, (1,), generator=g)), int(torch.randint(width - w + 1, (1,), generator=g))
        label[top : top + h, left : left + w] = c
        label[top : top + h, left : left + w][torch.rand(h, w, generator=g) < 0.25] = 1  # ragged objects
    label[torch.rand(height, width, generator=g) < 0.05] = 255
    return image, label.long()


def run_both(recorded_draws, p_resize: float, p_sample: float, sizes: list[tuple[int, int]], seed: int):
    """Feed the same frames, one per call, to the library and to the transcription; compare after each."""
    g = torch.Generator().manual_seed(seed)
    bank = TailMemoryBank(tail_classes=TAIL, num_classes=NUM_CLASSES, ignore_index=255, memory_size=2,
                          p_sample=p_sample, p_resize=p_resize, seed=seed)
    replay = Replay(torch.zeros(len(TAIL)), torch.zeros(4, len(TAIL)))
    reference = ReferenceTMemoryBank(NUM_CLASSES, TAIL, memory_size=2, p_sample=p_sample, p_resize=p_resize,
                                     rng=replay, copy_on_store=True)
    pasted, kinds = 0, set()
    for height, width in sizes:
        image, label = random_frame(g, height, width)
        images, masks = image[None].clone(), label[None].clone()
        bank.update_and_paste(images, masks)
        update, paste = recorded_draws[-2:]
        assert update.shape == (1, len(TAIL)) and paste.shape == (4, 1, len(TAIL))
        replay.update, replay.paste = update[0].tolist(), paste[:, 0].tolist()
        results = {"img": SimpleNamespace(data=image.clone()), "gt_semantic_seg": SimpleNamespace(data=label[None].clone())}
        reference(results)
        torch.testing.assert_close(masks[0], results["gt_semantic_seg"].data[0], rtol=0, atol=0)
        torch.testing.assert_close(images[0], results["img"].data, rtol=1e-6, atol=1e-6)
        pasted += int((masks[0] != label).sum())
        kinds |= {call[0] for call in replay.calls}
    assert pasted > 0  # the comparison covered pastes
    assert kinds == {"slot", "sample", "entry", "paste"}  # and every kind of decision


@pytest.mark.parametrize("p_sample", [1.0, 0.5])
def test_full_size_frames_are_pasted_as_the_reference_pastes_them(recorded_draws, p_sample):
    """p_resize 1 (AUCSeg's Cityscapes setting) on fixed-size crops: objects stay where they were."""
    run_both(recorded_draws, 1.0, p_sample, [(12, 16)] * 40, seed=int(p_sample * 10))


@pytest.mark.parametrize("p_resize", [0.4, 0.5, 0.7])
def test_shrunk_frames_are_pasted_as_the_reference_pastes_them(recorded_draws, p_resize):
    """p_resize < 1 (ADE20K 0.4) on frames of varying sizes: resize, offsets and clipping of the reference."""
    g = torch.Generator().manual_seed(1)
    sizes = [(int(torch.randint(12, 17, (1,), generator=g)), int(torch.randint(14, 21, (1,), generator=g))) for _ in range(40)]
    run_both(recorded_draws, p_resize, 1.0, sizes, seed=7)


def test_the_reference_stores_frames_that_its_own_pastes_modify():
    """As written, the reference keeps the frame tensor itself; the pastes of the same call then change the
    stored pixels (the library stores a copy taken before pasting, the transcription's ``copy_on_store``)."""
    bank = ReferenceTMemoryBank(4, [2, 3], memory_size=5, p_sample=1, p_resize=1, rng=SeededRandom(0))
    first = {"img": SimpleNamespace(data=torch.zeros(3, 4, 4)), "gt_semantic_seg": SimpleNamespace(data=torch.zeros(1, 4, 4, dtype=torch.long))}
    first["gt_semantic_seg"].data[0, :2] = 3
    first["img"].data[:, :2] = 3.0
    bank(first)  # stores class 3; class 2 is absent but has no entry yet
    second = {"img": SimpleNamespace(data=torch.zeros(3, 4, 4)), "gt_semantic_seg": SimpleNamespace(data=torch.zeros(1, 4, 4, dtype=torch.long))}
    second["gt_semantic_seg"].data[0, 1:3] = 2
    second["img"].data[:, 1:3] = 2.0
    bank(second)  # stores class 2 (rows 1-2), then pastes class 3 (rows 0-1) over its row 1
    stored = bank.class_object_store_img[2][0]
    assert stored is second["img"].data
    assert torch.equal(stored[:, 1], torch.full((3, 4), 3.0))  # class-2 positions now hold class-3 pixels


@pytest.mark.parametrize("ipp", [True, False])
def test_opencv_transcription_matches_cv2(ipp):
    """Only where OpenCV is installed (it is no dependency of lightning-lt); checked with cv2 4.10 and 5.0."""
    cv2 = pytest.importorskip("cv2")
    if ipp and not cv2.ipp.useIPP():
        pytest.skip("this OpenCV build has no IPP")
    default = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(ipp)
    try:
        g = torch.Generator().manual_seed(0)
        for height, width, p in [(12, 16, 0.4), (13, 17, 0.5), (12, 16, 0.5), (15, 21, 0.7), (9, 11, 1.6), (96, 80, 0.1)]:
            image = torch.randn(height, width, 3, generator=g).numpy()
            label = torch.randint(-1, 9, (height, width), generator=g).int().numpy()
            size = (int(width * p), int(height * p))
            expected = cv2.resize(image, size, interpolation=INTER_LINEAR)
            np.testing.assert_allclose(opencv_resize(image, size, INTER_LINEAR, ipp=ipp), expected, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(opencv_resize(label, size, INTER_NEAREST), cv2.resize(label, size, interpolation=0))
    finally:
        cv2.ipp.setUseIPP(default)
