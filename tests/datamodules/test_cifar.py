"""CIFAR-10-LT / CIFAR-100-LT on generated files in the official pickle layout (no download)."""

import os
import pickle

import numpy as np
import pytest
import torch

from lightning_lt.datamodules import CIFAR10LT, CIFAR100LT, ResampledSampler
from lightning_lt.datamodules.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from lightning_lt.datamodules.transforms import CIFAR10_MEAN, CIFAR10_STD


def stamped_images(n: int) -> np.ndarray:
    """``n`` CIFAR rows (3072 bytes, channel-major) with the row index written into the first 3 red pixels."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    index = np.arange(n)
    data[:, 0], data[:, 1], data[:, 2] = index % 256, (index // 256) % 256, index // 65536
    return data


def read_stamps(hwc: np.ndarray) -> np.ndarray:
    """Indices written by :func:`stamped_images`, from ``[N, 32, 32, 3]`` images (torchvision's ``data``)."""
    red = hwc[:, 0, :3, 0].astype(np.int64)
    return red[:, 0] + 256 * red[:, 1] + 65536 * red[:, 2]


def shuffled_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def dump(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root) -> np.ndarray:
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    labels = shuffled_labels(10, 5000, seed=1)
    data = stamped_images(50000)
    for b in range(5):
        rows = slice(b * 10000, (b + 1) * 10000)
        dump(os.path.join(folder, f"data_batch_{b + 1}"), {"data": data[rows], "labels": labels[rows].tolist()})
    test_labels = shuffled_labels(10, 1000, seed=2)
    dump(os.path.join(folder, "test_batch"), {"data": stamped_images(10000), "labels": test_labels.tolist()})
    dump(os.path.join(folder, "batches.meta"), {"label_names": list(CIFAR10_CLASSES)})
    return labels


def make_cifar100(root) -> np.ndarray:
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    labels = shuffled_labels(100, 500, seed=3)
    dump(os.path.join(folder, "train"), {"data": stamped_images(50000), "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()})
    test_labels = shuffled_labels(100, 100, seed=4)
    dump(os.path.join(folder, "test"), {"data": stamped_images(10000), "fine_labels": test_labels.tolist(), "coarse_labels": (test_labels // 5).tolist()})
    dump(os.path.join(folder, "meta"), {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": [str(i) for i in range(20)]})
    return labels


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return str(root), {CIFAR10LT: make_cifar10(root), CIFAR100LT: make_cifar100(root)}


def ldam_reference_selection(targets, counts) -> np.ndarray:
    """LDAM-DRW's gen_imbalanced_data, with numpy's global RNG (state restored afterwards)."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        targets_np = np.array(targets, dtype=np.int64)
        kept = []
        for c, n in zip(np.unique(targets_np), counts):
            idx = np.where(targets_np == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)


def formula(n_max, num_classes, imbalance_factor):
    return [int(n_max * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


SPECS = {CIFAR10LT: (5000, 10), CIFAR100LT: (500, 100)}


@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_counts_and_names_without_setup_or_files(cls, tmp_path):
    dm = cls(root=str(tmp_path / "nothing_here"), imbalance_factor=100)
    n_max, num_classes = SPECS[cls]
    assert dm.class_counts == formula(n_max, num_classes, 100)
    assert sum(dm.class_counts) == {CIFAR10LT: 12406, CIFAR100LT: 10847}[cls]
    assert dm.num_classes == num_classes
    assert dm.class_names[:3] == (["airplane", "automobile", "bird"] if cls is CIFAR10LT else ["apple", "aquarium_fish", "baby"])
    assert len(dm.class_names) == num_classes


@pytest.mark.parametrize("imbalance_factor", [10, 50, 100, 200])
@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_setup_keeps_exactly_the_protocol_images(cifar_root, cls, imbalance_factor):
    root, labels = cifar_root
    dm = cls(root=root, imbalance_factor=imbalance_factor, num_workers=0)
    dm.setup("fit")
    n_max, num_classes = SPECS[cls]
    expected_counts = formula(n_max, num_classes, imbalance_factor)
    train = dm.train_dataset
    assert np.bincount(train.targets, minlength=num_classes).tolist() == expected_counts == dm.class_counts
    expected = ldam_reference_selection(labels[cls], expected_counts)
    np.testing.assert_array_equal(dm.train_indices, expected)
    np.testing.assert_array_equal(read_stamps(train.data), expected)  # the pixels are those images
    np.testing.assert_array_equal(train.targets, labels[cls][expected])
    assert dm.train_targets() == list(train.targets)
    if imbalance_factor == 100:
        assert len(train) == {CIFAR10LT: 12406, CIFAR100LT: 10847}[cls]


@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_test_set_is_the_balanced_original(cifar_root, cls):
    root, _ = cifar_root
    dm = cls(root=root, num_workers=0)
    dm.setup("test")
    assert dm.train_dataset is None  # test stage does not build the training split
    test = dm.test_dataset
    n_max, num_classes = SPECS[cls]
    assert len(test) == 10000
    assert np.bincount(test.targets).tolist() == [10000 // num_classes] * num_classes
    np.testing.assert_array_equal(read_stamps(test.data), np.arange(10000))  # untouched, in order


def test_step_profile(cifar_root):
    root, labels = cifar_root
    dm = CIFAR10LT(root=root, imbalance_factor=10, profile="step", num_workers=0)
    assert dm.class_counts == [5000] * 5 + [500] * 5
    dm.setup("fit")
    assert np.bincount(dm.train_dataset.targets).tolist() == [5000] * 5 + [500] * 5
    np.testing.assert_array_equal(dm.train_indices, ldam_reference_selection(labels[CIFAR10LT], dm.class_counts))


def test_loaders(cifar_root):
    root, _ = cifar_root
    dm = CIFAR10LT(root=root, batch_size=16, eval_batch_size=64, num_workers=0, sampler="class_balanced")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert isinstance(dm.train_dataloader().sampler, ResampledSampler)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (64, 3, 32, 32)
    # black test pixels (all but the 3 stamps) are normalised to -mean/std
    expected = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(xv[0, :, 10, 10], expected)


def test_missing_files_error(tmp_path):
    dm = CIFAR10LT(root=str(tmp_path))
    assert sum(dm.class_counts) == 12406  # still fine without files
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    for part in (str(tmp_path), "cifar-10-batches-py", "data_batch_1", "batches.meta", "download"):
        assert part in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100LT(root=str(tmp_path)).setup("fit")


@pytest.mark.parametrize("bad", [0.5, 0, -1])
def test_imbalance_factor_below_one(bad):
    with pytest.raises(ValueError, match="imbalance_factor"):
        CIFAR10LT(imbalance_factor=bad)


def test_bad_profile():
    with pytest.raises(ValueError, match="profile"):
        CIFAR100LT(profile="linear")
