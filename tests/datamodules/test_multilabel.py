"""Multi-label DataModules (COCO, VOC) with OOD / outlier-exposure folders: labels, counts, loaders, errors, DDP."""

import doctest
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image

import lightning_lt.datamodules.multilabel as multilabel_module
from lightning_lt.datamodules import (
    COCOMultiLabel,
    MultiLabelDataset,
    OODEvalDataset,
    OODImageFolder,
    VOCMultiLabel,
)
from lightning_lt.datamodules.multilabel import VOC_CLASSES
from tests.datamodules.utils import write_image_folder
from tests.helpers import DDP_STRATEGY, shared_data_dir

SIZE = 32  # network input side: small, to keep the tests fast
TEXTURES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
            "crystalline"]  # fmt: skip


def label(name: str) -> int:
    return VOC_CLASSES.index(name)


# ---------------------------------------------------------------------------------------------- fake data
def write_jpeg(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def voc_xml(objects) -> str:
    """A VOC annotation with ``objects`` = [(name, difficult), ...]."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
        "</bndbox></object>"
        for name, difficult in objects
    )
    size = "<size><width>40</width><height>30</height><depth>3</depth></size>"
    return f"<annotation><folder>VOC2007</folder>{size}{body}</annotation>"


def make_voc(devkit: Path, annotations: dict, image_sets: dict, year: str = "2007") -> Path:
    """A VOCdevkit with ``annotations[id] = [(name, difficult), ...]`` and ``image_sets[set] = [id, ...]``."""
    voc = devkit / f"VOC{year}"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for i, (image_id, objects) in enumerate(annotations.items()):
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed=i)
    for name, ids in image_sets.items():
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return devkit


#: 4 annotations, one difficult-only image and two difficult objects.
VOC_OBJECTS = {
    "000001": [("dog", 0), ("person", 0), ("person", 0)],
    "000002": [("cat", 0), ("person", 1)],
    "000003": [("car", 1)],
    "000004": [("tvmonitor", 0), ("chair", 0), ("chair", 1)],
}
VOC_SETS = {"trainval": ["000001", "000002", "000003", "000004"], "test": ["000002", "000004"]}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> str:
    return str(make_voc(tmp_path_factory.mktemp("voc") / "VOCdevkit", VOC_OBJECTS, VOC_SETS))


@pytest.fixture(scope="module")
def ood_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ood")
    write_image_folder(str(root), {"oe_a": 3, "oe_b": 3, "test_c": 2, "test_d": 3}, size=(36, 28))
    return str(root)


def write_coco(root: Path, split: str, images: list, annotations: list, categories: list) -> None:
    """A COCO split: ``images`` = [(id, file name)], ``annotations`` = [(image id, category id, iscrowd)]."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for i, (_, name) in enumerate(images):
        write_jpeg(root / split / name, seed=i)
    content = {
        "images": [{"id": i, "file_name": name, "width": 40, "height": 30} for i, name in images],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": crowd}
            for k, (i, c, crowd) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": n, "supercategory": ""} for c, n in categories],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


FAKE_CATEGORIES = [(90, "toothbrush"), (1, "person"), (18, "dog")]  # unsorted ids: labels follow the sorted ids


@pytest.fixture
def fake_coco(tmp_path) -> Path:
    images = [(7, "a.jpg"), (3, "b.jpg"), (5, "c.jpg")]
    # image 7: two persons (one crowd) and a dog; image 3: a crowd of persons only; image 5: no box
    write_coco(tmp_path, "train", images, [(7, 1, 0), (7, 1, 1), (7, 18, 0), (3, 1, 1)], FAKE_CATEGORIES)
    write_coco(tmp_path, "val", [(11, "d.jpg")], [(11, 90, 0)], FAKE_CATEGORIES)
    return tmp_path


# ---------------------------------------------------------------------------------------------- doctests
def test_doctests():
    result = doctest.testmod(multilabel_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- real COCO128
def reference_coco(json_path: Path):
    """Category ids of every image, sorted category ids, positive images per label and names: plain Python."""
    content = json.loads(json_path.read_text())
    ids = sorted(c["id"] for c in content["categories"])
    names = {c["id"]: c["name"] for c in content["categories"]}
    per_image = {image["id"]: set() for image in content["images"]}
    for ann in content["annotations"]:
        per_image[ann["image_id"]].add(ann["category_id"])
    counts = [sum(cid in cats for cats in per_image.values()) for cid in ids]
    return per_image, ids, counts, [names[i] for i in ids]


def test_real_coco128_labels_and_counts():
    root = shared_data_dir("coco128")
    dm = COCOMultiLabel(str(root), image_size=SIZE, batch_size=4, num_workers=0)
    per_image, category_ids, counts, names = reference_coco(root / "annotations" / "instances_train2017.json")
    # valid right after __init__ (LightningCLI links them before setup)
    assert dm.class_counts == counts and dm.num_classes == 80 and dm.class_names == names
    assert dm.class_names[:3] == ["person", "bicycle", "car"] and dm.class_names[-1] == "toothbrush"
    assert dm.class_counts[0] == 61  # person: 254 boxes in 61 of the 128 images
    assert sum(c > 0 for c in counts) == 71
    assert dm.tail_labels == [c for c, n in enumerate(counts) if n < 20]
    assert not dm.has_outlier_exposure

    dm.setup("fit")
    assert len(dm.train_dataset) == 128 and len(dm.val_dataset) == 128 and dm.val_dataset.num_ood == 0
    unlabelled = sum(not cats for cats in per_image.values())
    assert unlabelled == 2
    assert len(COCOMultiLabel(str(root), drop_unlabelled=True).split_samples("train2017")) == 128 - unlabelled
    # every image's multi-hot target holds exactly the categories of its boxes (images in id order)
    for index, image_id in enumerate(sorted(per_image)):
        assert os.path.basename(dm.train_dataset.files[index]) == f"{image_id:012d}.jpg"
        hot = dm.train_dataset.target(index).nonzero().flatten().tolist()
        assert [category_ids[c] for c in hot] == sorted(per_image[image_id])

    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert targets.shape == (4, 80) and targets.dtype == torch.float32
    assert set(targets.unique().tolist()) <= {0.0, 1.0}


def test_real_coco128_with_dtd_outliers():
    root, dtd = shared_data_dir("coco128"), shared_data_dir("dtd10")
    oe, ood = TEXTURES[:5], TEXTURES[5:]
    dm = COCOMultiLabel(
        str(root), ood_root=str(dtd), oe_classes=oe, ood_classes=ood, image_size=SIZE, batch_size=4,
        oe_batch_size=6, eval_batch_size=8, num_workers=0,
    )  # fmt: skip
    assert dm.has_outlier_exposure
    dm.setup("fit")
    assert len(dm.oe_dataset) == 5 * 120 and set(dm.oe_dataset.folders) == set(oe)
    evaluation = dm.val_dataset
    assert dm.test_dataloader().dataset is evaluation
    assert len(evaluation) == 128 + 5 * 120
    assert evaluation.is_ood.tolist() == [0] * 128 + [1] * 600
    assert all(os.path.basename(os.path.dirname(f)) in ood for f in evaluation.datasets[1].files)
    for index, flag in ((127, 0), (128, 1), (len(evaluation) - 1, 1)):
        image, target, is_ood = evaluation[index]
        assert image.shape == (3, SIZE, SIZE) and target.shape == (80,)
        assert is_ood.dtype == torch.int64 and int(is_ood) == flag
        if flag:
            assert target.sum() == 0
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"id", "oe"}
    assert batch["id"][0].shape == (4, 3, SIZE, SIZE) and batch["id"][1].shape == (4, 80)
    assert batch["oe"][0].shape == (6, 3, SIZE, SIZE) and torch.equal(batch["oe"][1], torch.zeros(6, 80))

    with pytest.raises(ValueError, match=r"share \['cracked'\].*never be test OOD"):
        COCOMultiLabel(str(root), ood_root=str(dtd), oe_classes=oe + ["cracked"], ood_classes=ood)


# ---------------------------------------------------------------------------------------------- fake COCO
def test_coco_labels_iscrowd_and_unlabelled(fake_coco):
    dm = COCOMultiLabel(str(fake_coco), train_split="train", val_split="val", image_size=SIZE, num_workers=0)
    assert dm.class_names == ["person", "dog", "toothbrush"]  # category ids 1, 18, 90
    assert dm.class_counts == [2, 1, 0]  # the crowd-only image counts for person; one label per image
    assert dm.split_samples("train") == [
        (str(fake_coco / "train" / "b.jpg"), [0]),
        (str(fake_coco / "train" / "c.jpg"), []),
        (str(fake_coco / "train" / "a.jpg"), [0, 1]),
    ]
    assert dm.split_samples("val") == [(str(fake_coco / "val" / "d.jpg"), [2])]
    dropped = COCOMultiLabel(str(fake_coco), train_split="train", val_split="val", drop_unlabelled=True)
    assert [os.path.basename(p) for p, _ in dropped.split_samples("train")] == ["b.jpg", "a.jpg"]
    dm.setup("fit")
    _, target = dm.train_dataset[2]
    assert target.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(NotImplementedError, match="multi-label"):
        dm.train_targets()


def test_coco_errors(fake_coco, tmp_path_factory):
    def make(root, **kwargs):
        return COCOMultiLabel(str(root), train_split="train", val_split="val", **kwargs)

    with pytest.raises(FileNotFoundError, match="is not a directory.*official COCO layout"):
        make(fake_coco / "nowhere").class_counts
    with pytest.raises(FileNotFoundError, match=r"instances_test\.json.*not found.*Expected layout"):
        COCOMultiLabel(str(fake_coco), train_split="test").class_counts
    os.remove(fake_coco / "train" / "c.jpg")
    with pytest.raises(FileNotFoundError, match=r"c\.jpg.*not found.*Expected layout"):
        make(fake_coco).class_counts

    bad = tmp_path_factory.mktemp("bad_category")
    write_coco(bad, "train", [(1, "a.jpg")], [(1, 1, 0), (1, 44, 0)], FAKE_CATEGORIES)
    with pytest.raises(ValueError, match=r"instances_train\.json.*category_id 44.*not among"):
        make(bad).class_counts

    other = tmp_path_factory.mktemp("other_categories")
    write_coco(other, "train", [(1, "a.jpg")], [(1, 1, 0)], FAKE_CATEGORIES)
    write_coco(other, "val", [(2, "b.jpg")], [(2, 1, 0)], FAKE_CATEGORIES[:2])
    dm = make(other)
    assert dm.class_counts == [1, 0, 0]
    with pytest.raises(ValueError, match=r"categories of .*instances_val\.json.*differ.*missing: \[\(18, 'dog'\)\]"):
        dm.setup("validate")


# ---------------------------------------------------------------------------------------------- fake VOC
def test_voc_labels_counts_and_difficult(voc_root):
    dm = VOCMultiLabel(voc_root, image_size=SIZE, num_workers=0)
    assert dm.num_classes == 20 and dm.class_names == list(VOC_CLASSES)
    assert dm.class_names[0] == "aeroplane" and dm.class_names[-1] == "tvmonitor"
    expected = [0] * 20
    for name in ("dog", "person", "cat", "tvmonitor", "chair"):  # the difficult person and car are left out
        expected[label(name)] = 1
    assert dm.class_counts == expected
    assert dm.split_samples("trainval")[2][1] == []  # 000003 has only a difficult car: kept, all-negative
    assert dm.split_samples("test") == [
        (os.path.join(voc_root, "VOC2007", "JPEGImages", "000002.jpg"), [label("cat")]),
        (os.path.join(voc_root, "VOC2007", "JPEGImages", "000004.jpg"), [label("chair"), label("tvmonitor")]),
    ]
    with_difficult = VOCMultiLabel(voc_root, use_difficult=True)
    expected[label("person")] = 2
    expected[label("car")] = 1
    assert with_difficult.class_counts == expected
    assert with_difficult.split_samples("test")[0][1] == sorted([label("cat"), label("person")])
    tail = VOCMultiLabel(voc_root, use_difficult=True, tail_threshold=2).tail_labels
    assert tail == [c for c in range(20) if c != label("person")]
    with pytest.warns(UserWarning, match="no head / tail split"):
        assert dm.tail_labels is None  # every label has fewer than 20 positives


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory.*VOCdevkit folder"):
        VOCMultiLabel(str(tmp_path / "nowhere")).class_counts
    with pytest.raises(FileNotFoundError, match=r"VOC2012.*not found \(check `year`.*VOC2007"):
        VOCMultiLabel(voc_root, year="2012").class_counts
    with pytest.raises(FileNotFoundError, match=r"image set .*Main/train\.txt.*not found"):
        VOCMultiLabel(voc_root, train_set="train").class_counts

    devkit = make_voc(tmp_path / "bad", {"a": [("dog", 0)], "b": [("Dog", 0)]}, {"trainval": ["a", "b"]})
    with pytest.raises(ValueError, match=r"b\.xml.*object named 'Dog'.*not a VOC class"):
        VOCMultiLabel(str(devkit)).class_counts

    devkit = make_voc(tmp_path / "missing", {"a": [("dog", 0)], "b": [("cat", 0)]}, {"trainval": ["a", "b", "c"]})
    with pytest.raises(FileNotFoundError, match=r"annotation .*c\.xml.*listed in .*trainval\.txt.*not found"):
        VOCMultiLabel(str(devkit)).class_counts
    os.remove(devkit / "VOC2007" / "JPEGImages" / "b.jpg")
    (devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"image .*JPEGImages/b\.jpg.*not found.*Expected layout"):
        VOCMultiLabel(str(devkit)).class_counts


# ---------------------------------------------------------------------------------------------- OOD folders
def test_ood_arguments_and_folder_errors(voc_root, ood_root):
    with pytest.raises(ValueError, match=r"share \['oe_b'\]"):
        VOCMultiLabel(voc_root, ood_root=ood_root, oe_classes=["oe_a", "oe_b"], ood_classes=["oe_b"])
    with pytest.raises(ValueError, match="`oe_classes`.*without `ood_root`"):
        VOCMultiLabel(voc_root, oe_classes=["oe_a"])
    with pytest.raises(ValueError, match="`ood_classes`.*without `ood_root`"):
        VOCMultiLabel(voc_root, ood_classes=["test_c"])
    with pytest.raises(ValueError, match="neither `oe_classes` nor `ood_classes`"):
        VOCMultiLabel(voc_root, ood_root=ood_root)
    with pytest.raises(ValueError, match="`ood_classes` to be a list of sub-folder names, got the string 'test_c'"):
        VOCMultiLabel(voc_root, ood_root=ood_root, ood_classes="test_c")
    with pytest.raises(ValueError, match="`oe_classes` is an empty list"):
        VOCMultiLabel(voc_root, ood_root=ood_root, oe_classes=[])
    with pytest.raises(ValueError, match="`classes` is empty"):
        OODImageFolder(ood_root, [], num_classes=3)
    available = r"available sub-folders: \['oe_a', 'oe_b', 'test_c', 'test_d'\]"
    with pytest.raises(FileNotFoundError, match=r"\['nope'\] not found.*" + available):
        OODImageFolder(ood_root, ["oe_a", "nope"], num_classes=3)
    dm = VOCMultiLabel(voc_root, ood_root=ood_root, oe_classes=["oe_a", "missing"], num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"\['missing'\] not found"):
        dm.setup("fit")

    folder = OODImageFolder(ood_root, ["test_d", "oe_a"], num_classes=3)
    assert len(folder) == 6 and folder.folders == ["test_d"] * 3 + ["oe_a"] * 3
    image, target = folder[0]
    assert image.size == (36, 28) and torch.equal(target, torch.zeros(3))


def test_multilabel_dataset_targets(tmp_path):
    write_jpeg(tmp_path / "x.jpg", seed=0)
    dataset = MultiLabelDataset([(str(tmp_path / "x.jpg"), [3, 0, 3]), (str(tmp_path / "x.jpg"), [])], num_classes=5)
    image, target = dataset[0]
    assert image.size == (40, 30)
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert dataset.target(1).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match=r"labels \[5\].*\[0, 5\)"):
        MultiLabelDataset([("x.jpg", [5])], num_classes=5)


def test_small_oe_set_is_repeated_to_cover_the_id_epoch(voc_root, ood_root):
    dm = VOCMultiLabel(
        voc_root, ood_root=ood_root, oe_classes=["oe_a"], ood_classes=["test_c"],
        image_size=SIZE, batch_size=1, oe_batch_size=2, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    oe_size = len(dm.oe_dataset)
    assert len(loader) == 4  # 4 ID images, batch 1: the OE loader (repeated) does not cut the epoch short
    assert len(loader.flattened[1].dataset) >= 4 * 2 > oe_size


def test_loaders_with_outlier_exposure(voc_root, ood_root):
    dm = VOCMultiLabel(
        voc_root, ood_root=ood_root, oe_classes=["oe_a", "oe_b"], ood_classes=["test_c", "test_d"],
        image_size=SIZE, batch_size=2, oe_batch_size=2, eval_batch_size=4, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "min_size"
    iter(loader)
    assert len(loader) == 2  # one pass over the 4 ID images; 2 of the 3 OE batches are drawn
    batches = [batch for batch, _, _ in loader]
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"id", "oe"}
        images, targets = batch["id"]
        assert images.shape == (2, 3, SIZE, SIZE) and targets.shape == (2, 20) and targets.dtype == torch.float32
        oe_images, oe_targets = batch["oe"]
        assert oe_images.shape == (2, 3, SIZE, SIZE) and torch.equal(oe_targets, torch.zeros(2, 20))

    evaluation = [batch for batch in dm.val_dataloader()]
    images = torch.cat([b[0] for b in evaluation])
    targets = torch.cat([b[1] for b in evaluation])
    is_ood = torch.cat([b[2] for b in evaluation])
    assert images.shape == (2 + 5, 3, SIZE, SIZE) and is_ood.dtype == torch.int64
    assert is_ood.tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert targets[0].nonzero().flatten().tolist() == [label("cat")]
    assert targets[2:].sum() == 0

    plain = VOCMultiLabel(voc_root, image_size=SIZE, batch_size=3, num_workers=0)
    plain.setup("fit")
    images, targets = next(iter(plain.train_dataloader()))
    assert images.shape == (3, 3, SIZE, SIZE) and targets.shape == (3, 20)
    images, targets, is_ood = next(iter(plain.test_dataloader()))
    assert images.shape == (2, 3, SIZE, SIZE) and is_ood.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------- DDP
class IndexedID(MultiLabelDataset):
    """The ID training set with the index in place of the image."""

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]), self.target(index)


