"""Decoupling (Kang et al., ICLR 2020): tau-normalisation, LWS and cRT against transcriptions of the official code.

Reference: github:facebookresearch/classifier-balancing, read, not imported:

- ``tau_norm.py``: ``pnorm(weights, p)`` divides row ``i`` by ``norm(weights[i])^p``; the logits are
  ``dotproduct_similarity(feat, ws) = feat @ ws.T``: the classifier's **bias is dropped** (``bias`` is loaded but only the
  unused ``linear_classifier`` would add it); ``p`` runs over ``np.linspace(0, 2, 21)``; ``preds2accs`` reports the
  mean per-class accuracy (balanced accuracy) for each ``p``;
- ``models/TauNormClassifier.py`` (the LWS classifier, despite its name): ``fc`` frozen (``requires_grad = False``),
  ``scales = ones(num_classes)`` learned, ``fc(x) * scales`` (the bias is scaled too);
- ``models/DotProductClassifier.py`` + ``run_networks.load_model``: for cRT the classifier is skipped when loading the
  stage-1 model (a fresh ``nn.Linear``) while the feature model is loaded and fixed (``fix: true``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.nets import MLP
from lightning_lt.tasks import DecoupledClassifier
from lightning_lt.tasks.decoupling import TAU_GRID, tau_normalized_weight


# ----------------------------------------------------------------------------- transcriptions of the reference
def official_pnorm(weights: torch.Tensor, p: float) -> torch.Tensor:
    """``tau_norm.py``, ``pnorm``, step for step."""
    normB = torch.norm(weights, 2, 1)
    ws = weights.clone()
    for i in range(weights.size(0)):
        ws[i] = ws[i] / torch.pow(normB[i], p)
    return ws


def official_dotproduct_similarity(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``tau_norm.py``, ``dotproduct_similarity``: ``A @ B.T`` (no bias)."""
    AB = torch.mm(A, B.t())
    return AB


def official_lws_forward(fc: nn.Linear, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``models/TauNormClassifier.py``, ``DotProduct_Classifier.forward``: ``x = fc(x); x *= scales``."""
    x = fc(x)
    x *= scales
    return x


def model(**kwargs) -> DecoupledClassifier:
    defaults = dict(backbone=MLP(64, (16,)), num_classes=10, loss=CrossEntropyLoss, init_from="stage1.ckpt",
                    plot_per_class=False)  # fmt: skip
    defaults.update(kwargs)
    return DecoupledClassifier(**defaults)


def test_grid_is_linspace_0_2_21():
    assert list(TAU_GRID) == pytest.approx(np.linspace(0, 2, 21).tolist(), abs=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0, 1.9, 2.0])
def test_tau_normalised_logits_equal_pnorm_without_bias(tau):
    torch.manual_seed(0)
    m = model(tau_norm=True, freeze_head=True)
    with torch.no_grad():
        m.head.weight.mul_(torch.linspace(0.2, 3.0, 10).unsqueeze(1))  # unequal class norms
        m.head.bias.uniform_(-1, 1)
    features = torch.randn(32, 16)
    torch.testing.assert_close(tau_normalized_weight(m.head.weight, tau), official_pnorm(m.head.weight.detach(), tau),
                               rtol=0, atol=1e-6)  # fmt: skip
    expected = official_dotproduct_similarity(features, official_pnorm(m.head.weight.detach(), tau))
    torch.testing.assert_close(m.tau_normalized_logits(features, tau), expected, rtol=1e-6, atol=1e-6)


def test_lws_equals_the_scaled_dot_product_classifier():
    torch.manual_seed(1)
    m = model(freeze_head=True, learnable_scales=True)
    with torch.no_grad():
        m.logit_scales.uniform_(0.5, 2.0)
    scales = m.logit_scales.detach().clone().requires_grad_(True)
    fc = nn.Linear(16, 10)
    fc.load_state_dict(m.head.state_dict())
    for param in fc.parameters():  # DotProduct_Classifier.__init__: the fc is not trained
        param.requires_grad = False
    features, target = torch.randn(8, 16), torch.randint(0, 10, (8,))
    ours = F.cross_entropy(m.classify(features), target)
    theirs = F.cross_entropy(official_lws_forward(fc, scales, features), target)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, m.logit_scales)
    (g_theirs,) = torch.autograd.grad(theirs, scales)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-6)
    trainable = [name for name, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["logit_scales"]


def test_crt_trains_only_a_fresh_classifier(tmp_path):
    torch.manual_seed(2)
    stage1 = model()
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": {"num_classes": 10}}, path)
    crt = model(init_from=str(path), reinit_head=True)
    fresh_head = {k: v.clone() for k, v in crt.head.state_dict().items()}
    crt.load_init_from()
    for key, value in stage1.backbone.state_dict().items():
        torch.testing.assert_close(crt.backbone.state_dict()[key], value, rtol=0, atol=0)
    for key, value in fresh_head.items():  # skipped when loading: the fresh initialisation stays
        torch.testing.assert_close(crt.head.state_dict()[key], value, rtol=0, atol=0)
    assert {name for name, p in crt.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
