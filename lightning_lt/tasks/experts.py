"""Multi-expert long-tailed classification (RIDE, SADE, DirMixE) as a LightningModule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_lt.losses.base import check_target_range
from lightning_lt.losses.experts import ExpertLoss, SADELoss, check_expert_logits
from lightning_lt.metrics import LongTailAccuracy
from lightning_lt.nets.experts import ExpertRouter
from lightning_lt.tasks.base import (
    DEFAULT_PER_CLASS_SCALARS_MAX,
    TaskModule,
    WeightedMean,
    check_class_info,
    check_per_class_scalars_max,
    resolve_factory,
)
from lightning_lt.tasks.classification import FACTORY_TYPES, default_optimizer
from lightning_lt.tasks.plotting import log_validation_accuracy_figure

__all__ = ["EXPERT_FACTORY_TYPES", "ExpertBackboneFactory", "ExpertLossFactory", "MultiExpertClassifier"]

#: A multi-expert backbone is given as a factory called with the number of classes, e.g. the class
#: ``lightning_lt.nets.MultiExpertCIFARResNet`` or ``functools.partial(MultiExpertCIFARResNet, num_experts=3)``; in a
#: config ``class_path`` + ``init_args`` without ``num_classes`` (the data module provides it).
ExpertBackboneFactory = Callable[[int], nn.Module]
#: An expert loss is a factory called with the training class counts (``class_path`` + ``init_args`` in a config).
ExpertLossFactory = Callable[[Optional[Sequence[int]]], nn.Module]

#: What each factory argument builds (see :data:`~lightning_lt.tasks.classification.FACTORY_TYPES`).
EXPERT_FACTORY_TYPES: dict[str, tuple[type, ...]] = {**FACTORY_TYPES, "backbone": (nn.Module,)}


class MultiExpertClassifier(TaskModule):
    """Image classification with a mixture of experts: per-expert logits ``[E, B, C]``, an expert loss, and the
    weighted mean of the experts' logits as the prediction.

    The prediction is ``sum_e w_e z_e`` with the ``expert_weights`` buffer ``w`` (``1 / E`` each by default: the
    official RIDE / SADE / DirMixE test-time output, the mean of the expert logits). Test-time aggregation
    (:class:`~lightning_lt.callbacks.TestTimeAggregation`) replaces ``w`` with weights learned on the test stream;
    the buffer is saved in checkpoints.

    Logs, like :class:`~lightning_lt.tasks.LongTailClassifier`, ``{stage}/acc``, ``{stage}/balanced_acc``,
    ``{stage}/acc_many|acc_medium|acc_few``, ``{stage}/loss`` (the cross-entropy of the aggregated logits, as the
    official losses compute without per-expert information) and per-class accuracies; and, per expert,
    ``{stage}/expert{e}/acc`` (and ``/acc_many``, ``/acc_medium``, ``/acc_few``), plus ``{stage}/equal_weights/acc``
    ... whenever the weights are not equal (the accuracy before aggregation). Epoch-dependent parts of the loss
    (RIDE's re-weighting, DirMixE's semi-variance and draws) are set by ``loss.set_epoch(epoch, max_epochs,
    batches_per_epoch)`` at the start of every training epoch, after Lightning has restored the epoch of a resumed
    run.

    Args:
        backbone: factory called as ``backbone(num_classes)`` returning a module with an integer ``num_experts``
            whose forward gives ``[E, B, num_classes]`` (:class:`~lightning_lt.nets.MultiExpertCIFARResNet`,
            :class:`~lightning_lt.nets.MultiExpertTorchvisionResNet`).
        num_classes: number of classes (linked from the data module by the ``lightning-lt`` CLI).
        class_counts: training images per class (linked by the CLI); required by the expert losses.
        class_names: optional class names (linked by the CLI).
        loss: factory called as ``loss(class_counts)``: :class:`~lightning_lt.losses.RIDELoss`,
            :class:`~lightning_lt.losses.SADELoss`, :class:`~lightning_lt.losses.DirMixELoss`, or any module called
            as ``loss(expert_logits, target)``.
        optimizer: factory called with the parameters.
        lr_scheduler: optional factory called with the optimizer.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``.
        expert_weights: ``E`` non-negative weights of the prediction (normalised to sum 1); ``None``: equal.
        many_threshold / few_threshold: shot-group thresholds (100 / 20).
        log_per_class: log the accuracy of every class.
        per_class_scalars_max: see :class:`~lightning_lt.tasks.LongTailClassifier`.
        plot_per_class: log the per-class accuracy figure at the end of each validation epoch.
        log_experts: log every expert's accuracies.
        router_top_choices: build RIDE's expert router (:class:`~lightning_lt.nets.experts.ExpertRouter`) reading
            this many top logits (RIDE: 30 for CIFAR-100); ``None``: no router.
        router_pos_weight: the router loss's positive weight (RIDE CIFAR-100: 100).
        train_router: train only the router, on the frozen experts (RIDE's second stage; the official one uses a
            class-balanced sampler, batch 512, SGD lr 0.01 with a 5-epoch cosine schedule). Load the trained experts
            first: ``MultiExpertClassifier.load_from_checkpoint(ride_ckpt, router_top_choices=30, train_router=True,
            strict=False)``.
        route: predict (validation, test, predict) with routed inference: expert ``i + 1`` runs only on the samples
            the router sends on, the prediction is the mean of the experts used (equal weights), and
            ``{stage}/experts_per_sample`` is logged instead of the per-expert accuracies.

    Raises:
        ValueError: the backbone has no ``num_experts >= 2``; the loss trains another number of experts than the
            backbone has; ``expert_weights`` has another length than the number of experts, or negative / non-finite
            values / zero sum; bad class information or factories.
    """

    expert_weights: Tensor

    def __init__(
        self,
        backbone: ExpertBackboneFactory,
        num_classes: int,
        class_counts: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        loss: ExpertLossFactory = SADELoss,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        expert_weights: Optional[Sequence[float]] = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        log_per_class: bool = True,
        per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX,
        plot_per_class: bool = True,
        log_experts: bool = True,
        router_top_choices: Optional[int] = None,
        router_pos_weight: float = 20.0,
        train_router: bool = False,
        route: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        class_counts, names = check_class_info(num_classes, class_counts, class_names)
        backbone = resolve_factory(
            backbone, "backbone", owner, EXPERT_FACTORY_TYPES["backbone"],
            "functools.partial(MultiExpertCIFARResNet, num_experts=3, reduce_dimension=True)",
        )  # fmt: skip
        loss = resolve_factory(loss, "loss", owner, EXPERT_FACTORY_TYPES["loss"], "functools.partial(SADELoss, tau=2.0)")
        optimizer = resolve_factory(
            optimizer, "optimizer", owner, EXPERT_FACTORY_TYPES["optimizer"], "functools.partial(torch.optim.SGD, lr=0.1)"
        )
        lr_scheduler = resolve_factory(
            lr_scheduler, "lr_scheduler", owner, EXPERT_FACTORY_TYPES["lr_scheduler"],
            "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=30)",
        )  # fmt: skip
        self.save_config_hyperparameters(("backbone", "loss", "optimizer", "lr_scheduler"), EXPERT_FACTORY_TYPES)
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.class_names = names
        self.backbone = backbone(num_classes)
        num_experts = getattr(self.backbone, "num_experts", None)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(
                f"{owner} needs a multi-expert backbone with an integer `num_experts` >= 2 whose forward returns "
                f"[E, B, C], got {type(self.backbone).__name__} (num_experts={num_experts!r}). HINT: use "
                "lightning_lt.nets.MultiExpertCIFARResNet or MultiExpertTorchvisionResNet; for a single model use "
                "LongTailClassifier."
            )
        self.num_experts = num_experts
        self.loss = loss(class_counts)
        required = getattr(self.loss, "num_experts", None)
        if required is not None and required != num_experts:
            raise ValueError(
                f"{type(self.loss).__name__} trains exactly {required} experts but the backbone "
                f"{type(self.backbone).__name__} has {num_experts}. HINT: build the backbone with "
                f"`num_experts={required}` (`--model.init_args.backbone.init_args.num_experts={required}`)."
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.register_buffer("expert_weights", torch.full((num_experts,), 1.0 / num_experts))
        if expert_weights is not None:
            self.set_expert_weights(expert_weights)
        self.log_per_class = log_per_class
        self.per_class_scalars_max = check_per_class_scalars_max(per_class_scalars_max)
        self.plot_per_class = plot_per_class
        self.log_experts = log_experts
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.has_shot_groups = class_counts is not None
        metric_counts = class_counts if class_counts is not None else [many_threshold + 1] * num_classes

        def metric() -> LongTailAccuracy:
            return LongTailAccuracy(metric_counts, many_threshold, few_threshold)

        self.val_metric, self.test_metric = metric(), metric()
        self.expert_metrics = nn.ModuleDict(
            {stage: nn.ModuleList(metric() for _ in range(num_experts)) for stage in ("val", "test")}
        )
        self.equal_weight_metrics = nn.ModuleDict({stage: metric() for stage in ("val", "test")})
        self.router: Optional[ExpertRouter] = None
        if router_top_choices is not None:
            if not all(callable(getattr(self.backbone, name, None)) for name in ("shared", "expert_output")):
                raise ValueError(
                    f"The expert router needs a backbone with `shared(x)` and `expert_output(shared, e)`, which "
                    f"{type(self.backbone).__name__} lacks. HINT: use lightning_lt.nets.MultiExpertCIFARResNet or "
                    "MultiExpertTorchvisionResNet."
                )
            self.router = ExpertRouter(
                num_experts, self.backbone.num_features, router_top_choices, pos_weight=router_pos_weight
            )
        if (train_router or route) and self.router is None:
            raise ValueError(
                f"`train_router={train_router}` / `route={route}` need RIDE's expert router. HINT: set "
                "`router_top_choices` (RIDE: 30 for CIFAR-100, at most the number of classes)."
            )
        self.train_router, self.route = bool(train_router), bool(route)
        if self.train_router:  # RIDE trains the router on frozen experts (no gradients: the optimizer skips them)
            self.backbone.requires_grad_(False)
        self.routed_experts = nn.ModuleDict({"val": WeightedMean(), "test": WeightedMean()})

    # ------------------------------------------------------------------------------------------- weights
    def set_expert_weights(self, weights: Union[Tensor, Sequence[float]]) -> None:
        """Set the prediction's expert weights (normalised to sum 1).

        Raises:
            ValueError: another number of weights than experts, negative or non-finite values, or a zero sum.
        """
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().flatten()
        if w.numel() != self.num_experts:
            raise ValueError(
                f"Got {w.numel()} expert weights but the backbone has {self.num_experts} experts. HINT: pass one weight "
                f"per expert ({self.num_experts})."
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"Expected finite, non-negative expert weights with a positive sum, got {w.tolist()}.")
        self.expert_weights.copy_((w / w.sum()).to(self.expert_weights))

    @property
    def equal_weights(self) -> bool:
        """Whether the prediction is the plain mean of the experts (all weights ``1 / E``)."""
        return bool(torch.allclose(self.expert_weights, torch.full_like(self.expert_weights, 1.0 / self.num_experts)))

    # --------------------------------------------------------------------------------------------- model
    def expert_logits(self, x: Tensor) -> Tensor:
        """Logits of every expert, ``[E, B, num_classes]``."""
        return self.backbone(x)

    def aggregate(self, expert_logits: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """``sum_e w_e z_e`` ``[B, C]`` of ``expert_logits`` ``[E, B, C]`` (``w``: :attr:`expert_weights` by default)."""
        w = self.expert_weights if weights is None else weights
        return torch.einsum("e,ebc->bc", w.to(expert_logits.dtype), expert_logits)

    def forward(self, x: Tensor) -> Tensor:
        """The aggregated logits ``[B, num_classes]``."""
        return self.aggregate(self.expert_logits(x))

    def eval_logits(self, logits: Tensor) -> Tensor:
        """Logits used for evaluation (the aggregated logits as they are; the protocol of
        :class:`~lightning_lt.tasks.LongTailClassifier`)."""
        return logits

    # -------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.train_router:
            self.backbone.eval()  # frozen experts, BatchNorm statistics included
        if isinstance(self.loss, ExpertLoss) and not self.train_router:
            trainer = self.trainer
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
            batches = trainer.num_training_batches
            batches = int(batches) * trainer.world_size if math.isfinite(batches) else None
            self.loss.set_epoch(self.current_epoch, max_epochs, batches)

    def on_validation_model_train(self) -> None:
        super().on_validation_model_train()
        if self.train_router:  # back from a validation inside an epoch: the experts stay frozen
            self.backbone.eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if self.train_router:
            with torch.no_grad():
                shared = self.backbone.shared(x)
                outputs = [self.backbone.expert_output(shared, e) for e in range(self.num_experts)]
            features, logits = torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])
            loss = self.router.loss(features, logits, y)  # type: ignore[union-attr]
            self.log("train/router_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.shape[0])
            return loss
        expert_logits = self.expert_logits(x)
        if isinstance(self.loss, ExpertLoss):
            # The batch's position among all processes' batches of the epoch (DirMixE picks its draws by it).
            world = self.trainer.world_size if self._trainer is not None else 1
            rank = self.global_rank if self._trainer is not None else 0
            loss = self.loss(expert_logits, y, batch_index=batch_idx * world + rank)
        else:
            check_expert_logits(expert_logits, y, self.num_classes, owner=type(self).__name__)
            loss = self.loss(expert_logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=y.shape[0])
        return loss

    # ------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self.router.route(self.backbone, x)[0] if self.route else self(x)  # type: ignore[union-attr]
        probs = logits.softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def _eval_step(self, batch: Any, stage: str, metric: LongTailAccuracy) -> None:
        x, y = batch
        if self.route:  # RIDE's routed inference: later experts only where the router asks for them
            check_target_range(y, self.num_classes, type(self).__name__)
            logits, used = self.router.route(self.backbone, x)  # type: ignore[union-attr]
            self.update_eval_loss(stage, F.cross_entropy(logits, y), y.shape[0])
            self.routed_experts[stage].update(used.float().mean(), y.shape[0])
            metric.update(logits, y)
            return
        expert_logits = self.expert_logits(x)
        check_expert_logits(expert_logits, y, self.num_classes, owner=type(self).__name__)
        logits = self.aggregate(expert_logits)
        self.update_eval_loss(stage, F.cross_entropy(logits, y), y.shape[0])
        metric.update(logits, y)
        if self.log_experts:
            for e, expert_metric in enumerate(self.expert_metrics[stage]):
                expert_metric.update(expert_logits[e], y)
        if not self.equal_weights:
            self.equal_weight_metrics[stage].update(expert_logits.mean(dim=0), y)

    def on_validation_epoch_end(self) -> None:
        log_validation_accuracy_figure(self, self._log_epoch_metrics("val", self.val_metric))

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metric)

    def _group_values(self, metric: LongTailAccuracy, quiet: bool = False) -> dict[str, Tensor]:
        """``acc``, ``balanced_acc`` and the shot groups' accuracies; ``quiet``: no empty-group warning (the main
        metric has given it once)."""
        with warnings.catch_warnings():
            if quiet or not self.has_shot_groups:
                warnings.simplefilter("ignore")
            values = metric.compute()
        keys = ["acc", "balanced_acc"] + (["acc_many", "acc_medium", "acc_few"] if self.has_shot_groups else [])
        return {k: values[k] for k in keys}

    def _log_epoch_metrics(self, stage: str, metric: LongTailAccuracy) -> Tensor:
        self.log_eval_loss(stage)
        logged = {f"{stage}/{k}": v for k, v in self._group_values(metric).items()}
        per_class = metric.per_class()
        if self.route:
            logged[f"{stage}/experts_per_sample"] = self.routed_experts[stage].compute()
            self.routed_experts[stage].reset()
        elif self.log_experts:
            for e, expert_metric in enumerate(self.expert_metrics[stage]):
                logged.update({f"{stage}/expert{e}/{k}": v for k, v in self._group_values(expert_metric, True).items()})
                expert_metric.reset()
        if not self.equal_weights and not self.route:
            equal = self.equal_weight_metrics[stage]
            logged.update({f"{stage}/equal_weights/{k}": v for k, v in self._group_values(equal, True).items()})
            equal.reset()
        # torchmetrics has synchronised the values; sync_dist only averages equal numbers (warning-free DDP).
        self.log_dict(logged, sync_dist=True)
        if self.log_per_class:
            self.log_class_values(stage, "class_acc", self.class_names, per_class)
        metric.reset()
        return per_class
