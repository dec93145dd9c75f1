"""Sharpness-aware training as drop-in callbacks: SAM / ASAM, ImbSAM, SSE-SAM and stage-wise switching.

Add one to the ``Trainer`` of a LightningModule that uses automatic optimization; the module is not
changed. At fit start the callback wraps the module's optimizer in a :mod:`lightning_lt.optim.sam`
wrapper (sharing its parameter groups, so LR schedulers keep driving it, and passing its state dict
through, so checkpoints are those of the base optimizer) and turns every optimizer step into several
forward/backward passes through Lightning's own closure:

* only the first pass of a step (at the unperturbed weights) logs: ``self.log`` calls and torchmetrics
  updates made in ``training_step`` by the other passes are dropped, so nothing is double-counted;
* only the first pass updates BatchNorm running statistics;
* under DDP the perturbation passes run under ``no_sync()`` (each process perturbs with its own
  gradient, as in the SAM paper); the passes whose gradients make the update are all-reduced.

ImbSAM and SSE-SAM split the batch loss into head-class and tail-class parts. They need per-sample
losses and targets from ``training_step``, by this protocol::

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_sample_loss = F.cross_entropy(self(x), y, reduction="none")   # [B]
        return {"loss": per_sample_loss.mean(), "per_sample_loss": per_sample_loss, "target": y}

(``loss`` must equal ``per_sample_loss.mean()``: the callbacks optimise the per-sample losses, so a
weighting applied to ``loss`` only would be lost; the first step of every epoch checks it, to a relative
tolerance of 1e-4, and raises otherwise.)
:class:`~lightning_lt.tasks.LongTailClassifier` follows it. The group losses are
``L_head = sum_{y_i not in T} l_i / B`` and ``L_tail = tail_weight * sum_{y_i in T} l_i / B`` (2 for
ImbSAM, 1 for SSE-SAM, as their official code); a plain step (``sam_every``) back-propagates
``L_head + L_tail``. What is logged is unchanged: ``self.log`` in ``training_step`` sees the module's own
``loss`` of the first pass, and ``on_train_batch_end`` gets that ``loss`` too, not the weighted objective.

Limits, checked at ``setup`` with a message that says what to do: automatic optimization only, one
optimizer, ``accumulate_grad_batches=1``, precision ``32-true`` / ``bf16-mixed`` (``16-mixed`` steps
through a GradScaler without a closure, so a second pass is impossible there). Gradient clipping
configured on the Trainer applies to each pass's gradient. ``on_train_batch_end`` hooks receive the
``outputs`` of the first pass (the unperturbed, whole-batch ``training_step`` output).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_lt.callbacks.stages import StageCallback
from lightning_lt.optim import sam as sam_optim
from lightning_lt.optim.rho import RhoSchedule, check_rho

__all__ = ["SAM", "ImbSAM", "OptimizerStages", "SSESAM", "SAMAdapter"]

#: A factory wrapping the module's base optimizer, e.g. ``functools.partial(lightning_lt.optim.SAM, rho=0.1)``
#: or, in a config, ``{class_path: lightning_lt.optim.SAM, init_args: {rho: 0.1}}``.
OptimizerWrapper = Callable[[Optimizer], Optimizer]

PROTOCOL_HINT = (
    "return {'loss': per_sample_loss.mean(), 'per_sample_loss': per_sample_loss, 'target': target} from "
    "training_step, with per_sample_loss = criterion(logits, target) un-reduced ([B]); "
    "lightning_lt.tasks.LongTailClassifier does this"
)


def tail_classes_of(class_counts: Any, tail_threshold: int, owner: str) -> list[int]:
    """Classes with fewer than ``tail_threshold`` training samples."""
    if class_counts is None:
        raise ValueError(
            f"{owner} needs the training class counts as `class_counts` on the LightningModule to find the tail "
            "classes. LongTailClassifier has them (the lightning-lt CLI links data.class_counts); for your own "
            "module set `self.class_counts = datamodule.class_counts`."
        )
    counts = [int(c) for c in (class_counts.tolist() if isinstance(class_counts, Tensor) else class_counts)]
    tail = [c for c, n in enumerate(counts) if n < tail_threshold]
    if not tail:
        rank_zero_warn(
            f"{owner}: no class has fewer than tail_threshold={tail_threshold} training samples "
            f"(smallest class: {min(counts)}), so the tail loss is always empty. Raise `tail_threshold`."
        )
    return tail


class SAMAdapter:
    """Runs a :class:`~lightning_lt.optim.sam.GroupSAM` wrapper inside Lightning's automatic optimization.

    Used by the SAM-family callbacks; holds the trainer checks, the optimizer installation, the pass
    contexts (DDP ``no_sync``, quiet logging) and the group-loss selection of ``training_step``.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.wrapper: Optional[sam_optim.GroupSAM] = None
        self._group: Optional[int] = None
        self._ddp_model: Optional[DistributedDataParallel] = None
        self._pl_module: Optional[pl.LightningModule] = None
        self._original_training_step: Optional[Callable[..., Any]] = None
        self._batch_loss: Optional[Tensor] = None  # whole-batch loss of the current pass (head/tail methods)
        #: ``sam_steps`` of the wrapper saved in a checkpoint, given to the next wrapper installed.
        self._restored_sam_steps: Optional[int] = None
        #: whether `loss == per_sample_loss.mean()` was checked (at the first step after install and of each epoch)
        self._loss_checked = False

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's step count (which steps are SAM steps with ``sam_every > 1``), for checkpoints."""
        return {"sam_steps": None if self.wrapper is None else self.wrapper.sam_steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._restored_sam_steps = state_dict.get("sam_steps")

    # ----------------------------------------------------------------------------------- checks
    def check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{self.owner} turns optimizer steps into SAM steps under automatic optimization, but "
                f"{type(pl_module).__name__} uses manual optimization. Use lightning_lt.optim.SAM / ImbSAM / "
                "SSESAM directly in your training_step (optimizer.step(closure))."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"{self.owner} needs two or more forward/backward passes per step, but precision="
                f"{trainer.precision!r} steps through a GradScaler that calls the closure once and then steps "
                "without it. Use precision='bf16-mixed' (no scaler) or '32-true'."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{self.owner} does not support gradient accumulation (accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): every SAM pass needs the gradient of the same batch. Use "
                "accumulate_grad_batches=1 with a larger batch size (or more devices)."
            )

    # ------------------------------------------------------------------------------- install
    def install(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, factory: Callable[[Optimizer], Optimizer]
    ) -> Optimizer:
        """Wrap the module's (base) optimizer with ``factory`` and hand it to the trainer."""
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"{self.owner} supports exactly one optimizer, but configure_optimizers returned {len(optimizers)}."
            )
        base = getattr(optimizers[0], "base_optimizer", optimizers[0])
        wrapper = factory(base)
        if isinstance(wrapper, sam_optim.GroupSAM):
            wrapper.model = pl_module
            wrapper.lightning_pass = self.lightning_pass
            if self._restored_sam_steps is not None:  # resumed: continue the sam_every cycle
                wrapper.sam_steps = int(self._restored_sam_steps)
            self.wrapper = wrapper
        else:
            self.wrapper = None
        self._restored_sam_steps = None
        self._loss_checked = False
        self._pl_module = pl_module
        model = trainer.strategy.model
        self._ddp_model = model if isinstance(model, DistributedDataParallel) else None
        trainer.strategy.optimizers = [wrapper]
        return wrapper

    def uninstall(self, trainer: pl.Trainer) -> None:
        """Give the trainer its base optimizer back and undo the training_step patch."""
        optimizers = trainer.strategy.optimizers
        if optimizers and hasattr(optimizers[0], "base_optimizer"):
            trainer.strategy.optimizers = [optimizers[0].base_optimizer]
        self.unpatch_training_step()
        self.wrapper = None

    def patch_training_step(self, pl_module: pl.LightningModule) -> None:
        """Make ``training_step`` return the loss of the current group (head / tail) for the pass."""
        if self._original_training_step is not None:
            return
        original = pl_module.training_step
        self._original_training_step = original
        adapter = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            wrapper = adapter.wrapper
            if not isinstance(wrapper, sam_optim._HeadTailSAM):
                return output
            if not (isinstance(output, Mapping) and "per_sample_loss" in output and "target" in output):
                raise ValueError(
                    f"{adapter.owner} needs per-sample losses and targets from "
                    f"{type(pl_module).__name__}.training_step, which returned "
                    f"{type(output).__name__ if not isinstance(output, Mapping) else sorted(output)}. "
                    f"HINT: {PROTOCOL_HINT}."
                )
            if not adapter._loss_checked:
                adapter.check_protocol_loss(output["loss"], output["per_sample_loss"], type(pl_module).__name__)
                adapter._loss_checked = True
            adapter._batch_loss = output["loss"]
            # group None: a plain step's pass, L_head + L_tail with the same tail weight
            loss = wrapper.group_loss(output["per_sample_loss"], output["target"], adapter._group)
            return {**output, "loss": loss}

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def recheck_protocol_loss(self) -> None:
        """Check ``loss == per_sample_loss.mean()`` again at the next step."""
        self._loss_checked = False

    def check_protocol_loss(self, loss: Any, per_sample_loss: Tensor, module_name: str) -> None:
        """Raise unless ``loss`` equals ``per_sample_loss.mean()``, to a relative tolerance of 1e-4 (1e-2 when
        either is half precision)."""
        if not isinstance(loss, Tensor) or per_sample_loss.numel() == 0:
            return
        half = {torch.float16, torch.bfloat16} & {loss.dtype, per_sample_loss.dtype}
        mean = per_sample_loss.detach().double().mean()
        if loss.numel() == 1:
            value = loss.detach().double().reshape(())
            if torch.isclose(value, mean, rtol=1e-2 if half else 1e-4, atol=1e-6):
                return
            got = f"{value.item():.6g}"
        else:
            got = f"of shape {tuple(loss.shape)}"
        raise ValueError(
            f"{self.owner}: {module_name}.training_step returned a `loss` ({got}) that is not the mean of its "
            f"`per_sample_loss` ({mean.item():.6g}). {self.owner} back-propagates the head and tail parts of "
            "`per_sample_loss`, so it would optimise the per-sample losses and silently drop whatever `loss` adds "
            "(e.g. class weights). Fix: return per-sample losses whose mean is `loss`, e.g. with per-class weights "
            "w: `per_sample_loss = w[y] * l * len(y) / w[y].sum()` and `loss = per_sample_loss.mean()` (a "
            "lightning_lt loss gives them as `loss_fn.per_sample_loss(logits, y)`)."
        )

    def unpatch_training_step(self) -> None:
        if self._original_training_step is not None and self._pl_module is not None:
            if "training_step" in vars(self._pl_module):
                del self._pl_module.training_step
        self._original_training_step = None

    # ----------------------------------------------------------------------------------- passes
    def lightning_pass(
        self, closure: Callable[[], Any], group: Optional[int], first: bool, sync: bool
    ) -> Optional[Tensor]:
        """One forward/backward pass through Lightning's closure (which zeroes the gradients itself)."""
        no_sync = self._ddp_model.no_sync() if (self._ddp_model is not None and not sync) else nullcontext()
        quiet = nullcontext() if first else _quiet_pass(self._pl_module)
        # Lightning hands `on_train_batch_end` the result its closure stored last; keep the first pass's.
        stored = _stored_closure_result(closure)
        first_result = None if first or stored is None else stored._result
        self._group = group
        self._batch_loss = None
        try:
            with no_sync, quiet:
                loss = closure()
        finally:
            self._group = None
            if first_result is not None:
                stored._result = first_result
        if first and stored is not None and self._batch_loss is not None and hasattr(stored._result, "loss"):
            # a head/tail pass backpropagates its group loss; report the module's whole-batch loss
            stored._result.loss = self._batch_loss.detach()
        return loss


