"""Long-tailed image classification as a LightningModule."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_lt.losses import CrossEntropyLoss, LongTailLoss
from lightning_lt.metrics import LongTailAccuracy, shot_groups
from lightning_lt.nets import build_head
from lightning_lt.tasks.base import TaskModule, check_class_info, safe_metric_key
from lightning_lt.tasks.plotting import log_figure, per_class_accuracy_figure

#: A loss is given as a factory called with the training class counts, e.g. the class
#: ``lightning_lt.losses.LDAMLoss`` or ``functools.partial(LDAMLoss, max_m=0.5)``. In a config it is
#: written as ``class_path`` + ``init_args`` without ``class_counts`` (the data module provides them).
LossFactory = Callable[[Optional[Sequence[int]]], nn.Module]


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
        loss: factory called as ``loss(class_counts)`` returning the criterion.
        head: ``"linear"``, ``"cosine"`` (normalised classifier, for LDAM) or ``"none"``.
        optimizer: factory called with the parameters.
        lr_scheduler: optional factory called with the optimizer; stepped every epoch
            (``lr_scheduler_interval="epoch"``) or every optimizer step (``"step"``).
        posthoc_tau: if set, evaluation uses ``logits - posthoc_tau * log(prior)`` (post-hoc logit
            adjustment, Menon et al.); training is unchanged.
        many_threshold / few_threshold: shot-group thresholds (OLTR convention: 100 / 20).
        log_per_class: log one accuracy scalar per class.
        plot_per_class: log the per-class accuracy figure at the end of each validation epoch.

    Raises:
        ValueError: if ``class_counts`` does not have ``num_classes`` entries, if post-hoc adjustment is
            asked for without class counts, or if the backbone has no ``num_features``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        loss: LossFactory = CrossEntropyLoss,
        head: Literal["linear", "cosine", "none"] = "linear",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        posthoc_tau: Optional[float] = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        log_per_class: bool = True,
        plot_per_class: bool = True,
    ) -> None:
        super().__init__()
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        if posthoc_tau is not None and class_counts is None:
            raise ValueError(
                f"`posthoc_tau={posthoc_tau}` needs `class_counts` for the class prior. HINT: use the "
                "`lightning-lt` CLI (it links them from the data module) or pass `class_counts`."
            )
        self.save_config_hyperparameters(("backbone", "loss", "optimizer", "lr_scheduler"))
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.class_names = names
        self.backbone = backbone
        self.head = self._build_head(backbone, head, num_classes)
        self.loss = loss(class_counts)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.posthoc_tau = posthoc_tau
        self.log_per_class = log_per_class
        self.plot_per_class = plot_per_class
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold

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
    def _build_head(backbone: nn.Module, head: str, num_classes: int) -> nn.Module:
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
        return build_head(head, num_features, num_classes)

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
        (``{"loss", "per_sample_loss", "target"}``, the protocol of the ImbSAM / SSE-SAM callbacks)."""
        x, y = batch
        logits = self(x)
        if isinstance(self.loss, LongTailLoss) and self.loss.reduction == "mean":
            per_sample = self.loss.per_sample_loss(logits, y)
            loss = per_sample.mean()
            output: Union[Tensor, dict[str, Tensor]] = {"loss": loss, "per_sample_loss": per_sample, "target": y}
        else:
            loss = self.loss(logits, y)
            output = loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.shape[0])
        return output

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
        self.update_eval_loss(stage, self.loss(logits, y), y.shape[0])
        metric.update(self.eval_logits(logits), y)

    def on_validation_epoch_end(self) -> None:
        per_class = self._log_epoch_metrics("val", self.val_metric)
        if (
            self.plot_per_class
            and self.class_counts is not None
            and not self.trainer.sanity_checking
            and self.trainer.is_global_zero
            and self.loggers
        ):
            figure = per_class_accuracy_figure(
                self.class_counts, per_class.cpu().tolist(), self.many_threshold, self.few_threshold,
                title=f"per-class accuracy, epoch {self.current_epoch}",
            )
            for logger in self.loggers:
                log_figure(logger, "val/per_class_accuracy", figure, step=self.global_step)

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
            self.log_dict(
                {f"{stage}/class_acc/{safe_metric_key(name)}": per_class[i] for i, name in enumerate(self.class_names)},
                sync_dist=True,
            )
        metric.reset()
        return per_class


def shot_group_sizes(class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20) -> dict[str, int]:
    """Number of classes in each shot group (for summaries)."""
    groups = shot_groups(class_counts, many_threshold, few_threshold)
    return {name: int((groups == i).sum()) for i, name in enumerate(("many", "medium", "few"))}


__all__ = ["LongTailClassifier", "LossFactory", "default_optimizer", "shot_group_sizes"]

