"""Class-aware re-sampling that stays correct under DDP, and the seeds of per-epoch, per-rank randomness."""

import math
from collections.abc import Iterator, Sequence
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["ResampledSampler", "derive_seed"]


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and ``keys`` (e.g. epoch, rank) with numpy's ``SeedSequence``.

    Distinct key tuples give independent seeds (unlike ``seed + rank``, where rank 1 of epoch 0 would repeat
    rank 0 of epoch 1).

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1), derive_seed(0, 1) == derive_seed(0, 2)
        (True, False)
    """
    return int(np.random.SeedSequence([int(seed) % 2**64, *(int(k) for k in keys)]).generate_state(1)[0])

_MODES = {"class_balanced": 0.0, "sqrt": 0.5}


class ResampledSampler(DistributedSampler):
    """Draws training indices with replacement so that class ``c`` is seen with probability ``∝ n_c^q``.

    Each sample ``i`` is drawn with ``P(i) ∝ n_{y_i}^(q - 1)``, hence class ``c`` with probability
    ``p_c = n_c^q / sum_k n_k^q``: ``q = 0`` (``"class_balanced"``) gives uniform classes,
    ``q = 1/2`` (``"sqrt"``) square-root sampling.

    Every epoch has one global *plan*: ``num_samples`` (default ``len(targets)``) indices drawn from a
    ``torch.Generator`` seeded with ``seed + epoch``, identical on every rank, padded by repeating its
    first entries up to a multiple of ``num_replicas`` (or truncated to one with ``drop_last``).
    Rank ``r`` iterates over ``plan[r::num_replicas]``, so the ranks' shares are disjoint positions of
    the plan and together cover it. :meth:`set_epoch` changes the plan.

    Being a :class:`~torch.utils.data.DistributedSampler`, Lightning neither wraps nor replaces it
    under DDP and calls :meth:`set_epoch` at every epoch start.

    Note that the constructor argument ``num_samples`` is the epoch size over *all* ranks, whereas the
    attribute ``num_samples`` (inherited meaning, ``len(sampler)``) is the share of one rank.

    Args:
        targets: training label of every dataset index.
        mode: ``"class_balanced"`` (``q = 0``) or ``"sqrt"`` (``q = 0.5``).
        num_replicas: number of processes (``trainer.world_size``).
        rank: this process' rank in ``[0, num_replicas)``.
        seed: base seed; the plan of epoch ``e`` uses ``seed + e``.
        num_samples: indices drawn per epoch over all ranks (default: ``len(targets)``).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.

    Raises:
        ValueError: empty ``targets``, negative labels, unknown ``mode``, ``num_replicas < 1``,
            ``rank`` outside ``[0, num_replicas)`` or ``num_samples < 1``.

    Example:
        >>> sampler = ResampledSampler([0, 0, 0, 0, 0, 0, 1, 1], mode="class_balanced", num_samples=4000)
        >>> labels = [[0, 0, 0, 0, 0, 0, 1, 1][i] for i in sampler]
        >>> round(sum(labels) / len(labels), 1)  # class 1 is now half of the draws
        0.5
    """

    def __init__(
        self,
        targets: Sequence[int],
        mode: Literal["class_balanced", "sqrt"] = "class_balanced",
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_samples: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"Expected `mode` to be one of {tuple(_MODES)}, got {mode!r}")
        targets_t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
        if targets_t.numel() == 0:
            raise ValueError("Expected a non-empty `targets` (the training labels), got an empty sequence")
        if targets_t.min() < 0:
            raise ValueError(f"Expected non-negative labels in `targets`, got {int(targets_t.min())}")
        if num_replicas < 1:
            raise ValueError(f"Expected `num_replicas` >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Expected `rank` in [0, {num_replicas}) (`num_replicas`={num_replicas}), got {rank}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"Expected `num_samples` >= 1 (or None for len(targets)), got {num_samples}")
        super().__init__(
            targets_t, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        self.targets = targets_t
        self.mode = mode
        self.q = _MODES[mode]
        self.plan_size = int(num_samples) if num_samples is not None else int(targets_t.numel())
        if drop_last:
            if self.plan_size < num_replicas:
                raise ValueError(
                    f"`drop_last=True` with {self.plan_size} samples per epoch and {num_replicas} replicas "
                    "leaves every rank empty; increase `num_samples` or set `drop_last=False`"
                )
            self.total_size = (self.plan_size // num_replicas) * num_replicas
        else:
            self.total_size = math.ceil(self.plan_size / num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas
        class_counts = torch.bincount(targets_t).to(torch.float64)
        self.class_counts = class_counts
        # P(i) ∝ n_{y_i}^(q - 1); classes absent from targets never get drawn.
        self.weights = class_counts[targets_t].pow(self.q - 1.0)

    def class_probabilities(self) -> torch.Tensor:
        """Expected fraction of draws per class, ``n_c^q / sum_k n_k^q`` (0 for absent classes)."""
        present = self.class_counts > 0
        p = torch.zeros_like(self.class_counts)
        p[present] = self.class_counts[present].pow(self.q)
        return p / p.sum()

    def epoch_plan(self, epoch: Optional[int] = None) -> list[int]:
        """The global plan of ``epoch`` (default: the current one), ``total_size`` indices, before splitting."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        plan = torch.multinomial(self.weights, self.plan_size, replacement=True, generator=generator)
        if self.total_size > self.plan_size:
            repeats = math.ceil(self.total_size / self.plan_size)
            plan = plan.repeat(repeats)
        return plan[: self.total_size].tolist()

    def __iter__(self) -> Iterator[int]:
        plan = self.epoch_plan()
        return iter(plan[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