def _stored_closure_result(closure: Any) -> Any:
    """Lightning's ``Closure`` behind the precision plugin's ``partial(_wrap_closure, model, optimizer,
    closure)``, or ``None`` where Lightning's internals differ (then the last pass's result is kept)."""
    inner = closure.args[-1] if isinstance(closure, functools.partial) and closure.args else closure
    return inner if hasattr(inner, "_result") else None


@contextmanager
def _quiet_pass(pl_module: Optional[pl.LightningModule]) -> Iterator[None]:
    """Drop ``self.log`` calls and torchmetrics updates made during an extra SAM pass."""
    if pl_module is None:
        yield
        return
    from torchmetrics import Metric

    snapshots = []
    for metric in pl_module.modules():
        if isinstance(metric, Metric):
            state = {
                name: value.clone() if isinstance(value, Tensor) else list(value)
                for name, value in metric.metric_state.items()
            }
            snapshots.append((metric, state, metric._update_count, metric._computed))
    pl_module.log = _no_log  # type: ignore[method-assign]
    pl_module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        for metric, state, count, computed in snapshots:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count = count
            metric._computed = computed


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


class _AdapterCallback(StageCallback):
    """A stage callback that installs optimizer wrappers through a :class:`SAMAdapter`: the trainer checks,
    removal of the wrapper when fit ends, and the wrapper's step count in the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = SAMAdapter(type(self).__name__)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.adapter.check_trainer(trainer, pl_module)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule, factory: OptimizerWrapper) -> None:
        self.adapter.install(trainer, pl_module, factory)
        self.adapter.patch_training_step(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.uninstall(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.adapter.uninstall(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.recheck_protocol_loss()  # loss weights (e.g. DRW) change at epoch starts
        super().on_train_epoch_start(trainer, pl_module)

    @property
    def optimizer(self) -> Optional[sam_optim.GroupSAM]:
        """The installed wrapper (during ``fit``)."""
        return self.adapter.wrapper

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.adapter.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.adapter.load_state_dict(state_dict)


class _SAMFamily(_AdapterCallback):
    """SAM-family callbacks: the wrapper of :meth:`make_wrapper` is installed when fit starts."""

    def make_wrapper(self, base: Optimizer, pl_module: pl.LightningModule) -> Optimizer:
        raise NotImplementedError(f"{type(self).__name__} must implement `make_wrapper(base, pl_module)`")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.install(trainer, pl_module, lambda base: self.make_wrapper(base, pl_module))
        super().on_fit_start(trainer, pl_module)


def _check_threshold(tail_threshold: int) -> int:
    if isinstance(tail_threshold, bool) or not isinstance(tail_threshold, int) or tail_threshold < 1:
        raise ValueError(f"Expected `tail_threshold` to be an integer >= 1 (n_c < tail_threshold is tail), got {tail_threshold!r}")
    return tail_threshold


class SAM(_SAMFamily):
    """SAM / ASAM for any LightningModule with automatic optimization: two passes per optimizer step.

    Args:
        rho: radius (0.05 for SAM; ASAM needs about 10x). Ignored when ``rho_schedule`` is given.
        adaptive: ASAM (scale-invariant perturbation).
        rho_schedule: ``rho`` by epoch (:mod:`lightning_lt.optim.rho`: constant, step, linear).
        sam_every: the efficient option: a SAM step every ``sam_every`` steps, a plain step otherwise
            (cost ``(k + 1) / k`` passes instead of 2; ``k = 1`` is SAM).

    Example:
        >>> callback = SAM(rho=0.1)
        >>> callback.rho_at(150)
        0.1
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        rho_schedule: Optional[RhoSchedule] = None,
        sam_every: int = 1,
    ) -> None:
        super().__init__()
        self.rho = check_rho("rho", rho)
        self.adaptive = adaptive
        self.rho_schedule = rho_schedule
        self.sam_every = sam_optim._check_sam_every(sam_every)

    def rho_at(self, epoch: int) -> float:
        return float(self.rho_schedule(epoch)) if self.rho_schedule is not None else self.rho

    def make_wrapper(self, base: Optimizer, pl_module: pl.LightningModule) -> Optimizer:
        return sam_optim.SAM(base, rho=self.rho_at(0), adaptive=self.adaptive, sam_every=self.sam_every)

    def stage_at(self, epoch: int, trainer: pl.Trainer) -> Hashable:
        return self.rho_at(epoch)

    def apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable) -> None:
        self.adapter.wrapper.rhos = [float(stage)]  # type: ignore[union-attr]

    def describe_stage(self, stage: Hashable) -> str:
        return f"rho={stage}"


