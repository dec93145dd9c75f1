"""Long-tailed image classification as a LightningModule."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_lt.losses import (
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    LongTailLoss,
    MixedTarget,
    mixed_loss,
)
from lightning_lt.losses.base import check_target_range
from lightning_lt.metrics import LongTailAccuracy, shot_groups
from lightning_lt.nets import build_head
from lightning_lt.nets.heads import HEAD_BIAS_INITS, HEAD_INITS
from lightning_lt.tasks.base import (
    DEFAULT_PER_CLASS_SCALARS_MAX,
    TaskModule,
    check_class_info,
    check_per_class_scalars_max,
    check_saved,
    resolve_factory,
)
from lightning_lt.tasks.plotting import log_validation_accuracy_figure

#: A loss is given as a factory called with the training class counts, e.g. the class
#: ``lightning_lt.losses.LDAMLoss`` or ``functools.partial(LDAMLoss, max_m=0.5)``. In a config it is
#: written as ``class_path`` + ``init_args`` without ``class_counts`` (the data module provides them).
LossFactory = Callable[[Optional[Sequence[int]]], nn.Module]

HEADS = ("linear", "cosine", "none")

#: What each factory argument builds: a checkpoint saved in plain Python records a class or
#: ``functools.partial`` of one as ``class_path`` / ``init_args`` and rebuilds only these types from it.
FACTORY_TYPES: dict[str, tuple[type, ...]] = {
    "loss": (nn.Module,),
    "optimizer": (torch.optim.Optimizer,),
    "lr_scheduler": (LRScheduler, ReduceLROnPlateau),
}


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD as in the CIFAR-LT literature: lr 0.1, momentum 0.9, weight decay 2e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


class LongTailClassifier(TaskModule):
    """Image classification for long-tailed data: a backbone, a classifier head and a long-tail loss.

    Logs ``{stage}/acc`` (overall top-1), ``{stage}/balanced_acc`` (mean per-class accuracy),
    ``{stage}/acc_many|acc_medium|acc_few`` (mean per-class accuracy of the classes with more than
    ``many_threshold``, between, and fewer than ``few_threshold`` training images) and, when
    ``log_per_class``, ``{stage}/class_acc/<name>`` for every class. At the end of each validation epoch a
    figure of per-class accuracy against training count is logged to every configured logger.

    Args:
        backbone: feature extractor returning ``[B, D]`` features; must expose ``num_features`` (D)
            unless ``head="none"``, in which case it must return ``[B, num_classes]`` logits itself.
        num_classes: number of classes (linked from the data module by the ``lightning-lt`` CLI).
        class_counts: training images per class (linked from the data module by the CLI). Needed by
            prior-based losses, the many/medium/few split and post-hoc logit adjustment.
        class_names: optional class names for per-class logging (linked by the CLI).
        loss: factory called as ``loss(class_counts)`` returning the criterion: a class or a
            ``functools.partial`` (not an instance: the counts are only known here).
        head: ``"linear"``, ``"cosine"`` (normalised classifier; ``LDAMLoss`` with ``s != 1`` requires it) or
            ``"none"``.
        head_init: weight init of the linear head: ``"default"`` (PyTorch's), ``"kaiming_normal"``, or
            ``"auto"``: the backbone's ``head_init`` attribute if it has one (``CIFARResNet``:
            ``"kaiming_normal"``, as LDAM-DRW's ResNet-32 initialises its classifier), else ``"default"``.
        head_bias_init: bias of the linear head: ``"default"`` (PyTorch's), ``"zero"``, ``"sigmoid_prior"``
            (``-log(C - 1)``, every sigmoid starts at ``1 / C``: the initialisation of Cui et al. for the
            class-balanced sigmoid / focal loss; :func:`~lightning_lt.nets.heads.sigmoid_prior_bias`), or
            ``"auto"``: ``"sigmoid_prior"`` when the loss scores classes with sigmoids
            (``loss.sigmoid_outputs``, e.g. ``ClassBalancedLoss(loss_type="focal")``), else ``"default"``.
        optimizer: factory called with the parameters.
        lr_scheduler: optional factory called with the optimizer; stepped every epoch
            (``lr_scheduler_interval="epoch"``) or every optimizer step (``"step"``).
        posthoc_tau: if set, evaluation uses ``logits - posthoc_tau * log(prior)`` (post-hoc logit
            adjustment, Menon et al.); training is unchanged. Refused with ``LogitAdjustedLoss`` and
            ``BalancedSoftmaxLoss``, whose raw logits are already adjusted.
        many_threshold / few_threshold: shot-group thresholds (OLTR convention: 100 / 20).
        log_per_class: log the accuracy of every class (once per epoch).
        per_class_scalars_max: with ``log_per_class``, up to this many classes the per-class values are scalars
            through ``self.log`` (in ``callback_metrics``); above it they are logged once per epoch as one
            structured object (a single ``log_metrics`` call per logger), see
            :meth:`~lightning_lt.tasks.base.TaskModule.log_class_values`. Either way ``module.per_class_values``
            holds the last epoch's values.
        plot_per_class: log the per-class accuracy figure at the end of each validation epoch.

    Batch transforms: ``batch_transforms`` is a list of callables ``(x, y) -> (x, y)`` applied to every training batch
    before the forward pass; :class:`~lightning_lt.callbacks.Mixup` / :class:`~lightning_lt.callbacks.CutMix` add
    themselves to it. A transform may return a :class:`~lightning_lt.losses.MixedTarget` ``(y_a, y_b, lam)`` as the
    target; the training loss is then :func:`~lightning_lt.losses.mixed_loss`,
    ``lam * loss(logits, y_a) + (1 - lam) * loss(logits, y_b)``, and ``training_step`` returns the loss alone (no
    per-sample losses: the head / tail split of ImbSAM / SSE-SAM is undefined for mixed labels).

    A checkpoint saved in plain Python (not by the CLI, whose checkpoints hold the config) records ``loss``,
    ``optimizer`` and ``lr_scheduler`` given as a class or a ``functools.partial`` of one with plain keyword
    arguments as ``class_path`` / ``init_args``, so ``LongTailClassifier.load_from_checkpoint(path)`` rebuilds
    them; for the backbone and any other object it raises naming the argument to pass
    (``load_from_checkpoint(path, backbone=...)``) instead of silently using a default.

    Raises:
        ValueError: if ``class_counts`` does not have ``num_classes`` entries; ``head`` / ``head_init`` /
            ``head_bias_init`` is unknown; the backbone has no ``num_features``; ``loss`` (or ``optimizer`` /
            ``lr_scheduler``) is an instance instead of a factory; post-hoc adjustment is asked for without
            class counts or together with a loss that already adjusts the logits (``LogitAdjustedLoss``,
            ``BalancedSoftmaxLoss``); ``LDAMLoss`` (scale ``s != 1``) is paired with a linear head; or a
            checkpoint argument cannot be rebuilt.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        loss: LossFactory = CrossEntropyLoss,
        head: Literal["linear", "cosine", "none"] = "linear",
        head_init: Literal["auto", "default", "kaiming_normal"] = "auto",
        head_bias_init: Literal["auto", "default", "zero", "sigmoid_prior"] = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        posthoc_tau: Optional[float] = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        log_per_class: bool = True,
        per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX,
        plot_per_class: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        _check_choice(head, "head", HEADS)
        _check_choice(head_init, "head_init", ("auto", *HEAD_INITS))
        _check_choice(head_bias_init, "head_bias_init", ("auto", *HEAD_BIAS_INITS))
        backbone = check_saved(backbone, "backbone", owner)
        loss = resolve_factory(loss, "loss", owner, FACTORY_TYPES["loss"], "functools.partial(LDAMLoss, max_m=0.5)")
        optimizer = resolve_factory(
            optimizer, "optimizer", owner, FACTORY_TYPES["optimizer"], "functools.partial(torch.optim.SGD, lr=0.1)"
        )
        lr_scheduler = resolve_factory(
            lr_scheduler, "lr_scheduler", owner, FACTORY_TYPES["lr_scheduler"],
            "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=30)",
        )  # fmt: skip
        if posthoc_tau is not None and class_counts is None:
            raise ValueError(
                f"`posthoc_tau={posthoc_tau}` needs `class_counts` for the class prior. HINT: use the "
                "`lightning-lt` CLI (it links them from the data module) or pass `class_counts`."
            )
        self.save_config_hyperparameters(("backbone", "loss", "optimizer", "lr_scheduler"), FACTORY_TYPES)
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.class_names = names
        self.backbone = backbone
        self.loss = loss(class_counts)
        _check_loss_and_head(self.loss, head, posthoc_tau)
        self.head = self._build_head(backbone, head, num_classes, head_init, head_bias_init, self.loss)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.posthoc_tau = posthoc_tau
        self.log_per_class = log_per_class
        self.per_class_scalars_max = check_per_class_scalars_max(per_class_scalars_max)
        self.plot_per_class = plot_per_class
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        #: Callables ``(x, y) -> (x, y)`` applied to every training batch (Mixup / CutMix callbacks add themselves).
        self.batch_transforms: list[Callable[[Tensor, Tensor], tuple[Tensor, Any]]] = []
        self._transformed_batch: Optional[tuple[Any, Tensor, Any]] = None

        if class_counts is not None:
            counts = torch.tensor(class_counts, dtype=torch.float)
            self.register_buffer("log_prior", torch.log(counts / counts.sum()), persistent=False)
            metric_counts: Sequence[int] = class_counts
        else:
            self.register_buffer("log_prior", torch.empty(0), persistent=False)
            # Without training counts there are no shot groups: every class counts as "many".
            metric_counts = [many_threshold + 1] * num_classes
        self.has_shot_groups = class_counts is not None
        self.val_metric = LongTailAccuracy(metric_counts, many_threshold, few_threshold)
        self.test_metric = LongTailAccuracy(metric_counts, many_threshold, few_threshold)

    @staticmethod
    def _build_head(
        backbone: nn.Module, head: str, num_classes: int, init: str, bias_init: str, loss: nn.Module
    ) -> nn.Module:
        if head == "none":
            return nn.Identity()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError(
                f"The backbone {type(backbone).__name__} has no integer `num_features` attribute, so a "
                f"{head!r} head cannot be sized. HINT: use a lightning_lt.nets backbone, set "
                "`backbone.num_features` to its feature size, or use `head='none'` with a backbone that "
                "returns logits."
            )
        if init == "auto":  # the cosine head has its own init and ignores this
            init = getattr(backbone, "head_init", "default")
        if bias_init == "auto":  # the cosine head has no bias
            bias_init = "sigmoid_prior" if head == "linear" and getattr(loss, "sigmoid_outputs", False) else "default"
        return build_head(head, num_features, num_classes, init=init, bias_init=bias_init)

    # ----------------------------------------------------------------------------------------- model
    def forward(self, x: Tensor) -> Tensor:
        """Return the raw (training) logits ``[B, num_classes]``."""
        return self.head(self.backbone(x))

    def eval_logits(self, logits: Tensor) -> Tensor:
        """Logits used for evaluation: post-hoc logit adjusted when ``posthoc_tau`` is set."""
        if self.posthoc_tau is None:
            return logits
        return logits - self.posthoc_tau * self.log_prior.to(logits.dtype)

    # -------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Union[Tensor, dict[str, Tensor]]:
        """The batch loss; with a :mod:`lightning_lt.losses` loss also the per-sample losses and targets
        (``{"loss", "per_sample_loss", "target"}``, the protocol of the ImbSAM / SSE-SAM callbacks). A batch mixed by a
        :attr:`batch_transforms` entry gives the mixed loss alone."""
        x, y = self._transform_batch(batch)
        logits = self.training_logits(x)
        if isinstance(y, MixedTarget):
            self._check_target(y.y_a)
            loss = mixed_loss(self.loss, logits, y)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.y_a.shape[0])
            return loss
        self._check_target(y)
        if isinstance(self.loss, LongTailLoss) and self.loss.reduction == "mean":
            per_sample = self.loss.per_sample_loss(logits, y)
            loss = per_sample.mean()
            output: Union[Tensor, dict[str, Tensor]] = {"loss": loss, "per_sample_loss": per_sample, "target": y}
        else:
            loss = self.loss(logits, y)
            output = loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.shape[0])
        return output

    def _transform_batch(self, batch: Any) -> tuple[Tensor, Any]:
        """``(x, y)`` of a training batch after :attr:`batch_transforms`, drawn once per batch: the SAM-family callbacks
        run ``training_step`` several times on one batch, and every pass must see the same mixed images."""
        x, y = batch
        if not self.batch_transforms:
            return x, y
        cached = self._transformed_batch
        if cached is None or cached[0] is not batch:  # holding `batch` keeps its id from being reused
            for transform in self.batch_transforms:
                x, y = transform(x, y)
            self._transformed_batch = cached = (batch, x, y)
        return cached[1], cached[2]

    def training_logits(self, x: Tensor) -> Tensor:
        """The logits ``training_step`` scores for a (transformed) training batch ``x``: ``self(x)``."""
        return self(x)

    def _check_target(self, target: Tensor) -> None:
        """Labels outside ``[0, num_classes)`` raise (the lightning_lt losses check them themselves)."""
        if not isinstance(self.loss, LongTailLoss):
            check_target_range(target, self.num_classes, type(self).__name__)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.eval_logits(self(x)).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def _eval_step(self, batch: Any, stage: str, metric: LongTailAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self._check_target(y)
        self.update_eval_loss(stage, self.loss(logits, y), y.shape[0])
        metric.update(self.eval_logits(logits), y)

    def on_validation_epoch_end(self) -> None:
        self._plot_per_class(self._log_epoch_metrics("val", self.val_metric))

    def _plot_per_class(self, per_class: Tensor) -> None:
        """Log the per-class accuracy figure of a validation epoch (``plot_per_class``, rank zero, loggers set)."""
        log_validation_accuracy_figure(self, per_class)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metric)

    def _log_epoch_metrics(self, stage: str, metric: LongTailAccuracy) -> Tensor:
        self.log_eval_loss(stage)
        with warnings.catch_warnings():
            if not self.has_shot_groups:
                warnings.simplefilter("ignore")
            values = metric.compute()
        per_class = metric.per_class()
        keys = ["acc", "balanced_acc"] + (["acc_many", "acc_medium", "acc_few"] if self.has_shot_groups else [])
        # torchmetrics has already synchronised the values, so every rank holds the same numbers;
        # sync_dist only tells Lightning so (averaging equal values), keeping DDP runs warning-free.
        self.log_dict({f"{stage}/{k}": values[k] for k in keys}, sync_dist=True)
        if self.log_per_class:
            self.log_class_values(stage, "class_acc", self.class_names, per_class)
        metric.reset()
        return per_class


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown `{name}` {value!r} of LongTailClassifier: expected one of {tuple(choices)}.{hint}")


