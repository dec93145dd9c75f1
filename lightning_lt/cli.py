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
import os
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.imports import RequirementCache

from lightning_lt.checkpoint import AtomicCheckpointIO

#: Attributes of the data module linked into ``model.init_args`` at instantiation.
LINKED_DATA_ATTRIBUTES = ("num_classes", "class_counts", "class_names")


def run_dir(trainer: Trainer) -> str:
    """The directory of this run: TensorBoard's / CSV's ``<save_dir>/<name>/version_N``; for other loggers
    (W&B) ``<save_dir>/<name>/<version>``, i.e. ``<save_dir>/<project>/<run id>``, where ``ModelCheckpoint``
    puts ``checkpoints/``; without a logger, ``default_root_dir``. Call it on every rank (it broadcasts)."""
    if not trainer.loggers or isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return trainer.log_dir or trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return trainer.strategy.broadcast(path)


#: ``parser.save`` keyword that keeps ``None`` values: ``skip_unset`` since jsonargparse 4.49, ``skip_none`` before.
_KEEP_NONE = "skip_unset" if RequirementCache("jsonargparse>=4.49") else "skip_none"


class RunConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's own directory (:func:`run_dir`), so that runs sharing a logger
    ``save_dir`` (W&B sweep agents started in one folder) each keep their own config next to their checkpoints.

    Lightning's callback writes it to ``trainer.log_dir``, which for W&B is the shared ``save_dir``."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            log_dir = run_dir(trainer)
            config_path = os.path.join(log_dir, self.config_filename)
            fs = get_filesystem(log_dir)
            if not self.overwrite:
                exists = trainer.strategy.broadcast(fs.isfile(config_path) if trainer.is_global_zero else False)
                if exists:
                    raise RuntimeError(
                        f"{type(self).__name__} expected {config_path} to NOT exist. Aborting to avoid overwriting"
                        " the results of a previous run; delete it or set `save_config_kwargs={'overwrite': True}`."
                    )
            if trainer.is_global_zero:
                fs.makedirs(log_dir, exist_ok=True)
                self.parser.save(
                    self.config, config_path, overwrite=self.overwrite, multifile=self.multifile, **{_KEEP_NONE: False}
                )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class LightningLTCLI(LightningCLI):
    """LightningCLI for lightning-lt: subclass mode for model and data, data facts linked into the model.

    ``config.yaml`` is saved in each run's own directory (:class:`RunConfigCallback`; with W&B next to the
    run's checkpoints, so sweep runs started in one folder keep one config each) and overwritten there (repeated
    runs with a fixed version do not fail). After ``fit`` a summary of the final validation metrics is printed.
    Checkpoints are written atomically (:class:`~lightning_lt.checkpoint.AtomicCheckpointIO`) unless the trainer
    is given its own ``CheckpointIO`` plugin.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if "plugins" not in kwargs and uses_default_checkpoint_io(trainer_config):
            plugins = trainer_config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        summary = final_metrics_summary(self.trainer.callback_metrics, stage="val")
        if summary:
            rank_zero_info(summary)


def uses_default_checkpoint_io(trainer_config: dict[str, Any]) -> bool:
    """Whether a Trainer built from ``trainer_config`` would write checkpoints with Lightning's default
    ``TorchCheckpointIO``: no ``CheckpointIO`` among its plugins or in its strategy, and not a strategy that
    saves by its own means (DeepSpeed, XLA / TPU)."""
    plugins = trainer_config.get("plugins")
    plugins = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        return False
    strategy = trainer_config.get("strategy", "auto")
    if isinstance(strategy, Strategy):
        if getattr(strategy, "_checkpoint_io", None) is not None:
            return False
        strategy = type(strategy).__name__
    own_savers = ("deepspeed", "xla", "tpu")
    names = f"{strategy} {trainer_config.get('accelerator', '')}".lower()
    return not any(name in names for name in own_savers)


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
