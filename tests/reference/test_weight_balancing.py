"""Weight balancing (Alshammari et al., CVPR 2022): MaxNorm against a transcription of the official PGD.

Reference: github:ShadeAlsha/LTR-weight-balancing, read, not imported:

- ``utils/regularizers.py``, ``MaxNorm_via_PGD.setPerLayerThresh``: for each constrained parameter (the classifier's
  ``fc.weight`` and ``fc.bias``) the threshold is ``min + thresh * (max - min)`` of the L2 norms of its rows, or
  ``inf`` for a 1-D parameter (the bias is never projected); ``thresh = 0.1`` in ``demo2_second-stage-training.py``;
- ``MaxNorm_via_PGD.PGD`` (``LpNorm=2``, ``tau=1``): rows whose norm exceeds the threshold are multiplied by
  ``threshold / norm``;
- ``utils/trainval.py``, ``train_model``: ``pgdFunc.PGD(model)`` runs once per epoch, after the training phase
  (``MaxNorm(interval="epoch")``; ``interval="step"`` projects after every optimizer step instead).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lt.callbacks import MaxNorm
from lightning_lt.callbacks.maxnorm import max_norm_radius


class OfficialMaxNormViaPGD:
    """``MaxNorm_via_PGD`` (``thresh``, ``LpNorm=2``, ``tau=1``) on ``[fc.weight, fc.bias]``, step for step."""

    def __init__(self, thresh=1.0, LpNorm=2, tau=1):
        self.thresh = thresh
        self.LpNorm = LpNorm
        self.tau = tau
        self.perLayerThresh = []

    def setPerLayerThresh(self, fc: nn.Linear):
        self.perLayerThresh = []
        for curLayer in [fc.weight, fc.bias]:
            curparam = curLayer.data
            if len(curparam.shape) <= 1:
                self.perLayerThresh.append(float("inf"))
                continue
            curparam_vec = curparam.reshape((curparam.shape[0], -1))
            neuronNorm_curparam = torch.linalg.norm(curparam_vec, ord=self.LpNorm, dim=1).detach().unsqueeze(-1)
            curLayerThresh = neuronNorm_curparam.min() + self.thresh * (neuronNorm_curparam.max() - neuronNorm_curparam.min())
            self.perLayerThresh.append(curLayerThresh)

    def PGD(self, fc: nn.Linear):
        if len(self.perLayerThresh) == 0:
            self.setPerLayerThresh(fc)
        for i, curLayer in enumerate([fc.weight, fc.bias]):
            curparam = curLayer.data
            curparam_vec = curparam.reshape((curparam.shape[0], -1))
            neuronNorm_curparam = (torch.linalg.norm(curparam_vec, ord=self.LpNorm, dim=1) ** self.tau).detach().unsqueeze(-1)
            scalingVect = torch.ones_like(curparam)
            curLayerThresh = self.perLayerThresh[i]
            idx = neuronNorm_curparam > curLayerThresh
            idx = idx.squeeze()
            tmp = curLayerThresh / (neuronNorm_curparam[idx].squeeze()) ** (self.tau)
            for _ in range(len(scalingVect.shape) - 1):
                tmp = tmp.unsqueeze(-1)
            scalingVect[idx] = torch.mul(scalingVect[idx], tmp)
            curparam[idx] = scalingVect[idx] * curparam[idx]


class Holder(nn.Module):
    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head


@pytest.mark.parametrize("thresh", [0.1, 0.5, 1.0])
def test_projection_equals_maxnorm_via_pgd(thresh):
    torch.manual_seed(0)
    fc = nn.Linear(16, 10)
    with torch.no_grad():
        fc.weight.mul_(torch.linspace(0.2, 4.0, 10).unsqueeze(1))
    ours, theirs = Holder(nn.Linear(16, 10)), nn.Linear(16, 10)
    ours.head.load_state_dict(fc.state_dict())
    theirs.load_state_dict(fc.state_dict())
    official = OfficialMaxNormViaPGD(thresh=thresh)
    official.setPerLayerThresh(theirs)
    callback = MaxNorm(threshold=thresh)
    callback.on_fit_start(None, ours)
    assert callback.radius == pytest.approx(float(official.perLayerThresh[0]), rel=1e-6)
    for _ in range(3):  # weights grow between projections, as after training steps
        with torch.no_grad():
            noise = torch.randn(10, 16)
            ours.head.weight.add_(noise)
            theirs.weight.add_(noise)
        callback.project(ours)
        official.PGD(theirs)
        torch.testing.assert_close(ours.head.weight, theirs.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.head.bias, theirs.bias, rtol=0, atol=0)


def test_relative_radius_by_hand():
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    assert max_norm_radius(weight, 0.1) == pytest.approx(1 + 0.1 * 4)
    assert max_norm_radius(weight, 0.1, relative=False) == 0.1
