"""Score one model over a family of test label distributions (the test-agnostic protocol of SADE / DirMixE)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_lt.callbacks.test_time_aggregation import TestTimeAggregation, check_has_experts, has_experts
from lightning_lt.datamodules.test_distributions import (
    DEFAULT_TEST_RATIOS,
    TestDistribution,
    check_test_ratio,
    dirichlet_test_distribution,
    sade_test_distributions,
)
from lightning_lt.metrics import LongTailAccuracy
from lightning_lt.tasks.plotting import log_figure

__all__ = ["TestDistributions", "accuracy_over_distributions_figure"]

_GROUP_KEYS = ("acc", "balanced_acc", "acc_many", "acc_medium", "acc_few")


def accuracy_over_distributions_figure(
    distributions: Sequence[TestDistribution],
    series: dict[str, Sequence[float]],
    title: str = "accuracy over test label distributions",
) -> Figure:
    """Accuracy against the test imbalance ratio: forward long-tailed on the left, uniform in the middle, backward
    on the right (x = ``log(ratio)``, negated for backward), one line per entry of ``series`` (the model, each expert,
    the aggregated experts). Dirichlet draws sit at their base profile's position.

    Example:
        >>> import numpy as np
        >>> d = [TestDistribution("forward2", "forward", 2.0, [2, 1], np.arange(3)), TestDistribution("uniform", "uniform", 1.0, [2, 2], np.arange(4))]
        >>> fig = accuracy_over_distributions_figure(d, {"model": [0.8, 0.7]})
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['forward2', 'uniform']
    """
    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    x = [-d.signed_log_ratio for d in distributions]  # forward (head-heavy) on the left
    for name, values in series.items():
        ax.plot(x, [float(v) for v in values], marker="o", label=name)
    ticks = {}
    for pos, d in zip(x, distributions):
        ticks.setdefault(round(pos, 6), d.name if d.kind == "sade" else d.name.rsplit("_", 1)[0])
    ax.set_xticks(list(ticks))
    ax.set_xticklabels(list(ticks.values()), rotation=45, ha="right", fontsize="small")
    ax.set_xlabel("test label distribution (forward long-tailed ... uniform ... backward long-tailed)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


class TestDistributions(Callback):
    """After the test loop, score the model on every test label distribution built from the balanced test set.

    The distributions are SADE's forward / uniform / backward long-tailed test sets at ``ratios``
    (:func:`~lightning_lt.datamodules.test_distributions.sade_test_distributions`: ``forward50 ... uniform ...
    backward50``) plus, with ``dirichlet_draws > 0``, that many DirMixE Dirichlet draws around each of the uniform,
    forward and backward profiles at ``dirichlet_ratio``, from the data module's ``test_dataset`` (it must have
    ``targets``). Works for every classifier of the library: the prediction is ``module.eval_logits(module(x))``
    (post-hoc adjustment of :class:`~lightning_lt.tasks.LongTailClassifier` included); for a
    :class:`~lightning_lt.tasks.MultiExpertClassifier` also each expert's and, with ``aggregation``, the accuracy after
    SADE's test-time aggregation learned on that distribution's own images (the same draw is adapted on and scored;
    the model's weights are restored afterwards).

    Logs ``{prefix}/{name}/acc|balanced_acc|acc_many|acc_medium|acc_few`` per distribution (and
    ``{prefix}/{name}/expert{e}/acc``, ``{prefix}/{name}/equal_weights/acc`` with ``aggregation``),
    ``{prefix}/acc_mean`` and ``{prefix}/acc_std`` (population standard deviation over the distributions), and the
    figure ``{prefix}/accuracy`` (:func:`accuracy_over_distributions_figure`) to every logger. :attr:`results` keeps the
    numbers: ``{name: {key: value}}``.

    Usage::

        lightning-lt test --config configs/cifar10_lt/la.yaml --ckpt_path last.ckpt \\
            --trainer.callbacks+=lightning_lt.callbacks.TestDistributions

    Under DDP every process scores its share of each distribution and the metrics are synchronised.

    Args:
        ratios: SADE's test imbalance ratios (``>= 1``; 1 is the uniform set).
        dirichlet_draws: DirMixE draws per profile (0: none).
        dirichlet_ratio: ratio of the Dirichlet draws' forward / backward profiles (DirMixE: 100).
        dirichlet_concentration: Dirichlet concentration (``None``: DirMixE's, the images per class).
        seed: seed of the image selection and the Dirichlet draws (SADE: 0).
        aggregation: learn SADE's expert weights per distribution (a :class:`TestTimeAggregation`, or ``True`` for
            the default one).
        batch_size: evaluation batch size (default: the data module's ``eval_batch_size``, else 128).
        plot: log the figure.
        prefix: metric-key prefix.

    Raises:
        ValueError: a ratio ``< 1``, ``dirichlet_draws < 0``, a concentration ``<= 0``; when run, a test set without
            ``targets`` or with a class that has too few images for a distribution (naming it), or ``aggregation`` for
            a model without experts.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        ratios: Sequence[float] = DEFAULT_TEST_RATIOS,
        dirichlet_draws: int = 0,
        dirichlet_ratio: float = 100.0,
        dirichlet_concentration: Optional[float] = None,
        seed: int = 0,
        aggregation: Union[bool, TestTimeAggregation, None] = None,
        batch_size: Optional[int] = None,
        plot: bool = True,
        prefix: str = "test_dist",
    ) -> None:
        super().__init__()
        if not ratios:
            raise ValueError("Expected at least one test imbalance ratio in `ratios`, got none.")
        for ratio in ratios:
            check_test_ratio(ratio)
        if isinstance(dirichlet_draws, bool) or not isinstance(dirichlet_draws, int) or dirichlet_draws < 0:
            raise ValueError(f"Expected `dirichlet_draws` to be an integer >= 0, got {dirichlet_draws!r}.")
        if dirichlet_concentration is not None and not dirichlet_concentration > 0:
            raise ValueError(
                f"Expected the Dirichlet concentration to be > 0, got {dirichlet_concentration!r}. HINT: leave it None "
                "for DirMixE's (the balanced test set's images per class)."
            )
        if aggregation is True:
            aggregation = TestTimeAggregation()
        if aggregation is not None and not isinstance(aggregation, TestTimeAggregation):
            raise ValueError(f"Expected `aggregation` to be a TestTimeAggregation, True or None, got {aggregation!r}.")
        self.ratios = tuple(ratios)
        self.dirichlet_draws, self.dirichlet_ratio = dirichlet_draws, float(dirichlet_ratio)
        self.dirichlet_concentration, self.seed = dirichlet_concentration, int(seed)
        self.aggregation: Optional[TestTimeAggregation] = aggregation
        self.batch_size, self.plot, self.prefix = batch_size, plot, prefix
        self.results: dict[str, dict[str, float]] = {}
        self.distributions: list[TestDistribution] = []
        #: Per distribution: the test indices adapted on (with ``aggregation``) and the per-class counts scored.
        self.adapted_indices: dict[str, np.ndarray] = {}
        self.scored_counts: dict[str, list[int]] = {}

    def build(
        self, dataset: Dataset, num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None
    ) -> list[TestDistribution]:
        """The test distributions over ``dataset`` (which needs ``targets``)."""
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ValueError(
                f"TestDistributions needs the labels of the test set as `targets`, but {type(dataset).__name__} has "
                "none. HINT: use a lightning_lt data module, or give your test dataset a `targets` list."
            )
        out = sade_test_distributions(targets, self.ratios, num_classes, self.seed, class_names)
        for direction in ("uniform", "forward", "backward"):
            for draw in range(self.dirichlet_draws):
                out.append(dirichlet_test_distribution(
                    targets, self.dirichlet_ratio, direction, draw, self.seed, self.dirichlet_concentration, num_classes,
                    class_names,
                ))  # fmt: skip
        return out

    def _loader(self, dataset: Dataset, indices: np.ndarray, trainer: pl.Trainer) -> DataLoader:
        subset = Subset(dataset, indices.tolist())
        sampler = None
        if trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                subset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        batch_size = self.batch_size or getattr(trainer.datamodule, "eval_batch_size", None) or 128
        return DataLoader(subset, batch_size=batch_size, shuffle=False, sampler=sampler)

    def _score(
        self, pl_module: Any, loader: DataLoader, experts: bool, counts: Sequence[int], trainer: pl.Trainer
    ) -> dict[str, Any]:
        device = pl_module.device
        many, few = getattr(pl_module, "many_threshold", 100), getattr(pl_module, "few_threshold", 20)

        def metric() -> LongTailAccuracy:
            return LongTailAccuracy(counts, many, few).to(device)

        main = metric()
        per_expert = [metric() for _ in range(pl_module.num_experts)] if experts else []
        equal = metric() if experts else None
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                if experts:
                    z = pl_module.expert_logits(x)
                    main.update(pl_module.aggregate(z), y)
                    equal.update(z.mean(dim=0), y)  # type: ignore[union-attr]
                    for e, m in enumerate(per_expert):
                        m.update(z[e], y)
                else:
                    logits = pl_module(x)
                    eval_logits = getattr(pl_module, "eval_logits", None)
                    main.update(eval_logits(logits) if callable(eval_logits) else logits, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty shot groups give nan (CIFAR-10-LT has no few-shot class)
            out: dict[str, Any] = {k: float(v) for k, v in main.compute().items() if k in _GROUP_KEYS}
            total = main.total.detach().clone()  # compute() restores the local states: sum them here
            if trainer.world_size > 1:
                total = trainer.strategy.reduce(total, reduce_op="sum")
            out["_total"] = total.cpu().tolist()
            if experts:
                equal_values = equal.compute().items()  # type: ignore[union-attr]
                out.update({f"equal_weights/{k}": float(v) for k, v in equal_values if k in _GROUP_KEYS})
                for e, m in enumerate(per_expert):
                    out[f"expert{e}/acc"] = float(m.compute()["acc"])
        return out

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = getattr(trainer.datamodule, "test_dataset", None)
        if dataset is None:
            raise ValueError(
                "TestDistributions scores the data module's `test_dataset`, but the trainer has none. HINT: run "
                "`trainer.test(model, datamodule=...)` with a lightning_lt data module (the `lightning-lt test` CLI does)."
            )
        experts = has_experts(pl_module)
        if self.aggregation is not None:
            check_has_experts(pl_module, "TestDistributions(aggregation=...)")
        counts = getattr(pl_module, "class_counts", None)
        num_classes = getattr(pl_module, "num_classes", None)
        if counts is None:  # no shot groups without training counts: every class counts as "many"
            counts = [101] * int(num_classes)
        self.distributions = self.build(dataset, num_classes, getattr(pl_module, "class_names", None))
        self.results, self.adapted_indices, self.scored_counts = {}, {}, {}
        was_training = pl_module.training
        pl_module.eval()
        saved_weights = pl_module.expert_weights.detach().clone() if experts else None
        try:
            for dist in self.distributions:
                row: dict[str, Any] = {}
                if self.aggregation is not None:
                    result = self.aggregation.adapt(pl_module, dataset, dist.indices, trainer)
                    self.adapted_indices[dist.name] = result.indices
                    with torch.inference_mode(False):
                        pl_module.set_expert_weights(result.weights)
                    row.update({f"expert{e}/weight": float(w) for e, w in enumerate(result.weights.tolist())})
                row.update(self._score(pl_module, self._loader(dataset, dist.indices, trainer), experts, counts, trainer))
                self.scored_counts[dist.name] = [int(n) for n in row.pop("_total")]
                self.results[dist.name] = row
        finally:
            if saved_weights is not None:
                with torch.inference_mode(False):
                    pl_module.expert_weights.copy_(saved_weights)
            pl_module.train(was_training)
        accs = [self.results[d.name]["acc"] for d in self.distributions]
        summary = {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs))}
        logged = {f"{self.prefix}/{k}": v for k, v in summary.items()}
        for name, row in self.results.items():
            logged.update({f"{self.prefix}/{name}/{k}": v for k, v in row.items() if not math.isnan(v)})
        pl_module.log_dict(logged, sync_dist=True)
        self.results["mean"] = summary
        shown = ", ".join(f"{d.name} {self.results[d.name]['acc']:.4f}" for d in self.distributions)
        rank_zero_info(f"TestDistributions: {shown}; mean {summary['acc_mean']:.4f}, std {summary['acc_std']:.4f}.")
        if self.plot and trainer.is_global_zero and trainer.loggers:
            figure = accuracy_over_distributions_figure(self.distributions, self.figure_series())
            for logger in trainer.loggers:
                log_figure(logger, f"{self.prefix}/accuracy", figure, step=trainer.global_step)

    def figure_series(self) -> dict[str, list[float]]:
        """The lines of the figure: the model (aggregated), its equal-weight mean and every expert, when present."""
        rows = [self.results[d.name] for d in self.distributions]
        series = {"aggregated" if self.aggregation is not None else "model": [r["acc"] for r in rows]}
        if self.aggregation is not None and "equal_weights/acc" in rows[0]:
            series["equal weights"] = [r["equal_weights/acc"] for r in rows]
        for key in sorted(k for k in rows[0] if k.startswith("expert") and k.endswith("/acc")):
            series[key.split("/")[0]] = [r[key] for r in rows]
        return series
