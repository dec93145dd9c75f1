"""Losses of multi-expert long-tail methods: RIDE (Wang et al., ICLR 2021), SADE (Zhang et al., NeurIPS 2022) and
DirMixE (Yang et al., ICML 2024).

Every loss here takes the logits of ``E`` experts stacked as ``[E, B, C]`` (the output of
:class:`~lightning_lt.nets.MultiExpertCIFARResNet` / :class:`~lightning_lt.nets.MultiExpertTorchvisionResNet`,
already multiplied by the cosine classifier's scale ``s``) and integer targets ``[B]``. The class priors are buffers
(``.to(device)`` moves them; the official code builds them with ``.cuda()`` and cannot run on a CPU). Epoch-dependent
parts (RIDE's deferred re-weighting and diversity temperature, DirMixE's semi-variance term and its per-epoch
reshuffle of the Dirichlet draws) are set by :meth:`ExpertLoss.set_epoch`, which
:class:`~lightning_lt.tasks.MultiExpertClassifier` calls at the start of every training epoch with the restored
epoch, so a resumed run is in the right stage from its first step.

Functional forms: :func:`ride_loss`, :func:`sade_loss`, :func:`dirmixe_loss` (with :func:`inverse_prior`,
:func:`semi_variance`, :func:`dirichlet_meta_draws`).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lt.losses.base import (
    as_class_counts,
    check_class_vector,
    check_non_negative,
    check_positive,
    check_target_range,
)
from lightning_lt.losses.class_balanced import _check_beta, class_balanced_weights
from lightning_lt.losses.ldam import ldam_margins

__all__ = [
    "DirMixELoss",
    "ExpertLoss",
    "RIDELoss",
    "SADELoss",
    "check_expert_logits",
    "dirichlet_meta_draws",
    "dirmixe_loss",
    "inverse_prior",
    "ride_loss",
    "sade_loss",
    "semi_variance",
]

#: ``log(p + LOG_EPS)`` of SADE's and DirMixE's logit adjustments (``1e-9`` in both official losses).
LOG_EPS = 1e-9


def check_expert_logits(
    expert_logits: Tensor,
    target: Tensor,
    num_classes: Optional[int] = None,
    num_experts: Optional[int] = None,
    owner: str = "loss",
) -> None:
    """Check ``expert_logits`` ``[E, B, C]`` (``E >= 2``, ``E == num_experts`` when given, ``C == num_classes`` when
    given) and integer ``target`` ``[B]`` with values in ``[0, C)``.

    Raises:
        ValueError: naming the shape or value that is wrong and how to get the right one.

    Example:
        >>> check_expert_logits(torch.zeros(2, 4, 3), torch.tensor([0, 1, 2, 0]), num_experts=3, owner="SADELoss")
        Traceback (most recent call last):
        ...
        ValueError: SADELoss trains exactly 3 experts, got logits of 2 experts (shape (2, 4, 3)). HINT: build the backbone with `num_experts=3`.
    """
    if expert_logits.ndim != 3:
        raise ValueError(
            f"{owner} expects the stacked logits of every expert, shape [num_experts, batch_size, num_classes], got "
            f"shape {tuple(expert_logits.shape)}. HINT: use a multi-expert backbone "
            "(lightning_lt.nets.MultiExpertCIFARResNet) whose forward returns [E, B, C]."
        )
    num = expert_logits.shape[0]
    if num_experts is not None and num != num_experts:
        raise ValueError(
            f"{owner} trains exactly {num_experts} experts, got logits of {num} experts (shape "
            f"{tuple(expert_logits.shape)}). HINT: build the backbone with `num_experts={num_experts}`."
        )
    if num < 2:
        raise ValueError(
            f"{owner} needs at least 2 experts, got logits of {num} (shape {tuple(expert_logits.shape)}). HINT: use "
            "a single-model loss (lightning_lt.losses) with LongTailClassifier for one model."
        )
    if target.ndim != 1 or target.shape[0] != expert_logits.shape[1]:
        raise ValueError(
            f"{owner} expects `target` of shape [batch_size] = [{expert_logits.shape[1]}] (class indices), got shape "
            f"{tuple(target.shape)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"{owner} expects integer class indices as `target`, got dtype {target.dtype}; use `target.long()`."
        )
    if num_classes is not None and expert_logits.shape[2] != num_classes:
        raise ValueError(
            f"{owner} got logits of {expert_logits.shape[2]} classes (shape {tuple(expert_logits.shape)}) but "
            f"`class_counts` has {num_classes} entries. HINT: the experts' classifiers must have len(class_counts) "
            "outputs."
        )
    check_target_range(target, expert_logits.shape[2], owner)


def _check_int(value: object, name: str, owner: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Expected `{name}` of {owner} to be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _margin_cross_entropy(logits: Tensor, target: Tensor, scaled_margins: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``F.cross_entropy(logits - m_y e_y, y, weight)`` (mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}``): LDAM on logits
    that are already scaled, with the margins already multiplied by the scale."""
    adjusted = logits.scatter_add(1, target[:, None], -scaled_margins.to(logits.dtype)[target][:, None])
    return F.cross_entropy(adjusted, target, weight=None if weight is None else weight.to(logits.dtype))


