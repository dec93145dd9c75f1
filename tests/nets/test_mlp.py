import pytest
import torch
from torch import nn

from lightning_lt.nets import MLP


def test_shapes_and_num_features():
    net = MLP(in_features=64, hidden_features=(32, 16))
    assert net.num_features == 16
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 16)  # flattens
    assert net(torch.randn(5, 64)).shape == (5, 16)
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 2


def test_default_and_empty_hidden():
    assert MLP().num_features == 128
    flat = MLP(in_features=12, hidden_features=())
    assert flat.num_features == 12
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(flat(x), x.flatten(1))


def test_dropout_layers():
    net = MLP(in_features=4, hidden_features=(8, 8), dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in MLP(4, (8,)).modules())


def test_output_is_relu_of_linear():
    torch.manual_seed(0)
    net = MLP(in_features=3, hidden_features=(2,))
    x = torch.randn(4, 3)
    linear = net.layers[1]
    torch.testing.assert_close(net(x), torch.relu(x @ linear.weight.T + linear.bias))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, "in_features"),
        ({"hidden_features": (8, 0)}, r"hidden_features\[1\]"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_wrong_input_size():
    with pytest.raises(ValueError, match="64 elements per sample"):
        MLP(in_features=64)(torch.randn(2, 3, 32, 32))
