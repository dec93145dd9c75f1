import os

import pytest
import torch
from PIL import Image

from lightning_lt.datamodules import ListFileDataModule
from lightning_lt.datamodules.list_file import read_list_file
from tests.datamodules.utils import write_image_folder


@pytest.fixture(scope="module")
def imagenet_lt(tmp_path_factory):
    """ImageNet-LT-like tree: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and list files at the root."""
    root = tmp_path_factory.mktemp("imagenet_lt")
    train = {"n01": 6, "n02": 3, "n03": 1}
    write_image_folder(str(root / "train"), train, size=(48, 40), ext=".JPEG")
    write_image_folder(str(root / "val"), {w: 2 for w in train}, size=(40, 48), ext=".JPEG", seed=1)
    lines = [f"train/{w}/{i:04d}.JPEG {c}" for c, (w, n) in enumerate(train.items()) for i in range(n)]
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines[::-1]) + "\n\n")  # order and a blank line do not matter
    (root / "ImageNet_LT_val.txt").write_text("".join(f"val/{w}/{i:04d}.JPEG {c}\n" for c, w in enumerate(train) for i in range(2)))
    (root / "ImageNet_LT_test.txt").write_text("val/n03/0000.JPEG 2\nval/n01/0001.JPEG 0\n")
    (root / "classes.txt").write_text("tench\ngoldfish\nshark\n")
    return str(root)


def make(root, **kwargs):
    defaults = dict(train_list="ImageNet_LT_train.txt", val_list="ImageNet_LT_val.txt", image_size=32, num_workers=0)
    return ListFileDataModule(root, **{**defaults, **kwargs})


def test_counts_from_the_train_list_without_decoding(imagenet_lt, monkeypatch):
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    dm = make(imagenet_lt)
    assert dm.class_counts == [6, 3, 1]
    assert dm.num_classes == 3
    assert dm.class_names == ["0", "1", "2"]
    assert make(imagenet_lt, class_names_file="classes.txt").class_names == ["tench", "goldfish", "shark"]
    # list paths may also be given as absolute paths
    absolute = make(imagenet_lt, train_list=os.path.join(imagenet_lt, "ImageNet_LT_train.txt"))
    assert absolute.class_counts == [6, 3, 1]


def test_datasets_and_loaders(imagenet_lt):
    dm = make(imagenet_lt, test_list="ImageNet_LT_test.txt", batch_size=4, eval_batch_size=3)
    dm.setup("fit")
    assert len(dm.train_dataset) == 10 and len(dm.val_dataset) == 6 and len(dm.test_dataset) == 2
    assert sorted(dm.train_targets()) == [0] * 6 + [1] * 3 + [2]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (3, 3, 32, 32) and yv.tolist() == [0, 0, 1]
    xt, yt = next(iter(dm.test_dataloader()))
    assert yt.tolist() == [2, 0]
    assert dm.test_dataset.files[0] == os.path.join(imagenet_lt, "val/n03/0000.JPEG")


def test_test_list_defaults_to_val(imagenet_lt):
    dm = make(imagenet_lt)
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset and dm.train_dataset is None


def test_explicit_num_classes_with_empty_class(imagenet_lt):
    with pytest.raises(ValueError, match=r"1 class\(es\) have no training images.*\[3\]"):
        make(imagenet_lt, num_classes=4).class_counts


def test_class_without_training_images(tmp_path):
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg 2\n")
    with pytest.raises(ValueError, match=r"no training images .*\[1\]"):
        ListFileDataModule(str(tmp_path), "train.txt", "train.txt").class_counts


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a.jpg 0\n\nb.jpg zero\n")
    with pytest.raises(ValueError, match=rf"{path}:3: .*'b.jpg zero'"):
        ListFileDataModule(str(tmp_path), "train.txt", "train.txt").class_counts
    path.write_text("a.jpg 0\nonlyapath.jpg\n")
    with pytest.raises(ValueError, match=rf"{path}:2:"):
        read_list_file(str(path))
    path.write_text("a.jpg -1\n")
    with pytest.raises(ValueError, match=rf"{path}:1:"):
        read_list_file(str(path))