def _check_loss_and_head(loss: nn.Module, head: str, posthoc_tau: Optional[float]) -> None:
    """Refuse the combinations that train or evaluate silently wrong."""
    if isinstance(loss, LDAMLoss) and head == "linear" and loss.s != 1.0:
        raise ValueError(
            f"LDAMLoss multiplies the logits by s={loss.s} and subtracts margins up to {loss.max_m}, which assumes "
            "cosine logits in [-1, 1]; on a linear head's unbounded logits it trains to chance accuracy. HINT: "
            "use `head='cosine'` (the normalised classifier of LDAM-DRW), or `LDAMLoss(s=1.0)` to keep a linear "
            "head."
        )
    if posthoc_tau is not None and isinstance(loss, (LogitAdjustedLoss, BalancedSoftmaxLoss)):
        raise ValueError(
            f"`posthoc_tau={posthoc_tau}` with {type(loss).__name__} adjusts the logits twice: the loss already "
            "trains `f + tau * log(prior)`, so its raw logits are the balanced prediction, and post-hoc "
            "adjustment would subtract `tau * log(prior)` once more. HINT: drop `posthoc_tau` (predict with the "
            "raw logits), or train with `CrossEntropyLoss` to adjust post hoc."
        )


def shot_group_sizes(class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20) -> dict[str, int]:
    """Number of classes in each shot group (for summaries)."""
    groups = shot_groups(class_counts, many_threshold, few_threshold)
    return {name: int((groups == i).sum()) for i, name in enumerate(("many", "medium", "few"))}


__all__ = ["FACTORY_TYPES", "HEADS", "LongTailClassifier", "LossFactory", "default_optimizer", "shot_group_sizes"]

