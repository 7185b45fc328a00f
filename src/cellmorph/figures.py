"""Figures from arrays (the layer below training: a run's tables and numbers in, PNGs out), used by ``cv``,
``compare-inits``, ``profile-eval`` and the HTML report (:mod:`cellmorph.report`). PNG figures of a CV run: the treatment-level confusion matrix (the paper's Fig. 2),
per-fold learning curves (training loss; training and held-out tile accuracy) and the
pretrained-vs-random comparison (Fig. 4). Written atomically, headless (Agg backend).

Each ``*_figure`` builder returns the matplotlib figure (for tests); ``plot_*`` saves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellmorph.runinfo import atomic_path
from cellmorph.schema import HELDOUT_ACCURACY


def pyplot():
    """matplotlib's pyplot, headless (Agg), with mathtext off; loaded on first use (start-up time)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    # Labels are compound and MoA names as the user's CSVs spell them: a "$" in one must print as
    # itself, not start mathtext (which fails outright on e.g. "$^$"). No figure here uses mathtext.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str = "Treatment-level confusion") -> None:
    """:func:`confusion_figure` saved as a PNG."""
    _save(confusion_figure(matrix, classes, title), path)


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str = "Treatment-level confusion"):
    """Classes × classes; rows are the true MoA, columns the predicted MoA.

    Cells show counts of treatments, coloured by the row fraction.
    """
    plt = pyplot()
    matrix = np.asarray(matrix)
    n = len(classes)
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                        color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted MoA")
    ax.set_ylabel("true MoA")
    correct = int(np.trace(matrix))
    total = int(matrix.sum())
    ax.set_title(f"{title}: {correct}/{total} correct" if total else title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return fig


def plot_novelty_roc(unseen: np.ndarray, known: np.ndarray, path: Path, auroc: float, alpha: float,
                     flagged: float, false_alarms: float) -> None:
    """``open_set_roc.png`` of a lomo run: the ROC of the novelty score, unseen-MoA treatments against new compounds
    of known MoAs, with the calibrated flag's operating point (its measured false alarms, the fraction flagged)."""
    _save(novelty_roc_figure(unseen, known, auroc, alpha, flagged, false_alarms), path)


def novelty_roc_figure(unseen: np.ndarray, known: np.ndarray, auroc: float, alpha: float, flagged: float,
                       false_alarms: float):
    plt = pyplot()
    scores = np.concatenate([unseen, known])
    thresholds = np.concatenate([[np.inf], np.sort(np.unique(scores))[::-1]])
    tpr = [(unseen >= t).mean() for t in thresholds]
    fpr = [(known >= t).mean() for t in thresholds]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr, tpr, color="#1f77b4", label=f"novelty score (AUROC {auroc:.2f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8, label="chance")
    ax.scatter([false_alarms], [flagged], color="#d62728", zorder=3,
               label=f"Novel at α {alpha:g}: {flagged:.0%} flagged, {false_alarms:.0%} false alarms")
    ax.set_xlabel("new compounds of known MoAs flagged (false alarms)")
    ax.set_ylabel("unseen-MoA treatments flagged")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"Leave one MoA out: {len(unseen)} unseen, {len(known)} known treatments", fontsize=9)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (legends outside the axes are kept: tight bounding box)."""
    plt = pyplot()
    try:
        with atomic_path(Path(path), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


def _finite(value) -> bool:
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def _by_epoch(histories: dict[str, list[dict]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per fold: the epochs whose record has a finite ``key``, and those values."""
    out = {}
    for name, history in histories.items():
        points = [(int(h["epoch"]), float(h[key])) for h in history or [] if _finite(h.get(key))]
        if points:
            out[name] = ([e for e, _ in points], [v for _, v in points])
    return out


def _mean_curve(curves: dict[str, tuple[list[int], list[float]]], common: bool) -> tuple[list[int], list[float]]:
    """Mean over folds per epoch: at the epochs every fold has (``common``), else at any fold's."""
    values: dict[int, list[float]] = {}
    for epochs, ys in curves.values():
        for e, y in zip(epochs, ys):
            values.setdefault(e, []).append(y)
    keep = sorted(e for e, v in values.items() if not common or len(v) == len(curves))
    return keep, [float(np.mean(values[e])) for e in keep]


