"""Second stages of two-stage long-tail methods: a classifier re-trained or re-scaled on a stage-1 backbone.

:class:`DecoupledClassifier` starts from a checkpoint of any :class:`~lightning_lt.tasks.LongTailClassifier` run
(``init_from``) and implements, by its options, the classifier stages of

* decoupling (Kang et al., ICLR 2020; github:facebookresearch/classifier-balancing): cRT (re-initialised classifier,
  class-balanced sampling), LWS (learned per-class scales on the frozen stage-1 classifier) and tau-normalisation
  (no training: class weights divided by their norm^tau, tau chosen on the validation split);
* weight balancing (Alshammari et al., CVPR 2022; github:ShadeAlsha/LTR-weight-balancing): the classifier re-trained
  with a class-balanced loss, weight decay and the :class:`~lightning_lt.callbacks.MaxNorm` constraint;
* MiSLAS (Zhong et al., CVPR 2021; github:dvlab-research/MiSLAS): classifier and LWS scales re-trained with
  label-aware smoothing (:class:`~lightning_lt.losses.LabelAwareSmoothingLoss`) and, optionally, BN shift
  (the frozen backbone's BatchNorm statistics re-estimated on the stage-2 batches).

The configs ``configs/<dataset>/{crt,lws,tau_norm,wb_stage2,mislas_stage2}.yaml`` set the options of each method.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.metrics import LongTailAccuracy
from lightning_lt.nets.heads import CosineClassifier
from lightning_lt.tasks.base import DEFAULT_PER_CLASS_SCALARS_MAX
from lightning_lt.tasks.classification import LongTailClassifier, LossFactory, default_optimizer
from lightning_lt.tasks.plotting import log_figure, tau_curve_figure

__all__ = ["TAU_GRID", "DecoupledClassifier", "tau_normalized_weight"]

#: The tau grid of classifier-balancing's ``tau_norm.py``: ``np.linspace(0, 2, 21)``.
TAU_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))

_INIT_HINT = (
    "HINT: pass the checkpoint of a finished stage-1 run, `--model.init_args.init_from=PATH` (e.g. "
    "PATH/checkpoints/last.ckpt: `lightning-lt fit` of any LongTailClassifier config saves one)."
)


def tau_normalized_weight(weight: Tensor, tau: float) -> Tensor:
    r"""Class weights divided by their L2 norm to the power ``tau``: ``w_c / |w_c|^tau`` for every row ``c``.

    ``tau = 0`` leaves the weights unchanged, ``tau = 1`` gives unit-norm rows. ``pnorm`` of
    github:facebookresearch/classifier-balancing (``tau_norm.py``).

    Example:
        >>> tau_normalized_weight(torch.tensor([[3.0, 4.0], [0.0, 0.5]]), 1.0).norm(dim=1).tolist()
        [1.0, 1.0]
    """
    norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
    return weight / norms.pow(tau).view(-1, *([1] * (weight.ndim - 1)))


class DecoupledClassifier(LongTailClassifier):
    r"""The second stage of a two-stage method: a stage-1 backbone (usually frozen) and a re-trained or re-scaled
    classifier.

    **Starting point.** ``init_from`` names a checkpoint of any :class:`~lightning_lt.tasks.LongTailClassifier` run
    (state-dict keys ``backbone.*``, ``head.*``; the lightning-lt CLI saves them). Its backbone, and its head unless
    ``reinit_head``, are loaded when the Trainer sets the module up (``setup``, every stage), or by
    :meth:`load_init_from`; a module restored from a stage-2 checkpoint (``load_from_checkpoint``, ``ckpt_path``)
    keeps the restored weights. The backbone and head of this module must be built like the stage-1 ones (same
    ``backbone`` config, same ``head``); the stage-1 number of classes must equal ``num_classes``.

    **Options** (the configs combine them per method):

    * ``freeze_backbone``: no gradient to the backbone, which runs under ``no_grad`` and, unless ``bn_shift``, in
      eval mode (its BatchNorm statistics stay those of stage 1) even while the module trains.
    * ``bn_shift``: with a frozen backbone, keep it in train mode while training, so that its BatchNorm layers
      normalise with batch statistics and re-estimate their running statistics on the stage-2 batches (MiSLAS's
      ``shift_bn``; the official decoupling and weight-balancing code also leave the frozen backbone in train mode).
    * ``reinit_head``: keep this module's freshly initialised head instead of the stage-1 one (cRT).
    * ``freeze_head``: no gradient to the head (LWS, tau-normalisation).
    * ``learnable_scales``: logits ``s_c * head(f)_c`` with a learned per-class scale ``s_c`` (parameter
      ``logit_scales``, initialised to 1, so that the untrained module is the stage-1 model). LWS trains it on the
      frozen head (``LearnableWeightScaling`` of MiSLAS and the scaled ``DotProduct_Classifier`` of
      classifier-balancing both scale the whole logit, bias included).
    * ``head_lr_factor``: the head's parameters train at ``head_lr_factor`` times the optimizer's learning rate
      (their own parameter group); everything else at the optimizer's rate (MiSLAS: ``lr_factor``, 0.5 on
      CIFAR-10-LT and 0.2 on CIFAR-100-LT, with the scales at the full rate).
    * ``tau_norm``: evaluate with tau-normalised class weights, logits ``f . w_c / |w_c|^tau`` (+ ``b_c`` with
      ``tau_norm_bias="keep"``; the official ``tau_norm.py`` drops the bias: ``"drop"``). Training, if any, uses the
      raw logits. ``tau`` fixes tau; with ``tau=None`` every validation epoch evaluates all of ``tau_grid``, keeps the
      tau of the highest balanced accuracy (the smallest on ties) in the buffer ``chosen_tau`` (saved in checkpoints)
      and logs ``val/tau``, the metrics at that tau, and the figure ``val/tau_curve`` (balanced accuracy against tau,
      also in :attr:`tau_curve`). Test and predict use ``tau`` or ``chosen_tau``. Choose on a validation split, not
      the test split (a warning says when the data module has none).
    * ``cache_features`` (classifier-only stages: frozen backbone, no ``bn_shift``): at fit start the backbone
      computes the features of every training image once, from the data module's ``train_eval_dataloader()`` (the
      training images with the evaluation transform, in dataset order), and the training epochs iterate over the
      cached ``[N, D]`` tensor with the data module's own sampler (``sampler="class_balanced"`` re-samples it) and
      batch size. There is no augmentation on this path. Under DDP each process computes the features of its shard
      of ``train_eval_dataloader()``; the shards are all-gathered, so every process holds all ``N`` features in dataset
      order (``N * D`` floats each) and draws its batches from the same sharded sampler as the image path: a cached
      run equals an image run without augmentation. The data module's ``train_dataloader`` is replaced by the cached
      loader for the fit and restored at its end.

    ``forward`` returns the raw (training) logits, with the scales; evaluation uses the tau-normalised ones with
    ``tau_norm``.

    Args:
        backbone, num_classes, class_counts, class_names, loss, head, head_init, head_bias_init, optimizer,
            lr_scheduler, lr_scheduler_interval, posthoc_tau, many_threshold, few_threshold, log_per_class,
            per_class_scalars_max, plot_per_class: see :class:`~lightning_lt.tasks.LongTailClassifier`. The head
            must be ``"linear"`` or ``"cosine"`` (``"linear"`` for ``tau_norm``).
        init_from: path of the stage-1 checkpoint (required).
        freeze_backbone, bn_shift, reinit_head, freeze_head, learnable_scales, head_lr_factor, tau_norm, tau,
            tau_grid, tau_norm_bias, cache_features: see above.

    Raises:
        ValueError: ``init_from`` missing; ``head="none"``; contradicting options (``bn_shift`` or
            ``cache_features`` without a frozen backbone, ``cache_features`` with ``bn_shift``, ``reinit_head`` with
            ``freeze_head``, ``head_lr_factor`` other than 1 on a frozen head or ``<= 0``, ``tau_norm`` with a cosine
            head, LWS scales or ``posthoc_tau``, an empty ``tau_grid``); at setup, a stage-1 checkpoint with another
            number of classes (both named), without the backbone / head keys or with other shapes, or a fit with
            nothing to train; with ``cache_features``, a data module without ``train_eval_dataloader()``.
        FileNotFoundError: at setup, ``init_from`` does not exist.
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
        init_from: Optional[str] = None,
        freeze_backbone: bool = True,
        bn_shift: bool = False,
        reinit_head: bool = False,
        freeze_head: bool = False,
        learnable_scales: bool = False,
        head_lr_factor: float = 1.0,
        tau_norm: bool = False,
        tau: Optional[float] = None,
        tau_grid: Sequence[float] = TAU_GRID,
        tau_norm_bias: Literal["drop", "keep"] = "drop",
        cache_features: bool = False,
    ) -> None:
        _check_stage2_options(
            init_from, head, freeze_backbone, bn_shift, reinit_head, freeze_head, learnable_scales, head_lr_factor,
            tau_norm, tau, tau_grid, tau_norm_bias, cache_features, posthoc_tau,
        )  # fmt: skip
        super().__init__(
            backbone, num_classes, class_counts, class_names, loss, head, head_init, head_bias_init, optimizer,
            lr_scheduler, lr_scheduler_interval, posthoc_tau, many_threshold, few_threshold, log_per_class,
            per_class_scalars_max, plot_per_class,
        )  # fmt: skip
        self.init_from = str(init_from)
        self.freeze_backbone = bool(freeze_backbone)
        self.bn_shift = bool(bn_shift)
        self.reinit_head = bool(reinit_head)
        self.freeze_head = bool(freeze_head)
        self.head_lr_factor = float(head_lr_factor)
        self.tau_norm = bool(tau_norm)
        self.tau = None if tau is None else float(tau)
        self.tau_grid = [float(t) for t in tau_grid]
        self.tau_norm_bias = tau_norm_bias
        self.cache_features = bool(cache_features)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        if self.freeze_head:
            self.head.requires_grad_(False)
        self.logit_scales: Optional[nn.Parameter] = nn.Parameter(torch.ones(num_classes)) if learnable_scales else None
        #: The tau chosen on the last validation (``nan`` until then); saved in checkpoints.
        self.register_buffer("chosen_tau", torch.tensor(float("nan")))
        #: ``[(tau, balanced accuracy), ...]`` of the last validation epoch with ``tau_norm``.
        self.tau_curve: list[tuple[float, float]] = []
        metric_counts = class_counts if class_counts is not None else [many_threshold + 1] * num_classes
        self.tau_metrics = nn.ModuleList(
            LongTailAccuracy(metric_counts, many_threshold, few_threshold) for _ in (self.tau_grid if tau_norm else [])
        )
        self._init_loaded = False
        self._features_cached = False
        self._patched_datamodule: Optional[Any] = None

    # --------------------------------------------------------------------------------- the stage-1 weights
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A module restored from a (stage-2) checkpoint keeps its weights: ``setup`` does not load ``init_from``."""
        self._init_loaded = True

    def setup(self, stage: str) -> None:
        if not self._init_loaded:
            self.load_init_from()
        if stage == "fit" and not any(p.requires_grad for p in self.parameters()):
            raise ValueError(
                f"{type(self).__name__} has nothing to train: the backbone and the head are frozen and there are no "
                "learnable scales. HINT: tau-normalisation needs no training: run `lightning-lt validate` (it chooses "
                "tau on the validation split and logs val/tau) and then `lightning-lt test --model.init_args.tau=TAU`, "
                "or in Python `trainer.validate(model, datamodule)` then `trainer.test(model, datamodule)`."
            )

    def load_init_from(self) -> None:
        """Load the stage-1 backbone (and head, unless ``reinit_head``) from ``init_from``.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: not a Lightning checkpoint readable as weights, another number of classes, missing keys or
                other shapes.
        """
        path = self.init_from
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{type(self).__name__}: the stage-1 checkpoint `init_from`={path!r} does not exist (absolute: "
                f"{os.path.abspath(path)!r}). {_INIT_HINT}"
            )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling error names the offending object
            raise ValueError(
                f"{type(self).__name__}: could not read the stage-1 checkpoint {path!r} as weights ({err}). It is "
                "loaded with `torch.load(weights_only=True)`, which refuses arbitrary Python objects. HINT: pass a "
                "checkpoint saved by Lightning / the lightning-lt CLI."
            ) from err
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(
                f"{type(self).__name__}: {path!r} is not a Lightning checkpoint (no 'state_dict'). {_INIT_HINT}"
            )
        stage1_classes = self._stage1_num_classes(checkpoint, state)
        if stage1_classes is not None and stage1_classes != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: the stage-1 checkpoint {path!r} has {stage1_classes} classes, but this model "
                f"has num_classes={self.num_classes}. HINT: start stage 2 from a checkpoint trained on the same data "
                "set (the same classes); a stage-2 config must use the stage-1 data."
            )
        parts = {"backbone": self.backbone} if self.reinit_head else {"backbone": self.backbone, "head": self.head}
        for name, module in parts.items():
            self._load_part(path, state, name, module)
        self._init_loaded = True
        loaded = "backbone" if self.reinit_head else "backbone and head"
        rank_zero_info(f"{type(self).__name__}: loaded the stage-1 {loaded} from {path}.")

    def _stage1_num_classes(self, checkpoint: dict, state: dict) -> Optional[int]:
        saved = (checkpoint.get("hyper_parameters") or {}).get("num_classes")
        if isinstance(saved, int):
            return saved
        weight = state.get("head.weight")
        if weight is None or weight.ndim != 2:
            return None
        return int(weight.shape[1] if isinstance(self.head, CosineClassifier) else weight.shape[0])

    @staticmethod
    def _load_part(path: str, state: dict, name: str, module: nn.Module) -> None:
        prefix = f"{name}."
        part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(part)), sorted(set(part) - expected)
        shapes = [
            f"{key}: {tuple(part[key].shape)} in the checkpoint, {tuple(value.shape)} here"
            for key, value in module.state_dict().items() if key in part and part[key].shape != value.shape
        ]  # fmt: skip
        if missing or unexpected or shapes:
            details = [f"{kind} {_few(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                       if keys]
            details += ["other shapes: " + ", ".join(shapes[:3])] if shapes else []
            details = "; ".join(details)
            raise ValueError(
                f"The {name} of the stage-1 checkpoint {path!r} does not fit this model's {name} "
                f"({type(module).__name__}): {details}. HINT: build the stage-2 `{name}` exactly as in stage 1 (the "
                f"same `{name}` config{', head kind and init' if name == 'head' else ''})."
            )
        module.load_state_dict(part)

    # --------------------------------------------------------------------------------- model
    def train(self, mode: bool = True) -> DecoupledClassifier:
        """Train mode, with a frozen backbone kept in eval mode (its BatchNorm statistics fixed) unless ``bn_shift``."""
        super().train(mode)
        if mode and self.freeze_backbone and not self.bn_shift:
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Put a frozen backbone in eval mode (train mode with ``bn_shift``) for the epoch: Lightning leaves the modes
        of a module's parts as they are when training starts."""
        super().on_train_epoch_start()
        if self.freeze_backbone:
            self.backbone.train(self.bn_shift)

    def classify(self, features: Tensor) -> Tensor:
        """Logits of backbone features: ``head(features)``, times the learned scales with ``learnable_scales``."""
        logits = self.head(features)
        return logits if self.logit_scales is None else logits * self.logit_scales

    def forward(self, x: Tensor) -> Tensor:
        """Raw (training) logits ``[B, num_classes]``: :meth:`classify` of the backbone features."""
        return self.classify(self.backbone(x))

    def training_logits(self, x: Tensor) -> Tensor:
        """Logits of a training batch: of cached features directly; through a frozen backbone under ``no_grad``."""
        if self._features_cached:
            return self.classify(x)
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(x)
            return self.classify(features)
        return self(x)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters; the head in its own group at ``head_lr_factor`` x lr."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.head_lr_factor == 1.0:
            return self.optimizer_factory(trainable)
        head = [p for p in self.head.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        others = [p for p in trainable if id(p) not in head_ids]
        optimizer = self.optimizer_factory([{"params": head}] + ([{"params": others}] if others else []))
        optimizer.param_groups[0]["lr"] *= self.head_lr_factor
        return optimizer

    # --------------------------------------------------------------------------------- tau-normalisation
    def tau_normalized_logits(self, features: Tensor, tau: float) -> Tensor:
        """Logits ``f . w_c / |w_c|^tau`` (``+ b_c`` with ``tau_norm_bias="keep"``) of backbone features."""
        logits = features @ tau_normalized_weight(self.head.weight, tau).t()
        if self.tau_norm_bias == "keep" and self.head.bias is not None:
            logits = logits + self.head.bias
        return logits

    def current_tau(self) -> float:
        """``tau`` if fixed, else the tau chosen on the last validation.

        Raises:
            RuntimeError: no tau chosen yet.
        """
        if self.tau is not None:
            return self.tau
        chosen = float(self.chosen_tau)
        if math.isnan(chosen):
            raise RuntimeError(
                f"{type(self).__name__}(tau_norm=True, tau=None) has not chosen tau yet: it is chosen on the "
                "validation split. HINT: run `trainer.validate(model, datamodule)` (or a fit, which validates) before "
                "test / predict, or pass the chosen value, `--model.init_args.tau=TAU` (logged as val/tau)."
            )
        return chosen

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not self.tau_norm:
            return super().validation_step(batch, batch_idx)
        x, y = batch
        self._check_target(y)
        features = self.backbone(x)
        self.update_eval_loss("val", self.loss(self.classify(features), y), y.shape[0])
        dots = features @ self.head.weight.t()
        norms = self.head.weight.norm(dim=1)
        bias = self.head.bias if self.tau_norm_bias == "keep" and self.head.bias is not None else None
        for tau, metric in zip(self.tau_grid, self.tau_metrics):
            logits = dots / norms.pow(tau)
            metric.update(logits if bias is None else logits + bias, y)
        if self.tau is not None:
            self.val_metric.update(self.tau_normalized_logits(features, self.tau), y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if not self.tau_norm:
            return super().test_step(batch, batch_idx)
        x, y = batch
        self._check_target(y)
        features = self.backbone(x)
        self.update_eval_loss("test", self.loss(self.classify(features), y), y.shape[0])
        self.test_metric.update(self.tau_normalized_logits(features, self.current_tau()), y)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        if not self.tau_norm:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.tau_normalized_logits(self.backbone(x), self.current_tau()).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def on_validation_epoch_start(self) -> None:
        if self.tau_norm and self.tau is None and self.trainer is not None and not self.trainer.sanity_checking:
            datamodule = self.trainer.datamodule
            on_test = getattr(datamodule, "validates_on_test_split", None)
            if on_test is None:  # a data module without that property: LongTailDataModule validates on the test split
                on_test = datamodule is not None and getattr(datamodule, "val_dataset", "unset") is None
            if on_test:
                rank_zero_warn(
                    f"{type(self).__name__} chooses tau on the validation loader, which for "
                    f"{type(datamodule).__name__} is the test split (it has no validation split): the test accuracy at "
                    "that tau is optimistic. HINT: give the data module a validation split (e.g. `val_per_class: 50`)."
                )

    def on_validation_epoch_end(self) -> None:
        if not self.tau_norm:
            return super().on_validation_epoch_end()
        balanced = [_balanced_accuracy(metric.per_class()) for metric in self.tau_metrics]
        self.tau_curve = list(zip(self.tau_grid, balanced))
        sanity = self.trainer is not None and self.trainer.sanity_checking
        if self.tau is None:
            finite = [b if not math.isnan(b) else -math.inf for b in balanced]
            best = int(np.argmax(finite))  # the first maximum: the smallest tau on ties
            if not sanity:
                self.chosen_tau.fill_(self.tau_grid[best])
            tau, metric = self.tau_grid[best], self.tau_metrics[best]
        else:
            tau, metric = self.tau, self.val_metric
        self.log("val/tau", float(tau), sync_dist=True)
        per_class = self._log_epoch_metrics("val", metric)
        for other in self.tau_metrics:
            other.reset()
        if not sanity and self.trainer.is_global_zero and self.loggers:
            title = f"tau-normalisation, epoch {self.current_epoch}"
            figure = tau_curve_figure(self.tau_grid, balanced, tau, title=title)
            for logger in self.loggers:
                log_figure(logger, "val/tau_curve", figure, step=self.global_step)
        self._plot_per_class(per_class)

    # --------------------------------------------------------------------------------- cached features
    def on_fit_start(self) -> None:
        if self.cache_features:
            self._cache_training_features()

    def on_train_end(self) -> None:
        self._restore_train_dataloader()

    def teardown(self, stage: str) -> None:
        self._restore_train_dataloader()

    def on_exception(self, exception: BaseException) -> None:
        self._restore_train_dataloader()

    def _cache_training_features(self) -> None:
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "train_eval_dataloader", None)):
            name = "no data module" if datamodule is None else f"{type(datamodule).__name__}, which has none"
            raise ValueError(
                f"{type(self).__name__}(cache_features=True) computes the training features once from the data "
                "module's `train_eval_dataloader()` (training images with the evaluation transform, in order), but "
                f"the fit has {name}. HINT: use a lightning_lt LongTailDataModule (`trainer.fit(model, "
                "datamodule=dm)`), or set `cache_features=False`."
            )
        loader = datamodule.train_eval_dataloader()
        indices = torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)
        features, labels = self._extract_features(loader)
        if features.shape[0] != indices.numel():
            raise ValueError(
                f"{type(datamodule).__name__}.train_eval_dataloader() yielded {features.shape[0]} samples but its "
                f"sampler lists {indices.numel()}. HINT: it must iterate over its sampler's indices in order (no "
                "shuffling, no dropped last batch)."
            )
        if trainer.world_size > 1:
            features, labels, indices = self._gather_shards(features, labels, indices)
        order = torch.argsort(indices)
        features, labels, indices = features[order].cpu(), labels[order].cpu(), indices[order].cpu()
        targets = torch.as_tensor(list(datamodule.train_targets()), dtype=torch.long)
        if not torch.equal(indices, torch.arange(targets.numel())) or not torch.equal(labels, targets):
            raise ValueError(
                f"{type(datamodule).__name__}.train_eval_dataloader() does not cover the training set in dataset order "
                f"({indices.numel()} samples for {targets.numel()} training images, or labels that differ from "
                "`train_targets()`). HINT: it must serve `train_dataset`'s images (with the evaluation transform) in "
                "order, sharded like the evaluation loaders."
            )
        dataset = TensorDataset(features, labels)
        resampled = getattr(datamodule, "sampler", None) is not None
        sampler = datamodule.build_sampler() if resampled else datamodule.shuffle_sampler(dataset)
        cached = DataLoader(dataset, batch_size=datamodule.batch_size, sampler=sampler)
        self._patched_datamodule = datamodule
        datamodule.train_dataloader = lambda: cached  # the fit loop asks for it after on_fit_start
        self._features_cached = True
        rank_zero_info(
            f"{type(self).__name__}: cached {features.shape[0]} training features of size {features.shape[1]}; the "
            f"classifier trains on them ({'class-balanced' if getattr(datamodule, 'sampler', None) else 'shuffled'} "
            f"batches of {datamodule.batch_size}, no augmentation)."
        )

    def _extract_features(self, loader: DataLoader) -> tuple[Tensor, Tensor]:
        was_training = self.backbone.training
        self.backbone.eval()
        features, labels = [], []
        try:
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                for x, y in loader:
                    features.append(self.backbone(x.to(self.device)).float())
                    labels.append(torch.as_tensor(y).to(self.device))
        finally:
            self.backbone.train(was_training)
        if not features:
            return torch.zeros(0, 0, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(features), torch.cat(labels).long()

    def _gather_shards(self, features: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All-gather every process's shard (padded to the longest) and keep the real rows."""
        counts = self.all_gather(torch.tensor(features.shape[0], device=self.device)).reshape(-1)
        longest = int(counts.max())
        dim = int(self.all_gather(torch.tensor(features.shape[1] if features.numel() else 0, device=self.device)).max())
        padded = torch.zeros(longest, dim, device=self.device)
        padded[: features.shape[0], : features.shape[1]] = features
        index_pad = torch.full((longest,), -1, dtype=torch.long, device=self.device)
        index_pad[: indices.numel()] = indices.to(self.device)
        label_pad = torch.zeros(longest, dtype=torch.long, device=self.device)
        label_pad[: labels.numel()] = labels
        all_features = self.all_gather(padded).reshape(-1, dim)
        all_indices = self.all_gather(index_pad).reshape(-1)
        all_labels = self.all_gather(label_pad).reshape(-1)
        keep = all_indices >= 0
        return all_features[keep], all_labels[keep], all_indices[keep]

    def _restore_train_dataloader(self) -> None:
        datamodule, self._patched_datamodule = self._patched_datamodule, None
        if datamodule is not None and "train_dataloader" in vars(datamodule):
            del datamodule.train_dataloader
        self._features_cached = False


def _few(keys: list[str]) -> str:
    return f"{keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _balanced_accuracy(per_class: Tensor) -> float:
    seen = ~torch.isnan(per_class)
    return float(per_class[seen].mean()) if seen.any() else float("nan")


def _check_stage2_options(
    init_from: Optional[str], head: str, freeze_backbone: bool, bn_shift: bool, reinit_head: bool, freeze_head: bool,
    learnable_scales: bool, head_lr_factor: float, tau_norm: bool, tau: Optional[float], tau_grid: Sequence[float],
    tau_norm_bias: str, cache_features: bool, posthoc_tau: Optional[float],
) -> None:  # fmt: skip
    owner = "DecoupledClassifier"
    if init_from is None or str(init_from) == "":
        raise ValueError(
            f"{owner} is a second stage and starts from a stage-1 checkpoint, but `init_from` is not set. {_INIT_HINT}"
        )
    if head == "none":
        raise ValueError(
            f"{owner} re-trains or re-scales the classifier head, but `head='none'` has none. HINT: use the stage-1 "
            "run's 'linear' (or 'cosine') head."
        )
    conflicts = [
        (bn_shift and not freeze_backbone, "`bn_shift=True` re-estimates the BatchNorm statistics of a *frozen* "
         "backbone, but `freeze_backbone=False`. HINT: set `freeze_backbone=True`, or drop `bn_shift` (a trained "
         "backbone updates its statistics anyway)."),
        (cache_features and not freeze_backbone, "`cache_features=True` needs a frozen backbone (the features are "
         "computed once). HINT: set `freeze_backbone=True` or `cache_features=False`."),
        (cache_features and bn_shift, "`cache_features=True` computes the features once in eval mode, but "
         "`bn_shift=True` changes them every batch. HINT: set one of them to False."),
        (reinit_head and freeze_head, "`reinit_head=True` with `freeze_head=True` would keep a random classifier. "
         "HINT: drop one of them (cRT re-initialises and trains the head; LWS freezes the stage-1 head)."),
        (tau_norm and head != "linear", "`tau_norm=True` rescales the rows of a linear classifier, but "
         f"`head={head!r}` normalises its weights already. HINT: use a stage-1 run with `head: linear`."),
        (tau_norm and learnable_scales, "`tau_norm=True` and `learnable_scales=True` are two alternative ways to "
         "rebalance the class norms. HINT: choose one (tau_norm.yaml or lws.yaml)."),
        (tau_norm and posthoc_tau is not None, "`tau_norm=True` with `posthoc_tau` would rebalance the logits twice. "
         "HINT: drop `posthoc_tau`."),
    ]  # fmt: skip
    for failed, message in conflicts:
        if failed:
            raise ValueError(f"{owner}: {message}")
    if isinstance(head_lr_factor, bool) or not isinstance(head_lr_factor, (int, float)) or not head_lr_factor > 0:
        raise ValueError(f"Expected `head_lr_factor` of {owner} to be > 0, got {head_lr_factor!r}.")
    if head_lr_factor != 1.0 and freeze_head:
        raise ValueError(
            f"{owner}: `head_lr_factor={head_lr_factor}` sets the learning rate of the head, which `freeze_head=True` "
            "does not train. HINT: drop one of them."
        )
    if tau_norm_bias not in ("drop", "keep"):
        raise ValueError(f"Expected `tau_norm_bias` of {owner} to be 'drop' or 'keep', got {tau_norm_bias!r}.")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau)):
        raise ValueError(f"Expected `tau` of {owner} to be None (chosen on validation) or finite, got {tau!r}.")
    if tau_norm and len(tau_grid) == 0:
        raise ValueError(f"Expected a non-empty `tau_grid` of {owner}, e.g. {list(TAU_GRID)}.")
    if tau_norm and not all(isinstance(t, (int, float)) and math.isfinite(t) for t in tau_grid):
        raise ValueError(f"Expected finite numbers in `tau_grid` of {owner}, got {list(tau_grid)!r}.")
    if not tau_norm and tau is not None:
        warnings.warn(f"{owner}: `tau={tau}` has no effect without `tau_norm=True`.", UserWarning, stacklevel=3)
