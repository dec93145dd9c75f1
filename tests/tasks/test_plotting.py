import math

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle

from lightning_lt.tasks.plotting import figure_to_array, per_class_iou_figure
from lightning_lt.tasks.plotting import ood_score_histogram_figure

CAMVID_NAMES = [
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"
]


def _bars(figure):
    (ax,) = figure.axes
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _na_markers(figure):
    (ax,) = figure.axes
    return [t for t in ax.texts if t.get_text() == "n/a"]


def test_camvid_figure_with_names_tail_colours_and_nan():
    ious = [0.9, 0.8, 0.2, 0.95, 0.7, 0.75, float("nan"), 0.3, 0.85, 0.1, float("nan")]
    figure = per_class_iou_figure(ious, CAMVID_NAMES, tail_classes=[9, 10], title="CamVid val")
    image = figure_to_array(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # something was drawn

    (ax,) = figure.axes
    assert ax.get_title(loc="left") == "CamVid val"
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == CAMVID_NAMES  # label order
    bars = _bars(figure)
    assert len(bars) == 9  # nan classes get no bar ...
    assert sorted(round(t.get_position()[0]) for t in _na_markers(figure)) == [6, 10]  # ... but an "n/a" marker
    by_class = {round(b.get_x() + b.get_width() / 2): b for b in bars}
    assert by_class[9].get_height() == pytest.approx(0.1)
    assert to_hex(by_class[9].get_facecolor()) != to_hex(by_class[0].get_facecolor())  # tail vs head colour
    head_colours = {to_hex(by_class[c].get_facecolor()) for c in range(9) if c != 6}
    assert head_colours == {to_hex(by_class[0].get_facecolor())}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["head", "tail", f"mIoU {np.nanmean(ious):.3f}"]


def test_150_classes_use_index_ticks():
    rng = np.random.default_rng(0)
    ious = rng.random(150)
    ious[[3, 77, 149]] = np.nan
    figure = per_class_iou_figure(ious.tolist(), [f"class{c}" for c in range(150)], tail_classes=range(100, 150))
    image = figure_to_array(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    (ax,) = figure.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks)  # indices, not names
    assert not any(t.startswith("class") for t in ticks)
    assert ax.get_xlabel() == "class index"
    assert len(_bars(figure)) == 147 and len(_na_markers(figure)) == 3


def test_without_tail_classes_and_all_nan():
    figure = per_class_iou_figure([0.5, 0.25], ["a", "b"])
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mIoU 0.375"]  # no head / tail entries
    assert len({to_hex(b.get_facecolor()) for b in _bars(figure)}) == 1

    figure = per_class_iou_figure([math.nan, math.nan], ["a", "b"], tail_classes=[1])
    assert figure_to_array(figure).dtype == np.uint8
    assert not _bars(figure) and len(_na_markers(figure)) == 2


@pytest.mark.parametrize(
    ("ious", "names", "tail", "match"),
    [
        ([0.5, 0.5], ["a"], None, "2 IoUs and 1 names"),
        ([0.5, 0.5], ["a", "b"], [2], r"Tail class id 2 .*\[0, 2\)"),
        ([0.5, 0.5], ["a", "b"], [], "non-empty"),
    ],
)
def test_invalid_arguments(ious, names, tail, match):
    with pytest.raises(ValueError, match=match):
        per_class_iou_figure(ious, names, tail_classes=tail)


def _hist_patches(figure):
    (ax,) = figure.axes
    return [p for p in ax.patches if p.get_label() in ("ID", "OOD")]


def test_ood_score_histogram_figure():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(3.0, 1.0, 400), rng.normal(0.0, 1.0, 50)
    figure = ood_score_histogram_figure(id_scores.tolist(), ood_scores.tolist(), "jointenergy")
    image = figure_to_array(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    (ax,) = figure.axes
    assert ax.get_xlabel() == "jointenergy (higher = in-distribution)"
    assert ax.get_title() == "jointenergy: ID vs OOD"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ID", "OOD"]
    id_patch, ood_patch = _hist_patches(figure)
    # shared bins over the pooled range, both normalised to unit area despite 400 vs 50 scores
    pooled = np.concatenate([id_scores, ood_scores])
    for patch, scores in ((id_patch, id_scores), (ood_patch, ood_scores)):
        x, y = patch.get_xy()[:, 0], patch.get_xy()[:, 1]
        assert x.min() == pytest.approx(pooled.min()) and x.max() == pytest.approx(pooled.max())
        edges = np.histogram_bin_edges(pooled, bins=int(np.sqrt(pooled.size)))
        density, _ = np.histogram(scores, bins=edges, density=True)
        assert (density * np.diff(edges)).sum() == pytest.approx(1.0)
        assert y.max() == pytest.approx(density.max())
    assert not [t for t in ax.texts if t.get_text()]  # no note


def test_ood_score_histogram_figure_without_ood_scores_or_with_non_finite_ones():
    figure = ood_score_histogram_figure([1.0, 2.0, 2.5], [], "maxlogit", title="epoch 3")
    assert figure_to_array(figure).dtype == np.uint8
    (ax,) = figure.axes
    assert ax.get_title() == "epoch 3"
    assert [t.get_text() for t in ax.texts] == ["no OOD samples"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ID"]

    figure = ood_score_histogram_figure([], [], "energy")
    assert figure_to_array(figure).shape[2] == 3
    (ax,) = figure.axes
    assert ax.texts[0].get_text() == "no ID samples\nno OOD samples" and ax.get_legend() is None

    figure = ood_score_histogram_figure([5.0, 5.0], [float("inf"), 1.0, float("nan")], "energy")  # one ID value
    assert figure_to_array(figure).dtype == np.uint8
    (ax,) = figure.axes
    assert ax.texts[0].get_text() == "2 non-finite OOD scores left out"


def test_tau_curve_figure_marks_the_chosen_tau_and_skips_nan():
    from lightning_lt.tasks.plotting import tau_curve_figure

    figure = tau_curve_figure([0.0, 0.5, 1.0], [0.4, float("nan"), 0.6], chosen_tau=1.0)
    (ax,) = figure.axes
    (curve,) = [line for line in ax.lines if line.get_marker() == "o"]
    assert curve.get_xdata().tolist() == [0.0, 1.0]
    assert "chosen tau 1 (0.6000)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert figure_to_array(figure).ndim == 3
    with pytest.raises(ValueError, match="one balanced accuracy per tau, got 3 taus and 2"):
        tau_curve_figure([0.0, 0.5, 1.0], [0.4, 0.5])
