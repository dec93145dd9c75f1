"""Segmentation DataModules (CamVid, ADE20K, Cityscapes): pixel counts, label mapping, joint transforms, errors."""

import doctest
import inspect
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

import lightning_lt.datamodules.segmentation as segmentation_module
import lightning_lt.datamodules.segmentation_transforms as transforms_module
from lightning_lt.cli import LightningLTCLI
from lightning_lt.datamodules import ADE20K, CamVid, Cityscapes, SegmentationDataModule
from lightning_lt.datamodules.segmentation import ADE20K_CLASSES, CITYSCAPES_CLASSES
from lightning_lt.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import shared_data_dir

H, W = 24, 32
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- fake data sets
def block_mask(rng, values, block=4, size=(H, W)) -> np.ndarray:
    """A uint8 mask of ``block`` x ``block`` squares, each a random value of ``values``."""
    coarse = rng.choice(np.asarray(values), size=(size[0] // block, size[1] // block))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, rng, encode_labels: bool = False) -> None:
    """Save ``mask`` and an RGB image of its size: random pixels, or ``label * 20`` in every channel."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    if encode_labels:
        pixels = np.repeat((mask.astype(np.int64) * 20).astype(np.uint8)[..., None], 3, axis=2)
    else:
        pixels = rng.integers(0, 256, size=(*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    Image.fromarray(mask).save(mask_path)


def make_camvid(root: Path, counts=(4, 2, 2), seed: int = 0, encode_labels: bool = False) -> dict[str, list]:
    """SegNet CamVid layout with PNG images; masks hold 0-10 and 11 (ignore). Returns the masks per split."""
    rng = np.random.default_rng(seed)
    masks = {}
    for split, n in zip(("train", "val", "test"), counts):
        lines, masks[split] = [], []
        for i in range(n):
            mask = block_mask(rng, range(12))
            write_pair(root / split / f"{i:04d}.png", root / f"{split}annot" / f"{i:04d}.png", mask, rng, encode_labels)
            lines.append(f"{split}/{i:04d}.png {split}annot/{i:04d}.png")
            masks[split].append(mask)
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return masks


def make_ade20k(root: Path, val_sizes=((H, W), (H, W)), seed: int = 0) -> dict[str, list[np.ndarray]]:
    """ADEChallengeData2016 layout (JPEG images); masks hold 0 (other) and 1-150."""
    rng = np.random.default_rng(seed)
    values = [0, 1, 2, 3, 75, 149, 150]
    masks = {"training": [block_mask(rng, values) for _ in range(4)]}
    masks["validation"] = [block_mask(rng, values, size=size) for size in val_sizes]
    for split, split_masks in masks.items():
        for i, mask in enumerate(split_masks):
            name = f"ADE_{split}_{i:08d}"
            write_pair(root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png", mask, rng)
    return masks


def make_cityscapes(root: Path, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Cityscapes layout, two cities; labelTrainIds masks hold 0-18 and 255 (ignore)."""
    rng = np.random.default_rng(seed)
    values = [*range(19), 255]
    masks = {}
    for split, cities in (("train", {"aachen": 3, "bochum": 1}), ("val", {"frankfurt": 2})):
        masks[split] = []
        for city, n in cities.items():
            for i in range(n):
                mask = block_mask(rng, values)
                stem = f"{city}_{i:06d}_000019"
                write_pair(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                    mask,
                    rng,
                )
                masks[split].append(mask)
    return masks


def reference_counts(masks, num_classes: int, offset: int = 0) -> list[int]:
    """Pixels of stored value ``c + offset`` for each class ``c`` (offset 1 for ADE20K's reduced labels)."""
    stacked = np.concatenate([m.ravel() for m in masks]).astype(np.int64)
    return [int((stacked == c + offset).sum()) for c in range(num_classes)]


LAYOUTS = {
    "camvid": (CamVid, make_camvid, "train", 0, 11),
    "ade20k": (ADE20K, make_ade20k, "training", 1, 255),
    "cityscapes": (Cityscapes, make_cityscapes, "train", 0, 255),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    cls, make, train_split, offset, ignore = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    masks = make(root)
    return cls, str(root), masks[train_split], offset, ignore


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    root = tmp_path_factory.mktemp("camvid")
    return str(root), make_camvid(root)


def small(cls, root, **kwargs):
    defaults = dict(crop_size=(16, 20), batch_size=2, num_workers=0)
    return cls(root, **{**defaults, **kwargs})


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    """uint8-scale values of a normalised image."""
    return (image * STD + MEAN).mul(255).round()


def interior(mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labelled pixels whose 3x3 neighbourhood inside ``mask`` has one label (away from label edges and the border).

    There the bilinear image and the nearest(-exact) mask must agree exactly.
    """
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), value=-1.0)
    windows = torch.nn.functional.unfold(padded, 3).view(9, *mask.shape)
    return (windows == mask.float()).all(0) & (mask != ignore_index)


# ---------------------------------------------------------------------------------------------- statistics
def test_pixel_counts_match_numpy(layout):
    cls, root, train_masks, offset, ignore = layout
    dm = small(cls, root)
    assert dm.num_classes == len(cls.CLASS_NAMES) and dm.ignore_index == ignore
    assert dm.class_counts == reference_counts(train_masks, dm.num_classes, offset)  # valid before setup()
    assert len(dm.class_names) == dm.num_classes


def test_class_names():
    assert CamVid.CLASS_NAMES[:4] == ("Sky", "Building", "Pole", "Road") and len(CamVid.CLASS_NAMES) == 11
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree") and ADE20K_CLASSES[-1] == "flag"


def test_ade20k_reduces_the_zero_label(tmp_path):
    masks = make_ade20k(tmp_path)
    dm = ADE20K(str(tmp_path), num_workers=0)
    dataset = dm._dataset("validation", transform=None)
    for (_, mask), raw in zip(dataset, masks["validation"]):
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # 0 -> ignore, v -> v - 1
        assert mask.dtype == torch.uint8 and np.array_equal(mask.numpy(), expected)
    assert dm.class_counts[0] == sum(int((m == 1).sum()) for m in masks["training"])
    assert dm.class_counts[149] == sum(int((m == 150).sum()) for m in masks["training"])
    assert dm.class_counts[148] > 0 and dm.class_counts[147] == 0  # raw 149 is in the masks, raw 148 is not


def test_explicit_pixel_counts_skip_the_scan(camvid, monkeypatch):
    monkeypatch.setattr(segmentation_module, "count_label_pixels", lambda *a, **k: pytest.fail("scanned"))
    counts = list(range(1, 12))
    assert small(CamVid, camvid[0], pixel_counts=counts).class_counts == counts
    with pytest.raises(ValueError, match=r"`pixel_counts` has 3 entries, expected one pixel count per class \(11\)"):
        small(CamVid, camvid[0], pixel_counts=[1, 2, 3])
    with pytest.raises(ValueError, match="integers >= 0"):
        small(CamVid, camvid[0], pixel_counts=[-1] * 11)


def test_pixel_counts_file_round_trip(camvid, tmp_path, monkeypatch):
    root, masks = camvid
    path = tmp_path / "cache" / "camvid_counts.json"
    expected = reference_counts(masks["train"], 11)
    assert small(CamVid, root, pixel_counts_file=str(path)).class_counts == expected
    content = json.loads(path.read_text())
    assert content["class_counts"] == expected and content["num_masks"] == 4 and content["num_classes"] == 11
    assert content["ignored_pixels"] == sum(int((m == 11).sum()) for m in masks["train"])
    monkeypatch.setattr(segmentation_module, "count_label_pixels", lambda *a, **k: pytest.fail("scanned"))
    assert small(CamVid, root, pixel_counts_file=str(path)).class_counts == expected  # read, no scan

    path.write_text(json.dumps({**content, "class_counts": [1, 2]}))
    with pytest.raises(ValueError, match=r"has 2 entries, expected one pixel count per class \(11\).*delete it"):
        _ = small(CamVid, root, pixel_counts_file=str(path)).class_counts
    path.write_text(json.dumps({**content, "num_masks": 99}))
    with pytest.raises(ValueError, match="counts 99 training masks but .* has 4 .*stale"):
        _ = small(CamVid, root, pixel_counts_file=str(path)).class_counts
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _ = small(CamVid, root, pixel_counts_file=str(path)).class_counts


# ---------------------------------------------------------------------------------------------- loaders
def test_loaders_give_image_and_mask_batches(layout):
    cls, root, _, _, ignore = layout
    dm = small(cls, root, eval_batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 20) and x.dtype == torch.float32
    assert y.shape == (2, 16, 20) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(range(dm.num_classes)) | {ignore}
    xv, yv = next(iter(dm.val_dataloader()))  # native resolution
    assert xv.shape == (2, 3, H, W) and yv.shape == (2, H, W) and yv.dtype == torch.int64
    dm.setup("test")
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape[1:] == (3, H, W) and yt.shape[1:] == (H, W)


def test_eval_size_resizes_images_and_masks(camvid):
    root, masks = camvid
    dm = small(CamVid, root, eval_size=(12, 16), val_split="test")
    dm.setup("validate")
    x, y = dm.val_dataset[0]
    assert x.shape == (3, 12, 16) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(masks["test"][0][1::2, 1::2]).long())  # nearest-exact: source pixel 2i + 1


def test_crop_pads_the_mask_with_the_ignore_index(camvid):
    root, masks = camvid
    dm = small(CamVid, root, crop_size=(30, 40), scale_range=(1.0, 1.0), hflip=0.0)
    dm.setup("fit")
    x, y = dm.train_dataset[0]
    assert y.shape == (30, 40)
    assert torch.equal(y[:H, :W], torch.from_numpy(masks["train"][0]).long())  # padding at the bottom / right
    assert (y[H:] == 11).all() and (y[:, W:] == 11).all()
    assert (unnormalise(x)[:, H:] == 0).all() and (unnormalise(x)[:, :, W:] == 0).all()  # image padded with 0


@pytest.fixture(scope="module")
def camvid_encoded(tmp_path_factory):
    """CamVid whose image pixels are ``label * 20``, so image and mask must move together."""
    root = tmp_path_factory.mktemp("camvid_encoded")
    return str(root), make_camvid(root, encode_labels=True)


def test_scale_and_flip_move_image_and_mask_together(camvid_encoded):
    root, masks = camvid_encoded
    dm = small(CamVid, root, crop_size=(48, 64), scale_range=(2.0, 2.0), hflip=1.0)  # no crop freedom
    dm.setup("fit")
    x, y = dm.train_dataset[0]
    expected = np.kron(masks["train"][0], np.ones((2, 2), dtype=np.int64))[:, ::-1].copy()
    assert torch.equal(y, torch.from_numpy(expected))  # nearest x2, mirrored
    inside = interior(y, 11)
    assert inside.sum() > 500
    assert torch.equal(unnormalise(x)[0][inside], y[inside].float() * 20)


def test_random_scale_crop_and_flip_keep_the_image_aligned(camvid_encoded):
    root, _ = camvid_encoded
    dm = small(CamVid, root, crop_size=(20, 28), scale_range=(1.3, 1.7), hflip=1.0)
    dm.setup("fit")
    torch.manual_seed(0)
    checked = 0
    for index in range(len(dm.train_dataset)):
        for _ in range(3):
            x, y = dm.train_dataset[index]
            values = unnormalise(x)
            assert torch.equal(values[0], values[1]) and torch.equal(values[1], values[2])
            inside = interior(y, 11)
            assert torch.equal(values[0][inside], y[inside].float() * 20)
            checked += int(inside.sum())
    assert checked > 1000


def test_train_loader_seed_and_collate(camvid):
    dm = small(CamVid, camvid[0], seed=3)
    dm.setup("fit")
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert loaders[0].sampler.seed == 3  # the shuffling order depends only on (seed, epoch)
    assert all(loader.collate_fn is segmentation_module.segmentation_collate for loader in loaders)


def test_ade20k_native_evaluation_batches_one_image(tmp_path):
    make_ade20k(tmp_path, val_sizes=((H, W), (32, 24)))
    assert ADE20K(str(tmp_path)).eval_batch_size == 1  # varying sizes at native resolution
    assert ADE20K(str(tmp_path), batch_size=4, eval_size=(16, 16)).eval_batch_size == 4
    dm = small(ADE20K, str(tmp_path))
    dm.setup("validate")
    assert [tuple(y.shape) for _, y in dm.val_dataloader()] == [(1, H, W), (1, 32, 24)]
    dm = small(ADE20K, str(tmp_path), eval_batch_size=2)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"different sizes .*`eval_batch_size=1`.*`eval_size`"):
        next(iter(dm.val_dataloader()))
    dm = small(ADE20K, str(tmp_path), eval_batch_size=2, eval_size=(16, 16))
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))[1].shape == (2, 16, 16)


def test_no_image_level_resampling(camvid):
    for cls in (CamVid, ADE20K, Cityscapes, SegmentationDataModule):
        assert "sampler" not in inspect.signature(cls).parameters
    with pytest.raises(NotImplementedError, match="re-sampling is not defined"):
        small(CamVid, camvid[0]).train_targets()


class _PixelClassifier(LightningModule):
    """A 1x1 convolution trained with cross-entropy that ignores ``ignore_index``."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        self.ignore_index = ignore_index

    def step(self, batch):
        images, masks = batch
        return torch.nn.functional.cross_entropy(self.conv(images), masks, ignore_index=self.ignore_index)

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_on_the_loaders(camvid, tmp_path):
    dm = small(CamVid, camvid[0])
    trainer = Trainer(
        accelerator="cpu", fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_PixelClassifier(dm.num_classes, dm.ignore_index), datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_cli_parses_sizes_from_yaml_and_links_pixel_counts(camvid, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    root, masks = camvid
    config = {
        "trainer": {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "lightning_lt.tasks.LongTailClassifier",
            "init_args": {"backbone": {"class_path": "lightning_lt.nets.MLP", "init_args": {"in_features": 8}}},
        },
        "data": {
            "class_path": "lightning_lt.datamodules.CamVid",
            "init_args": {
                "root": root, "crop_size": [16, 24], "scale_range": [0.75, 1.25], "eval_size": [12, 16],
                "base_size": [24, 32], "val_split": "test", "num_workers": 0,
            },
        },
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningLTCLI(args=["--config", str(path)], run=False)
    dm = cli.datamodule
    assert isinstance(dm, CamVid)
    assert (dm.crop_size, dm.scale_range, dm.eval_size, dm.base_size) == ((16, 24), (0.75, 1.25), (12, 16), (24, 32))
    assert cli.model.num_classes == 11 and cli.model.class_names == list(CamVid.CLASS_NAMES)
    assert cli.model.class_counts == reference_counts(masks["train"], 11)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_size=(0, 16)), r"`crop_size` to be two positive integers"),
        (dict(crop_size=(16,)), r"`crop_size` to be two positive integers"),
        (dict(eval_size=(-1, 8)), r"`eval_size` to be two positive integers"),
        (dict(base_size=(8, 0)), r"`base_size` to be two positive integers"),
        (dict(scale_range=(0.0, 2.0)), r"`scale_range` = \(low, high\) with 0 < low <= high"),
        (dict(scale_range=(2.0, 1.0)), r"`scale_range` = \(low, high\) with 0 < low <= high"),
        (dict(hflip=1.5), r"`hflip` \(a probability\) in \[0, 1\], got 1.5"),
        (dict(hflip=-0.1), r"`hflip` \(a probability\) in \[0, 1\]"),
        (dict(val_split="train"), r"`val_split` to be 'val' or 'test'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CamVid(str(tmp_path), **kwargs)


def test_missing_root_and_split_list(tmp_path, camvid):
    layout = r"Expected layout: .*\{train,val,test\}\.txt"
    with pytest.raises(FileNotFoundError, match=r"`root`=.*nowhere.* is not a directory.*" + layout):
        _ = CamVid(str(tmp_path / "nowhere")).class_counts
    root = tmp_path / "camvid"
    make_camvid(root, counts=(1, 1, 1))
    (root / "val.txt").unlink()
    dm = small(CamVid, str(root))
    with pytest.raises(FileNotFoundError, match=r"split list .*val\.txt.* not found\. Expected layout"):
        dm.setup("fit")
    for cls in (ADE20K, Cityscapes):
        with pytest.raises(FileNotFoundError, match=r"not found\. Expected layout"):
            _ = cls(str(tmp_path)).class_counts


def test_missing_image_file(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts=(2, 1, 1))
    os.remove(root / "train" / "0001.png")
    with pytest.raises(FileNotFoundError, match=r"train\.txt:2 names 'train/0001\.png'.*Expected layout"):
        _ = CamVid(str(root)).class_counts


def test_segnet_absolute_list_paths(tmp_path):
    root = tmp_path / "camvid"
    masks = make_camvid(root, counts=(2, 1, 1))
    lines = [f"/SegNet/CamVid/train/{i:04d}.png /SegNet/CamVid/trainannot/{i:04d}.png" for i in range(2)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    dm = CamVid(str(root))
    assert dm.split_samples("train")[1] == (str(root / "train" / "0001.png"), str(root / "trainannot" / "0001.png"))
    assert dm.class_counts == reference_counts(masks["train"], 11)


def test_missing_annotations(tmp_path):
    make_ade20k(tmp_path / "ade")
    os.remove(tmp_path / "ade" / "annotations" / "training" / "ADE_training_00000002.png")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* have no annotation.*ADE_training_00000002\.png"):
        _ = ADE20K(str(tmp_path / "ade")).class_counts
    make_cityscapes(tmp_path / "cs")
    os.remove(tmp_path / "cs" / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelTrainIds.png")
    message = r"aachen_000001_000019_gtFine_labelTrainIds\.png.*csCreateTrainIdLabelImgs"
    with pytest.raises(FileNotFoundError, match=message):
        _ = Cityscapes(str(tmp_path / "cs")).class_counts


def test_label_outside_the_classes(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts=(2, 1, 1))
    bad = np.full((H, W), 3, dtype=np.uint8)
    bad[0, 0] = 12
    Image.fromarray(bad).save(root / "trainannot" / "0001.png")
    message = r"trainannot/0001\.png' holds label value\(s\) \[12\].*\[0, 11\).*ignore index 11.*Fix the mask"
    with pytest.raises(ValueError, match=message):
        _ = CamVid(str(root)).class_counts  # the pixel-count scan
    dm = small(CamVid, str(root), pixel_counts=[1] * 11)
    dm.setup("fit")
    dm.train_dataset[0]
    with pytest.raises(ValueError, match=r"trainannot/0001\.png' holds label value\(s\) \[12\]"):
        dm.train_dataset[1]  # the dataset checks every mask it reads
    ade = tmp_path / "ade"
    make_ade20k(ade)
    bad_path = ade / "annotations" / "training" / "ADE_training_00000000.png"
    Image.fromarray(np.full((H, W), 151, dtype=np.uint8)).save(bad_path)
    with pytest.raises(ValueError, match=r"value\(s\) \[151\].*0 = other \(ignored\) and 1-150"):
        _ = ADE20K(str(ade)).class_counts
    cs = tmp_path / "cs"
    make_cityscapes(cs)
    mask_path = cs / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((H, W), 33, dtype=np.uint8)).save(mask_path)
    dm = small(Cityscapes, str(cs))
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"\[33\].*createTrainIdLabelImgs"):
        dm.val_dataset[0]


def test_image_and_mask_of_different_sizes(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts=(1, 1, 1))
    Image.fromarray(np.zeros((H, W - 2), dtype=np.uint8)).save(root / "valannot" / "0000.png")
    dm = small(CamVid, str(root), pixel_counts=[1] * 11)
    dm.setup("validate")
    message = r"val/0000\.png' is 32x24 \(W x H\) but its mask .*valannot/0000\.png' is 30x24.*Fix"
    with pytest.raises(ValueError, match=message):
        dm.val_dataset[0]


def test_colour_masks_are_rejected(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts=(1, 1, 1))
    Image.new("RGB", (W, H)).save(root / "trainannot" / "0000.png")
    with pytest.raises(ValueError, match=r"mode 'RGB'.*single-channel label image"):
        _ = CamVid(str(root)).class_counts


def test_docstring_examples():
    for module in (segmentation_module, transforms_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- real CamVid
def test_real_camvid(tmp_path):
    root = shared_data_dir("camvid")
    dm = CamVid(str(root), batch_size=2, num_workers=0, pixel_counts_file=str(tmp_path / "counts.json"))
    assert dm.class_counts == [
        10682767, 14750079, 623349, 20076880, 2845085, 6166762, 743859, 714595, 3719877, 405385, 184967
    ]  # fmt: skip
    ignored = json.loads((tmp_path / "counts.json").read_text())["ignored_pixels"]
    assert ignored == 2503995 and sum(dm.class_counts) + ignored == 367 * 360 * 480
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (367, 101, 233)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 360, 480) and y.shape == (2, 360, 480) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(range(12))
