"""Figures for long-tail evaluation, logged to whichever Lightning logger is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_lt.metrics.segmentation import validate_tail_classes

_BANDS = (("few", "#d62728"), ("medium", "#ff7f0e"), ("many", "#2ca02c"))
_HEAD_COLOR, _TAIL_COLOR, _NA_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
_MAX_NAMED_CLASSES = 40  # more classes: index ticks instead of names


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


def per_class_iou_figure(
    ious: Sequence[float],
    class_names: Sequence[str],
    tail_classes: Optional[Sequence[int]] = None,
    title: str = "per-class IoU",
) -> Figure:
    """Bar chart of per-class IoU in label order, tail classes in another colour.

    One bar per class; a class whose IoU is ``nan`` (absent from predictions and targets) gets no bar but an
    "n/a" marker. With more than 40 classes the x axis shows class indices instead of names. A dashed line marks
    the mIoU (mean over the classes with an IoU). The y axis spans [0, 1].

    Args:
        ious: IoU per class, e.g. ``SegmentationIoU.compute()["iou"].tolist()``.
        class_names: one name per class.
        tail_classes: tail class ids, drawn in red with a head / tail legend; ``None``: one colour.
        title: the axes title.

    Raises:
        ValueError: ``ious`` and ``class_names`` differ in length, or invalid ``tail_classes``.
    """
    iou = np.asarray(ious, dtype=float).reshape(-1)
    names = [str(name) for name in class_names]
    if iou.size != len(names):
        raise ValueError(f"Expected one IoU per class name, got {iou.size} IoUs and {len(names)} names")
    num_classes = iou.size
    tail = np.zeros(num_classes, dtype=bool)
    if tail_classes is not None:
        tail[validate_tail_classes(tail_classes, num_classes)] = True
    x = np.arange(num_classes)
    defined = ~np.isnan(iou)
    width = min(max(6.4, 0.22 * num_classes + 1.5), 16.0)
    figure = Figure(figsize=(width, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if tail_classes is None:
        groups = [("_nolegend_", ~tail, _HEAD_COLOR)]
    else:
        groups = [("head", ~tail, _HEAD_COLOR), ("tail", tail, _TAIL_COLOR)]
    for label, in_group, color in groups:
        keep = in_group & defined
        ax.bar(x[keep], iou[keep], width=0.8, color=color, label=label, zorder=2)
    na_size = "small" if num_classes <= _MAX_NAMED_CLASSES else "xx-small"
    for c in np.flatnonzero(~defined):
        ax.text(c, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=na_size, color=_NA_COLOR)
    if defined.any():
        miou = float(iou[defined].mean())
        ax.axhline(miou, color="black", ls="--", lw=0.8, label=f"mIoU {miou:.3f}", zorder=3)
    ax.set_xlim(-0.6, num_classes - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("IoU")
    ax.set_title(title, loc="left")
    if num_classes <= _MAX_NAMED_CLASSES:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", rotation_mode="anchor", fontsize="small")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
        ax.set_xlabel("class index")
    handles, labels = ax.get_legend_handles_labels()
    if labels:  # head, tail, then the mIoU line
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("mIoU"))
        ax.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),  # above the bars, next to the title
            ncol=len(labels),
            fontsize="small",
            frameon=False,
        )
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
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
