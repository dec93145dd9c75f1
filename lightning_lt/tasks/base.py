"""What the task modules share: class facts from the data module, config hyper-parameters, optimizers."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_lt.datamodules.base import derive_seed

__all__ = [
    "NOT_SAVED",
    "TaskModule",
    "WeightedMean",
    "check_class_info",
    "check_saved",
    "factory_config",
    "reseed_for_epoch",
    "resolve_factory",
    "safe_metric_key",
]


def check_class_info(
    num_classes: int, class_counts: Optional[Sequence[int]], class_names: Optional[Sequence[str]]
) -> tuple[Optional[list[int]], list[str]]:
    """Validate ``num_classes`` / ``class_counts`` / ``class_names`` (as linked from a data module) and return
    the counts as ints (or ``None``) and the names (``"0" .. "C-1"`` by default)."""
    if num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2, got {num_classes}")
    if class_counts is not None:
        class_counts = [int(c) for c in class_counts]
        if len(class_counts) != num_classes:
            raise ValueError(
                f"`class_counts` has {len(class_counts)} entries but `num_classes` is {num_classes}. HINT: let "
                "the data module provide both (the `lightning-lt` CLI links them), or pass one count per class."
            )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"`class_names` has {len(class_names)} entries but `num_classes` is {num_classes}.")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return class_counts, names


#: Default of the task modules' ``per_class_scalars_max``: up to this many classes, per-class values are scalars.
DEFAULT_PER_CLASS_SCALARS_MAX = 100


class TaskModule(LightningModule):
    """Base of the task modules: config-only hyper-parameters and optimizer / scheduler factories."""

    optimizer_factory: OptimizerCallable
    lr_scheduler_factory: Optional[LRSchedulerCallable] = None
    lr_scheduler_interval: Literal["epoch", "step"] = "epoch"

    def __init__(self) -> None:
        super().__init__()
        # Evaluation losses as sample-weighted means whose sums are synced across processes: exact under
        # DDP with unequal shards (``self.log(..., sync_dist=True)`` averages the batch-size weights in an
        # integer tensor and would be off by N / (N - 1) for an odd number of samples).
        self.eval_losses = nn.ModuleDict({"val": WeightedMean(), "test": WeightedMean()})
        self.per_class_values = {}

    def on_train_epoch_start(self) -> None:
        """With ``seed_everything(s)`` (``PL_GLOBAL_SEED``), reseed the global random generators (torch, numpy,
        random) from ``(s, epoch, global rank)``: the random draws of an epoch (augmentation in the main process,
        dropout) then do not depend on what happened before it, so a run resumed from an epoch-end checkpoint
        repeats the uninterrupted run exactly, and each DDP rank draws its own. Workers of the lightning_lt data
        modules are seeded from ``(s, rank, epoch)`` by their loader
        (:class:`~lightning_lt.datamodules.base.EpochSeededDataLoader`)."""
        reseed_for_epoch(self.current_epoch, self.global_rank)

    #: Per-class values of the last evaluation epoch, ``{stage: {key: value}}`` (see :meth:`log_class_values`).
    per_class_values: dict[str, dict[str, float]]
    #: Up to this many classes, per-class values are logged as scalars through ``self.log``.
    per_class_scalars_max: int = DEFAULT_PER_CLASS_SCALARS_MAX

    def log_class_values(self, stage: str, kind: str, names: Sequence[str], values: Tensor) -> None:
        """Log one value per class for ``stage`` as ``{stage}/{kind}/<class name>``, once per epoch.

        With at most :attr:`per_class_scalars_max` classes (100 by default; the task modules take it as an
        argument) they are scalars through ``self.log``: in ``trainer.callback_metrics``, usable by
        ``ModelCheckpoint`` / ``EarlyStopping``. With more, ``self.log`` would cost time quadratic in the number of
        keys (Lightning re-walks every logged key each time one is added: 15 s per validation at 8,142 classes),
        so they go out as **one structured object**: a single ``log_metrics`` call per logger on global rank zero
        with the same keys (one host transfer of the already synchronised values). Either way the values are kept
        in :attr:`per_class_values` ``[stage]`` (every rank holds the same, synchronised numbers).
        """
        keys = [f"{stage}/{kind}/{safe_metric_key(name)}" for name in names]
        per_class = dict(zip(keys, values.detach().cpu().tolist()))
        if len(keys) <= self.per_class_scalars_max:
            # torchmetrics has synchronised the values already; sync_dist only averages equal numbers.
            self.log_dict(dict(zip(keys, values)), sync_dist=True)
        else:
            trainer = self._trainer
            if trainer is not None and not trainer.sanity_checking and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(per_class, step=trainer.global_step)
        self.per_class_values[stage] = per_class

    def update_eval_loss(self, stage: str, loss: Tensor, num_samples: int) -> None:
        """Add a batch's mean ``loss`` over ``num_samples`` samples to the ``stage`` loss (0 samples is allowed)."""
        self.eval_losses[stage].update(loss.detach(), num_samples)

    def log_eval_loss(self, stage: str) -> None:
        """Log ``{stage}/loss``, the sample-weighted mean over every process's samples, and reset it."""
        metric = self.eval_losses[stage]
        with warnings.catch_warnings():  # a process without evaluation batches has not called update()
            warnings.simplefilter("ignore")
            value = metric.compute()  # a collective under DDP: every process calls it
        if torch.isfinite(value):  # the same synced value on every process, so all log or none
            self.log(f"{stage}/loss", value, sync_dist=True)
        metric.reset()

    def save_config_hyperparameters(
        self, object_keys: Sequence[str], factories: Optional[Mapping[str, tuple[type, ...]]] = None
    ) -> None:
        """``save_hyperparameters()`` of the caller's arguments, keeping objects only as config.

        Under LightningCLI the arguments are config (``class_path`` / ``init_args`` dicts), so a checkpoint
        can rebuild the model. In plain Python use, the ``object_keys`` arguments are objects (networks, losses,
        factories). Without ``factories`` they are dropped from the hyper-parameters (weights are in the state
        dict). With ``factories`` (argument name -> the types a saved factory may build, see
        :func:`factory_config`), a factory given as a class or a ``functools.partial`` of one with plain keyword
        arguments is saved as its ``class_path`` / ``init_args``, and every other object as a
        :data:`NOT_SAVED` marker, so that ``load_from_checkpoint(path)`` rebuilds the same factories and names
        the arguments it cannot rebuild instead of silently using their defaults. A module that passes
        ``factories`` reads its arguments through :func:`resolve_factory` / :func:`check_saved`.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key in object_keys:
            value = self.hparams.get(key)
            if isinstance(value, (dict, str, type(None))):
                continue
            if factories is None:
                self.hparams.pop(key)
                continue
            config = factory_config(value, factories[key]) if key in factories else None
            self.hparams[key] = config if config is not None else f"{NOT_SAVED} {describe_object(value)}>"

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of :meth:`configure_optimizers`: ``optimizer_factory(self.parameters())``."""
        return self.optimizer_factory(self.parameters())

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer()
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}