# ------------------------------------------------------------------------------------------------------------- RIDE
def ride_loss(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor,
    s: float = 30.0,
    weight: Optional[Tensor] = None,
    diversity_temperature: Union[float, Tensor] = 1.0,
    base_loss_factor: float = 1.0,
    additional_diversity_factor: float = -0.2,
) -> Tensor:
    r"""RIDE's loss: every expert's LDAM loss plus a KL diversity term against the experts' mean prediction.

    With expert logits :math:`z_e` (already scaled by ``s``), their mean :math:`\bar z`, temperature :math:`T`
    (a number, or one value per class) and :math:`\bar T` its mean:

    .. math::
        L = \sum_e \Big[\lambda_b\,\mathrm{CE}_w(z_e - s\,\Delta_y e_y,\ y)
        + \lambda_d\,\bar T^2\,\mathrm{KL}\big(\mathrm{sg}[\mathrm{softmax}(\bar z / T)]\ \big\|\
        \mathrm{softmax}(z_e / T)\big)\Big]

    (``KL`` averaged over the batch, ``sg`` = no gradient). ``lambda_d < 0`` (``-0.2``, ``-0.45`` in the CIFAR-100
    config) *rewards* disagreement with the mean: the diversity term. As in the official ``RIDELoss.forward``, with
    ``additional_diversity_factor == 0`` every expert's LDAM term is computed on the mean logits :math:`\bar z`
    instead of its own.

    Args:
        expert_logits: ``[E, B, C]`` scaled logits.
        target: ``[B]`` class indices.
        margins: LDAM margins ``[C]`` (:func:`~lightning_lt.losses.functional.ldam_margins`), multiplied by ``s``.
        s: the classifier scale (the margin is subtracted as ``s * margin`` from scaled logits).
        weight: optional per-class weights ``[C]`` of the LDAM terms (DRW).
        diversity_temperature: ``T``: a number or a per-class tensor ``[C]``.
        base_loss_factor: ``lambda_b``.
        additional_diversity_factor: ``lambda_d``.

    Example:
        >>> logits = torch.tensor([[[3.0, 0.0]], [[0.0, 3.0]]])
        >>> margins = ldam_margins([100, 10], max_m=0.5)
        >>> print(f"{ride_loss(logits, torch.tensor([0]), margins, s=1.0).item():.4f}")
        3.0398
    """
    check_expert_logits(expert_logits, target, owner="ride_loss")
    check_positive(s, "s", "ride_loss")
    num_classes = expert_logits.shape[2]
    check_class_vector(margins, num_classes, "margins", "ride_loss")
    check_class_vector(weight, num_classes, "weight", "ride_loss")
    target = target.long()
    mean_logits = expert_logits.mean(dim=0)
    if isinstance(diversity_temperature, Tensor):
        check_class_vector(diversity_temperature, num_classes, "diversity_temperature", "ride_loss")
        temperature: Union[float, Tensor] = diversity_temperature.to(expert_logits.dtype).view(1, -1)
        temperature_mean = diversity_temperature.mean().item()  # a number, as the official `.mean().item()`
    else:
        temperature = temperature_mean = float(diversity_temperature)
    with torch.no_grad():
        mean_dist = F.softmax(mean_logits / temperature, dim=1)
    scaled_margins = margins * s
    loss = expert_logits.new_zeros(())
    for logits in expert_logits:
        base_logits = mean_logits if additional_diversity_factor == 0 else logits
        loss = loss + base_loss_factor * _margin_cross_entropy(base_logits, target, scaled_margins, weight)
        log_dist = F.log_softmax(logits / temperature, dim=1)
        kl = F.kl_div(log_dist, mean_dist, reduction="batchmean")
        loss = loss + additional_diversity_factor * temperature_mean * temperature_mean * kl
    return loss


