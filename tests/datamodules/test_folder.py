import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from lightning_lt.datamodules import ImageFolderLT, ResampledSampler
from lightning_lt.datamodules.folder import decode_images
from lightning_lt.datamodules.transforms import CIFAR10_MEAN, CIFAR10_STD
from tests.datamodules.utils import write_digit_folder, write_image_folder
from tests.helpers import shared_data_dir

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def balanced_root(tmp_path_factory):
    """4 classes x 20 training images, 4 classes x 3 test images, 32x32 JPEG."""
    root = tmp_path_factory.mktemp("balanced")
    write_image_folder(str(root / "train"), {c: 20 for c in CLASSES}, seed=0)
    write_image_folder(str(root / "test"), {c: 3 for c in CLASSES}, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def odd_size_root(tmp_path_factory):
    """Natively imbalanced PNG folder with 40x36 images (resized to image_size)."""
    root = tmp_path_factory.mktemp("odd")
    write_image_folder(str(root / "train"), {"a": 6, "b": 3}, size=(40, 36), seed=2, ext=".png")
    write_image_folder(str(root / "test"), {"a": 2, "b": 2}, size=(40, 36), seed=3, ext=".png")
    return str(root)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image gets opened."""

    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image, "open", fail)


def test_counts_and_names_by_listing_only(balanced_root, no_decoding):
    dm = ImageFolderLT(balanced_root)
    assert dm.class_counts == [20, 20, 20, 20]  # imbalance_factor=1 keeps the folder as it is
    assert dm.class_names == CLASSES
    assert dm.num_classes == 4
    dm = ImageFolderLT(balanced_root, imbalance_factor=10)
    expected = [int(20 * 0.1 ** (i / 3)) for i in range(4)]
    assert dm.class_counts == expected == [20, 9, 4, 2]
    assert ImageFolderLT(balanced_root, imbalance_factor=10, profile="step").class_counts == [20, 20, 2, 2]


def test_selection_follows_the_protocol_on_sorted_file_lists(balanced_root):
    dm = ImageFolderLT(balanced_root, imbalance_factor=10, imbalance_seed=0)
    files = [os.path.join(balanced_root, "train", c, f"{i:04d}.jpg") for c in CLASSES for i in range(20)]
    labels = np.repeat(np.arange(4), 20)
    state = np.random.get_state()
    np.random.seed(0)
    kept = []
    for c, n in enumerate([20, 9, 4, 2]):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        kept.extend(idx[:n].tolist())
    np.random.set_state(state)
    assert dm.train_files() == [files[i] for i in kept]
    assert dm.train_targets() == labels[kept].tolist()


@pytest.mark.parametrize("root_fixture", ["balanced_root", "odd_size_root"])
def test_in_memory_and_file_paths_give_identical_tensors(request, root_fixture):
    root = request.getfixturevalue(root_fixture)
    on_disk = ImageFolderLT(root, imbalance_factor=2, num_workers=0, in_memory=False)
    in_memory = ImageFolderLT(root, imbalance_factor=2, num_workers=0, in_memory=True)
    on_disk.setup("fit")
    in_memory.setup("fit")
    assert in_memory.train_dataset.images.dtype == torch.uint8
    assert in_memory.train_dataset.images.shape == (len(on_disk.train_dataset), 3, 32, 32)
    for split in ("train_dataset", "test_dataset"):
        a_set, b_set = getattr(on_disk, split), getattr(in_memory, split)
        assert len(a_set) == len(b_set)
        for i in range(len(a_set)):
            torch.manual_seed(i)  # same random crop offsets and flips on both paths
            a, ya = a_set[i]
            torch.manual_seed(i)
            b, yb = b_set[i]
            assert ya == yb
            assert a.shape == (3, 32, 32) and a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_augmentation_is_cifar_style(balanced_root):
    dm = ImageFolderLT(balanced_root, num_workers=0, in_memory=True)
    dm.setup("fit")
    image = dm.train_dataset.images[0]
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    expected_crops = set()
    for dy in range(9):
        for dx in range(9):
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            for flip in (False, True):
                crop = padded.flip(-1) if flip else padded
                expected_crops.add(((crop.float() / 255 - mean) / std).numpy().round(4).tobytes())
    seen = set()
    for seed in range(60):
        torch.manual_seed(seed)
        x, _ = dm.train_dataset[0]
        key = x.numpy().round(4).tobytes()
        assert key in expected_crops  # every output is a pad-4 crop (maybe flipped), normalised
        seen.add(key)
    assert len(seen) > 30  # and the crops vary


def test_eval_is_plain_normalisation(balanced_root):
    dm = ImageFolderLT(balanced_root, num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    dm.setup("test")
    x, y = dm.test_dataset[0]
    pixels = torch.from_numpy(np.array(Image.open(os.path.join(balanced_root, "test", "ant", "0000.jpg")).convert("RGB")))
    torch.testing.assert_close(x, (pixels.permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
    assert y == 0
    assert len(dm.test_dataset) == 12
    assert dm.test_dataset.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_loaders_with_sampler(balanced_root):
    dm = ImageFolderLT(balanced_root, imbalance_factor=10, batch_size=5, eval_batch_size=7, num_workers=0, sampler="sqrt")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResampledSampler) and loader.sampler.mode == "sqrt"
    assert len(loader.sampler) == 35
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 32, 32)
    assert next(iter(dm.val_dataloader()))[0].shape == (7, 3, 32, 32)


def test_cifar10_jpeg_long_tailed_counts(no_decoding):
    root = shared_data_dir("cifar10-jpeg")
    dm = ImageFolderLT(str(root), imbalance_factor=100)
    expected = [int(5000 * 0.01 ** (i / 9)) for i in range(10)]
    assert dm.class_counts == expected == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(dm.class_counts) == 12406
    assert dm.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(dm.train_files()) == 12406
    files, labels = dm.test_files()
    assert np.bincount(labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------- errors
def test_missing_root(tmp_path):
    dm = ImageFolderLT(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError) as info:
        dm.class_counts
    assert str(tmp_path / "nope") in str(info.value) and "<class>" in str(info.value)


def test_missing_train_dir(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train_dir.*training"):
        ImageFolderLT(str(tmp_path)).class_counts
    write_image_folder(str(tmp_path / "training"), {"a": 1, "b": 1})
    assert ImageFolderLT(str(tmp_path), train_dir="training").class_counts == [1, 1]


def test_images_without_class_folders(tmp_path):
    write_image_folder(str(tmp_path), {"train": 2})  # root/train/0000.jpg: no class level
    with pytest.raises(ValueError, match=r"no class folders.*<class>"):
        ImageFolderLT(str(tmp_path)).class_counts


def test_empty_class_folder(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 2})
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"without images.*'.*b'"):
        ImageFolderLT(str(tmp_path)).class_counts


def test_test_classes_differ(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 2, "b": 2})
    write_image_folder(str(tmp_path / "test"), {"a": 1, "c": 1})
    dm = ImageFolderLT(str(tmp_path), num_workers=0)
    assert dm.class_counts == [2, 2]
    with pytest.raises(ValueError, match=r"missing in test: \['b'\], not in train: \['c'\]"):
        dm.setup("fit")


def test_missing_test_dir(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 2, "b": 2})
    with pytest.raises(FileNotFoundError, match="test"):
        ImageFolderLT(str(tmp_path), num_workers=0).setup("fit")


def test_too_few_images_for_the_profile(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 10, "b": 2, "c": 10})
    with pytest.raises(ValueError, match=r"Class 1 \('b'\) has 2 images .* asks for 7") as info:
        ImageFolderLT(str(tmp_path), imbalance_factor=2).class_counts  # asks [10, 7, 5]
    for fix in ("HINT", "`n_max: min`", "`cap_to_available: true`"):  # the message names the options that fix it
        assert fix in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="imbalance_factor"):
        ImageFolderLT(str(tmp_path), imbalance_factor=0.5)
    with pytest.raises(ValueError, match="profile"):
        ImageFolderLT(str(tmp_path), profile="linear")
    with pytest.raises(ValueError, match="mean"):
        ImageFolderLT(str(tmp_path), mean=(0.5,))
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderLT(str(tmp_path), image_size=0)


# ---------------------------------------------------------------------------------------------- own data (issue 14)
@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """MNIST-style folder: 1-channel 28x28 PNGs, classes "0" .. "3" with 10, 14, 8 and 12 training images."""
    root = tmp_path_factory.mktemp("digits")
    write_digit_folder(str(root), [10, 14, 8, 12], test_per_class=2)
    return str(root)


def per_class(labels, num_classes=4) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def test_n_max_cuts_unequal_classes_to_a_profile(digits_root, no_decoding):
    """MNIST's case: classes of unequal size cut to an exp profile. The largest class (default) is an error that
    names the options; `min`, `mean`, a number and `cap_to_available` give these counts, always those trained on."""
    with pytest.raises(ValueError, match=r"Class 0 \('0'\) has 10 images .* asks for 14.*HINT.*`n_max: min`"):
        ImageFolderLT(digits_root, imbalance_factor=2).class_counts
    cases = {
        (("n_max", "min"),): [8, int(8 * 0.5 ** (1 / 3)), int(8 * 0.5 ** (2 / 3)), 4],  # [8, 6, 5, 4]
        (("n_max", "mean"),): [11, 8, 6, 5],  # 44 // 4 = 11: class 0 (10 images) is short ...
        (("n_max", 9),): [9, 7, 5, 4],
        (("n_max", 12), ("cap_to_available", True)): [10, 9, 7, 6],  # ... class 0 keeps its 10
        (("n_max", 6), ("imbalance_factor", 1.0)): [6, 6, 6, 6],  # n_max alone: a balanced cut
    }
    with pytest.raises(ValueError, match=r"Class 0 \('0'\) has 10 images .* n_max=11: the mean class size"):
        ImageFolderLT(digits_root, imbalance_factor=2, n_max="mean").class_counts
    cases[(("n_max", "mean"), ("cap_to_available", True))] = [10, 8, 6, 5]
    del cases[(("n_max", "mean"),)]
    for options, expected in cases.items():
        dm = ImageFolderLT(digits_root, **{"imbalance_factor": 2.0, **dict(options)})
        assert dm.class_counts == expected, options
        assert per_class(dm.train_targets()) == expected == [
            sum(f"/train/{c}/" in f for f in dm.train_files()) for c in range(4)
        ]


@pytest.mark.parametrize("n_max", ["max", 0, -3, True, 2.5])
def test_bad_n_max(tmp_path, n_max):
    with pytest.raises(ValueError, match=r"`n_max`.*'min'.*'mean'"):
        ImageFolderLT(str(tmp_path), n_max=n_max)


def test_class_counts_are_the_images_trained_on(digits_root):
    """With a cut, a cap and a validation hold-out, `class_counts` counts exactly the training dataset's labels."""
    dm = ImageFolderLT(digits_root, imbalance_factor=2, n_max=12, cap_to_available=True, val_fraction=0.25,
                       num_workers=0)  # fmt: skip
    dm.setup("fit")
    # [10, 9, 7, 6] minus round(0.25 * n) = 3, 2, 2, 2 (2.5, 2.25, 1.75, 1.5 rounded half up)
    assert per_class(dm.train_dataset.targets) == dm.class_counts == [7, 7, 5, 4]
    assert len(dm.train_dataset) == sum(dm.class_counts) and dm.train_dataset.files == dm.train_files()
    assert per_class(dm.val_dataset.targets) == [3, 2, 2, 2]


@pytest.mark.parametrize("in_memory", [False, True])
def test_grayscale_pngs(digits_root, in_memory):
    """1-channel PNGs become 3 equal channels by default (RGB backbones take them) or stay 1 channel with `L`."""
    rgb = ImageFolderLT(digits_root, num_workers=0, in_memory=in_memory, mean=(0, 0, 0), std=(1, 1, 1))
    rgb.setup("fit")
    x, _ = rgb.test_dataset[0]
    pixels = torch.from_numpy(np.array(Image.open(os.path.join(digits_root, "test", "0", "0000.png"))))
    assert Image.open(os.path.join(digits_root, "test", "0", "0000.png")).mode == "L"
    expected = T.functional.resize(pixels[None], [32, 32], antialias=True).float() / 255
    assert x.shape == (3, 32, 32)
    for channel in x:
        torch.testing.assert_close(channel[None], expected, atol=1 / 255 + 1e-6, rtol=0)
    gray = ImageFolderLT(digits_root, num_workers=0, in_memory=in_memory, image_mode="L")
    gray.setup("fit")
    x, _ = gray.test_dataset[0]
    assert x.shape == (1, 32, 32) and gray.mean == (0.5,) and gray.std == (0.5,)
    assert next(iter(gray.train_dataloader()))[0].shape[1:] == (1, 32, 32)
    with pytest.raises(ValueError, match=r"`mean` to have 1 value\(s\), one per channel of `image_mode`='L'"):
        ImageFolderLT(digits_root, image_mode="L", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="image_mode"):
        ImageFolderLT(digits_root, image_mode="CMYK")


@pytest.mark.parametrize("in_memory", [False, True])
def test_custom_transforms(odd_size_root, in_memory):
    """A torchvision v2 pipeline replaces the CIFAR recipe for training and evaluation (as given: `image_size` does
    not resize for it); with `in_memory` it receives the decoded image as a PIL image."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    train = v2.Compose([v2.RandomResizedCrop(24, scale=(0.5, 1.0)), *to_tensor])
    evaluation = v2.Compose([v2.Resize(20), v2.CenterCrop(20), *to_tensor])
    dm = ImageFolderLT(odd_size_root, num_workers=0, batch_size=4, in_memory=in_memory,
                       train_transform=train, eval_transform=evaluation)  # fmt: skip
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24)
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 3, 20, 20)
    files = ImageFolderLT(odd_size_root, num_workers=0, eval_transform=evaluation)
    files.setup("test")
    expected = evaluation(Image.open(files.test_dataset.files[0]).convert("RGB"))
    if not in_memory:  # the in-memory path resizes to image_size first
        torch.testing.assert_close(dm.test_dataset[0][0], expected)


def test_transform_of_unequal_sizes_is_an_error_at_setup(tmp_path):
    """Images of two sizes and a transform without a resize: `setup()` names the transform and the fix."""
    write_image_folder(str(tmp_path / "train"), {"a": 3}, size=(40, 36), seed=0)
    write_image_folder(str(tmp_path / "train"), {"b": 3}, size=(20, 20), seed=1)
    write_image_folder(str(tmp_path / "test"), {"a": 1, "b": 1}, size=(32, 32), seed=2)
    no_resize = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    dm = ImageFolderLT(str(tmp_path), num_workers=0, train_transform=no_resize)
    with pytest.raises(ValueError, match=r"`train_transform` returns image tensors of different sizes.*HINT.*Resize"):
        dm.setup("fit")
    no_tensor = v2.Compose([v2.Resize((8, 8))])
    dm = ImageFolderLT(str(tmp_path), num_workers=0, eval_transform=no_tensor)
    with pytest.raises(ValueError, match=r"`eval_transform` returns a PIL.Image.Image, not a tensor.*ToImage"):
        dm.setup("test")


def test_device_data_refuses_custom_transforms(tmp_path):
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    for name in ("train_transform", "eval_transform"):
        message = rf"`device_data=True` .* cannot run your `{name}`.*HINT.*device_data=false"
        with pytest.raises(ValueError, match=message):
            ImageFolderLT(str(tmp_path), device_data=True, **{name: transform})


def test_val_dir(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 4, "b": 3})
    write_image_folder(str(tmp_path / "val"), {"a": 2, "b": 1}, seed=1)
    write_image_folder(str(tmp_path / "test"), {"a": 1, "b": 1}, seed=2)
    dm = ImageFolderLT(str(tmp_path), val_dir="val", num_workers=0)
    dm.setup("fit")
    assert dm.class_counts == [4, 3]  # nothing held out of the training folder
    assert dm.val_dataset.files == dm.val_files()[0] and dm.val_dataset.targets == [0, 0, 1]
    assert all("/val/" in f for f in dm.val_dataset.files) and dm.validates_on_test_split is False
    with pytest.raises(ValueError, match=r"one validation source.*`val_dir`='val'.*`val_fraction`=0.2.*HINT"):
        ImageFolderLT(str(tmp_path), val_dir="val", val_fraction=0.2)
    write_image_folder(str(tmp_path / "val2"), {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"missing in validation: \['b'\], not in train: \['c'\]"):
        ImageFolderLT(str(tmp_path), val_dir="val2", num_workers=0).setup("fit")
    without = ImageFolderLT(str(tmp_path), num_workers=0)
    without.setup("fit")
    assert without.val_dataset is None and without.validates_on_test_split is True  # the test folder


@pytest.mark.parametrize("in_memory", [False, True])
def test_train_eval_dataloader(digits_root, in_memory):
    """The training images (not the validation ones) with the evaluation transform: in order, the same in two passes."""
    dm = ImageFolderLT(digits_root, val_fraction=0.25, num_workers=0, batch_size=4, eval_batch_size=5,
                       in_memory=in_memory)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_eval_dataloader()
    first, second = list(loader), list(loader)
    assert loader.batch_size == 5
    x = torch.cat([b[0] for b in first])
    torch.testing.assert_close(x, torch.cat([b[0] for b in second]), rtol=0, atol=0)  # no augmentation
    assert torch.cat([b[1] for b in first]).tolist() == dm.train_targets()
    evaluation = dm.test_dataset.transform
    for i, path in enumerate(dm.train_files()):  # image i is train file i through the evaluation transform
        image = decode_images([path], 32)[0] if in_memory else Image.open(path).convert("RGB")
        expected = evaluation(image)
        torch.testing.assert_close(x[i], expected, rtol=0, atol=1e-6)
    assert not set(dm.train_files()) & set(dm.val_files()[0])
