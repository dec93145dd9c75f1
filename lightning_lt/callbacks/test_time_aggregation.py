"""SADE's test-time self-supervised aggregation of experts (Zhang et al., NeurIPS 2022) as a Lightning callback.

On the unlabelled test stream, learn softmax-normalised expert weights ``w = softmax(a)`` that make the aggregated
prediction ``softmax(sum_e w_e z_e)`` stable between two augmented views of each image: maximise the mean cosine
similarity of the two views' predictions with SGD on ``a`` (lr 0.1, momentum 0.9, weight decay 5e-4, Nesterov, batch
128, ``a`` starting at ``1 / E``), 5 epochs, stopping after an epoch in which a weight rounded to 2 decimals falls below
0.05 (SADE ``test_training_cifar.py``: ``test_training`` and the loop in ``main``). The network is frozen (eval mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_lt.datamodules.samplers import derive_seed

__all__ = [
    "AggregationResult",
    "TestTimeAggregation",
    "aggregate_expert_logits",
    "check_has_experts",
    "has_experts",
    "prediction_stability",
    "sade_view_augment",
]


def has_experts(module: Any) -> bool:
    """Whether ``module`` is a mixture of experts (``num_experts >= 2`` and ``expert_logits``)."""
    num = getattr(module, "num_experts", None)
    is_count = isinstance(num, int) and not isinstance(num, bool) and num >= 2
    return is_count and callable(getattr(module, "expert_logits", None))


def check_has_experts(module: Any, owner: str = "TestTimeAggregation") -> int:
    """Return the number of experts of ``module``, or raise naming the problem when it has none.

    Raises:
        ValueError: the module has no ``num_experts >= 2`` or no ``expert_logits``.
    """
    if not has_experts(module):
        raise ValueError(
            f"{owner} learns weights of a mixture of experts, but {type(module).__name__} has no experts "
            f"(num_experts={getattr(module, 'num_experts', None)!r}). HINT: aggregate a "
            "lightning_lt.tasks.MultiExpertClassifier (RIDE, SADE, DirMixE configs); a single model has nothing to "
            "aggregate."
        )
    return module.num_experts


def aggregate_expert_logits(expert_logits: Tensor, weights: Tensor) -> Tensor:
    """``sum_e w_e z_e``: ``[B, C]`` from ``[E, B, C]`` logits and ``[E]`` weights.

    Example:
        >>> aggregate_expert_logits(torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]]), torch.tensor([0.5, 0.5])).tolist()
        [[0.5, 1.5]]
    """
    return torch.einsum("e,ebc->bc", weights.to(expert_logits.dtype), expert_logits)


def prediction_stability(
    logits_view1: Tensor, logits_view2: Tensor, raw_weights: Tensor, reduction: str = "mean"
) -> Tensor:
    """SADE's self-supervised objective: the cosine similarity (eps ``1e-6``) of the softmax predictions of two
    views, each ``softmax(sum_e softmax(a)_e z_e)``; ``reduction="mean"`` (SADE) or ``"sum"`` over the batch.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])
        >>> round(prediction_stability(z, z, torch.zeros(2)).item(), 4)
        1.0
    """
    weights = F.softmax(raw_weights, dim=0)
    p1 = F.softmax(aggregate_expert_logits(logits_view1, weights), dim=1)
    p2 = F.softmax(aggregate_expert_logits(logits_view2, weights), dim=1)
    similarity = F.cosine_similarity(p1, p2, dim=1, eps=1e-6)
    return similarity.mean() if reduction == "mean" else similarity.sum()


def sade_view_augment(size: int = 32, padding: int = 4) -> v2.Compose:
    """SADE's test-time view augmentation (``TestAgnosticImbalanceCIFAR100DataLoader.train_trsfm`` before
    ``ToTensor``): random crop with padding, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2,
    Gaussian blur (sigma in [0.1, 2]) with p 0.2, horizontal flip. torchvision ``v2`` ops, so it maps a PIL image to a
    PIL image and a ``uint8`` tensor to a ``uint8`` tensor, drawing only from the torch generator; SADE blurs with PIL's
    ``GaussianBlur(radius=sigma)``, here a 9-tap kernel of the same sigma."""
    return v2.Compose([
        v2.RandomCrop(size, padding=padding),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.2),
        v2.RandomHorizontalFlip(),
    ])  # fmt: skip


class _TwoViews(Dataset):
    """``(view1, view2)`` of ``dataset[i]``: ``transform(augment(raw image))`` twice, with the randomness of sample
    ``i`` at epoch ``e`` drawn from ``derive_seed(seed, e, i)`` (independent of workers, processes and order)."""

    def __init__(self, dataset: Dataset, augment: Callable, seed: int) -> None:
        transform = getattr(dataset, "transform", None)
        if transform is None and not hasattr(dataset, "transform"):
            raise ValueError(
                f"TestTimeAggregation needs the raw test images, but {type(dataset).__name__} has no `transform` "
                "attribute to switch off. HINT: use a lightning_lt data module (CIFAR10LT, ImageFolderLT, ...) or a "
                "dataset that applies `self.transform` in `__getitem__`."
            )
        self.raw = copy.copy(dataset)
        self.raw.transform = None
        self.transform = transform
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.raw[index][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, int(index)))
            views = [self.augment(image), self.augment(image)]
        if self.transform is not None:
            views = [self.transform(v) for v in views]
        return views[0], views[1]


@dataclass
class AggregationResult:
    """What :meth:`TestTimeAggregation.adapt` learned.

    Attributes:
        weights: the expert weights ``softmax(a)`` ``[E]`` (sum 1).
        history: the weights after every epoch.
        stopped_early: the stop rule ended the adaptation before ``epochs``.
        indices: the test-set indices adapted on.
    """

    weights: Tensor
    history: list[list[float]] = field(default_factory=list)
    stopped_early: bool = False
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)


class TestTimeAggregation(Callback):
    """Learn SADE's expert weights on the test set before ``trainer.test`` scores it (``lightning-lt test``).

    At ``on_test_start`` it runs :meth:`adapt` on the data module's ``test_dataset`` (every image, unlabelled) and
    sets the model's ``expert_weights``; the test loop then scores the same images with them. The model logs
    ``test/acc`` (after aggregation) beside ``test/equal_weights/acc`` (before, the plain mean of the experts) and
    per-expert accuracies; ``test/expert{e}/weight`` holds the learned weights. To adapt and score per test label
    distribution (forward / backward long-tailed), pass this callback to
    :class:`~lightning_lt.callbacks.TestDistributions` (``aggregation=``) instead.

    Usage::

        lightning-lt test --config configs/cifar100_lt/sade.yaml --ckpt_path last.ckpt \\
            --trainer.callbacks+=lightning_lt.callbacks.TestTimeAggregation

    Deterministic from ``seed``: the epoch's order is a permutation drawn from ``(seed, epoch)`` and the two views of
    image ``i`` from ``(seed, epoch, i)``. Under DDP every process takes its share ``batch[rank::world_size]`` of each
    global batch of ``batch_size`` and the processes sum their gradients and sample counts before every step, so
    every process holds the weights of a single-process run.

    Args:
        epochs: adaptation epochs (5).
        lr, momentum, weight_decay, nesterov: the SGD of SADE's test-time config (0.1, 0.9, 5e-4, True).
        batch_size: images per step (128).
        stop_below: stop after an epoch in which a weight, rounded to 2 decimals as the official code does, is below
            this (0.05).
        seed: seed of the order and the views.
        augment: view augmentation applied to the raw image before the dataset's own transform (default
            :func:`sade_view_augment` for 32-pixel images).
        num_workers: ``DataLoader`` workers for the views.

    Raises:
        ValueError: ``epochs < 1``, ``batch_size < 1``, ``lr <= 0``, ``stop_below`` outside ``[0, 1)``; when run, a model
            without experts or a dataset without ``transform``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        epochs: int = 5,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        batch_size: int = 128,
        stop_below: float = 0.05,
        seed: int = 0,
        augment: Optional[Callable] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` of TestTimeAggregation to be an integer >= 1, got {value!r}.")
        if not lr > 0:
            raise ValueError(f"Expected `lr` of TestTimeAggregation to be > 0, got {lr!r}.")
        if not 0 <= stop_below < 1:
            raise ValueError(f"Expected `stop_below` of TestTimeAggregation in [0, 1), got {stop_below!r}.")
        self.epochs, self.batch_size = epochs, batch_size
        self.lr, self.momentum, self.weight_decay, self.nesterov = float(lr), float(momentum), float(weight_decay), nesterov
        self.stop_below, self.seed, self.num_workers = float(stop_below), int(seed), int(num_workers)
        self.augment = augment if augment is not None else sade_view_augment()
        self.result: Optional[AggregationResult] = None

    def adapt(
        self,
        module: Any,
        dataset: Dataset,
        indices: Optional[Sequence[int]] = None,
        trainer: Optional[pl.Trainer] = None,
    ) -> AggregationResult:
        """Learn the expert weights of ``module`` on ``dataset`` (restricted to ``indices``); does not set them.

        Args:
            module: a model with experts (``num_experts``, ``expert_logits(x) -> [E, B, C]``).
            dataset: the test set (labels are ignored); its ``transform`` is applied after the view augmentation.
            indices: the test images to adapt on (all by default).
            trainer: under DDP, its strategy sums the processes' gradients (``None``: one process).

        Raises:
            ValueError: ``module`` has no experts, ``dataset`` has no ``transform``.
        """
        num_experts = check_has_experts(module)
        size = len(dataset)  # type: ignore[arg-type]
        indices_np = np.arange(size) if indices is None else np.asarray(indices, dtype=np.int64)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        device = next(module.parameters()).device
        views = _TwoViews(dataset, self.augment, self.seed)
        was_training = module.training
        module.eval()
        history: list[list[float]] = []
        stopped = False
        with torch.inference_mode(False), torch.enable_grad():
            raw = torch.nn.Parameter(torch.full((num_experts,), 1.0 / num_experts, device=device))
            optimizer = torch.optim.SGD(
                [raw], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov
            )
            for epoch in range(self.epochs):
                views.epoch = epoch
                order = indices_np[np.random.RandomState(derive_seed(self.seed, epoch)).permutation(len(indices_np))]
                global_batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
                local = [batch[rank::world].tolist() for batch in global_batches]
                loader = DataLoader(views, batch_sampler=[b for b in local if b], num_workers=self.num_workers)
                batches = iter(loader)
                for batch in local:
                    grad_sum = torch.zeros(num_experts, device=device)
                    count = torch.tensor(float(len(batch)), device=device)
                    if batch:
                        view1, view2 = next(batches)
                        with torch.no_grad():
                            z1 = module.expert_logits(view1.to(device)).float()
                            z2 = module.expert_logits(view2.to(device)).float()
                        objective = prediction_stability(z1, z2, raw, reduction="sum")
                        (grad_sum,) = torch.autograd.grad(-objective, raw)
                    if world > 1:
                        grad_sum = trainer.strategy.reduce(grad_sum, reduce_op="sum")  # type: ignore[union-attr]
                        count = trainer.strategy.reduce(count, reduce_op="sum")  # type: ignore[union-attr]
                    raw.grad = grad_sum / count
                    optimizer.step()
                weights = F.softmax(raw.detach(), dim=0)
                history.append(weights.cpu().tolist())
                if bool((np.round(weights.cpu().numpy(), 2) < self.stop_below).any()):
                    stopped = epoch < self.epochs - 1
                    break
        module.train(was_training)
        return AggregationResult(F.softmax(raw.detach(), dim=0).cpu(), history, stopped, indices_np)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_has_experts(pl_module)
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "test_dataset", None)
        if dataset is None:
            raise ValueError(
                "TestTimeAggregation adapts on the data module's `test_dataset`, but the trainer has none. HINT: run "
                "`trainer.test(model, datamodule=...)` with a lightning_lt data module (the `lightning-lt test` CLI does)."
            )
        self.result = self.adapt(pl_module, dataset, None, trainer)
        with torch.inference_mode(False):
            pl_module.set_expert_weights(self.result.weights)
        shown = ", ".join(f"{w:.3f}" for w in self.result.weights.tolist())
        rank_zero_info(f"TestTimeAggregation: expert weights [{shown}] after {len(self.result.history)} epoch(s).")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None:
            weights = {f"test/expert{e}/weight": float(w) for e, w in enumerate(self.result.weights.tolist())}
            pl_module.log_dict(weights, sync_dist=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        before, after = metrics.get("test/equal_weights/acc"), metrics.get("test/acc")
        if before is not None and after is not None:
            rank_zero_info(
                f"TestTimeAggregation: test accuracy {float(before):.4f} with equal weights, {float(after):.4f} "
                "aggregated."
            )
