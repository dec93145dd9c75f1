"""Shared helpers for the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir(name: str = "") -> Path:
    """Return ``../shared/data/<name>`` relative to the repository root, or skip the test."""
    path = (REPO_ROOT.parent / "shared" / "data" / name).resolve()
    if not path.exists():
        pytest.skip(f"real data set not found at {path} (the workplace's ../shared/data is absent)")
    return path

#: Strategy of the 2-process CPU DDP tests. ``ddp_spawn`` workers of this torch / gloo build abort at random
#: while shutting down after a finished fit (SIGABRT, "terminate called without an active exception";
#: about 1 fit in 12, with plain SGD too), which would make the suite flaky; forked workers skip that
#: shutdown. The DDP maths (gradient all-reduce, metric sync, samplers) is the same.
DDP_STRATEGY = "ddp_fork"

#: Lightning warnings of the small CPU fits in the callback and stage-2 tests (few batches, no workers, resumes).
QUIET_FITS = (
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*GPU available but not used:UserWarning",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated",
    "ignore:.*smaller than the logging interval:UserWarning",
)


def digits_classifier(lr: float = 0.1, momentum: float = 0.0, hidden: int = 16):
    """A small :class:`~lightning_lt.tasks.LongTailClassifier` for ``DigitsLT()`` (MLP, CE, SGD, no per-class logs)."""
    import functools

    import torch

    from lightning_lt.datamodules import DigitsLT
    from lightning_lt.losses import CrossEntropyLoss
    from lightning_lt.nets import MLP
    from lightning_lt.tasks import LongTailClassifier

    return LongTailClassifier(
        MLP(64, (hidden,)), 10, DigitsLT().class_counts, loss=CrossEntropyLoss, many_threshold=60, few_threshold=20,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=momentum), plot_per_class=False,
        log_per_class=False,
    )  # fmt: skip
