import doctest
import logging
import warnings
from collections.abc import Callable

import pytest
import torch
import torchvision
from jsonargparse import ArgumentError, ArgumentParser
from torch import nn

import lightning_lt.nets.segmentation as segmentation_module
from lightning_lt.nets import TorchvisionSegmentation, available_segmentation_archs

ARCHS = [
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything tries to fetch weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("TorchvisionSegmentation tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def _outputs_equal(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_available_archs():
    assert available_segmentation_archs() == ARCHS


def _run_arch_params():
    """ResNet-101 variants run only with ``-m slow`` (the default run builds them, see the next test)."""
    return [pytest.param(a, marks=pytest.mark.slow) if "resnet101" in a else a for a in ARCHS]


@pytest.mark.parametrize("arch", [a for a in ARCHS if "resnet101" in a])
def test_resnet101_archs_build(arch):
    net = TorchvisionSegmentation(5, arch=arch)
    head = net.model.classifier[-1]
    assert isinstance(head, nn.Conv2d) and head.out_channels == 5
    assert net.model.backbone.layer3[22].conv1.weight.shape == (256, 1024, 1, 1)  # the 23-block layer3 of ResNet-101


@pytest.mark.parametrize("arch", _run_arch_params())
def test_every_arch_returns_logits_at_input_resolution(arch):
    torch.manual_seed(0)
    net = TorchvisionSegmentation(5, arch=arch)
    assert net.num_classes == 5 and net.arch == arch
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 64, 64)
    assert torch.isfinite(out).all()
    assert net.forward_with_aux(torch.randn(2, 3, 64, 64))[1] is None


def test_odd_input_size_and_training_mode_backward():
    net = TorchvisionSegmentation(3, arch="lraspp_mobilenet_v3_large").train()
    out = net(torch.randn(2, 3, 50, 70))
    assert out.shape == (2, 3, 50, 70)
    out.mean().backward()
    assert net.model.classifier.low_classifier.weight.grad is not None


@pytest.mark.parametrize("arch", ["deeplabv3_mobilenet_v3_large", "fcn_resnet50"])
def test_aux_head(arch):
    torch.manual_seed(0)
    net = TorchvisionSegmentation(4, arch=arch, aux_loss=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, aux = net.forward_with_aux(x)
        plain = net(x)
    assert out.shape == aux.shape == (2, 4, 64, 64)
    torch.testing.assert_close(plain, out)  # forward skips the auxiliary head but gives the same logits
    assert not torch.equal(out, aux)


def test_aux_head_not_available_for_lraspp():
    with pytest.raises(ValueError, match="`aux_loss=True` is not available for 'lraspp_mobilenet_v3_large'"):
        TorchvisionSegmentation(4, aux_loss=True)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="Unknown `arch` 'deeplabv3_resnet18'") as err:
        TorchvisionSegmentation(5, arch="deeplabv3_resnet18")
    assert all(f"'{name}'" in str(err.value) for name in ARCHS)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True, "5"])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        TorchvisionSegmentation(num_classes)


# ---------------------------------------------------------------------------------------------- weights_path


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(1)
    source = TorchvisionSegmentation(5, arch="deeplabv3_mobilenet_v3_large")
    path = tmp_path / "net.pt"
    torch.save(source.state_dict(), path)
    loaded = TorchvisionSegmentation(5, arch="deeplabv3_mobilenet_v3_large", weights_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _outputs_equal(source, loaded)
    fresh = TorchvisionSegmentation(5, arch="deeplabv3_mobilenet_v3_large")
    assert not torch.equal(fresh.model.classifier[-1].weight, loaded.model.classifier[-1].weight)


def test_weights_path_from_torchvision_model_and_lightning_checkpoint(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3
    )
    plain = tmp_path / "torchvision.pth"
    torch.save(reference.state_dict(), plain)  # no "model." prefix
    net = TorchvisionSegmentation(3, weights_path=str(plain))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference.eval()(x)["out"], rtol=0, atol=0)

    # a Lightning checkpoint: the net sits under the task's attribute, next to other state
    wrapped = {f"net.{k}": v for k, v in net.state_dict().items()}
    wrapped["loss.weight"] = torch.ones(3)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": wrapped}, checkpoint)
    _outputs_equal(net, TorchvisionSegmentation(3, weights_path=str(checkpoint)))


