"""Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) as batch transforms and Lightning callbacks."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_lt.datamodules.samplers import derive_seed
from lightning_lt.losses.mixing import MixedTarget

__all__ = ["CutMix", "Mixup"]


class Mixup(Callback):
    r"""Mixup: train on convex combinations of image pairs, scored against both labels.

    For a batch ``(x, y)`` of size ``B``: ``lam ~ Beta(alpha, alpha)``, a random permutation ``perm`` of the batch,

    .. math::
        \tilde x = \lambda x + (1 - \lambda)\, x[\mathrm{perm}], \qquad
        L = \lambda\, \ell(f(\tilde x), y) + (1 - \lambda)\, \ell(f(\tilde x), y[\mathrm{perm}])

    as ``mixup_data`` / ``mixup_criterion`` of github:dvlab-research/MiSLAS (``methods.py``), whose first stage trains
    with mixup (``alpha=1``) on every batch. The transform returns ``(x_mixed, MixedTarget(y, y[perm], lam))``; the
    loss of a :class:`~lightning_lt.losses.MixedTarget` is :func:`~lightning_lt.losses.mixed_loss`.

    Two ways to use it:

    * as a callback of a :class:`~lightning_lt.tasks.LongTailClassifier` (or any module with a list attribute
      ``batch_transforms`` applied to ``(x, y)`` in ``training_step``): at fit setup it adds itself to
      ``pl_module.batch_transforms`` and removes itself at teardown. Only training batches are mixed.
    * as a plain function in any loop: ``x, target = mixup(x, y)``.

    Randomness: its own ``numpy`` generator, reseeded at every training epoch start from ``(seed, epoch, global
    rank)`` (``seed``: the argument, else ``PL_GLOBAL_SEED``, else 0), so each DDP process mixes differently and a run
    resumed at an epoch boundary repeats the uninterrupted run's draws; the generator state is also kept in the
    callback's ``state_dict``, so a run resumed from a mid-epoch checkpoint continues the epoch's draws.

    Args:
        alpha: Beta distribution parameter, ``> 0`` (MiSLAS: 1.0).
        prob: probability that a batch is mixed, in ``(0, 1]`` (MiSLAS mixes every batch: 1.0).
        lam: a fixed ``lambda`` in ``[0, 1]`` instead of drawing it (tests, ablations).
        seed: base seed of the draws (default: the global seed).

    Raises:
        ValueError: ``alpha <= 0``, ``prob`` outside ``(0, 1]``, ``lam`` outside ``[0, 1]``; when applied, a batch
            already mixed (two mixing transforms), or inputs without a batch dimension; at fit setup, a module
            without ``batch_transforms`` or one that trains on cached features (``cache_features=True``).

    Example:
        >>> mixup = Mixup(lam=0.75, seed=0)
        >>> x, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0, 1])
        >>> mixed, target = mixup(x, y)
        >>> perm = target.y_b  # y is arange(2), so y[perm] is perm
        >>> torch.equal(mixed, 0.75 * x + 0.25 * x[perm]), target.lam
        (True, 0.75)
    """

    def __init__(
        self, alpha: float = 1.0, prob: float = 1.0, lam: Optional[float] = None, seed: Optional[int] = None
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"Expected `alpha` of {owner} to be a finite number > 0 (the Beta(alpha, alpha) parameter), got "
                f"{alpha!r}. HINT: MiSLAS uses alpha=1.0; to train without mixing, remove the callback."
            )
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 < prob <= 1.0:
            raise ValueError(f"Expected `prob` of {owner} to be in (0, 1] (the share of mixed batches), got {prob!r}.")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0):
            raise ValueError(f"Expected `lam` of {owner} to be None (drawn from Beta) or in [0, 1], got {lam!r}.")
        self.alpha = float(alpha)
        self.prob = float(prob)
        self.lam = None if lam is None else float(lam)
        self.seed = seed
        self._rng = np.random.default_rng(self._base_seed())
        self._restored: Optional[tuple[int, dict]] = None  # (epoch, generator state) of a loaded checkpoint
        self._epoch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, prob=self.prob, lam=self.lam)

    def _base_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------------------------------------ the transform
    def __call__(self, x: Tensor, y: Union[Tensor, MixedTarget]) -> tuple[Tensor, Union[Tensor, MixedTarget]]:
        """Mix a batch with probability ``prob``: ``(x_mixed, MixedTarget(y, y[perm], lam))``, else ``(x, y)``."""
        if isinstance(y, MixedTarget):
            raise ValueError(
                f"{type(self).__name__} got a batch that is already mixed (its target is a MixedTarget). HINT: use one "
                "mixing transform at a time (Mixup or CutMix)."
            )
        if x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{type(self).__name__} expects inputs [B, ...] and labels [B], got shapes {tuple(x.shape)} and "
                f"{tuple(y.shape)}."
            )
        if self._rng.random() >= self.prob:
            return x, y
        lam = self.lam if self.lam is not None else float(self._rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(self._rng.permutation(x.shape[0])).to(x.device)
        mixed, lam = self.mix(x, perm, lam)
        return mixed, MixedTarget(y, y[perm], lam)

    def mix(self, x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
        """``(lam * x + (1 - lam) * x[perm], lam)``."""
        return lam * x + (1.0 - lam) * x[perm], lam

    # ------------------------------------------------------------------------------------------ callback
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        transforms = getattr(pl_module, "batch_transforms", None)
        if not isinstance(transforms, list):
            raise ValueError(
                f"{type(self).__name__} mixes training batches through the module's `batch_transforms` list, which "
                f"{type(pl_module).__name__} does not have. HINT: use lightning_lt.tasks.LongTailClassifier, or give "
                "your module `self.batch_transforms = []` and apply them in training_step (`x, y = t(x, y)`), scoring "
                "a MixedTarget with lightning_lt.losses.mixed_loss."
            )
        if getattr(pl_module, "cache_features", False):
            raise ValueError(
                f"{type(self).__name__} mixes input images, but {type(pl_module).__name__} trains on cached features "
                "(`cache_features=True`), whose batches are feature vectors. HINT: set `cache_features=False` to "
                "mix images through the frozen backbone, or remove the callback."
            )
        if self not in transforms:
            transforms.append(self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        transforms = getattr(pl_module, "batch_transforms", None)
        if isinstance(transforms, list) and self in transforms:
            transforms.remove(self)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._epoch = epoch
        if self._restored is None or self._restored[0] != epoch:  # not resumed within this epoch
            self._rng = np.random.default_rng(derive_seed(self._base_seed(), epoch, trainer.global_rank))
        self._restored = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at once: a run resumed mid-epoch continues that epoch without an `on_train_epoch_start`.
        if "rng" in state_dict:
            self._epoch = int(state_dict.get("epoch", 0))
            self._rng.bit_generator.state = state_dict["rng"]
            self._restored = (self._epoch, state_dict["rng"])


class CutMix(Mixup):
    r"""CutMix: paste a random box of another image of the batch, scored against both labels by area.

    ``lam ~ Beta(alpha, alpha)``, a permutation ``perm``, a box of sides ``int(S * sqrt(1 - lam))`` around a uniform
    centre (clipped to the image) on the last two dimensions: ``x[:, :, box] = x[perm, :, box]``, and ``lam`` is
    reset to the exact kept area ``1 - box_area / (H W)``. This is ``rand_bbox`` and the training loop of
    github:clovaai/CutMix-PyTorch (``train.py``), with its ``cutmix_prob`` as ``prob``. The loss is
    :func:`~lightning_lt.losses.mixed_loss` as for :class:`Mixup`; seeding and resuming are those of :class:`Mixup`.

    Args:
        alpha: Beta distribution parameter, ``> 0`` (CutMix's ``beta``, 1.0 in its CIFAR / ImageNet runs).
        prob: probability that a batch is mixed, in ``(0, 1]`` (CutMix's ``cutmix_prob``: 0.5 on CIFAR).
        lam: a fixed ``lambda`` in ``[0, 1]`` before the area correction (the box centre is still drawn).
        seed: base seed of the draws (default: the global seed).

    Raises:
        ValueError: as :class:`Mixup`; inputs with fewer than 3 dimensions (no image plane).

    Example:
        >>> x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
        >>> mixed, target = CutMix(lam=0.75, seed=2)(x, torch.tensor([0, 1]))
        >>> target.y_b.tolist(), target.lam, mixed[0, 0].tolist()  # a 2 x 2 box of image 1 in image 0: 1 - 4 / 16
        ([1, 0], 0.75, [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    """

    def mix(self, x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
        """Paste ``x[perm]``'s box into ``x``; return the mixed batch and the kept-area ``lam``."""
        if x.ndim < 3:
            raise ValueError(f"CutMix cuts boxes from images [B, C, H, W], got inputs of shape {tuple(x.shape)}.")
        size_w, size_h = x.shape[-2], x.shape[-1]  # CutMix's rand_bbox: W = size[2], H = size[3]
        cut_ratio = math.sqrt(1.0 - lam)
        cut_w, cut_h = int(size_w * cut_ratio), int(size_h * cut_ratio)
        cx, cy = int(self._rng.integers(size_w)), int(self._rng.integers(size_h))
        x1, x2 = int(np.clip(cx - cut_w // 2, 0, size_w)), int(np.clip(cx + cut_w // 2, 0, size_w))
        y1, y2 = int(np.clip(cy - cut_h // 2, 0, size_h)), int(np.clip(cy + cut_h // 2, 0, size_h))
        mixed = x.clone()
        mixed[..., x1:x2, y1:y2] = x[perm][..., x1:x2, y1:y2]
        return mixed, 1.0 - (x2 - x1) * (y2 - y1) / (size_w * size_h)