class IndexedOE(OODImageFolder):
    """The OE folder with the index in place of the image."""

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]), torch.zeros(self.num_classes)


class IndexedVOC(VOCMultiLabel):
    def setup(self, stage=None) -> None:
        super().setup(stage)
        if stage == "fit":
            samples = list(zip(self.train_dataset.files, self.train_dataset.labels))
            self.train_dataset = IndexedID(samples, self.num_classes)
            self.oe_dataset = IndexedOE(self.ood_root, self.oe_classes, self.num_classes)


class RecordStreams(LightningModule):
    """Writes the ID and OE indices (and ID targets) each rank receives to ``out_dir/rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 20)
        self.seen = {"id": [], "oe": [], "targets": [], "batch_sizes": []}

    def training_step(self, batch, batch_idx):
        (x, y), (x_oe, y_oe) = batch["id"], batch["oe"]
        self.seen["id"].extend(int(i) for i in x.flatten())
        self.seen["oe"].extend(int(i) for i in x_oe.flatten())
        self.seen["targets"].extend(y.tolist())
        self.seen["batch_sizes"].append([len(x), len(x_oe)])
        logits = self.layer(torch.cat([x, x_oe]))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.cat([y, y_oe]))

    def on_train_epoch_end(self) -> None:
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.json"), "w") as f:
            json.dump({**self.seen, "world_size": self.trainer.world_size}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
def test_ddp_shards_id_and_oe_streams(tmp_path):
    # 8 ID and 16 OE images: even sizes, so DistributedSampler needs no padding and the shares are disjoint
    names = ["dog", "cat", "person", "car", "bus", "sheep", "sofa", "train"]
    annotations = {f"{i:06d}": [(names[i], 0), (names[(i + 3) % 8], 0)] for i in range(8)}
    devkit = make_voc(tmp_path / "VOCdevkit", annotations, {"trainval": list(annotations), "test": ["000000"]})
    write_image_folder(str(tmp_path / "ood"), {"a": 10, "b": 6}, size=(8, 8))
    dm = IndexedVOC(
        str(devkit), ood_root=str(tmp_path / "ood"), oe_classes=["a", "b"], batch_size=2, oe_batch_size=4,
        num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDP_STRATEGY, max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(RecordStreams(str(tmp_path)), datamodule=dm)

    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(run["world_size"] == 2 for run in runs)
    assert [run["batch_sizes"] for run in runs] == [[[2, 4], [2, 4]]] * 2  # 4 ID + 8 OE per rank: 2 steps each
    ids = [run["id"] for run in runs]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(8))
    oe = [run["oe"] for run in runs]
    assert not set(oe[0]) & set(oe[1])
    assert sorted(oe[0] + oe[1]) == list(range(16))
    # each ID index arrives with its own multi-hot target
    labels = dict(enumerate(dm.split_samples("trainval")))
    for run in runs:
        for index, target in zip(run["id"], run["targets"]):
            assert [c for c, v in enumerate(target) if v] == labels[index][1]
    assert Counter(len(run["id"]) for run in runs) == Counter({4: 2})
