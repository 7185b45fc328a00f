"""The run figures: what they draw, not only that a PNG appears."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cellmorph.report import (  # noqa: E402
    init_comparison_figure,
    learning_curves_figure,
    plot_init_comparison,
    plot_learning_curves,
)
from cellmorph.schema import HELDOUT_ACCURACY  # noqa: E402

LOSSES = {"0": 1.5, "1": 1.9, "2": 2.6}
TRAIN = {"0": 0.40, "1": 0.50, "2": 0.30}
HELDOUT = {"0": 0.20, "1": 0.80, "2": 0.65}  # no fold at the mean (0.55), which would hide it


def one_epoch(heldout: bool = True) -> dict[str, list[dict]]:
    return {
        name: [dict(epoch=1, loss=LOSSES[name], train_accuracy=TRAIN[name], lr=1e-3, seconds=2.0,
                    **({HELDOUT_ACCURACY: HELDOUT[name]} if heldout else {}))]
        for name in LOSSES
    }


def visible_marker(line) -> bool:
    return line.get_marker() not in (None, "None", "none", "", " ") and line.get_markersize() > 0


def rendered(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def pixel_at(image: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The RGB pixel under data point (x, y) of ``ax`` (display y counts from the bottom)."""
    px, py = ax.transData.transform((x, y))
    return image[image.shape[0] - 1 - int(round(py)), int(round(px))]


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_one_epoch_learning_curves_draw_their_points():
    fig = learning_curves_figure(one_epoch())
    try:
        ax_loss, ax_acc = fig.axes[:2]
        # Loss: every single-point line has a marker (a one-point line without one draws nothing).
        lines = [line for line in ax_loss.lines if len(line.get_xdata())]
        assert len(lines) == 4  # three folds + the mean
        assert all(visible_marker(line) and len(line.get_xdata()) == 1 for line in lines)
        mean_loss = np.mean(list(LOSSES.values()))
        means = [line for line in lines if line.get_label() == "mean over folds"]
        assert len(means) == 1 and means[0].get_ydata()[0] == pytest.approx(mean_loss)
        assert sorted(line.get_ydata()[0] for line in lines if line is not means[0]) == sorted(LOSSES.values())

        # Accuracy: the mean training accuracy, every fold's held-out point and their mean.
        by_label = {line.get_label(): line for line in ax_acc.lines}
        train = next(line for label, line in by_label.items() if label.startswith("training accuracy"))
        assert visible_marker(train) and train.get_ydata()[0] == pytest.approx(np.mean(list(TRAIN.values())))
        held_mean = next(line for label, line in by_label.items() if label.startswith("held-out tile accuracy"))
        assert visible_marker(held_mean)
        assert (held_mean.get_xdata()[0], held_mean.get_ydata()[0]) == (1, pytest.approx(0.55))
        points = np.concatenate([c.get_offsets() for c in ax_acc.collections])
        assert sorted(map(tuple, np.asarray(points))) == [(1.0, v) for v in sorted(HELDOUT.values())]

        # And the pixels: the black mean-loss marker and the red held-out mean marker are painted.
        image = rendered(fig)
        assert (pixel_at(image, ax_loss, 1, mean_loss) < 60).all()
        red = np.array(mcolors.to_rgb(held_mean.get_markerfacecolor())) * 255
        assert np.abs(pixel_at(image, ax_acc, 1, 0.55) - red).max() < 40
        for collection in ax_acc.collections:  # each fold's held-out point, in its own (translucent) colour
            (x, y), = collection.get_offsets()
            r, g, b, a = collection.get_facecolor()[0]
            expected = (np.array([r, g, b]) * a + (1 - a)) * 255
            assert np.abs(pixel_at(image, ax_acc, x, y) - expected).max() < 40, (y, expected)
    finally:
        plt.close(fig)


def test_learning_curves_png_and_history_without_heldout(tmp_path):
    path = tmp_path / "curves.png"
    plot_learning_curves(one_epoch(), path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 800
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    # The held-out markers' red is in the picture (markers + legend), not only white and greys.
    assert (np.abs(pixels - np.array([214, 39, 40])).max(axis=1) < 30).sum() > 20

    older = {name: [dict(epoch=e, loss=2.0 / e, train_accuracy=1 - 0.5 / e, lr=1e-3, seconds=1.0) for e in (1, 2, 3)]
             for name in ("a", "b")}
    fig = learning_curves_figure(older)
    try:
        ax_loss, ax_acc = fig.axes[:2]
        assert not ax_acc.collections  # no held-out points invented
        assert [line.get_label() for line in ax_acc.lines] == ["training accuracy (mean of 2 folds)"]
        np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [0.5, 0.75, 1 - 0.5 / 3])
        mean = next(line for line in ax_loss.lines if line.get_label() == "mean over folds")
        np.testing.assert_allclose(mean.get_xdata(), [1, 2, 3])
    finally:
        plt.close(fig)
    plot_learning_curves(older, tmp_path / "older.png")
    assert (tmp_path / "older.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_curve_legends_sit_outside_the_axes():
    histories = {str(k): [dict(epoch=e, loss=2.0 / e + k, train_accuracy=0.9, lr=1e-3, seconds=1.0,
                               **({HELDOUT_ACCURACY: 0.8} if e in (1, 5) else {})) for e in range(1, 6)] for k in range(8)}
    fig = learning_curves_figure(histories)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 2
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not overlaps(box, ax.get_window_extent(renderer)), (box, ax)
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0  # not cut off
        # The held-out mean is averaged over folds per scored epoch, at those epochs only.
        ax_acc = fig.axes[1]
        held = next(line for line in ax_acc.lines if line.get_label().startswith("held-out"))
        assert list(held.get_xdata()) == [1, 5]
    finally:
        plt.close(fig)


def comparison_table() -> pd.DataFrame:
    rows = []
    for init, level in (("imagenet", 0.95), ("xavier", 0.9)):  # tall bars everywhere, right edge included
        for epoch in (1, 2):
            for replicate, delta in enumerate((-0.02, 0.0, 0.02)):
                rows.append(dict(init=init, epoch=epoch, replicate=replicate, well_accuracy=level + delta))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("epochs", [(1,), (1, 2)])
def test_init_comparison_legend_covers_no_bar(tmp_path, epochs):
    table = comparison_table()
    table = table[table["epoch"].isin(epochs)]
    fig = init_comparison_figure(table, chance=1 / 12, title="t")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legend = ax.get_legend() or fig.legends[0]
        box = legend.get_window_extent(renderer)
        bars = [patch for patch in ax.patches]
        assert len(bars) == 2 * len(epochs)
        for bar in bars:
            assert not overlaps(box, bar.get_window_extent(renderer)), (box, bar)
        for points in ax.collections:
            assert not overlaps(box, points.get_window_extent(renderer))
        assert not overlaps(box, ax.get_window_extent(renderer))  # outside the plotting area altogether
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 <= box.y0 <= box.y1 <= fig.bbox.y1 + 1
        labels = [text.get_text() for text in legend.get_texts()]
        assert labels == ["ImageNet-pretrained (mean ± SD)", "Xavier (random) init (mean ± SD)", "chance", "each replicate"]
        heights = sorted(bar.get_height() for bar in bars)
        assert heights == pytest.approx(sorted([0.95, 0.9] * len(epochs)))
    finally:
        plt.close(fig)
    path = tmp_path / "fig4.png"
    plot_init_comparison(table, path, chance=1 / 12)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > png.height  # the legend column widens the picture