class ImbSAM(_SAMFamily):
    """ImbSAM: SAM on the tail-class loss only (classes with ``n_c < tail_threshold``), three passes a step.

    ``g = grad L_head(w) + grad L_tail(w + e)`` with ``L_head = sum_{y_i not in T} l_i / B`` and
    ``L_tail = tail_weight * sum_{y_i in T} l_i / B``. The defaults reproduce the official step
    (cool-xuan/Imbalanced_SAM, ``utils/trainval.py``): ``tail_weight=2`` as its ``... / B * 2``, rho 0.05,
    eta 20 (see :class:`lightning_lt.optim.ImbSAM`). Needs the per-sample protocol of this module's
    docstring and ``class_counts`` on the module.

    Args:
        rho: radius of the tail-loss perturbation (0.05).
        tail_threshold: ``eta``; classes with fewer training samples are the tail (20 = CIFAR-100-LT's
            few-shot classes).
        tail_weight: the factor on the tail loss (2.0, as published; 1.0 splits the batch-mean loss).
        adaptive: ASAM-style perturbation.
        sam_every: a sharpness-aware step every ``sam_every`` steps, a plain one (on ``L_head + L_tail``)
            otherwise.

    Example:
        >>> callback = ImbSAM(rho=0.05, tail_threshold=20)
        >>> callback.tail_weight
        2.0
    """

    def __init__(
        self,
        rho: float = 0.05,
        tail_threshold: int = 20,
        tail_weight: float = 2.0,
        adaptive: bool = False,
        sam_every: int = 1,
    ) -> None:
        super().__init__()
        self.rho = check_rho("rho", rho)
        self.tail_threshold = _check_threshold(tail_threshold)
        self.tail_weight = sam_optim.check_tail_weight(tail_weight)
        self.adaptive = adaptive
        self.sam_every = sam_optim._check_sam_every(sam_every)

    def make_wrapper(self, base: Optimizer, pl_module: pl.LightningModule) -> Optimizer:
        tail = tail_classes_of(getattr(pl_module, "class_counts", None), self.tail_threshold, type(self).__name__)
        return sam_optim.ImbSAM(
            base, tail, rho=self.rho, tail_weight=self.tail_weight, adaptive=self.adaptive, sam_every=self.sam_every
        )

    def stage_at(self, epoch: int, trainer: pl.Trainer) -> Hashable:
        return "imbsam"

    def apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable) -> None:
        self.adapter.wrapper.rhos = [0.0, self.rho]  # type: ignore[union-attr]


