"""Sharpness-aware optimizer wrappers: SAM / ASAM, ImbSAM and SSE-SAM.

All three are one algorithm, *group-wise SAM*: the training loss is a sum of loss groups
``L = sum_g L_g`` (one group for SAM; the head-class and tail-class parts of the batch for ImbSAM and
SSE-SAM), and each group has its own radius ``rho_g``. For every group with ``rho_g > 0``:

* a pass at ``w`` gives ``grad L_g(w)``;
* the perturbation is ``e_g = rho_g * T^2 grad L_g(w) / ||T grad L_g(w)||`` with ``T = |w|`` (ASAM,
  ``adaptive=True``) or ``T = 1`` (SAM);
* a pass at ``w + e_g`` gives ``grad L_g(w + e_g)``; ``w`` is restored.

A group with ``rho_g = 0`` contributes ``grad L_g(w)`` from a single pass. The base optimizer then
steps with ``g = sum_g grad L_g(w + e_g)``. So SAM is ``rhos=[rho]`` (2 passes), ImbSAM is
``rhos=[0, rho]`` over (head, tail) (3 passes) and SSE-SAM stage 1 is ``rhos=[rho_head, rho_tail]``
(4 passes). The group losses divide by the whole batch size ``B``, as the official ImbSAM and SSE-SAM
code does, and the tail loss carries a weight ``lambda_t`` (``tail_weight``)::

    L_head = sum_{y_i not in T} l_i / B,    L_tail = lambda_t * sum_{y_i in T} l_i / B.

``lambda_t = 2`` reproduces ImbSAM's official step (``utils/trainval.py`` of cool-xuan/Imbalanced_SAM
multiplies the tail loss by 2 in both tail passes), ``lambda_t = 1`` SSE-SAM's (``utils/trainval.py`` of
Zemdalk/SSE-SAM divides head and tail losses by ``B`` alone, in both stages); these are the defaults of
:class:`ImbSAM` and :class:`SSESAM`. The perturbation ``e`` is normalised, so ``lambda_t`` scales only the
tail gradient that enters the update. A plain step (``sam_every``) back-propagates ``L_head + L_tail``
(the same weights), and every pass of a step uses the same ``lambda_t``.

The wrappers share ``param_groups`` with the base optimizer (LR schedulers built on the base optimizer
drive them) and pass ``state_dict`` / ``load_state_dict`` through to it, so checkpoints are those of the
base optimizer. With ``model`` given, BatchNorm running statistics are updated by the first pass only (the
official ImbSAM / SSE-SAM code lets every forward pass update them, the perturbed ones included; the
weights do not depend on it, as training-mode BatchNorm normalises with the batch statistics).
``sam_every=k`` applies the sharpness-aware update on every k-th step and a plain one-pass step otherwise
(cost ``(k + 1) / k`` passes for SAM instead of 2).

Closures in a plain PyTorch loop:

* ``SAM.step(closure)``: ``closure()`` computes the loss, calls ``backward()`` and returns the loss
  (gradients are zeroed by the optimizer before each call);
* ``ImbSAM.step(closure)`` / ``SSESAM.step(closure)``: ``closure()`` runs the forward pass and returns
  ``(per_sample_loss, target)`` (``[B]`` each) without calling ``backward()``; the optimizer forms and
  back-propagates the group losses. ``step`` returns ``per_sample_loss.mean()`` of the first pass (at the
  unperturbed weights, without the tail weight).

Under Lightning, use the callbacks in :mod:`lightning_lt.callbacks.sam`, which drive the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lt.optim.rho import check_rho

__all__ = ["GroupSAM", "ImbSAM", "SAM", "SSESAM", "preserve_batchnorm_stats", "tail_mask"]

#: ``run_pass(group, first, sync) -> loss``: zero the gradients, compute the loss of ``group`` (``None``:
#: the whole batch) at the current weights and back-propagate it. ``first`` marks the step's first pass
#: (the only one that may update BatchNorm statistics and logged metrics); ``sync=False`` marks a
#: perturbation pass whose gradient stays local to the process under DDP.
PassFn = Callable[[Optional[int], bool, bool], Optional[Tensor]]


@contextmanager
def preserve_batchnorm_stats(module: Optional[nn.Module]) -> Iterator[None]:
    """Restore every BatchNorm running statistic of ``module`` (mean, var, batch count) on exit."""
    if module is None:
        yield
        return
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def tail_mask(target: Tensor, tail_classes: Tensor) -> Tensor:
    """Boolean mask of the samples whose class is in ``tail_classes``."""
    return torch.isin(target, tail_classes.to(target.device))


def check_tail_weight(tail_weight: float) -> float:
    """``tail_weight`` as a float; a finite number > 0."""
    if isinstance(tail_weight, bool) or not isinstance(tail_weight, (int, float)) or not (
        math.isfinite(tail_weight) and tail_weight > 0
    ):
        raise ValueError(
            f"Expected `tail_weight` (the factor on the tail-class loss) to be a finite number > 0, got {tail_weight!r}"
        )
    return float(tail_weight)


def _check_sam_every(sam_every: int) -> int:
    if isinstance(sam_every, bool) or not isinstance(sam_every, int) or sam_every < 1:
        raise ValueError(f"Expected `sam_every` to be an integer >= 1, got {sam_every!r}")
    return sam_every


class GroupSAM(Optimizer):
    """Group-wise sharpness-aware minimisation around a base optimizer (see the module docstring).

    Args:
        base_optimizer: the optimizer that makes the update (e.g. SGD); its ``param_groups`` are shared.
        rhos: one radius per loss group (``0`` = plain gradient for that group).
        adaptive: ASAM's scale-invariant perturbation (``T = |w|``); needs a ~10x larger ``rho``.
        sam_every: apply the sharpness-aware update every ``sam_every`` steps, a plain step otherwise.
        model: module whose BatchNorm running statistics only the first pass of a step may update.
        eps: added to the gradient norm (1e-12, as davda54/sam; ImbSAM and SSE-SAM use their code's 1e-16).

    Raises:
        ValueError: a negative or non-finite ``rho``, ``sam_every < 1``, or a base optimizer that is
            itself a SAM wrapper.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rhos: Sequence[float],
        adaptive: bool = False,
        sam_every: int = 1,
        model: Optional[nn.Module] = None,
        eps: float = 1e-12,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(f"Expected `base_optimizer` to be a torch Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, GroupSAM):
            raise ValueError(
                f"`base_optimizer` is already a {type(base_optimizer).__name__}; wrap its `base_optimizer` instead"
            )
        self.base_optimizer = base_optimizer
        self.rhos = list(rhos)
        self.adaptive = adaptive
        self.sam_every = _check_sam_every(sam_every)
        self.model = model
        self.eps = eps
        self.sam_steps = 0  # steps taken through this wrapper (decides which steps are SAM steps)
        #: set by the Lightning callbacks: runs one pass through Lightning's closure.
        self.lightning_pass: Optional[Callable[[Callable[[], Any], Optional[int], bool, bool], Optional[Tensor]]] = None
        # Share the base optimizer's parameter groups and defaults (timm's Lookahead pattern); the
        # hooks and bookkeeping of torch.optim.Optimizer are set up by its constructor.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self._backup: dict[Tensor, Tensor] = {}

    # ------------------------------------------------------------------------------ hyper-parameters
    @property
    def rhos(self) -> list[float]:
        """One radius per loss group."""
        return list(self._rhos)

    @rhos.setter
    def rhos(self, values: Sequence[float]) -> None:
        values = [check_rho(f"rhos[{i}]", v) for i, v in enumerate(values)]
        if not values:
            raise ValueError("Expected at least one rho (one per loss group), got none")
        self._rhos = values

    @property
    def optimizer(self) -> Optimizer:
        """The base optimizer (the attribute Lightning's ``LearningRateMonitor`` unwraps, so the learning
        rate is logged once, under the base optimizer's name)."""
        return self.base_optimizer

    # ----------------------------------------------------------------------------- state pass-through
    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns it
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rhos={self.rhos}, adaptive={self.adaptive}, sam_every={self.sam_every}, "
            f"base_optimizer={type(self.base_optimizer).__name__})"
        )

    # ------------------------------------------------------------------------------- perturbation
    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self, rho: float) -> None:
        """Move the weights to ``w + e`` with ``e = rho * T^2 g / ||T g||`` (``g`` = current gradients)."""
        params = self._params_with_grad()
        if not params:
            return
        if self.adaptive:
            scaled = [p.abs() * p.grad for p in params]
        else:
            scaled = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = rho / (norm + self.eps)
        for p, s in zip(params, scaled):
            self._backup[p] = p.detach().clone()
            e = s * p.abs() * scale if self.adaptive else s * scale
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Move the weights back to ``w`` (exactly: the weights were saved before :meth:`perturb`)."""
        for p, saved in self._backup.items():
            p.copy_(saved)
        self._backup.clear()

    # --------------------------------------------------------------------------------------- step
    def is_sam_step(self) -> bool:
        """Whether the next step is a sharpness-aware one (``sam_every``)."""
        return self.sam_steps % self.sam_every == 0

    @torch.no_grad()
    def step_with(self, run_pass: PassFn) -> Optional[Tensor]:
        """One update, with the passes made by ``run_pass(group, first, sync)`` (see :data:`PassFn`).

        Passes after the first keep ``model``'s BatchNorm running statistics unchanged.
        """
        make_pass = run_pass

        def run_pass(group: Optional[int], first: bool, sync: bool) -> Optional[Tensor]:
            with nullcontext() if first else preserve_batchnorm_stats(self.model):
                return make_pass(group, first, sync)

        sam_step = self.is_sam_step()
        self.sam_steps += 1
        if not sam_step or not any(self._rhos):
            # A plain step: one pass over the whole batch.
            loss = run_pass(None, True, True)
            self.base_optimizer.step()
            return loss
        total: Optional[list[Optional[Tensor]]] = None
        first_loss: Optional[Tensor] = None
        params = [p for group in self.param_groups for p in group["params"]]
        for group, rho in enumerate(self._rhos):
            first = group == 0
            if rho > 0:
                loss = run_pass(group, first, False)
                self.perturb(rho)
                run_pass(group, False, True)
                self.restore()
            else:
                loss = run_pass(group, first, True)
            if first:
                first_loss = loss
            if len(self._rhos) > 1:
                grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
                if total is None:
                    total = grads
                else:
                    total = [a if b is None else (b if a is None else a.add_(b)) for a, b in zip(total, grads)]
        if total is not None:
            for p, g in zip(params, total):
                p.grad = g
        self.base_optimizer.step()
        return first_loss

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Tensor]:  # type: ignore[override]
        """One sharpness-aware update; ``closure`` is required (see the module docstring)."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that re-evaluates the loss: it computes gradients at "
                "perturbed weights. Under Lightning use the lightning_lt.callbacks SAM callbacks (they handle "
                "this); with precision='16-mixed' Lightning steps without a closure, use 'bf16-mixed' or '32-true'."
            )
        if self.lightning_pass is not None:
            lightning_pass = self.lightning_pass
            return self.step_with(lambda group, first, sync: lightning_pass(closure, group, first, sync))
        return self.step_with(self._plain_pass(closure))

    def _plain_pass(self, closure: Callable[[], Any]) -> PassFn:
        raise NotImplementedError  # pragma: no cover - every concrete wrapper defines it


