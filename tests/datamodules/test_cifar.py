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


# ---------------------------------------------------------------------------------------------- validation splits
#: Per class, the validation images that `val_per_class=50` takes from the long-tailed training images: those the
#: profile leaves fewer than 50 unused images (CIFAR-10-LT IF=100 keeps all 5000 of class 0; CIFAR-100-LT all 500 of
#: class 0 and 477 / 455 of classes 1 / 2).
SHORTFALL = {CIFAR10LT: {0: 50}, CIFAR100LT: {0: 50, 1: 27, 2: 5}}


@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_val_per_class_is_balanced_from_unused_images(cifar_root, cls):
    """A balanced validation set from the training images the profile leaves unused, disjoint from the long-tailed
    training images, which stay the protocol's except for the classes without enough unused images."""
    root, labels = cifar_root
    labels = labels[cls]
    n_max, num_classes = SPECS[cls]
    plain = cls(root=root, num_workers=0)
    plain.setup("fit")
    dm = cls(root=root, num_workers=0, val_per_class=50)
    shortfall = [SHORTFALL[cls].get(c, 0) for c in range(num_classes)]
    expected_counts = [n - s for n, s in zip(formula(n_max, num_classes, 100), shortfall)]
    assert dm.class_counts == expected_counts  # before setup, without the files
    dm.setup("fit")
    assert sum(expected_counts) == {CIFAR10LT: 12356, CIFAR100LT: 10765}[cls]
    val, train = dm.val_indices, dm.train_indices
    assert np.bincount(labels[val], minlength=num_classes).tolist() == [50] * num_classes  # balanced
    np.testing.assert_array_equal(read_stamps(dm.val_dataset.data), val)  # the pixels are those images
    assert dm.val_dataset.targets == labels[val].tolist()
    assert not set(val.tolist()) & set(train.tolist())  # disjoint from the training images
    assert np.bincount(dm.train_dataset.targets, minlength=num_classes).tolist() == expected_counts
    assert dm.train_targets() == list(dm.train_dataset.targets)
    protocol = set(plain.train_indices.tolist())
    for c in range(num_classes):
        kept = train[labels[train] == c]
        reference = plain.train_indices[labels[plain.train_indices] == c]
        if shortfall[c]:  # the missing validation images come out of the class's long-tailed images
            assert set(kept.tolist()) < set(reference.tolist()) and len(reference) - len(kept) == shortfall[c]
        else:  # the protocol's images, in the protocol's order
            np.testing.assert_array_equal(kept, reference)
        from_unused = [i for i in val[labels[val] == c].tolist() if i not in protocol]
        assert len(from_unused) == 50 - shortfall[c]
    assert dm.validates_on_test_split is False


def test_val_per_class_is_seeded_and_evaluated_without_augmentation(cifar_root):
    root, _ = cifar_root
    runs = {}
    for seed in (0, 0, 1):
        dm = CIFAR10LT(root=root, num_workers=0, val_per_class=20, seed=seed)
        dm.setup("validate")  # validation alone builds no training set
        assert dm.train_dataset is None and len(dm.val_dataset) == 200
        runs.setdefault(seed, []).append(dm.val_indices)
    np.testing.assert_array_equal(*runs[0])  # the same seed, the same split
    assert not np.array_equal(runs[0][0], runs[1][0])  # another seed, another split
    x1, x2 = dm.val_dataset[7][0], dm.val_dataset[7][0]
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)  # the evaluation transform: no random crop or flip


@pytest.mark.parametrize("cls", [CIFAR10LT, CIFAR100LT])
def test_val_fraction_holds_out_a_share_of_the_long_tailed_images(cifar_root, cls):
    root, labels = cifar_root
    labels = labels[cls]
    n_max, num_classes = SPECS[cls]
    counts = formula(n_max, num_classes, 100)
    dm = cls(root=root, num_workers=0, val_fraction=0.1)
    held = [int(np.floor(0.1 * n + 0.5)) for n in counts]
    assert dm.class_counts == [n - h for n, h in zip(counts, held)]
    dm.setup("fit")
    plain = cls(root=root, num_workers=0)
    plain.setup("fit")
    assert np.bincount(labels[dm.val_indices], minlength=num_classes).tolist() == held
    union = np.concatenate([dm.train_indices, dm.val_indices])
    assert sorted(union.tolist()) == sorted(plain.train_indices.tolist())  # a split of the protocol's images
    assert not set(dm.train_indices.tolist()) & set(dm.val_indices.tolist())


def test_device_data_with_a_validation_split(cifar_root):
    root, labels = cifar_root
    dm = CIFAR10LT(root=root, val_per_class=10, device_data=True, eval_batch_size=64)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 3, 32, 32)
    pixels = dm.val_dataset.images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(read_stamps(pixels), dm.val_indices)
    assert y.tolist() == labels[CIFAR10LT][dm.val_indices][:64].tolist()
    assert dm.train_eval_dataset.images is dm.train_dataset.images  # shared, not copied


@pytest.mark.parametrize("device_data", [False, True])
def test_train_eval_dataloader(cifar_root, device_data):
    """The long-tailed training images without the validation ones, with the evaluation transform, in order."""
    root, _ = cifar_root
    dm = CIFAR10LT(root=root, num_workers=0, val_per_class=10, eval_batch_size=500, device_data=device_data)
    dm.setup("fit")
    loader = dm.train_eval_dataloader()
    x = torch.cat([x for x, _ in loader])
    assert x.shape == (12406 - 10, 3, 32, 32)
    torch.testing.assert_close(x[:500], next(iter(loader))[0], rtol=0, atol=0)  # no augmentation
    pixels = (x * torch.tensor(CIFAR10_STD)[:, None, None] + torch.tensor(CIFAR10_MEAN)[:, None, None]) * 255
    stamps = read_stamps(pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(stamps, dm.train_indices)  # the training images, in order: no validation image


def test_validation_and_transform_errors(cifar_root):
    with pytest.raises(ValueError, match=r"`val_per_class` in \[0, 5000\).*got 5000"):
        CIFAR10LT(val_per_class=5000)
    with pytest.raises(ValueError, match=r"one validation split.*`val_per_class`=50 and `val_fraction`=0.1.*HINT"):
        CIFAR10LT(val_per_class=50, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"`val_fraction` in \[0, 1\)"):
        CIFAR100LT(val_fraction=1.0)
    transform = lambda image: image  # noqa: E731
    with pytest.raises(ValueError, match=r"`device_data=True`.*`train_transform`.*HINT"):
        CIFAR10LT(device_data=True, train_transform=transform)
    root, _ = cifar_root
    dm = CIFAR10LT(root=root, num_workers=0, eval_transform=transform)  # returns the PIL image
    with pytest.raises(ValueError, match=r"`eval_transform` returns a PIL.Image.Image, not a tensor"):
        dm.setup("test")


def test_custom_transforms(cifar_root):
    from torchvision.transforms import v2

    root, _ = cifar_root
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    dm = CIFAR10LT(root=root, num_workers=0, batch_size=8, val_per_class=5,
                   train_transform=v2.Compose([v2.RandomResizedCrop(16), *to_tensor]),
                   eval_transform=v2.Compose([v2.Resize(16), *to_tensor]))  # fmt: skip
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 16, 16)
    assert next(iter(dm.val_dataloader()))[0].shape == (8, 3, 16, 16)
    assert next(iter(dm.train_eval_dataloader()))[0].shape == (8, 3, 16, 16)
