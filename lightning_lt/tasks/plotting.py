"""Figures for long-tail evaluation, logged to whichever Lightning logger is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_BANDS = (("few", "#d62728"), ("medium", "#ff7f0e"), ("many", "#2ca02c"))


def per_class_accuracy_figure(
    class_counts: Sequence[int],
    accuracies: Sequence[float],
    many_threshold: int = 100,
    few_threshold: int = 20,
    title: str = "per-class accuracy",
) -> Figure:
    """Scatter per-class accuracy against training count on a log-scale x axis.

    The few (``n < few_threshold``), medium and many (``n > many_threshold``) bands are shaded. Classes
    with no evaluation samples (accuracy ``nan``) are left out.
    """
    counts = np.asarray(class_counts, dtype=float)
    acc = np.asarray(accuracies, dtype=float)
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    low = max(0.8, counts.min() / 1.5) if counts.size else 1.0
    high = counts.max() * 1.5 if counts.size else 10.0
    edges = {"few": (low, few_threshold), "medium": (few_threshold, many_threshold), "many": (many_threshold, high)}
    for name, color in _BANDS:
        start, stop = edges[name]
        if stop > start:
            ax.axvspan(start, stop, color=color, alpha=0.12, label=name, lw=0)
    keep = ~np.isnan(acc)
    ax.scatter(counts[keep], acc[keep], s=14, color="#1f77b4", zorder=3)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a figure to an ``H x W x 3`` uint8 array."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(logger: Logger, key: str, figure: Figure, step: Optional[int] = None) -> Optional[str]:
    """Log ``figure`` to ``logger``: TensorBoard and W&B natively, otherwise as a PNG in the log dir.

    Returns the path of the written PNG for file-based loggers, else ``None``.
    """
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, figure_to_array(figure), global_step=step, dataformats="HWC")
        return None
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[figure_to_array(figure)])
        return None
    log_dir = getattr(logger, "log_dir", None) or logger.save_dir
    if log_dir is None:
        return None
    folder = os.path.join(log_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    suffix = "" if step is None else f"_step{step:06d}"
    path = os.path.join(folder, key.replace("/", "_") + suffix + ".png")
    figure.savefig(path)
    return path