class SSESAM(_SAMFamily):
    """SSE-SAM: stage 1 perturbs head and tail losses separately (4 passes), stage 2 is ImbSAM's update.

    ``L_head = sum_{y_i not in T} l_i / B``, ``L_tail = tail_weight * sum_{y_i in T} l_i / B``; the defaults
    reproduce the official step (Zemdalk/SSE-SAM, ``utils/trainval.py``): no factor on either loss in
    either stage (``tail_weight=1``; so stage 2 is the ImbSAM update *without* ImbSAM's doubled tail loss),
    rho_head 0.05, rho_tail 0.10, eta 100, gamma 0.7 (its README). See :class:`lightning_lt.optim.SSESAM`.

    Stage 2 starts at the first epoch ``e`` with ``e >= gamma * max_epochs`` (the official code counts
    finished epochs and switches once the count reaches ``gamma * total_epochs``), i.e. epoch
    ``ceil(gamma * max_epochs)``: 140 of 200 with gamma 0.7. ``gamma = 0`` trains in stage 2 throughout
    (the official code crashes there); ``gamma >= 1`` stays in stage 1.

    Args:
        rho_head / rho_tail: radii of the head and tail perturbations (0.05 / 0.10).
        tail_threshold: ``eta``; classes with fewer training samples are the tail (100 in the paper).
        gamma: fraction of ``max_epochs`` trained in stage 1 (0.7).
        tail_weight: the factor on the tail loss (1.0, as in the official code).
        adaptive: ASAM-style perturbations.
        sam_every: a sharpness-aware step every ``sam_every`` steps, a plain one otherwise.
    """

    def __init__(
        self,
        rho_head: float = 0.05,
        rho_tail: float = 0.10,
        tail_threshold: int = 100,
        gamma: float = 0.7,
        tail_weight: float = 1.0,
        adaptive: bool = False,
        sam_every: int = 1,
    ) -> None:
        super().__init__()
        self.rho_head = check_rho("rho_head", rho_head)
        self.rho_tail = check_rho("rho_tail", rho_tail)
        self.tail_threshold = _check_threshold(tail_threshold)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma:
            raise ValueError(f"Expected `gamma` (fraction of training in stage 1) to be >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.tail_weight = sam_optim.check_tail_weight(tail_weight)
        self.adaptive = adaptive
        self.sam_every = sam_optim._check_sam_every(sam_every)

    def switch_epoch(self, trainer: pl.Trainer) -> int:
        """First epoch of stage 2."""
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                "SSESAM switches stage at gamma * max_epochs, but the Trainer has no max_epochs. Set "
                "Trainer(max_epochs=...)."
            )
        return math.ceil(round(self.gamma * max_epochs, 9))

    def make_wrapper(self, base: Optimizer, pl_module: pl.LightningModule) -> Optimizer:
        tail = tail_classes_of(getattr(pl_module, "class_counts", None), self.tail_threshold, type(self).__name__)
        return sam_optim.SSESAM(
            base, tail, rho_head=self.rho_head, rho_tail=self.rho_tail, tail_weight=self.tail_weight,
            adaptive=self.adaptive, sam_every=self.sam_every,
        )

    def stage_at(self, epoch: int, trainer: pl.Trainer) -> Hashable:
        return 1 if epoch < self.switch_epoch(trainer) else 2

    def apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable) -> None:
        self.adapter.wrapper.set_stage(int(stage))  # type: ignore[union-attr]

    def describe_stage(self, stage: Hashable) -> str:
        return "1 (head and tail perturbed)" if stage == 1 else "2 (ImbSAM update: tail perturbed only)"


