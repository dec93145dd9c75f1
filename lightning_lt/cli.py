"""The ``lightning-lt`` command line: LightningCLI with data facts linked into the model.

Usage::

    lightning-lt fit --config configs/cifar10_lt/ldam_drw.yaml
    lightning-lt fit --config configs/quickstart.yaml --trainer.max_epochs=5
    lightning-lt test --config configs/cifar10_lt/ce.yaml --ckpt_path path/to/last.ckpt

Any LightningModule and LightningDataModule can be chosen by ``class_path``. The data module's
``num_classes``, ``class_counts`` and ``class_names`` are linked into ``model.init_args`` when the
classes are instantiated, so a config never repeats them. Data modules compute them lazily, right after
``__init__`` (LightningCLI reads linked attributes before ``setup()`` runs).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

#: Attributes of the data module linked into ``model.init_args`` at instantiation.
LINKED_DATA_ATTRIBUTES = ("num_classes", "class_counts", "class_names")


class LightningLTCLI(LightningCLI):
    """LightningCLI for lightning-lt: subclass mode for model and data, data facts linked into the model.

    ``config.yaml`` is overwritten in the log directory (so repeated runs and W&B sweep agents that share a
    directory do not fail), and after ``fit`` a summary of the final validation metrics is printed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def after_fit(self) -> None:
        summary = final_metrics_summary(self.trainer.callback_metrics, stage="val")
        if summary:
            rank_zero_info(summary)


def final_metrics_summary(metrics: dict[str, Any], stage: str = "val") -> str:
    """One line per headline metric logged under ``{stage}/``: overall, balanced, many/medium/few accuracy
    (classification); mIoU, head/tail mIoU, pixel accuracy (segmentation)."""
    names = ("acc", "balanced_acc", "acc_many", "acc_medium", "acc_few", "miou", "miou_head", "miou_tail", "pixel_acc")
    rows = []
    for name in names:
        value = metrics.get(f"{stage}/{name}")
        if value is None:
            continue
        value = float(value)
        rows.append(f"  {name:<13} {'nan' if math.isnan(value) else f'{value:.4f}'}")
    if not rows:
        return ""
    return f"Final {stage} metrics:\n" + "\n".join(rows)


def main(args: Any = None) -> None:
    """Entry point of the ``lightning-lt`` console script."""
    LightningLTCLI(args=args)


if __name__ == "__main__":
    main()