#: Start of the hyper-parameter saved in place of an object that a checkpoint cannot rebuild (an instance, a
#: lambda, a ``functools.partial`` with positional arguments): ``"<not saved in the checkpoint: a lambda>"``.
NOT_SAVED = "<not saved in the checkpoint:"

_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _import_path(obj: Any) -> Optional[str]:
    """``module.qualname`` of a class or function that importing that path gives back, else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        found = _import_object(f"{module}.{qualname}")
    except (ImportError, AttributeError):
        return None
    return f"{module}.{qualname}" if found is obj else None


def _import_object(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    parts = name.split(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
            break
        except ImportError:
            module_name, _, outer = module_name.rpartition(".")
            parts.insert(0, outer)
    else:
        raise ImportError(f"no module in {path!r}")
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _allowed_factory(obj: Any, types: tuple[type, ...]) -> bool:
    """A class building one of ``types``, or a function of lightning_lt itself (``default_optimizer``)."""
    if isinstance(obj, type):
        return issubclass(obj, types)
    return callable(obj) and getattr(obj, "__module__", "").split(".")[0] == "lightning_lt"


def factory_config(factory: Any, types: tuple[type, ...]) -> Optional[dict[str, Any]]:
    """The config of a factory that a checkpoint can rebuild, or ``None``.

    A class building one of ``types`` (or a function of lightning_lt), importable by its path, gives
    ``{"class_path": path}``; a ``functools.partial`` of one with keyword arguments of plain values (numbers,
    strings, booleans, ``None`` and lists / dicts of them) gives ``{"class_path": path, "init_args": kwargs}``,
    the form of a LightningCLI config. Instances, lambdas, local classes and partials with positional or
    non-plain arguments give ``None``.

    Example:
        >>> import functools
        >>> from torch import nn
        >>> factory_config(functools.partial(nn.Dropout, p=0.5), (nn.Module,))
        {'class_path': 'torch.nn.modules.dropout.Dropout', 'init_args': {'p': 0.5}}
        >>> factory_config(lambda counts: nn.Identity(), (nn.Module,)) is None
        True
    """
    init_args: dict[str, Any] = {}
    if isinstance(factory, functools.partial):
        if factory.args or not _is_plain(factory.keywords):
            return None
        factory, init_args = factory.func, dict(factory.keywords)
    path = _import_path(factory)
    if path is None or not _allowed_factory(factory, types):
        return None
    return {"class_path": path, "init_args": init_args} if init_args else {"class_path": path}


def describe_object(value: Any) -> str:
    """A short description of an argument for messages: ``"a lambda"``, ``"an instance of MLP"``, ..."""
    if isinstance(value, functools.partial):
        return f"functools.partial of {getattr(value.func, '__qualname__', type(value.func).__name__)}"
    if getattr(value, "__name__", None) == "<lambda>":
        return "a lambda"
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__qualname__}"
    return f"an instance of {type(value).__name__}"


def check_saved(value: Any, name: str, owner: str) -> Any:
    """Return ``value`` unless it is a :data:`NOT_SAVED` marker, which raises naming the argument to pass."""
    if isinstance(value, str) and value.startswith(NOT_SAVED):
        raise ValueError(
            f"`{name}` of {owner} was not saved in the checkpoint: it was given in Python as "
            f"{value[len(NOT_SAVED):].strip(' >')}, which a checkpoint cannot rebuild. HINT: pass it again, "
            f"`{owner}.load_from_checkpoint(path, {name}=...)`, or save a class / functools.partial with plain "
            "keyword arguments (or train with the lightning-lt CLI, whose checkpoints hold the config)."
        )
    return value


def resolve_factory(value: Any, name: str, owner: str, types: tuple[type, ...], example: str) -> Any:
    """Check a factory argument and rebuild one saved by :func:`factory_config`.

    Args:
        value: the argument: a callable, a ``{"class_path", "init_args"}`` config, a :data:`NOT_SAVED` marker
            or ``None`` (returned as is).
        name: argument name, for messages.
        owner: class name, for messages.
        types: what the factory builds (a saved ``class_path`` must be a subclass of one of them, or a
            lightning_lt function: nothing else from a checkpoint is imported and called).
        example: a correct call for the messages, e.g. ``"functools.partial(LDAMLoss, max_m=0.5)"``.

    Raises:
        ValueError: a marker, an ``nn.Module`` / ``torch.optim.Optimizer`` instance instead of a factory, a
            non-callable, or a config naming something that cannot be imported or is not allowed.
    """
    value = check_saved(value, name, owner)
    if value is None:
        return None
    if isinstance(value, dict) and "class_path" in value:
        path = value["class_path"]
        try:
            factory = _import_object(path)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"`{name}` of {owner} names {path!r}, which cannot be imported ({err}). HINT: pass `{name}=` "
                "explicitly, e.g. to `load_from_checkpoint`."
            ) from err
        if not _allowed_factory(factory, types):
            allowed = " / ".join(t.__name__ for t in types)
            raise ValueError(
                f"`{name}` of {owner} names {path!r}, which is not a subclass of {allowed}; it is not imported "
                f"and called from a config. HINT: pass `{name}=` explicitly, e.g. `{name}={example}`."
            )
        init_args = value.get("init_args") or {}
        return functools.partial(factory, **init_args) if init_args else factory
    if isinstance(value, (nn.Module, torch.optim.Optimizer)):
        raise ValueError(
            f"`{name}` of {owner} must be a factory (a class or functools.partial) that {owner} calls itself, got "
            f"{describe_object(value)}. HINT: pass the class or a partial, e.g. `{name}={example}`; in a config, "
            "`class_path` + `init_args`."
        )
    if not callable(value):
        raise ValueError(
            f"`{name}` of {owner} must be a factory (a class or functools.partial), got {value!r}. "
            f"HINT: e.g. `{name}={example}`."
        )
    return value


def check_per_class_scalars_max(value: Any) -> int:
    """``per_class_scalars_max`` of the task modules: an integer >= 0 (the most classes logged as scalars)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"Expected `per_class_scalars_max` to be an integer >= 0 (the most classes whose per-class values are "
            f"logged as scalars; above it, one structured object per epoch), got {value!r}"
        )
    return value