class OptimizerStages(_AdapterCallback):
    """Switch the optimizer wrapper by epoch: ``{first_epoch: wrapper or None}``.

    ``None`` trains with the module's own (base) optimizer; a wrapper is a factory called with the base
    optimizer, e.g. ``functools.partial(lightning_lt.optim.SAM, rho=0.05)``. The base optimizer (and its
    state, e.g. momentum) is the same in every stage, so a switch keeps it. Examples: SGD for 100 epochs,
    then SAM: ``{0: None, 100: partial(SAM, rho=0.05)}``; a rho schedule:
    ``{0: partial(SAM, rho=0.05), 100: partial(SAM, rho=0.1)}``. In a config::

        - class_path: lightning_lt.callbacks.OptimizerStages
          init_args:
            stages:
              0: null
              100: {class_path: lightning_lt.optim.SAM, init_args: {rho: 0.05}}

    Args:
        stages: first epoch of each stage -> wrapper factory or ``None``. Epochs before the first key use
            the base optimizer.
    """

    def __init__(self, stages: dict[int, Optional[OptimizerWrapper]]) -> None:
        super().__init__()
        if not stages:
            raise ValueError("Expected `stages` to map at least one first epoch to an optimizer wrapper (or None)")
        for epoch, factory in stages.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"Expected the keys of `stages` to be epochs >= 0, got {epoch!r}")
            if factory is not None and not callable(factory):
                raise ValueError(f"Expected stages[{epoch}] to be an optimizer wrapper factory or None, got {factory!r}")
        self.stages = dict(sorted(stages.items()))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(f is not None for f in self.stages.values()):
            super().setup(trainer, pl_module, stage)

    def stage_at(self, epoch: int, trainer: pl.Trainer) -> Hashable:
        started = [first for first in self.stages if first <= epoch]
        return started[-1] if started else -1

    def apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Hashable) -> None:
        factory = self.stages.get(int(stage))  # type: ignore[arg-type]
        if factory is None:
            self.adapter.uninstall(trainer)
            return
        self.install(trainer, pl_module, factory)

    def describe_stage(self, stage: Hashable) -> str:
        factory = self.stages.get(int(stage))  # type: ignore[arg-type]
        return f"from epoch {stage}: {'base optimizer' if factory is None else factory}"