def test_weights_path_mismatches(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(TorchvisionSegmentation(5).state_dict(), path)
    with pytest.raises(ValueError, match=r"net\.pt' does not fit 'lraspp_mobilenet_v3_large' with num_classes=6.*"
                       r"shape mismatch.*HINT: is `num_classes`"):
        TorchvisionSegmentation(6, weights_path=str(path))
    with pytest.raises(ValueError, match=r"net\.pt' does not match 'deeplabv3_mobilenet_v3_large'.*missing keys"):
        TorchvisionSegmentation(5, arch="deeplabv3_mobilenet_v3_large", weights_path=str(path))

    aux = tmp_path / "aux.pt"
    torch.save(TorchvisionSegmentation(5, arch="fcn_resnet50", aux_loss=True).state_dict(), aux)
    with pytest.raises(ValueError, match="unexpected keys.*aux_classifier.*HINT: .*set `aux_loss=True`"):
        TorchvisionSegmentation(5, arch="fcn_resnet50", weights_path=str(aux))
    TorchvisionSegmentation(5, arch="fcn_resnet50", aux_loss=True, weights_path=str(aux))


# ---------------------------------------------------------------------------------------------- backbone weights


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_backbone_weights_from_imagenet_state_dict(tmp_path, arch, caplog):
    torch.manual_seed(3)
    imagenet = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(imagenet.state_dict(), path)  # keys "features.<i>..." and "classifier.<j>..."
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error")  # every backbone tensor is found: no warning
        torch.manual_seed(4)
        net = TorchvisionSegmentation(5, arch=arch, backbone_weights_path=str(path))
    backbone = net.model.backbone.state_dict()
    features = imagenet.features.state_dict()
    assert set(backbone) == set(features)
    for key, value in backbone.items():
        assert torch.equal(value, features[key]), key
    assert f"loaded {len(backbone)} of {len(backbone)} backbone tensors" in caplog.text
    assert "key prefix 'features.'" in caplog.text and "classifier.0.weight" in caplog.text  # skipped head
    # the segmentation head keeps its random initialisation
    torch.manual_seed(4)
    random_init = TorchvisionSegmentation(5, arch=arch)
    for key, value in random_init.model.classifier.state_dict().items():
        assert torch.equal(net.model.classifier.state_dict()[key], value), key
    assert not torch.equal(random_init.model.backbone.state_dict()["0.0.weight"], backbone["0.0.weight"])


def test_backbone_weights_missing_keys_warn_and_keep_init(tmp_path):
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    last = [k for k in state if k.startswith("features.16.")]
    partial = {k: v for k, v in state.items() if k not in last}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.warns(UserWarning, match=rf"partial\.pth' lacks {len(last)} of the .* backbone tensors"):
        net = TorchvisionSegmentation(5, backbone_weights_path=str(path))
    assert torch.equal(net.model.backbone.state_dict()["0.0.weight"], state["features.0.0.weight"])


def test_backbone_weights_errors(tmp_path):
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match=r"No key of `backbone_weights_path` '.*unrelated\.pth' matches.*'resnet50'"):
        TorchvisionSegmentation(5, arch="fcn_resnet50", backbone_weights_path=str(unrelated))
    wrong_shape = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, wrong_shape)
    with pytest.raises(ValueError, match=r"wrong\.pth' does not fit .*conv1\.weight: file \(8, 3, 3, 3\) vs model"):
        TorchvisionSegmentation(5, arch="fcn_resnet50", backbone_weights_path=str(wrong_shape))


# ---------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("argument", ["weights_path", "backbone_weights_path"])
def test_bad_files_name_the_path(tmp_path, argument):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=rf"`{argument}` '.*missing\.pth' does not exist.*never downloads"):
        TorchvisionSegmentation(5, **{argument: str(missing)})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=rf"Cannot read `{argument}` '.*garbage\.pth'"):
        TorchvisionSegmentation(5, **{argument: str(garbage)})
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(ValueError, match=rf"`{argument}` '.*list\.pt' to hold a state dict"):
        TorchvisionSegmentation(5, **{argument: str(a_list)})


# ---------------------------------------------------------------------------------------------- configs


def test_jsonargparse_callable_builds_the_net_with_num_classes():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=Callable[[int], nn.Module])
    value = {"class_path": "lightning_lt.nets.TorchvisionSegmentation", "init_args": {"arch": "fcn_resnet50"}}
    cfg = parser.parse_object({"net": value})
    factory = parser.instantiate(cfg).net
    assert callable(factory) and not isinstance(factory, nn.Module)
    net = factory(7)
    assert isinstance(net, TorchvisionSegmentation) and net.arch == "fcn_resnet50" and net.num_classes == 7
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7, 32, 32)
    # num_classes comes from the call, never from the config
    with pytest.raises(ArgumentError, match="Option 'num_classes' is not accepted"):
        parser.parse_object({"net": {**value, "init_args": {"num_classes": 3}}})


def test_docstring_examples():
    result = doctest.testmod(segmentation_module)
    assert result.attempted >= 3 and result.failed == 0
