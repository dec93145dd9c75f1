"""Every config in configs/ runs `lightning-lt fit --trainer.fast_dev_run=true`, with data paths overridden."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lt.cli import LightningLTCLI, main
from lightning_lt.nets import CIFARResNet
from lightning_lt.tasks import LongTailClassifier
from tests.datamodules.test_cifar import make_cifar10, make_cifar100
from tests.datamodules import test_detection as detection_data
from tests.datamodules.test_multilabel import VOC_OBJECTS, VOC_SETS, make_voc
from tests.datamodules.test_segmentation import make_ade20k, make_cityscapes
from tests.datamodules.utils import write_digit_folder
from tests.helpers import REPO_ROOT, shared_data_dir

#: Folders of partial configs (presets added to a full config with a second ``--config``) and W&B sweep files,
#: which are not runnable on their own; tests/test_sweeps.py and the preset tests cover them.
PARTIAL_CONFIG_DIRS = ("loggers", "trainer", "sweeps")
CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs").rglob("*.yaml")
    if p.relative_to(REPO_ROOT / "configs").parts[0] not in PARTIAL_CONFIG_DIRS
)


@pytest.fixture(scope="module")
def fake_cifar_root(tmp_path_factory) -> str:
    """CIFAR-10 and CIFAR-100 in the official pickle layout, random pixels (no download in tests)."""
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    make_cifar100(root)
    return str(root)


@pytest.fixture(scope="module")
def fake_data_roots(tmp_path_factory) -> dict[str, str]:
    """ADE20K, Cityscapes and PASCAL VOC (multi-label and detection) in their official layouts, random pixels
    (the real sets are not here)."""
    ade, city = tmp_path_factory.mktemp("ade20k"), tmp_path_factory.mktemp("cityscapes")
    make_ade20k(ade)
    make_cityscapes(city)
    voc = make_voc(tmp_path_factory.mktemp("voc") / "VOCdevkit", VOC_OBJECTS, VOC_SETS)
    voc_det = detection_data.make_voc(
        tmp_path_factory.mktemp("voc_det") / "VOCdevkit", detection_data.VOC_OBJECTS,
        {"trainval": ["000001", "000002", "000003"], "test": ["000001", "000002"]},
    )
    digits = tmp_path_factory.mktemp("own_data")
    write_digit_folder(str(digits), [30, 24, 18, 14, 11, 9, 7, 5, 4, 3], test_per_class=2)  # MNIST-style, grayscale
    return {
        "ADE20K": str(ade), "Cityscapes": str(city), "VOCMultiLabel": str(voc), "VOCDetection": str(voc_det),
        "own_data": str(digits),
    }


#: Segmentation configs train a small network on small crops in the smoke test (the configs' own
#: DeepLabV3-ResNet50 at full crops takes minutes per step on CPU).
SEGMENTATION_SMOKE = [
    "--model.init_args.net.init_args.arch=lraspp_mobilenet_v3_large",
    "--data.init_args.crop_size=[32, 32]",
    "--data.init_args.eval_size=[32, 32]",
    "--data.init_args.batch_size=2",
    "--data.init_args.eval_batch_size=2",
    "--data.init_args.num_workers=0",
]


def data_overrides(config: Path, fake_cifar_root: str, data_roots: dict[str, str]) -> list[str]:
    text = config.read_text()
    if "lightning_lt.tasks.DetectionModule" in text:
        root = shared_data_dir("coco128") if "COCODetection" in text else data_roots["VOCDetection"]
        return [
            f"--data.init_args.root={root}", "--model.init_args.backbone=resnet18",
            "--model.init_args.min_size=64", "--model.init_args.max_size=96", "--data.init_args.image_size=64",
            "--data.init_args.max_size=96", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        ]
    if "lightning_lt.tasks.MultiLabelOODModule" in text:
        root = shared_data_dir("coco128") if "COCOMultiLabel" in text else data_roots["VOCMultiLabel"]
        return [
            f"--data.init_args.root={root}", f"--data.init_args.ood_root={shared_data_dir('dtd10')}",
            "--model.init_args.backbone.init_args.arch=resnet18", "--data.init_args.image_size=32",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        ]
    if "lightning_lt.datamodules.CamVid" in text:
        return [f"--data.init_args.root={shared_data_dir('camvid')}", *SEGMENTATION_SMOKE]
    for name, root in data_roots.items():
        if f"lightning_lt.datamodules.{name}\n" in text:
            return [f"--data.init_args.root={root}", "--data.init_args.pixel_counts_file=null", *SEGMENTATION_SMOKE]
    if "lightning_lt.datamodules.CIFAR" in text:
        return [f"--data.init_args.root={fake_cifar_root}", "--data.init_args.num_workers=0"]
    if config.name == "own_data.yaml":
        return [f"--data.init_args.root={data_roots['own_data']}", "--data.init_args.num_workers=0"]
    if "lightning_lt.datamodules.ImageFolderLT" in text:
        root = shared_data_dir("cifar10-jpeg")
        return [f"--data.init_args.root={root}", "--data.init_args.in_memory=false", "--data.init_args.num_workers=0"]
    return []


@pytest.fixture(scope="module")
def stage1_checkpoints(tmp_path_factory) -> dict[int, str]:
    """Stage-1 checkpoints (ResNet-32, linear head; untrained) for the stage-2 configs, by number of classes."""
    root = tmp_path_factory.mktemp("stage1")
    paths = {}
    for num_classes in (10, 100):
        model = LongTailClassifier(CIFARResNet(depth=32), num_classes, plot_per_class=False)
        paths[num_classes] = str(root / f"cifar{num_classes}.ckpt")
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"num_classes": num_classes}}, paths[num_classes])
    return paths


def stage2_overrides(config: Path, checkpoints: dict[int, str]) -> list[str]:
    """Stage-2 configs (DecoupledClassifier) need the stage-1 checkpoint."""
    if "lightning_lt.tasks.DecoupledClassifier" not in config.read_text():
        return []
    return [f"--model.init_args.init_from={checkpoints[100 if 'CIFAR100LT' in config.read_text() else 10]}"]


def subcommand(config: Path) -> str:
    """tau-normalisation trains nothing: its config runs with `validate`."""
    return "validate" if "tau_norm: true" in config.read_text() else "fit"


def test_every_config_is_covered():
    names = {str(p.relative_to(REPO_ROOT / "configs")) for p in CONFIGS}
    assert "quickstart.yaml" in names
    for dataset in ("cifar10_lt", "cifar100_lt"):
        for method in ("ce", "focal", "cb_focal", "ldam_drw", "la", "balanced_softmax"):
            assert f"{dataset}/{method}.yaml" in names
        for sam in ("sam", "imbsam", "ssesam"):  # the SAM family on CE and on LDAM-DRW
            for base in ("ce", "ldam_drw"):
                assert f"{dataset}/{sam}_{base}.yaml" in names
        for method in ("crt", "lws", "tau_norm", "wb_stage1", "wb_stage2", "mislas_stage1", "mislas_stage2"):
            assert f"{dataset}/{method}.yaml" in names  # two-stage methods
    for dataset in ("camvid", "ade20k", "cityscapes"):  # AUCSeg: CE, CE + pixel AUC, CE + AUC + memory bank
        for method in ("ce", "ce_auc", "ce_auc_tmb"):
            assert f"{dataset}/{method}.yaml" in names
    for dataset in ("coco_ood", "voc_ood"):  # multi-label OOD: BCE vs unknown-aware training
        for method in ("bce", "edge"):
            assert f"{dataset}/{method}.yaml" in names
    for dataset in ("coco_det", "voc_det"):  # detection: RetinaNet / FCOS, focal vs sampling-free
        for method in ("retinanet_focal", "retinanet_sf", "fcos_focal", "fcos_sf"):
            assert f"{dataset}/{method}.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_config_fast_dev_run(config, fake_cifar_root, fake_data_roots, stage1_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.chdir(REPO_ROOT)  # relative data paths in configs are relative to the repository root
    main([
        subcommand(config),
        "--config", str(config),
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        *data_overrides(config, fake_cifar_root, fake_data_roots),
        *stage2_overrides(config, stage1_checkpoints),
    ])


# ---------------------------------------------------------------------------------------------- validation splits
def data_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def model_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)[-1]


#: Data modules of the configs without a held-out classification split, and what their `val_dataloader` reads.
#: All but CamVid validate on the split that `test` evaluates.
OTHER_VALIDATION = {
    "CamVid": "CamVid's own `val` split (`val_split='val'`); `test` evaluates the `test` split",
    "ADE20K": "the official `validation` split, which `test` evaluates too (the test labels are not public)",
    "Cityscapes": "the official `val` split, which `test` evaluates too (the test labels are not public)",
    "COCOMultiLabel": "val2017, which `test` evaluates too (COCO's test labels are not public)",
    "VOCMultiLabel": "`val_set` (VOC2007 `test` by convention), which `test` evaluates too",
    "COCODetection": "val2017, which `test` evaluates too (COCO's test labels are not public)",
    "VOCDetection": "`val_set` (VOC2007 `test` by convention), which `test` evaluates too",
}
CLASSIFICATION_CONFIGS = [
    c for c in CONFIGS
    if model_class(c) in ("LongTailClassifier", "MultiExpertClassifier") and data_class(c) not in OTHER_VALIDATION
]


def test_every_config_validates_on_a_held_out_split_or_is_listed():
    """Every config is a classification config with a held-out validation split (checked below), or uses a data
    module listed in OTHER_VALIDATION with what it validates on (a new config family has to be added to one or
    the other)."""
    families = {data_class(c) for c in CONFIGS}
    classification = {"CIFAR10LT", "CIFAR100LT", "ImageFolderLT", "DigitsLT"}
    assert {data_class(c) for c in CLASSIFICATION_CONFIGS} == classification
    assert families - set(OTHER_VALIDATION) == classification
    # 17 CIFAR-10-LT, 17 CIFAR-100-LT (with wb_stage1, mislas_stage1, ride, sade, dirmixe), 2 folders, the quickstart
    assert len(CLASSIFICATION_CONFIGS) == 37


@pytest.mark.parametrize("config", CLASSIFICATION_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_classification_configs_validate_on_held_out_training_images(config, fake_cifar_root, fake_data_roots,
                                                                     tmp_path, monkeypatch):  # fmt: skip
    """The data module a classification config builds (through the CLI) validates on images of its training split,
    disjoint from the images it trains on, never on the test split: after `setup("fit")`, `val_dataset` is set, is
    not `test_dataset`, and (CIFAR) its indices in the training pickles / (folders) its files under `root/train`
    do not meet the training images'."""
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.chdir(REPO_ROOT)
    overrides = data_overrides(config, fake_cifar_root, fake_data_roots)
    cli = LightningLTCLI(args=[
        "--config", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", *overrides,
    ], run=False)  # fmt: skip
    dm = cli.datamodule
    dm.setup("fit")
    assert dm.val_dataset is not None and dm.val_dataset is not dm.test_dataset
    assert dm.validates_on_test_split is False
    assert len(dm.train_dataset) == sum(dm.class_counts) == sum(cli.model.class_counts)
    if data_class(config).startswith("CIFAR"):
        assert dm.val_per_class == 50
        assert len(dm.val_indices) == 50 * dm.num_classes  # images of the training pickles
        assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    elif data_class(config) == "DigitsLT":  # the quickstart: a share of the long-tailed training images
        assert dm.val_fraction > 0
        train_pos, val_pos = dm.split_positions()
        assert len(val_pos) == len(dm.val_dataset) > 0 and not set(val_pos.tolist()) & set(train_pos.tolist())
        assert len(train_pos) + len(val_pos) == len(dm._pool_targets())
    else:
        assert dm.val_fraction > 0
        train_dir = os.path.join(dm.root, dm.train_dir) + os.sep
        val_files = dm.val_files()[0]
        assert val_files and all(f.startswith(train_dir) for f in val_files)
        assert not set(val_files) & set(dm.train_files())


STAGE2_CONFIGS = [p for p in CONFIGS if "lightning_lt.tasks.DecoupledClassifier" in p.read_text()]


@pytest.mark.parametrize("config", STAGE2_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_stage2_config_without_checkpoint_says_how_to_pass_it(config, fake_cifar_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-lt"])
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ValueError, match="`init_from` is not set.*--model.init_args.init_from=PATH"):
        main([subcommand(config), "--config", str(config), "--trainer.accelerator=cpu",
              f"--trainer.default_root_dir={tmp_path}", *data_overrides(config, fake_cifar_root, {})])  # fmt: skip


@pytest.mark.parametrize("config", STAGE2_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_stage2_configs_validate_on_the_held_out_split(config):
    """Stage-2 configs cannot be built without a checkpoint (above), so their data section is checked directly:
    the balanced validation split of unused training images, as the stage-1 configs (tau-norm picks tau on it)."""
    data = yaml.safe_load(config.read_text())["data"]
    assert data["class_path"].rsplit(".", 1)[-1] in ("CIFAR10LT", "CIFAR100LT")
    assert data["init_args"].get("val_per_class") == 50
