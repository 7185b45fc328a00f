"""What a run shows: one self-contained HTML report (:mod:`.html`), and the PNG figures it and the runs draw
(:mod:`cellmorph.figures`, re-exported here)."""

from cellmorph.figures import (
    init_comparison_figure,
    learning_curves_figure,
    plot_confusion,
    plot_init_comparison,
    plot_learning_curves,
)

__all__ = [
    "init_comparison_figure",
    "learning_curves_figure",
    "plot_confusion",
    "plot_init_comparison",
    "plot_learning_curves",
    "write_report",
]


def write_report(run, **kwargs):
    """``RUN/report.html`` for a cv, predict or compare-inits output folder (see :mod:`.html`)."""
    from cellmorph.report.html import write_report as write

    return write(run, **kwargs)
