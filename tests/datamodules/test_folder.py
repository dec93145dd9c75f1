import os

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_lt.datamodules import ImageFolderLT, ResampledSampler
from lightning_lt.datamodules.transforms import CIFAR10_MEAN, CIFAR10_STD
from tests.datamodules.utils import write_image_folder
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