def safe_metric_key(name: str) -> str:
    """A class name as a metric-key component: runs of characters other than ``[0-9A-Za-z_.-]`` become ``_``."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name) or "class"


def reseed_for_epoch(epoch: int, rank: int = 0) -> None:
    """Seed torch, numpy and ``random`` from ``(PL_GLOBAL_SEED, epoch, rank)``; nothing without a global seed.

    Rank 0 (and a single process) uses ``s_e = (PL_GLOBAL_SEED * 1_000_003 + epoch) mod 2^32``; rank ``r > 0``
    uses :func:`~lightning_lt.datamodules.base.derive_seed` ``(s_e, r)``, so under DDP each process draws its own
    augmentation and dropout (with one seed for all, rank ``r``'s ``i``-th sample would get the same crop, flip
    and dropout mask as rank 0's).

    Example:
        >>> import os, torch
        >>> os.environ["PL_GLOBAL_SEED"] = "0"
        >>> draws = []
        >>> for rank in (0, 1, 0):
        ...     reseed_for_epoch(3, rank)
        ...     draws.append(torch.rand(1).item())
        >>> draws[0] == draws[2], draws[0] == draws[1]
        (True, False)
        >>> del os.environ["PL_GLOBAL_SEED"]
    """
    base = os.environ.get("PL_GLOBAL_SEED")
    if base is None:
        return
    seed = (int(base) * 1_000_003 + int(epoch)) % (2**32)
    if rank:
        seed = derive_seed(seed, rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WeightedMean(Metric):
    """``sum_b w_b * x_b / sum_b w_b`` with the two sums synced across processes (``nan`` without weight).

    Like ``torchmetrics.MeanMetric`` but updated out of place, so that states reset under
    ``torch.inference_mode`` (one ``Trainer.validate``) can be updated again under ``no_grad`` (a later DDP run
    with gloo, which Lightning evaluates without inference mode).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float) -> None:
        self.total = self.total + value.detach().double().sum() * float(weight)
        self.weight = self.weight + float(weight)

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()
