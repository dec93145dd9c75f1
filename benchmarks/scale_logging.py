"""Row ``per-class-logging-C8142`` of ``benchmarks/scale.py``: the cost of per-class output at 8,142 classes.

``LongTailClassifier`` (a linear classifier on 16 random features, 8,142 classes: iNaturalist-2018's count)
is validated on 256 samples by a ``Trainer`` with a ``CSVLogger`` three ways, alternating, ``repeats`` times
each (medians):

* ``off``: ``log_per_class=False``, the headline metrics only (the reference time);
* ``structured``: the default (``per_class_scalars_max=100``): the 8,142 values in one ``log_metrics`` call;
* ``scalars``: ``per_class_scalars_max`` above the class count, i.e. 8,142 keys through ``self.log`` as before.

``ratio`` = structured / off (target <= 1.2); ``scalars_ratio`` = scalars / off (the former behaviour).
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
import warnings
from argparse import Namespace
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_lt.losses import CrossEntropyLoss
from lightning_lt.nets import MLP
from lightning_lt.tasks import LongTailClassifier

ROW = "per-class-logging-C8142"


def _validate_seconds(num_classes: int, samples: int, **kwargs: Any) -> float:
    torch.manual_seed(0)
    model = LongTailClassifier(
        backbone=MLP(16, (32,)), num_classes=num_classes, class_counts=[10] * num_classes, loss=CrossEntropyLoss,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), plot_per_class=False, **kwargs,
    )
    x = torch.randn(samples, 16)
    y = torch.randint(0, num_classes, (samples,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(accelerator="cpu", devices=1, logger=CSVLogger(root), enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)
        start = time.perf_counter()
        trainer.validate(model, loader, verbose=False)
        return time.perf_counter() - start


def run(args: Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    quick = getattr(args, "quick", False)
    num_classes, samples, repeats = (500, 64, 1) if quick else (8142, 256, 3)
    modes = {
        "off": {"log_per_class": False},
        "structured": {},
        "scalars": {"per_class_scalars_max": num_classes},
    }
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _validate_seconds(num_classes, samples, **modes["off"])  # warm-up (imports, first allocations)
        for _ in range(repeats):  # alternate, so that a slow phase of the machine hits every mode alike
            for mode, kwargs in modes.items():
                times[mode].append(_validate_seconds(num_classes, samples, **kwargs))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    row = {
        "name": ROW,
        "validate_s_off": median["off"],
        "validate_s_structured": median["structured"],
        "validate_s_scalars": median["scalars"],
        "ratio": median["structured"] / median["off"],
        "scalars_ratio": median["scalars"] / median["off"],
        "target_ratio": 1.2,
    }
    setup = {
        "classes": num_classes, "samples": samples, "batch_size": 64, "repeats": repeats,
        "model": "LongTailClassifier(MLP(16, (32,)), linear head), CSVLogger",
        "times_s": times,
    }
    return row, setup
