import math

import pytest
import torch
from torch import nn

from lightning_lt.nets import CosineClassifier, build_head
from lightning_lt.nets.heads import sigmoid_prior_bias


def test_cosine_classifier_matches_hand_computation():
    torch.manual_seed(0)
    head = CosineClassifier(5, 3)
    assert head.weight.shape == (5, 3)
    x = torch.randn(4, 5) * 3
    out = head(x).detach()
    w = head.weight.detach()
    for i in range(4):
        for j in range(3):
            dot = sum(x[i, k].item() * w[k, j].item() for k in range(5))
            norm_x = math.sqrt(sum(x[i, k].item() ** 2 for k in range(5)))
            norm_w = math.sqrt(sum(w[k, j].item() ** 2 for k in range(5)))
            assert out[i, j].item() == pytest.approx(dot / (norm_x * norm_w), abs=1e-6)


def test_cosine_classifier_small_example():
    head = CosineClassifier(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, -2.0], [0.0, 5.0, 0.0]]))  # class vectors (1,0), (0,5), (-2,0)
    out = head(torch.tensor([[3.0, 4.0], [-1.0, 0.0]])).detach()
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8, -0.6], [-1.0, 0.0, 1.0]]))


def test_cosine_outputs_in_unit_interval_and_scale_invariant():
    torch.manual_seed(1)
    head = CosineClassifier(16, 10)
    x = torch.randn(64, 16) * 10
    out = head(x)
    assert out.shape == (64, 10)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head(2.5 * x), out)


def test_cosine_init_uniform_then_unit_columns():
    torch.manual_seed(2)
    head = CosineClassifier(64, 100)
    w = head.weight.detach()
    torch.testing.assert_close(w.norm(dim=0), torch.ones(100), rtol=0, atol=1e-4)
    # renormed uniform(-1, 1): the direction of each column is that of a uniform vector, so entries are spread
    # symmetrically; no bias or scale parameters
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    assert w.mean().abs() < 0.01


def test_cosine_zero_input_and_gradient():
    head = CosineClassifier(4, 2)
    assert torch.equal(head(torch.zeros(1, 4)), torch.zeros(1, 2))  # normalize uses eps: no nan
    x = torch.randn(3, 4, requires_grad=True)
    head(x).sum().backward()
    assert head.weight.grad is not None and torch.isfinite(x.grad).all()


def test_build_head():
    linear = build_head("linear", 64, 10)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (10, 64) and linear.bias is not None
    cosine = build_head("cosine", 64, 10)
    assert isinstance(cosine, CosineClassifier) and cosine(torch.randn(2, 64)).shape == (2, 10)
    torch.manual_seed(0)
    kaiming = build_head("linear", 512, 1000, init="kaiming_normal")
    assert kaiming.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_sigmoid_prior_bias_gives_one_over_c(num_classes):
    """Cui et al.'s `-log(C - 1)`: every class's sigmoid starts at 1 / C."""
    bias = sigmoid_prior_bias(num_classes)
    assert bias == pytest.approx(-math.log(num_classes - 1))
    assert torch.sigmoid(torch.tensor(bias, dtype=torch.float64)).item() == pytest.approx(1 / num_classes)
    head = build_head("linear", 16, num_classes, bias_init="sigmoid_prior")
    torch.testing.assert_close(head.bias.detach(), torch.full((num_classes,), bias))
    with pytest.raises(ValueError, match="num_classes"):
        sigmoid_prior_bias(1)


def test_build_head_bias_inits():
    torch.manual_seed(0)
    assert torch.equal(build_head("linear", 16, 5, bias_init="zero").bias.detach(), torch.zeros(5))
    default = build_head("linear", 16, 5).bias.detach()
    assert default.abs().max() <= 1 / 4 and default.std() > 0  # PyTorch's uniform(-1/sqrt(16), 1/sqrt(16))
    kaiming = build_head("linear", 16, 5, init="kaiming_normal", bias_init="sigmoid_prior")
    assert kaiming.bias.detach().allclose(torch.full((5,), -math.log(4)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("softmax", 64, 10), r"`kind` to be one of \('linear', 'cosine'\)"),
        (("linear", 0, 10), "in_features"),
        (("cosine", 64, -1), "num_classes"),
        (("linear", 64, 10, "xavier"), "init"),
        (("linear", 64, 10, "default", "prior"), r"`bias_init` to be one of \('default', 'zero', 'sigmoid_prior'\)"),
        (("cosine", 64, 10, "default", "sigmoid_prior"), "cosine head has no bias"),
    ],
)
def test_build_head_errors(args, match):
    with pytest.raises(ValueError, match=match):
        build_head(*args)


def test_cosine_classifier_errors():
    with pytest.raises(ValueError, match="out_features"):
        CosineClassifier(4, 0)
