"""PNG figures of a CV run: the treatment-level confusion matrix (the paper's Fig. 2)
and per-fold training loss curves. Written atomically, headless (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellmorph.runinfo import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str = "Treatment-level confusion") -> None:
    """Classes × classes; rows are the true MoA, columns the predicted MoA.

    Cells show counts of treatments, coloured by the row fraction.
    """
    plt = _pyplot()
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
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_learning_curves(histories: dict[str, list[dict]], path: Path, metric: str = "loss") -> None:
    """One line per fold of ``metric`` against epoch, plus the mean over folds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curves = []
    for name, history in histories.items():
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        values = [h[metric] for h in history]
        curves.append(values)
        ax.plot(epochs, values, alpha=0.35 if len(histories) > 10 else 0.8, linewidth=1,
                label=None if len(histories) > 10 else str(name))
    if curves:
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(1, length + 1), mean, color="black", linewidth=2.2, label="mean over folds")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training {metric}")
    ax.set_title(f"Training {metric} per fold ({len(curves)} folds)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_init_comparison(
    table, path: Path, metric: str = "well_accuracy", title: str = "", chance: float | None = None
) -> None:
    """The paper's Fig. 4: accuracy after N epochs, one colour per initialisation.

    ``table`` has columns ``init``, ``epoch``, ``replicate`` and ``metric``. Every replicate
    is drawn as a point (jittered sideways so equal values stay visible) and the mean ± SD
    as a bar with error bars, epochs side by side.
    """
    plt = _pyplot()
    inits = list(dict.fromkeys(table["init"]))
    epochs = sorted(int(e) for e in table["epoch"].unique())
    width = 0.8 / max(len(inits), 1)
    colours = {"imagenet": "#1f77b4", "xavier": "#d62728"}
    labels = {"imagenet": "ImageNet-pretrained", "xavier": "Xavier (random) init"}
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(epochs), 4.2))
    for j, init in enumerate(inits):
        colour = colours.get(init, f"C{j + 2}")
        for i, epoch in enumerate(epochs):
            values = table[(table["init"] == init) & (table["epoch"] == epoch)][metric].to_numpy(dtype=float)
            if not len(values):
                continue
            x = i + (j - (len(inits) - 1) / 2) * width
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.bar(x, values.mean(), width * 0.9, color=colour, alpha=0.35, yerr=sd, capsize=3,
                   label=labels.get(init, init) if i == 0 else None)
            ax.scatter(x + rng.uniform(-width * 0.25, width * 0.25, len(values)), values, s=14, color=colour, zorder=3)
    ax.set_xticks(range(len(epochs)), [f"{e} epoch{'s' if e != 1 else ''}" for e in epochs])
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel(metric.replace("_", " "))
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_title(title or "Pretrained vs. randomly initialised", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