def ride_diversity_weights(class_counts: Sequence[int], reweight_factor: float = 0.05) -> Tensor:
    """RIDE's per-class diversity-temperature factors ``w_c = C pi_c r + 1 - r``, divided by their maximum.

    Raises:
        ValueError: when a factor is ``<= 0`` (``reweight_factor`` too large).

    Example:
        >>> print([round(w, 4) for w in ride_diversity_weights([90, 10], 0.05).tolist()])
        [1.0, 0.9231]
    """
    counts = as_class_counts(class_counts, "ride_diversity_weights")
    prior = counts / counts.sum()
    weights = counts.numel() * prior * reweight_factor + 1 - reweight_factor
    weights = weights / weights.max()
    if not bool((weights > 0).all()):
        raise ValueError(
            f"`reweight_factor`={reweight_factor} of RIDELoss gives non-positive diversity temperatures "
            f"{weights.tolist()[:5]}...: `C * prior * r + 1 - r` must stay > 0 for every class. HINT: use a smaller "
            "`reweight_factor` (the official default is 0.05)."
        )
    return weights.to(torch.get_default_dtype())


class ExpertLoss(nn.Module):
    """Base of the multi-expert losses: class counts and prior as buffers, expert-count checks, ``set_epoch``.

    Buffers: ``class_counts`` ``[C]``, ``prior`` ``[C]`` (``n_c / N``, computed in float64 then cast, as the official
    code does in numpy) and ``log_prior`` ``[C]``. Subclasses implement :meth:`_compute`.

    Args:
        class_counts: training samples per class (required, all ``> 0``).

    Raises:
        ValueError: missing or non-positive ``class_counts``.
    """

    #: The exact number of experts the loss trains (``None``: any number ``>= 2``).
    num_experts: Optional[int] = None

    class_counts: Tensor
    prior: Tensor
    log_prior: Tensor

    def __init__(self, class_counts: Optional[Sequence[int]]) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, type(self).__name__)
        prior = counts / counts.sum()
        self.register_buffer("class_counts", counts.to(torch.get_default_dtype()))
        self.register_buffer("prior", prior.to(torch.get_default_dtype()))
        self.register_buffer("log_prior", prior.log().to(torch.get_default_dtype()))

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_counts)``)."""
        return self.class_counts.numel()

    def set_epoch(self, epoch: int, max_epochs: Optional[int] = None, batches_per_epoch: Optional[int] = None) -> None:
        """Enter the (0-based) training epoch ``epoch`` of ``max_epochs`` with ``batches_per_epoch`` batches (summed
        over processes). The base loss has no epoch-dependent part."""

    def forward(self, expert_logits: Tensor, target: Tensor, batch_index: Optional[int] = None) -> Tensor:
        """The loss of ``expert_logits`` ``[E, B, C]`` for ``target`` ``[B]``; ``batch_index``: the batch's index in
        the epoch (used by losses that draw per batch, see :class:`DirMixELoss`)."""
        check_expert_logits(expert_logits, target, self.num_classes, self.num_experts, type(self).__name__)
        return self._compute(expert_logits, target.long(), batch_index)

    def _compute(self, expert_logits: Tensor, target: Tensor, batch_index: Optional[int]) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement `_compute(expert_logits, target, batch_index)`.")


class RIDELoss(ExpertLoss):
    r"""RIDE: LDAM(-DRW) for every expert plus the KL diversity term, with the official epoch schedule.

    See :func:`ride_loss`. Before ``reweight_epoch`` the LDAM terms are unweighted and the diversity temperature is
    the number ``base_diversity_temperature``; from ``reweight_epoch`` on (0-based: the official ``epoch >
    reweight_epoch`` with 1-based epochs, i.e. epoch 160 of 0..199 is the first, like LDAM-DRW) the LDAM terms get
    the class-balanced weights (``beta = 0.9999``) **and** the temperature becomes per class,
    ``T_c = base_diversity_temperature * w_c`` with ``w_c = (C pi_c r + 1 - r) / max`` (``r = reweight_factor``):
    head classes keep ``T`` close to the base, tail classes get a lower one; the term is scaled by the squared
    mean temperature. ``reweighted`` (a buffer, saved with the model) tells the current stage; it is set by
    :meth:`set_epoch`.

    Defaults are the official constructor's (``additional_diversity_factor=-0.2``); the official CIFAR-100 config
    uses ``-0.45`` and ``reweight_epoch=160``. The official code crashes without re-weighting (``reweight=False``
    leaves ``per_cls_weights_base`` undefined); here ``reweight_epoch=None`` trains unweighted with the scalar
    temperature throughout.

    Args:
        class_counts: training samples per class.
        max_m: the largest LDAM margin.
        s: the experts' logit scale (the margins are subtracted as ``s * margin``).
        reweight_epoch: first re-weighted 0-based epoch, or ``None`` (never).
        beta: class-balanced weights' ``beta``.
        base_loss_factor: weight of the LDAM terms.
        additional_diversity_factor: weight of the diversity terms (negative: diversity is rewarded).
        reweight_factor: ``r`` of the per-class temperatures.
        base_diversity_temperature: the temperature before re-weighting.

    Raises:
        ValueError: bad counts, ``max_m`` / ``s`` / ``base_diversity_temperature`` ``<= 0``, a negative
            ``reweight_epoch``, ``beta`` outside ``[0, 1)``, or a ``reweight_factor`` that gives non-positive
            temperatures.

    Example:
        >>> loss = RIDELoss([100, 10], reweight_epoch=1)
        >>> loss.set_epoch(1)
        >>> bool(loss.reweighted), [round(t, 4) for t in loss.diversity_temperature.tolist()]
        (True, [1.0, 0.9214])
    """

    margins: Tensor
    drw_weights: Tensor
    diversity_weights: Tensor
    reweighted: Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[int]],
        max_m: float = 0.5,
        s: float = 30.0,
        reweight_epoch: Optional[int] = 160,
        beta: float = 0.9999,
        base_loss_factor: float = 1.0,
        additional_diversity_factor: float = -0.2,
        reweight_factor: float = 0.05,
        base_diversity_temperature: float = 1.0,
    ) -> None:
        super().__init__(class_counts)
        owner = type(self).__name__
        check_positive(max_m, "max_m", owner)
        check_positive(s, "s", owner)
        check_positive(base_diversity_temperature, "base_diversity_temperature", owner)
        _check_beta(beta, owner)
        if reweight_epoch is not None:
            reweight_epoch = _check_int(reweight_epoch, "reweight_epoch", owner, 0)
        factors = {"base_loss_factor": base_loss_factor, "additional_diversity_factor": additional_diversity_factor}
        for name, value in factors.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Expected `{name}` of {owner} to be a finite number, got {value!r}.")
        self.max_m, self.s, self.beta = float(max_m), float(s), float(beta)
        self.reweight_epoch = reweight_epoch
        self.base_loss_factor = float(base_loss_factor)
        self.additional_diversity_factor = float(additional_diversity_factor)
        self.reweight_factor = float(reweight_factor)
        self.base_diversity_temperature = float(base_diversity_temperature)
        self.register_buffer("margins", ldam_margins(class_counts, self.max_m))
        self.register_buffer("drw_weights", class_balanced_weights(class_counts, self.beta))
        self.register_buffer("diversity_weights", ride_diversity_weights(class_counts, self.reweight_factor))
        self.register_buffer("reweighted", torch.tensor(False))

    def set_epoch(self, epoch: int, max_epochs: Optional[int] = None, batches_per_epoch: Optional[int] = None) -> None:
        """Re-weighted (class-balanced LDAM weights, per-class temperature) from ``reweight_epoch`` on."""
        self.reweighted.fill_(self.reweight_epoch is not None and epoch >= self.reweight_epoch)

    @property
    def diversity_temperature(self) -> Union[float, Tensor]:
        """The current temperature: the base number, or ``base * diversity_weights`` ``[C]`` once re-weighted."""
        if bool(self.reweighted):
            return self.base_diversity_temperature * self.diversity_weights
        return self.base_diversity_temperature

    def _compute(self, expert_logits: Tensor, target: Tensor, batch_index: Optional[int]) -> Tensor:
        weight = self.drw_weights if bool(self.reweighted) else None
        return ride_loss(
            expert_logits, target, self.margins, self.s, weight, self.diversity_temperature,
            self.base_loss_factor, self.additional_diversity_factor,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, reweight_epoch={self.reweight_epoch}, "
            f"additional_diversity_factor={self.additional_diversity_factor}"
        )


# ------------------------------------------------------------------------------------------------------------- SADE
def inverse_prior(prior: Tensor) -> Tensor:
    """The prior with its values reversed by rank: the most frequent class gets the smallest prior value, the
    second most frequent the second smallest, and so on (SADE's ``DiverseExpertLoss.inverse_prior``, also DirMixE's
    third meta-distribution).

    Ties: the official code ranks with an unstable ``torch.sort``, so classes with equal counts (CIFAR-100-LT at
    IF 100 has runs of them, e.g. several classes with 5 or 6 images) get their reversed values in an
    implementation-defined order. Here the more frequent rank goes to the lower class index, so the inverse of a
    non-increasing prior (the CIFAR-LT profiles) is exactly its mirror ``prior.flip(0)``, the label distribution
    of the backward long-tailed test sets. Without ties both agree.

    Example:
        >>> inverse_prior(torch.tensor([0.6, 0.1, 0.3])).tolist()
        [0.10000000149011612, 0.6000000238418579, 0.30000001192092896]
    """
    order = torch.sort(prior, descending=True, stable=True).indices  # most to least frequent, ties by index
    out = torch.empty_like(prior)
    out[order] = torch.sort(prior, stable=True).values
    return out


def sade_loss(expert_logits: Tensor, target: Tensor, prior: Tensor, tau: float = 2.0) -> Tensor:
    r"""SADE's diverse-expert loss for 3 experts: softmax CE, balanced softmax and inverse-prior logit adjustment.

    .. math::
        L = \mathrm{CE}(z_1, y) + \mathrm{CE}(z_2 + \log \pi, y) + \mathrm{CE}(z_3 + \log \pi - \tau \log \bar\pi, y)

    with the training prior :math:`\pi` and the inverted prior :math:`\bar\pi` (:func:`inverse_prior`), each
    ``log(p + 1e-9)`` as in the official code; the terms are summed, not averaged. Expert 1 fits the training
    (forward long-tailed) distribution, expert 2 the uniform one and expert 3 a backward long-tailed one
    (``tau = 2`` in every official config).

    Example:
        >>> logits = torch.zeros(3, 1, 2)
        >>> print(f"{sade_loss(logits, torch.tensor([0]), torch.tensor([0.9, 0.1])).item():.4f}")
        0.7999
    """
    check_expert_logits(expert_logits, target, num_experts=3, owner="sade_loss")
    check_class_vector(prior, expert_logits.shape[2], "prior", "sade_loss")
    target = target.long()
    prior = prior.to(expert_logits.dtype)
    log_prior = torch.log(prior + LOG_EPS)
    loss = F.cross_entropy(expert_logits[0], target)
    loss = loss + F.cross_entropy(expert_logits[1] + log_prior, target)
    inverse = inverse_prior(prior)
    loss = loss + F.cross_entropy(expert_logits[2] + log_prior - tau * torch.log(inverse + LOG_EPS), target)
    return loss


class SADELoss(ExpertLoss):
    """SADE's ``DiverseExpertLoss``: 3 experts skilled at forward-LT, uniform and backward-LT label distributions.

    See :func:`sade_loss`. The prior is the ``prior`` buffer. Test-time: the experts' logits are averaged (equal
    weights) or combined with weights learned on the test stream
    (:class:`~lightning_lt.callbacks.TestTimeAggregation`).

    Args:
        class_counts: training samples per class.
        tau: strength of the inverse-prior adjustment of expert 3 (2 in the official configs).

    Raises:
        ValueError: bad counts or a non-finite ``tau``.

    Example:
        >>> loss = SADELoss([90, 10])
        >>> print(f"{loss(torch.zeros(3, 1, 2), torch.tensor([0])).item():.4f}")
        0.7999
    """

    num_experts = 3

    def __init__(self, class_counts: Optional[Sequence[int]], tau: float = 2.0) -> None:
        super().__init__(class_counts)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"Expected `tau` of {type(self).__name__} to be a finite number (2 in SADE), got {tau!r}.")
        self.tau = float(tau)

    def _compute(self, expert_logits: Tensor, target: Tensor, batch_index: Optional[int]) -> Tensor:
        return sade_loss(expert_logits, target, self.prior, self.tau)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"


# ---------------------------------------------------------------------------------------------------------- DirMixE
def semi_variance(losses: Tensor) -> Tensor:
    r"""DirMixE's semi-variance of per-draw losses: the spread of the losses above their mean.

    .. math::
        \mathrm{SV} = \frac{\sum_{t : l_t > \bar l} (l_t - \bar l)^2}{\max(n_+ - 1, 1)}, \quad n_+ = \#\{t : l_t > \bar l\}

    (0 when no loss exceeds the mean). The mean is not detached, as in the official code.

    Example:
        >>> print(f"{semi_variance(torch.tensor([1.0, 2.0, 6.0])).item():.4f}")
        9.0000
    """
    mean = losses.mean()
    total = losses.new_zeros(())
    count = 0
    for t, above in enumerate((losses > mean).tolist()):  # summed in draw order, as the official loop
        if above:
            total = total + (losses[t] - mean) ** 2
            count += 1
    return total / max(count - 1, 1)


def dirmixe_loss(
    expert_logits: Tensor,
    target: Tensor,
    prior: Tensor,
    draws: Tensor,
    experts: Tensor,
    power: float = 1.3,
    lambda_var: float = 5.0,
    use_semi_variance: bool = True,
) -> Tensor:
    r"""DirMixE's loss for given Dirichlet draws: a logit-adjusted loss per draw, their mean and semi-variance.

    Draw :math:`t` picks expert :math:`k_t` and a label distribution :math:`w_t`; its loss is

    .. math::
        l_t = \mathrm{CE}\Big(z_{k_t} - \log\big(\tfrac{w_t^p}{\pi^p} + 10^{-9}\big),\ y\Big)

    (batch mean) and ``L = mean_t l_t + lambda_var * semi_variance(l)`` (:func:`semi_variance`; the second term only
    with ``use_semi_variance``).

    Args:
        expert_logits: ``[E, B, C]`` scaled logits.
        target: ``[B]`` class indices.
        prior: the training prior ``[C]``.
        draws: the Dirichlet draws ``[T, C]`` (:func:`dirichlet_meta_draws`).
        experts: the expert of each draw ``[T]`` (integers in ``[0, E)``).
        power: the exponent ``p``.
        lambda_var: weight of the semi-variance.
        use_semi_variance: add the semi-variance term (DirMixE switches it on late in training).

    Example:
        >>> logits = torch.zeros(3, 1, 2)
        >>> draws, experts = torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([1, 0])
        >>> print(f"{dirmixe_loss(logits, torch.tensor([1]), torch.tensor([0.9, 0.1]), draws, experts, power=1.0).item():.4f}")
        4.7357
    """
    check_expert_logits(expert_logits, target, owner="dirmixe_loss")
    num_classes = expert_logits.shape[2]
    check_class_vector(prior, num_classes, "prior", "dirmixe_loss")
    if draws.ndim != 2 or draws.shape[1] != num_classes or experts.shape != draws.shape[:1]:
        raise ValueError(
            f"dirmixe_loss expects `draws` [T, {num_classes}] and `experts` [T], got shapes {tuple(draws.shape)} and "
            f"{tuple(experts.shape)}."
        )
    target = target.long()
    dtype = expert_logits.dtype
    prior = prior.to(dtype)
    ratio = draws.to(dtype) ** power / prior**power
    scores = expert_logits[experts.long()] - torch.log(ratio + LOG_EPS)[:, None, :]  # [T, B, C]
    losses = torch.stack([F.cross_entropy(score, target) for score in scores])
    loss = losses.mean()
    if use_semi_variance:
        loss = loss + lambda_var * semi_variance(losses)
    return loss


def dirichlet_meta_draws(
    centres: Tensor, alpha_sum: float, trials: int, rng: np.random.RandomState
) -> tuple[Tensor, Tensor]:
    """``trials`` draws of DirMixE's Dirichlet mixture: for each, a meta-distribution ``k`` uniformly, then
    ``w ~ Dir(alpha_sum * centres[k])``, in the order of the official ``generate_weights_pool`` (``randint`` then
    ``dirichlet`` on a numpy ``RandomState``; float64 draws cast to float32).

    Args:
        centres: ``[K, C]`` label distributions (each sums to 1).
        alpha_sum: the Dirichlet concentration ``> 0`` (1e4 in DirMixE).
        trials: number of draws.
        rng: the numpy generator.

    Returns:
        ``(draws [trials, C] float32, experts [trials] int64)``.

    Example:
        >>> draws, experts = dirichlet_meta_draws(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), 1e4, 3, np.random.RandomState(0))
        >>> experts.tolist(), [round(v, 2) for v in draws.sum(dim=1).tolist()]
        ([0, 1, 0], [1.0, 1.0, 1.0])
    """
    check_positive(alpha_sum, "alpha_sum", "dirichlet_meta_draws")
    centres_np = centres.detach().cpu().numpy()
    draws, experts = [], []
    for _ in range(trials):
        k = rng.randint(len(centres_np))
        draws.append(rng.dirichlet(centres_np[k] * alpha_sum))
        experts.append(k)
    draws_t = torch.tensor(np.asarray(draws), dtype=torch.float32).reshape(trials, centres.shape[1])
    return draws_t, torch.tensor(experts, dtype=torch.long)


def dirmixe_centres(prior: Tensor) -> Tensor:
    """DirMixE's three meta-distribution centres for CIFAR: the training prior, the uniform distribution and the
    inverted prior (:func:`inverse_prior`), each normalised to sum 1, stacked ``[3, C]``."""
    uniform = torch.full_like(prior, 1.0 / prior.numel())
    centres = torch.stack([prior.clone(), uniform, inverse_prior(prior)])
    return centres / centres.sum(dim=1, keepdim=True)


class DirMixELoss(ExpertLoss):
    r"""DirMixE: each expert owns a Dirichlet meta-distribution of test label distributions.

    The centres are the training prior (expert 1), the uniform distribution (expert 2) and the inverted prior
    (expert 3), each scaled by the concentration ``alpha_sum``. Every training batch uses ``trials`` draws
    ``(k_t, w_t)`` and the loss :func:`dirmixe_loss`; the semi-variance of the per-draw losses (weight
    ``lambda_var``) is added from epoch ``int(semi_variance_start * (max_epochs + 1))`` on (0-based): the
    official trainer passes ``epochs + 1`` as the total and switches at 1-based ``epoch > int(0.8 * total)``, i.e.
    0-based epoch 160 of 200. ``semi_variance_active`` (a buffer) tells the stage; :meth:`set_epoch` sets it.

    Draws, as the official code: a *pool* of ``trials * batches_per_epoch`` draws is generated once
    (:func:`dirichlet_meta_draws` on ``np.random.RandomState(seed)``) and reshuffled at every epoch; batch ``b``
    uses pool entries ``b * trials .. (b + 1) * trials - 1``. Here the epoch's permutation comes from
    ``(seed, epoch)`` instead of the continuing global numpy stream, so a resumed run repeats the uninterrupted
    one. ``seed=None`` uses ``PL_GLOBAL_SEED`` (``seed_everything``), else 0.

    Defaults: ``alpha_sum=1e4`` and ``trials=60`` (the official constructor), ``power=1.3`` (both CIFAR configs;
    the constructor's default is 1.0), ``lambda_var=5`` (the CIFAR-100 config; CIFAR-10 uses 15).

    Args:
        class_counts: training samples per class.
        alpha_sum: Dirichlet concentration ``> 0``.
        trials: draws per batch ``>= 1``.
        power: exponent ``p`` of the adjustment ``log(w^p / pi^p)``.
        lambda_var: weight of the semi-variance ``>= 0``.
        semi_variance_start: fraction of training after which the semi-variance is added (``None``: never).
        seed: seed of the pool of draws.

    Raises:
        ValueError: ``alpha_sum <= 0`` (a Dirichlet concentration must be positive), ``trials < 1``, negative
            ``lambda_var``, ``semi_variance_start`` outside ``[0, 1]``; in :meth:`set_epoch`, an unknown
            ``max_epochs`` while the semi-variance is scheduled.

    Example:
        >>> loss = DirMixELoss([90, 10], trials=4, semi_variance_start=0.5)
        >>> loss.set_epoch(0, max_epochs=4, batches_per_epoch=2)
        >>> bool(loss.semi_variance_active), tuple(loss.pool_draws.shape)
        (False, (8, 2))
        >>> loss.set_epoch(2, max_epochs=4, batches_per_epoch=2)
        >>> bool(loss.semi_variance_active)
        True
    """

    num_experts = 3

    centres: Tensor
    semi_variance_active: Tensor
    pool_draws: Tensor
    pool_experts: Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[int]],
        alpha_sum: float = 1e4,
        trials: int = 60,
        power: float = 1.3,
        lambda_var: float = 5.0,
        semi_variance_start: Optional[float] = 0.8,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__(class_counts)
        # The official prior is a float32 division (``tensor(n).float() / sum``), not SADE's float64 one.
        counts32 = self.class_counts.float()
        self.prior = (counts32 / counts32.sum()).to(self.prior.dtype)
        self.log_prior = self.prior.log()
        owner = type(self).__name__
        if isinstance(alpha_sum, bool) or not isinstance(alpha_sum, (int, float)) or not 0 < alpha_sum < math.inf:
            raise ValueError(
                f"Expected the Dirichlet concentration `alpha_sum` of {owner} to be a finite number > 0, got "
                f"{alpha_sum!r}. HINT: DirMixE uses 1e4; smaller values spread the drawn label distributions further "
                "from the three centres."
            )
        self.trials = _check_int(trials, "trials", owner, 1)
        check_positive(power, "power", owner)
        check_non_negative(lambda_var, "lambda_var", owner)
        if semi_variance_start is not None and not (
            isinstance(semi_variance_start, (int, float)) and not isinstance(semi_variance_start, bool)
            and 0.0 <= semi_variance_start <= 1.0
        ):
            raise ValueError(
                f"Expected `semi_variance_start` of {owner} to be a fraction of training in [0, 1] or None, got "
                f"{semi_variance_start!r}."
            )
        self.alpha_sum, self.power, self.lambda_var = float(alpha_sum), float(power), float(lambda_var)
        self.semi_variance_start = None if semi_variance_start is None else float(semi_variance_start)
        self.seed = seed
        self.register_buffer("centres", dirmixe_centres(self.prior))
        self.register_buffer("semi_variance_active", torch.tensor(False))
        # The pool is rebuilt from the seed when training starts: not saved with the model.
        self.register_buffer("pool_draws", torch.zeros(0, self.num_classes), persistent=False)
        self.register_buffer("pool_experts", torch.zeros(0, dtype=torch.long), persistent=False)
        self._pool_seed: Optional[int] = None
        self._order = torch.zeros(0, dtype=torch.long)
        self._next_batch = 0

    def _resolved_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def semi_variance_epoch(self, max_epochs: int) -> Optional[int]:
        """The first 0-based epoch with the semi-variance term: ``int(semi_variance_start * (max_epochs + 1))``."""
        if self.semi_variance_start is None:
            return None
        return int(self.semi_variance_start * (max_epochs + 1))

    def set_epoch(self, epoch: int, max_epochs: Optional[int] = None, batches_per_epoch: Optional[int] = None) -> None:
        """Switch the semi-variance on from :meth:`semi_variance_epoch`, (re)build the pool of draws for
        ``batches_per_epoch`` batches and shuffle it for ``epoch``."""
        if self.semi_variance_start is not None:
            if max_epochs is None or max_epochs < 1:
                raise ValueError(
                    f"{type(self).__name__} switches its semi-variance term on after {self.semi_variance_start:g} of "
                    f"training, which needs the planned number of epochs, got max_epochs={max_epochs!r}. HINT: set "
                    "`trainer.max_epochs`, or `semi_variance_start=None` to train without the term."
                )
            self.semi_variance_active.fill_(epoch >= self.semi_variance_epoch(max_epochs))
        batches = max(int(batches_per_epoch or 1), 1)
        seed = self._resolved_seed()
        size = self.trials * batches
        if self.pool_draws.shape[0] != size or self._pool_seed != seed:
            draws, experts = dirichlet_meta_draws(self.centres.cpu(), self.alpha_sum, size, np.random.RandomState(seed))
            self.pool_draws = draws.to(device=self.prior.device, dtype=self.prior.dtype)
            self.pool_experts = experts.to(self.prior.device)
            self._pool_seed = seed
        epoch_seed = np.random.SeedSequence([seed % 2**64, int(epoch)]).generate_state(1)[0]
        self._order = torch.from_numpy(np.random.RandomState(epoch_seed).permutation(size))
        self._next_batch = 0

    def batch_draws(self, batch_index: int) -> tuple[Tensor, Tensor]:
        """The ``(draws [T, C], experts [T])`` of batch ``batch_index`` of the current epoch."""
        if self._order.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no Dirichlet draws yet. HINT: call `loss.set_epoch(epoch, max_epochs, "
                "batches_per_epoch)` at the start of every training epoch (MultiExpertClassifier does)."
            )
        size = self._order.numel()
        positions = (batch_index * self.trials + torch.arange(self.trials)) % size
        index = self._order[positions].to(self.pool_draws.device)
        return self.pool_draws[index], self.pool_experts[index]

    def _compute(self, expert_logits: Tensor, target: Tensor, batch_index: Optional[int]) -> Tensor:
        if batch_index is None:
            batch_index = self._next_batch
        self._next_batch = batch_index + 1
        draws, experts = self.batch_draws(batch_index)
        return dirmixe_loss(
            expert_logits, target, self.prior, draws, experts, self.power, self.lambda_var,
            bool(self.semi_variance_active),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha_sum={self.alpha_sum:g}, trials={self.trials}, power={self.power}, "
            f"lambda_var={self.lambda_var}, semi_variance_start={self.semi_variance_start}"
        )
