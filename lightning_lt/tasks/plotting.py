"""Figures for long-tail evaluation, logged to whichever Lightning logger is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

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


def ood_score_histogram_figure(
    id_scores: Sequence[float],
    ood_scores: Sequence[float],
    score_name: str,
    title: Optional[str] = None,
) -> Figure:
    """Overlaid histograms of an OOD score on in-distribution (ID) and OOD inputs.

    Both histograms share the same bins over the pooled range of the scores (between 10 and 60 bins, about the
    square root of the number of scores) and are normalised to unit area (``density=True``), so an ID set and an
    OOD set of different sizes compare directly. The less they overlap, the better the score separates ID from OOD.
    A side without scores is not drawn and a "no ID samples" / "no OOD samples" note is shown instead; non-finite
    scores are left out (the note says how many).

    Args:
        id_scores: the score of every ID input (higher = in-distribution).
        ood_scores: the score of every OOD input.
        score_name: the score's name, e.g. ``"jointenergy"``; the x label is ``"<score_name> (higher =
            in-distribution)"``.
        title: the axes title; default ``"<score_name>: ID vs OOD"``.
    """
    sides = {
        "ID": np.asarray(id_scores, dtype=float).reshape(-1),
        "OOD": np.asarray(ood_scores, dtype=float).reshape(-1),
    }
    notes = []
    for label, values in sides.items():
        finite = np.isfinite(values)
        if not finite.all():
            notes.append(f"{int((~finite).sum())} non-finite {label} scores left out")
            sides[label] = values[finite]
    notes = [f"no {label} samples" for label, values in sides.items() if not values.size] + notes
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    pooled = np.concatenate(list(sides.values()))
    if pooled.size:
        num_bins = int(np.clip(np.sqrt(pooled.size), 10, 60))
        edges = np.histogram_bin_edges(pooled, bins=num_bins)  # a single value: one unit-wide range around it
        for (label, values), color in zip(sides.items(), (_HEAD_COLOR, _TAIL_COLOR)):
            if values.size:
                ax.hist(values, bins=edges, density=True, alpha=0.5, color=color, label=label, histtype="stepfilled")
                ax.hist(values, bins=edges, density=True, color=color, histtype="step", lw=1.0)
    if notes:
        ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, ha="left", va="top", fontsize="small",
                color=_NA_COLOR)
    ax.set_xlabel(f"{score_name} (higher = in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(f"{score_name}: ID vs OOD" if title is None else title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper right", fontsize="small")
    ax.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def tau_curve_figure(
    taus: Sequence[float],
    balanced_accuracies: Sequence[float],
    chosen_tau: Optional[float] = None,
    title: str = "tau-normalisation: balanced accuracy vs tau",
) -> Figure:
    """Balanced accuracy against ``tau`` of tau-normalisation (one point per ``tau``), the chosen ``tau`` marked.

    ``tau = 0`` is the stage-1 classifier, ``tau = 1`` unit-norm class weights. ``nan`` accuracies are left out.

    Args:
        taus: the ``tau`` grid.
        balanced_accuracies: balanced (mean per-class) accuracy at each ``tau``.
        chosen_tau: the selected ``tau`` (a dashed vertical line), or ``None``.
        title: the axes title.

    Raises:
        ValueError: ``taus`` and ``balanced_accuracies`` differ in length.
    """
    tau = np.asarray(taus, dtype=float).reshape(-1)
    acc = np.asarray(balanced_accuracies, dtype=float).reshape(-1)
    if tau.size != acc.size:
        raise ValueError(f"Expected one balanced accuracy per tau, got {tau.size} taus and {acc.size} accuracies")
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    keep = ~np.isnan(acc)
    ax.plot(tau[keep], acc[keep], marker="o", ms=4, color=_HEAD_COLOR, zorder=3)
    if chosen_tau is not None and np.isfinite(chosen_tau):
        best = acc[np.argmin(np.abs(tau - chosen_tau))] if tau.size else float("nan")
        label = f"chosen tau {chosen_tau:g}" + (f" ({best:.4f})" if np.isfinite(best) else "")
        ax.axvline(chosen_tau, color=_TAIL_COLOR, ls="--", lw=1.0, label=label, zorder=2)
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xlabel("tau (class weights divided by their norm^tau)")
    ax.set_ylabel("balanced accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
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


def log_validation_accuracy_figure(module: Any, per_class: Sequence[float]) -> None:
    """Log the per-class accuracy figure of a classifier's validation epoch to every logger of ``module`` as
    ``val/per_class_accuracy``, when ``module.plot_per_class`` is set, its class counts are known, the trainer is
    not sanity checking, and this is rank zero with at least one logger. ``module`` has ``class_counts``,
    ``many_threshold`` and ``few_threshold`` (:class:`~lightning_lt.tasks.LongTailClassifier`,
    :class:`~lightning_lt.tasks.MultiExpertClassifier`)."""
    trainer = module.trainer
    if not (module.plot_per_class and module.class_counts is not None and not trainer.sanity_checking
            and trainer.is_global_zero and module.loggers):  # fmt: skip
        return
    values = per_class.cpu().tolist() if hasattr(per_class, "cpu") else list(per_class)
    figure = per_class_accuracy_figure(
        module.class_counts, values, module.many_threshold, module.few_threshold,
        title=f"per-class accuracy, epoch {module.current_epoch}",
    )  # fmt: skip
    for logger in module.loggers:
        log_figure(logger, "val/per_class_accuracy", figure, step=module.global_step)
