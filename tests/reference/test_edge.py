"""EDGE (Yuchen-Sunflower/EDGE, AAAI 2025) as its code computes it: the unknown-aware training loss and the
measure for choosing an outlier-exposure (OE) set.

The loss is the ``args.score == 'joint'`` branch of ``train()`` in ``weg.py``: one forward pass over the ID
batch followed by the OE batch (``cat_output``; the model is wrapped in ``nn.DataParallel``, so the loss sees
the whole batch), BCE on the ID logits, ``-log(1 - sigmoid)`` on the OE logits, and the pair loss between every
OE image and the ``k`` ID images with the lowest JointEnergy, weighted by ``energy_beta`` (0 before
``start_epoch``). The OE-set measure is ``train()`` of ``oe.py``: the singular values of ID and OE feature
batches, summed into ``[batch_size, oe_batch_size]`` buffers, and the norm of the difference of their first
``k`` rows divided by the number of batches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lt.losses.multilabel import energy_gap_loss
from lightning_lt.metrics.ood import oe_dilation_distance
from lightning_lt.tasks import MultiLabelOODModule


def reference_joint_loss(cat_output, n_id, target, k, m, alpha, energy_beta):
    """Transcription of the ``'joint'`` loss of ``train()`` in Yuchen-Sunflower/EDGE ``weg.py``; returns
    ``(loss, loss_pair, loss_oe)``."""
    criterion = nn.BCEWithLogitsLoss()
    loss = criterion(cat_output[:n_id], target)
    E = torch.log(1 + torch.exp(cat_output)).sum(1)
    Ec_in = E[:n_id]
    Ec_out = E[n_id:]
    Ec_in_bottom_k, _ = torch.topk(-Ec_in, k)
    Ec_in_bottom_k = -Ec_in_bottom_k
    loss_pair = F.relu(Ec_out.unsqueeze(1) - Ec_in_bottom_k.unsqueeze(0) + m).mean()
    loss_oe = -torch.log(1 - torch.sigmoid(cat_output[n_id:])).mean()
    return loss + alpha * loss_oe + energy_beta * loss_pair, loss_pair, loss_oe


def reference_s_gap(id_feature_batches, oe_feature_batches, batch_size, oe_batch_size, k):
    """Transcription of the measure of ``train()`` in Yuchen-Sunflower/EDGE ``oe.py`` on given feature batches
    (there ``feat = model(inputs).detach().view(n, -1)`` of the concatenated ID and OE images, split)."""
    S_id_total = torch.zeros((batch_size, oe_batch_size), dtype=torch.float32)
    S_ood_total = torch.zeros((batch_size, oe_batch_size), dtype=torch.float32)
    batch_num = 0
    for f_id, f_ood in zip(id_feature_batches, oe_feature_batches):
        batch_num += 1
        _, S_id, _ = torch.svd(f_id)
        _, S_ood, _ = torch.svd(f_ood)
        S_id_total += S_id  # broadcast over the rows: every row holds the whole spectrum
        S_ood_total += S_ood
    return torch.norm(S_id_total[:k] / batch_num - S_ood_total[:k] / batch_num)


class _Logits(nn.Module):
    def forward(self, x):
        return x


def _random_batch(seed: int, n_id: int, n_oe: int, num_classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n_id, num_classes, generator=g) < 0.3).float()
    id_logits = 3 * torch.randn(n_id, num_classes, generator=g) + 2 * targets
    oe_logits = 2 * torch.randn(n_oe, num_classes, generator=g) - 1
    return id_logits, oe_logits, targets


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n_id", "n_oe", "k"), [(16, 8, 5), (12, 20, 12), (9, 3, 1)])
def test_gap_loss_and_gradients_equal_reference(seed, n_id, n_oe, k):
    id_logits, oe_logits, targets = _random_batch(seed, n_id, n_oe)
    margin = 1.0 + seed * 0.5  # some pairs inside the margin, some outside
    lib_in = torch.cat([id_logits, oe_logits]).double().requires_grad_()
    ref_in = lib_in.detach().clone().requires_grad_()
    ours = energy_gap_loss(lib_in[:n_id], lib_in[n_id:], k=k, margin=margin)
    _, pair, _ = reference_joint_loss(ref_in, n_id, targets.double(), k, margin, 1.0, 1.0)
    torch.testing.assert_close(ours, pair, rtol=1e-12, atol=1e-12)
    ours.backward()
    pair.backward()
    torch.testing.assert_close(lib_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    assert 0 < ref_in.grad.abs().sum()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("gap_start_epoch", "energy_beta"), [(0, 0.1), (1, 0.0)])
def test_module_loss_and_gradients_equal_reference(seed, gap_start_epoch, energy_beta):
    """The whole training loss of the task module (outside a Trainer: epoch 0), before and after ``start_epoch``."""
    n_id, n_oe, k = 10, 7, 4
    id_logits, oe_logits, targets = _random_batch(100 + seed, n_id, n_oe)
    module = MultiLabelOODModule(_Logits(), num_classes=6, alpha=1.0, beta=0.1, gap_start_epoch=gap_start_epoch,
                                 gap_k=k, gap_margin=1.0).double()
    lib_in = torch.cat([id_logits, oe_logits]).double().requires_grad_()
    ref_in = lib_in.detach().clone().requires_grad_()
    ours = module.compute_losses(lib_in[:n_id], targets.double(), lib_in[n_id:])
    loss, pair, loss_oe = reference_joint_loss(ref_in, n_id, targets.double(), k, 1.0, 1.0, energy_beta)
    torch.testing.assert_close(ours["loss"], loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours["loss_conf"], loss_oe, rtol=1e-12, atol=1e-12)
    assert ("loss_gap" in ours) == (energy_beta > 0)
    if energy_beta > 0:
        torch.testing.assert_close(ours["loss_gap"], pair, rtol=1e-12, atol=1e-12)
    ours["loss"].backward()
    loss.backward()
    torch.testing.assert_close(lib_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 8, 32])
def test_oe_measure_equals_reference(seed, k):
    """The reference's number is ``sqrt(k)`` times the distance of the whole mean spectra (its buffer repeats the
    spectrum in every row), whatever ``k``: the library's ``k=None``."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, batches = 32, 48, 3
    id_feats = [torch.rand(batch, dim, generator=g).relu() for _ in range(batches + 1)]  # one unpaired batch
    oe_feats = [(torch.rand(batch, dim, generator=g) * (1 + seed)).relu() for _ in range(batches)]
    expected = reference_s_gap(id_feats, oe_feats, batch, batch, k)
    ours = oe_dilation_distance(id_feats, oe_feats)
    assert ours.item() * math.sqrt(k) == pytest.approx(expected.item(), rel=1e-5)