def test_paths_with_spaces(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("my images/a b.jpg 3\n")
    assert read_list_file(str(path)) == (["my images/a b.jpg"], [3])


def test_label_out_of_range(imagenet_lt, tmp_path):
    bad_val = tmp_path / "val.txt"
    bad_val.write_text("val/n01/0000.JPEG 0\nval/n01/0001.JPEG 5\n")
    dm = make(imagenet_lt, val_list=str(bad_val))
    with pytest.raises(ValueError, match=rf"{bad_val}:2: label 5 is outside \[0, 3\)"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"ImageNet_LT_train.txt:\d+: label 2 is outside \[0, 2\)"):
        make(imagenet_lt, num_classes=2).class_counts


def test_missing_files(imagenet_lt, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_list.*missing.txt"):
        make(imagenet_lt, train_list="missing.txt").class_counts
    (tmp_path / "train.txt").write_text("train/x.jpg 0\n")
    with pytest.raises(FileNotFoundError, match=r"relative to `root`"):
        ListFileDataModule(str(tmp_path), "train.txt", "train.txt").setup("fit")
    with pytest.raises(FileNotFoundError, match="root"):
        ListFileDataModule(str(tmp_path / "nope"), str(tmp_path / "train.txt"), str(tmp_path / "train.txt")).setup("fit")
    with pytest.raises(ValueError, match="2 names, expected one per class"):
        (tmp_path / "names.txt").write_text("a\nb\n")
        make(imagenet_lt, class_names_file=str(tmp_path / "names.txt")).class_names


# ---------------------------------------------------------------------------------------------- issue 14
def test_val_fraction_holds_out_part_of_the_training_list(imagenet_lt):
    """Without `val_list`, `val_fraction` validates on a per-class share of the training list (not the test list)."""
    dm = make(imagenet_lt, val_list=None, test_list="ImageNet_LT_test.txt", val_fraction=0.2)
    assert dm.class_counts == [5, 2, 1]  # 6, 3, 1 minus round(1.2), round(0.6), round(0.2)
    dm.setup("fit")
    train = [os.path.relpath(f, imagenet_lt) for f in dm.train_dataset.files]
    val = [os.path.relpath(f, imagenet_lt) for f in dm.val_dataset.files]
    assert train == dm.train_files() and len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == sorted(read_list_file(os.path.join(imagenet_lt, "ImageNet_LT_train.txt"))[0])
    assert sorted(dm.val_dataset.targets) == [0, 1] and dm.validates_on_test_split is False
    assert len(dm.test_dataset) == 2
    x1, x2 = dm.val_dataset[0][0], dm.val_dataset[0][0]
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)  # evaluation transform
    eval_x = torch.cat([x for x, _ in dm.train_eval_dataloader()])
    assert eval_x.shape == (8, 3, 32, 32)
    torch.testing.assert_close(eval_x, torch.cat([x for x, _ in dm.train_eval_dataloader()]), rtol=0, atol=0)


def test_validation_sources_are_checked(imagenet_lt):
    with pytest.raises(ValueError, match=r"one validation source.*`val_list`.*`val_fraction`=0.1.*HINT"):
        make(imagenet_lt, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"neither `val_list` nor `test_list`.*HINT"):
        make(imagenet_lt, val_list=None)
    dm = make(imagenet_lt, val_list=None, test_list="ImageNet_LT_test.txt", val_fraction=0.6)
    message = r"holds out all 1 training image\(s\) of class 2.*HINT: use `val_fraction` < 0.5"
    with pytest.raises(ValueError, match=message):
        dm.class_counts


def test_a_list_cut_to_a_profile(imagenet_lt):
    """Like ImageFolderLT: `n_max` and `cap_to_available` cut a list whose classes differ in size."""
    with pytest.raises(ValueError, match=r"Class 1 has 3 images .* asks for 4.*HINT"):
        make(imagenet_lt, imbalance_factor=2).class_counts  # n_max = 6: [6, 4, 3]
    assert make(imagenet_lt, n_max="min").class_counts == [1, 1, 1]  # a balanced cut to the smallest class
    assert make(imagenet_lt, imbalance_factor=2, cap_to_available=True).class_counts == [6, 3, 1]
    dm = make(imagenet_lt, imbalance_factor=3, n_max=3)
    assert dm.class_counts == [3, 1, 1]
    dm.setup("fit")
    assert sorted(dm.train_dataset.targets) == [0, 0, 0, 1, 2]


def test_custom_transforms_and_grayscale(imagenet_lt):
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    dm = make(imagenet_lt, image_mode="L", batch_size=4, eval_batch_size=3,
              train_transform=v2.Compose([v2.RandomResizedCrop(20), *to_tensor]),
              eval_transform=v2.Compose([v2.Resize(24), v2.CenterCrop(20), *to_tensor]))  # fmt: skip
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 1, 20, 20)
    assert next(iter(dm.val_dataloader()))[0].shape == (3, 1, 20, 20)
