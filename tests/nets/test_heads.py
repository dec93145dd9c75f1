import math

import pytest
import torch
from torch import nn

from lightning_lt.nets import CosineClassifier, build_head


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


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("softmax", 64, 10), "kind"),
        (("linear", 0, 10), "in_features"),
        (("cosine", 64, -1), "num_classes"),
        (("linear", 64, 10, "xavier"), "init"),
    ],
)
def test_build_head_errors(args, match):
    with pytest.raises(ValueError, match=match):
        build_head(*args)


def test_cosine_classifier_errors():
    with pytest.raises(ValueError, match="out_features"):
        CosineClassifier(4, 0)
