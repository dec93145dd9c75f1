import pytest
import torch
import torchvision
from torch import nn

from lightning_lt.nets import TorchvisionBackbone, available_archs


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to fetch weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("TorchvisionBackbone tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def test_resnet18_features(no_network):
    net = TorchvisionBackbone("resnet18")
    assert net.num_features == 512
    assert isinstance(net.model.fc, nn.Identity)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_sequential_classifier_head(no_network):
    net = TorchvisionBackbone("mobilenet_v3_small").eval()
    assert net.num_features == 1024  # in_features of the last Linear of the classifier
    assert isinstance(net.model.classifier[-1], nn.Identity)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_weights_path_round_trip_from_torchvision_state_dict(tmp_path, no_network):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # full model, classifier included (as the official files)

    net = TorchvisionBackbone("resnet18", weights_path=str(path)).eval()
    reference.fc = nn.Identity()
    reference.eval()
    for (name, ours), (ref_name, theirs) in zip(net.model.state_dict().items(), reference.state_dict().items()):
        assert name == ref_name and torch.equal(ours, theirs), name
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), reference(x))
    # different from a fresh random init
    assert not torch.equal(TorchvisionBackbone("resnet18").model.conv1.weight, net.model.conv1.weight)


def test_weights_path_round_trip_from_backbone_state_dict(tmp_path):
    torch.manual_seed(1)
    source = TorchvisionBackbone("resnet18")
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    loaded = TorchvisionBackbone("resnet18", weights_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="Unknown `arch` 'resnet33'") as err:
        TorchvisionBackbone("resnet33")
    message = str(err.value)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"):
        assert f"'{name}'" in message
    assert "inception_v3" not in available_archs() and "resnet50" in available_archs()


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TorchvisionBackbone("resnet18", weights_path=str(tmp_path / "missing.pth"))


def test_mismatching_weights(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not match torchvision 'resnet18'.*unexpected keys"):
        TorchvisionBackbone("resnet18", weights_path=str(path))
    wide = tmp_path / "wide.pth"
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), wide)
    with pytest.raises(ValueError, match="does not fit torchvision 'resnet50'"):
        TorchvisionBackbone("resnet50", weights_path=str(wide))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="state dict"):
        TorchvisionBackbone("resnet18", weights_path=str(path))
