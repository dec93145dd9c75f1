"""Multi-label losses: asymmetric loss, and the unknown-aware (outlier exposure + energy gap) terms."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AsymmetricLoss",
    "all_gather_with_grad",
    "asymmetric_loss",
    "energy_gap_loss",
    "joint_energy",
    "outlier_confidence_loss",
]


def joint_energy(logits: Tensor) -> Tensor:
    """JointEnergy (Wang et al., NeurIPS 2021): ``S(x) = sum_c log(1 + exp(f_c(x)))``, higher = in-distribution.

    Example:
        >>> print(f"{joint_energy(torch.tensor([[0.0, 0.0]])).item():.4f}")  # 2 log 2
        1.3863
    """
    return F.softplus(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).sum(dim=-1)


def asymmetric_loss(
    logits: Tensor, target: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
    eps: float = 1e-8,
) -> Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), summed over labels and averaged over samples.

    With ``p = sigmoid(f)`` and the shifted negative probability ``p_m = max(p - clip, 0)``:
    ``L = -sum_c [ y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m) ]``. ``gamma_pos =
    gamma_neg = clip = 0`` gives the binary cross-entropy summed over labels.

    Example:
        >>> logits, target = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
        >>> print(f"{asymmetric_loss(logits, target, 0.0, 0.0, 0.0).item():.4f}")  # 2 log 2
        1.3863
    """
    prob = torch.sigmoid(logits)
    prob_neg = (prob - clip).clamp_min(0) if clip > 0 else prob
    log_pos = torch.log(prob.clamp_min(eps))
    log_neg = torch.log((1 - prob_neg).clamp_min(eps))
    loss = target * log_pos + (1 - target) * log_neg
    if gamma_pos > 0 or gamma_neg > 0:
        # the focusing weights are constants in the gradient, as in the reference implementation
        with torch.no_grad():
            weight = torch.where(target > 0, (1 - prob) ** gamma_pos, prob_neg**gamma_neg)
        loss = loss * weight
    return -loss.sum(dim=-1).mean()


class AsymmetricLoss(nn.Module):
    """Module form of :func:`asymmetric_loss` (ASL defaults: ``gamma_pos=0``, ``gamma_neg=4``, ``clip=0.05``).

    Raises:
        ValueError: if a focusing parameter is negative or ``clip`` is outside ``[0, 1)``.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05) -> None:
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"Expected `gamma_pos`, `gamma_neg` >= 0, got {gamma_pos}, {gamma_neg}")
        if not 0 <= clip < 1:
            raise ValueError(f"Expected `clip` in [0, 1), got {clip}")
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return asymmetric_loss(logits, target, self.gamma_pos, self.gamma_neg, self.clip)

    def extra_repr(self) -> str:
        return f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}"


def outlier_confidence_loss(oe_logits: Tensor) -> Tensor:
    """Outlier exposure for multi-label outputs: every label should be off on an outlier,
    ``L_conf = mean_{o, c} -log(1 - sigmoid(f_c(x_o))) = mean_{o, c} softplus(f_c(x_o))``.

    Example:
        >>> print(f"{outlier_confidence_loss(torch.zeros(2, 3)).item():.4f}")  # log 2
        0.6931
    """
    if oe_logits.numel() == 0:
        return oe_logits.sum()
    return F.softplus(oe_logits).mean()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation of every process's 1-D ``tensor`` (any lengths) in rank order; the gradient of a process's
    slice is the sum over processes of the gradients they give it (all-reduce), as for a loss summed over them."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
        sizes = [int(size) for size in sizes]
        padded = tensor.new_zeros(max(sizes))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Every process's 1-D ``tensor`` concatenated in rank order, differentiable; ``tensor`` itself when not
    distributed (or one process).

    Under DDP every process computes the same loss of the gathered values; the backward all-reduce sums their
    gradients, and DDP averages over the processes, so the update equals that of the loss on the global batch.
    Every process must call it (a collective). Lengths may differ between processes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if tensor.ndim != 1:
        raise ValueError(
            f"Expected a 1-D tensor to gather, got shape {tuple(tensor.shape)}. HINT: gather `tensor.flatten()`."
        )
    return _AllGatherWithGrad.apply(tensor)


def energy_gap_loss(
    id_logits: Tensor, oe_logits: Tensor, k: int = 50, margin: float = 1.0, global_batch: bool = False
) -> Tensor:
    """The energy-gap term of unknown-aware multi-label training (EDGE, AAAI 2025).

    With ``S`` the JointEnergy and ``J`` the ``k`` in-distribution samples of the batch with the lowest
    ``S`` (all of them when the batch has fewer): ``L_gap = mean_{o, j in J} relu(S(x_o) - S(x_j) + margin)``:
    every outlier must score at least ``margin`` below the least confident in-distribution samples.

    With ``global_batch=True`` under ``torch.distributed``, the batch is the **global** one: the ID and OE
    JointEnergies of every process are gathered (with gradients, :func:`all_gather_with_grad`) before the
    bottom-``k`` selection, so every process computes the loss of the union of the batches and a DDP step equals
    the single-process step on it (the reference trains with ``nn.DataParallel``, whose loss sees the whole
    batch). Every process must then call it. Without it, each process takes the bottom-``k`` of its own batch.

    Raises:
        ValueError: ``k < 1``.

    Example:
        >>> id_logits = torch.tensor([[2.0], [0.0]])   # S = 2.1269, 0.6931
        >>> oe_logits = torch.tensor([[0.0]])          # S = 0.6931
        >>> print(f"{energy_gap_loss(id_logits, oe_logits, k=1, margin=1.0).item():.4f}")  # relu(0 + 1)
        1.0000
    """
    if k < 1:
        raise ValueError(f"Expected `k` >= 1 (bottom-k in-distribution samples), got {k}")
    id_scores, oe_scores = joint_energy(id_logits), joint_energy(oe_logits)
    if global_batch:
        id_scores, oe_scores = all_gather_with_grad(id_scores), all_gather_with_grad(oe_scores)
    if id_scores.shape[0] == 0 or oe_scores.shape[0] == 0:
        return id_scores.sum() * 0.0 + oe_scores.sum() * 0.0
    bottom = torch.topk(id_scores, min(k, id_scores.shape[0]), largest=False).values
    return F.relu(oe_scores[:, None] - bottom[None, :] + margin).mean()


def multilabel_bce(logits: Tensor, target: Tensor, pos_weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy averaged over samples and labels (``F.binary_cross_entropy_with_logits``)."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pos_weight)