def test_oe_measure_ranks_candidates_as_reference():
    g = torch.Generator().manual_seed(0)
    batch, dim = 16, 24
    id_feats = [torch.rand(batch, dim, generator=g) for _ in range(4)]
    candidates = {f"oe{i}": [torch.rand(batch, dim, generator=g) * scale for _ in range(4)]
                  for i, scale in enumerate([0.5, 1.1, 2.0, 0.9, 3.0])}
    reference = sorted(candidates, key=lambda n: float(reference_s_gap(id_feats, candidates[n], batch, batch, 8)))
    ours = sorted(candidates, key=lambda n: float(oe_dilation_distance(id_feats, candidates[n])))
    assert ours == reference


# ---------------------------------------------------------------------------------------------- DDP

DDP_N_ID, DDP_N_OE, DDP_K = 12, 8, 4  # per process: 6 ID and 4 OE inputs; the bottom-4 of 12 is global


def _ddp_gap_worker(fabric, out_dir: str) -> None:
    """Each process takes its half of one global batch, computes the gap loss with ``global_batch=True`` and its
    gradient with respect to its own logits."""
    import json

    id_logits, oe_logits, _ = _random_batch(7, DDP_N_ID, DDP_N_OE)
    rank, half_id, half_oe = fabric.global_rank, DDP_N_ID // 2, DDP_N_OE // 2
    local_id = id_logits[rank * half_id : (rank + 1) * half_id].double().requires_grad_()
    local_oe = oe_logits[rank * half_oe : (rank + 1) * half_oe].double().requires_grad_()
    loss = energy_gap_loss(local_id, local_oe, k=DDP_K, margin=1.0, global_batch=True)
    local_loss = energy_gap_loss(local_id.detach(), local_oe.detach(), k=DDP_K, margin=1.0)
    loss.backward()
    record = {"loss": loss.item(), "local_loss": local_loss.item(), "grad_id": local_id.grad.tolist(),
              "grad_oe": local_oe.grad.tolist(), "world_size": fabric.world_size}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(record, f)


@pytest.mark.ddp
def test_ddp_gap_loss_equals_reference_on_the_global_batch(tmp_path):
    """Two processes with half a batch each: the loss is the reference's on the whole batch, and the gradients,
    averaged over the processes as DDP does, are the reference's."""
    import json

    from lightning.fabric import Fabric

    from tests.helpers import DDP_STRATEGY

    Fabric(accelerator="cpu", devices=2, strategy=DDP_STRATEGY).launch(_ddp_gap_worker, str(tmp_path))
    id_logits, oe_logits, targets = _random_batch(7, DDP_N_ID, DDP_N_OE)
    cat_output = torch.cat([id_logits, oe_logits]).double().requires_grad_()
    _, pair, _ = reference_joint_loss(cat_output, DDP_N_ID, targets.double(), DDP_K, 1.0, 1.0, 1.0)
    pair.backward()
    grad_id, grad_oe = cat_output.grad[:DDP_N_ID], cat_output.grad[DDP_N_ID:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2
        assert record["loss"] == pytest.approx(pair.item(), rel=1e-12)
        assert record["local_loss"] != pytest.approx(pair.item())  # the half batch alone gives another loss
        half_id, half_oe = DDP_N_ID // 2, DDP_N_OE // 2
        torch.testing.assert_close(torch.tensor(record["grad_id"], dtype=torch.float64) / 2,
                                   grad_id[rank * half_id : (rank + 1) * half_id], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.tensor(record["grad_oe"], dtype=torch.float64) / 2,
                                   grad_oe[rank * half_oe : (rank + 1) * half_oe], rtol=1e-12, atol=1e-12)
