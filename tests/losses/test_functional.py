"""The functional namespace and the package exports."""

from __future__ import annotations

import inspect

import lightning_lt.losses as losses
from lightning_lt.losses import functional


def test_functional_reexports():
    for name in functional.__all__:
        assert callable(getattr(functional, name)), name
    assert functional.class_balanced_weights is losses.class_balanced_weights


def test_every_loss_takes_class_counts_first():
    names = ["CrossEntropyLoss", "FocalLoss", "ClassBalancedLoss", "LDAMLoss", "LogitAdjustedLoss", "BalancedSoftmaxLoss"]
    for name in names:
        cls = getattr(losses, name)
        assert issubclass(cls, losses.LongTailLoss)
        params = list(inspect.signature(cls).parameters.values())
        assert params[0].name == "class_counts", name
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), name  # no **kwargs: the config schema
        assert all(p.annotation is not inspect.Parameter.empty for p in params), name
        assert cls.__doc__ and "Example:" in cls.__doc__, name