class SAM(GroupSAM):
    """SAM (Foret et al., 2021) and ASAM (``adaptive=True``, Kwon et al., 2021) around a base optimizer.

    ``e = rho * T^2 g / ||T g||`` with ``T = |w|`` (ASAM) or 1; the base optimizer steps with the gradient
    at ``w + e``. Defaults: rho 0.05 for SAM; ASAM needs about 10x (2.0 in its example).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        >>> x, y = torch.ones(4, 2), torch.zeros(4, 1)
        >>> def closure():
        ...     loss = ((model(x) - y) ** 2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> print(len(optimizer.param_groups), optimizer.param_groups[0]["lr"])
        1 0.1
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        sam_every: int = 1,
        model: Optional[nn.Module] = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(base_optimizer, [check_rho("rho", rho)], adaptive, sam_every, model, eps)

    @property
    def rho(self) -> float:
        return self.rhos[0]

    @rho.setter
    def rho(self, value: float) -> None:
        self.rhos = [check_rho("rho", value)]

    def _plain_pass(self, closure: Callable[[], Any]) -> PassFn:
        def run_pass(group: Optional[int], first: bool, sync: bool) -> Optional[Tensor]:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
            return loss.detach() if isinstance(loss, Tensor) else loss

        return run_pass


class _HeadTailSAM(GroupSAM):
    """Group-wise SAM over two groups: head-class samples (group 0) and tail-class samples (group 1, weighted
    by ``tail_weight``)."""

    def __init__(
        self,
        base_optimizer: Optimizer,
        tail_classes: Sequence[int],
        rhos: Sequence[float],
        tail_weight: float = 1.0,
        adaptive: bool = False,
        sam_every: int = 1,
        model: Optional[nn.Module] = None,
        eps: float = 1e-16,
    ) -> None:
        super().__init__(base_optimizer, rhos, adaptive, sam_every, model, eps)
        tail = [int(c) for c in tail_classes]
        if any(c < 0 for c in tail):
            raise ValueError(f"Expected `tail_classes` to be class indices >= 0, got {tail}")
        self.tail_classes = torch.tensor(sorted(set(tail)), dtype=torch.long)
        self.tail_weight = check_tail_weight(tail_weight)

    def group_loss(self, per_sample_loss: Tensor, target: Tensor, group: Optional[int]) -> Tensor:
        """``L_head = sum_{y_i not in T} l_i / B`` (group 0), ``L_tail = tail_weight * sum_{y_i in T} l_i / B``
        (group 1), or ``L_head + L_tail`` (``group=None``, a plain step)."""
        if per_sample_loss.ndim != 1 or per_sample_loss.shape != target.shape:
            raise ValueError(
                f"Expected per-sample losses and targets of the same shape [B], got {tuple(per_sample_loss.shape)} "
                f"and {tuple(target.shape)}"
            )
        in_tail = tail_mask(target, self.tail_classes).to(per_sample_loss.dtype)
        if group is None:
            weights = 1 + (self.tail_weight - 1) * in_tail
        elif group == 0:
            weights = 1 - in_tail
        else:
            weights = self.tail_weight * in_tail
        return (per_sample_loss * weights).sum() / per_sample_loss.shape[0]

    def _plain_pass(self, closure: Callable[[], Any]) -> PassFn:
        def run_pass(group: Optional[int], first: bool, sync: bool) -> Optional[Tensor]:
            self.zero_grad()
            with torch.enable_grad():
                output = closure()
                if not (isinstance(output, (tuple, list)) and len(output) == 2):
                    raise ValueError(
                        f"{type(self).__name__}.step(closure): the closure must return (per_sample_loss, target) "
                        "without calling backward(), e.g. `return F.cross_entropy(model(x), y, reduction='none'), y`"
                    )
                per_sample_loss, target = output
                self.group_loss(per_sample_loss, target, group).backward()
            return per_sample_loss.detach().mean()

        return run_pass


class ImbSAM(_HeadTailSAM):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail-class loss only, a plain gradient for the head.

    ``g = grad L_head(w) + grad L_tail(w + e)`` with ``e = rho * grad L_tail(w) / (||grad L_tail(w)|| + eps)``,
    ``L_head = sum_{y_i not in T} l_i / B``, ``L_tail = tail_weight * sum_{y_i in T} l_i / B`` and ``T`` the
    tail classes (``n_c < eta``; eta 20 = the few-shot classes of CIFAR-100-LT). Three passes per step.

    The defaults reproduce the official step (cool-xuan/Imbalanced_SAM, ``utils/trainval.py::forbackward``
    and ``imbsam.py``): ``tail_weight=2`` (its ``tail_loss = loss[tail].sum() / B * 2``, in both tail
    passes), ``eps=1e-16`` and the same order of passes; ``tests/reference/test_imbsam.py`` checks 5 steps
    against a transcription of it to 1e-6.

    Args:
        base_optimizer: the optimizer that makes the update (SGD with momentum 0.9, wd 1e-3 in the paper).
        tail_classes: the class indices of ``T``.
        rho: radius of the tail-loss perturbation (0.05).
        tail_weight: ``lambda_t``, the factor on the tail loss (2.0, as published; 1.0: the plain batch-mean
            split ``L_head + L_tail = mean_i l_i``).
        adaptive: ASAM-style perturbation (``T = |w|``).
        sam_every: a sharpness-aware step every ``sam_every`` steps, a plain one (on ``L_head + L_tail``)
            otherwise.
        model: module whose BatchNorm running statistics only the first pass of a step may update.
        eps: added to the gradient norm (the official code's 1e-16).

    Raises:
        ValueError: a negative ``rho``, a ``tail_weight`` that is not > 0, negative ``tail_classes``.

    Example:
        >>> model = nn.Linear(2, 3)
        >>> optimizer = ImbSAM(torch.optim.SGD(model.parameters(), lr=0.1), tail_classes=[2], rho=0.05)
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 2])
        >>> loss = optimizer.step(lambda: (nn.functional.cross_entropy(model(x), y, reduction="none"), y))
        >>> print(optimizer.rhos, optimizer.tail_weight)
        [0.0, 0.05] 2.0
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        tail_classes: Sequence[int],
        rho: float = 0.05,
        tail_weight: float = 2.0,
        adaptive: bool = False,
        sam_every: int = 1,
        model: Optional[nn.Module] = None,
        eps: float = 1e-16,
    ) -> None:
        rhos = [0.0, check_rho("rho", rho)]
        super().__init__(base_optimizer, tail_classes, rhos, tail_weight, adaptive, sam_every, model, eps)


class SSESAM(_HeadTailSAM):
    """SSE-SAM (AAAI 2025), one stage: SAM with separate radii on the head and the tail loss.

    ``g = grad L_head(w + e_h) + grad L_tail(w + e_t)``, ``e_h = rho_head * grad L_head / (||.|| + eps)``,
    ``e_t = rho_tail * grad L_tail / (||.|| + eps)`` (four passes), ``L_head = sum_{y_i not in T} l_i / B``,
    ``L_tail = tail_weight * sum_{y_i in T} l_i / B``. Stage 2 of SSE-SAM is ``rho_head = 0``, i.e. the
    ImbSAM update with SSE-SAM's tail weight; :class:`lightning_lt.callbacks.SSESAM` switches stages by
    epoch, and in a plain loop :meth:`set_stage` does.

    The defaults reproduce the official step (Zemdalk/SSE-SAM, ``utils/trainval.py::forbackward`` with
    ``optim_mode='ssesam'`` and ``ssesam.py::SSESAM``): head and tail losses are divided by ``B`` with no
    further factor in both stages (``tail_weight=1``; unlike ImbSAM's code it does not double the tail
    loss), ``eps=1e-16``, passes in the order head at ``w``, head at ``w + e_h``, tail at ``w``, tail at
    ``w + e_t``. In stage 2 the official code still makes the head pass at ``w + 0 * e_h``; the gradient is
    that of the single head pass made here. ``tests/reference/test_ssesam.py`` checks both stages.

    Args:
        base_optimizer: the optimizer that makes the update.
        tail_classes: the class indices of ``T``.
        rho_head / rho_tail: the radii of the head and tail perturbations (0.05 / 0.10, the paper's).
        tail_weight: the factor on the tail loss (1.0, as in the official code).
        adaptive: ASAM-style perturbations.
        sam_every: a sharpness-aware step every ``sam_every`` steps, a plain one otherwise.
        model: module whose BatchNorm running statistics only the first pass of a step may update.
        eps: added to the gradient norm (the official code's 1e-16).

    Example:
        >>> model = nn.Linear(2, 3)
        >>> optimizer = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), tail_classes=[2])
        >>> optimizer.set_stage(2)
        >>> print(optimizer.rhos, optimizer.tail_weight)
        [0.0, 0.1] 1.0
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        tail_classes: Sequence[int],
        rho_head: float = 0.05,
        rho_tail: float = 0.10,
        tail_weight: float = 1.0,
        adaptive: bool = False,
        sam_every: int = 1,
        model: Optional[nn.Module] = None,
        eps: float = 1e-16,
    ) -> None:
        self.rho_head = check_rho("rho_head", rho_head)
        self.rho_tail = check_rho("rho_tail", rho_tail)
        rhos = [self.rho_head, self.rho_tail]
        super().__init__(base_optimizer, tail_classes, rhos, tail_weight, adaptive, sam_every, model, eps)

    def set_stage(self, stage: int) -> None:
        """Stage 1: ``(rho_head, rho_tail)``; stage 2: ``(0, rho_tail)`` (the ImbSAM update)."""
        if stage not in (1, 2):
            raise ValueError(f"Expected `stage` 1 or 2, got {stage!r}")
        self.rhos = [self.rho_head if stage == 1 else 0.0, self.rho_tail]