def learning_curves_figure(histories: dict[str, list[dict]], metric: str = "loss"):
    """Two panels: training ``metric`` per fold + mean; training accuracy (mean over folds) and,
    at the epochs whose held-out tiles were scored, held-out tile accuracy (each fold + mean).

    Every curve has markers, so a one-epoch run shows its points; the legends sit below the
    axes so they never cover data. Histories without held-out scores (older runs) still plot.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    losses = _by_epoch(histories, metric)
    many = len(losses) > 10
    n_epochs = max((max(e) for e, _ in losses.values()), default=0)
    fold_marker = "o" if n_epochs <= 30 else None
    colours = {name: ("0.55" if many else f"C{i % 10}") for i, name in enumerate(losses)}
    for i, (name, (epochs, values)) in enumerate(losses.items()):
        label = (f"each fold ({len(losses)})" if i == 0 else None) if many else str(name)
        ax_loss.plot(epochs, values, color=colours[name], alpha=0.35 if many else 0.8, linewidth=1,
                     marker=fold_marker if len(epochs) > 1 else "o", markersize=3, label=label)
    if losses:
        epochs, mean = _mean_curve(losses, common=True)
        ax_loss.plot(epochs, mean, color="black", linewidth=2.2, marker="o", markersize=5,
                     label="mean over folds", zorder=4)
    ax_loss.set_ylabel(f"training {metric}")
    ax_loss.set_title(f"Training {metric} per fold ({len(losses)} folds)", fontsize=10)

    train = _by_epoch(histories, "train_accuracy")
    if train:
        epochs, mean = _mean_curve(train, common=True)
        ax_acc.plot(epochs, mean, color="C0", linewidth=2, marker="o", markersize=5,
                    label=f"training accuracy (mean of {len(train)} folds)")
    heldout = _by_epoch(histories, HELDOUT_ACCURACY)
    handles = []
    if heldout:
        for name, (epochs, values) in heldout.items():
            ax_acc.scatter(epochs, values, s=16, marker="D", color="C3" if many else colours.get(name, "C3"),
                           alpha=0.45 if many else 0.8, zorder=3, linewidths=0)
        handles.append(Line2D([], [], linestyle="none", marker="D", markersize=4, color="C3" if many else "0.45",
                              alpha=0.6, label=f"held-out tile accuracy, each fold ({len(heldout)})"
                              + ("" if many else ", fold colours as on the left")))
        epochs, mean = _mean_curve(heldout, common=False)
        ax_acc.plot(epochs, mean, color="C3", linewidth=2, marker="D", markersize=6,
                    markeredgecolor="black", label="held-out tile accuracy (mean over folds)", zorder=4)
        ax_acc.set_title("Accuracy: training vs held-out tiles at the scored epochs", fontsize=10)
    else:
        ax_acc.set_title("Training accuracy (no held-out scores in this history)", fontsize=10)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("accuracy")

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if n_epochs == 1:  # a single epoch: one tick, the points centred
            ax.set_xticks([1])
            ax.set_xlim(0.5, 1.5)
    entries = ax_loss.get_legend_handles_labels()
    if entries[0]:
        ax_loss.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(4, len(entries[0])),
                       frameon=False)
    acc_handles, acc_labels = ax_acc.get_legend_handles_labels()
    acc_handles += handles
    if acc_handles:
        ax_acc.legend(handles=acc_handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1,
                      frameon=False)
    fig.tight_layout()
    return fig


def plot_learning_curves(histories: dict[str, list[dict]], path: Path, metric: str = "loss") -> None:
    """``learning_curves_figure`` written as a PNG."""
    _save(learning_curves_figure(histories, metric), path)


def init_comparison_figure(table, metric: str = "well_accuracy", title: str = "", chance: float | None = None):
    """The paper's Fig. 4: accuracy after N epochs, one colour per initialisation.

    ``table`` has columns ``init``, ``epoch``, ``replicate`` and ``metric``. Every replicate
    is drawn as a point (jittered sideways so equal values stay visible) and the mean ± SD
    as a bar with error bars, epochs side by side. The legend is a figure legend right of
    the axes, outside the plotting area, so it never covers a bar.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D

    inits = list(dict.fromkeys(table["init"]))
    epochs = sorted(int(e) for e in table["epoch"].unique())
    width = 0.8 / max(len(inits), 1)
    colours = {"imagenet": "#1f77b4", "xavier": "#d62728"}
    labels = {"imagenet": "ImageNet-pretrained", "xavier": "Xavier (random) init"}
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(epochs) + 2.4, 4.2), layout="constrained")
    for j, init in enumerate(inits):
        colour = colours.get(init, f"C{j + 2}")
        labelled = False
        for i, epoch in enumerate(epochs):
            values = table[(table["init"] == init) & (table["epoch"] == epoch)][metric].to_numpy(dtype=float)
            if not len(values):
                continue
            x = i + (j - (len(inits) - 1) / 2) * width
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.bar(x, values.mean(), width * 0.9, color=colour, alpha=0.35, yerr=sd, capsize=3,
                   label=None if labelled else f"{labels.get(init, init)} (mean ± SD)")
            labelled = True
            ax.scatter(x + rng.uniform(-width * 0.25, width * 0.25, len(values)), values, s=14, color=colour, zorder=3)
    ax.set_xticks(range(len(epochs)), [f"{e} epoch{'s' if e != 1 else ''}" for e in epochs])
    ax.set_xlim(-0.6, len(epochs) - 0.4)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel(metric.replace("_", " "))
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_title(title or "Pretrained vs. randomly initialised", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda k: names[k] == "chance")  # chance last
    handles, names = [handles[k] for k in order], [names[k] for k in order]
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=4, color="0.4"))
    names.append("each replicate")
    # A figure legend in its own column right of the axes (constrained layout makes room for it).
    fig.legend(handles, names, fontsize=8, loc="outside right upper", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_init_comparison(
    table, path: Path, metric: str = "well_accuracy", title: str = "", chance: float | None = None
) -> None:
    """``init_comparison_figure`` (the paper's Fig. 4) written as a PNG."""
    _save(init_comparison_figure(table, metric, title, chance), path)
