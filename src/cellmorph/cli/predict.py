"""``predict`` and ``report``: a model's calls on a new screen, and the HTML report of any output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cellmorph.cli.common import (
    PROGRESS_HELP,
    ImageInput,
    log_line,
    print_report,
    command,
    console,
    input_options,
    shared_options,
)
from cellmorph.cli.options import config_options

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.predict import PredictConfig
from cellmorph.errors import CellmorphError, validated


# Every predict setting but one as an option, from PredictConfig's fields (cellmorph.cli.options). Not one:
# reuse_freed_memory, which the command always turns on (a short-lived process: about 2x faster scoring).
PREDICT_SETTINGS = config_options(PredictConfig, exclude=("reuse_freed_memory",))


@command()
@input_options("input layout of raw images, prepared with the model's recipe into OUT/cache; labels are "
               "optional")
@shared_options(PREDICT_SETTINGS.options, "options")
def predict(
    model: Path = typer.Option(..., help="model bundle from `cellmorph train`"),
    out: Path = typer.Option(..., help="folder for tiles/wells/treatments tables"),
    data: Optional[Path] = typer.Option(None, help="tile cache of the screen, prepared with the model's recipe "
                                        "(else give the images: --layout with --root, --index or --layout-config)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    options: dict | None = None,
    images: ImageInput | None = None,
) -> None:
    """Call the MoA of every treatment of a screen, with confidence and a conformal prediction set."""
    from cellmorph.predict import predict as run_predict

    given = PREDICT_SETTINGS.settings(options)
    settings = validated(PredictConfig, given | {"reuse_freed_memory": True}, "predict options")
    layout = images.layout
    if (data is None) == (layout is None):
        raise CellmorphError("predict needs the screen as one of: --data CACHE, or --layout with "
                             "--root/--index/--layout-config")
    if images.moa is not None and layout not in ("crops", "ome-zarr", "pattern"):
        raise CellmorphError("--moa labels crop tables (--layout crops); BBBC021 reads BBBC021_v1_moa.csv beside "
                             "the image table, a generic layout its YAML's moa_table")
    if data is not None and ("normalize" in given or settings.skip_bad):
        raise CellmorphError("--normalize and --skip-bad apply to images (--layout); a cache is already prepared")
    if layout is not None:
        data = images.load(require_labels=False)
    summary = run_predict(model, data, out, settings, progress=progress, log=log_line)
    grid = Table(title=f"{summary['n_treatments']} treatments, sets at 1 − α = {1 - settings.alpha:.2f}: "
                       f"mean set size {summary['mean_set_size']:.2f}, {summary['n_empty_sets']} empty")
    for column in ("labelled treatments", "n", "accuracy", "coverage"):
        grid.add_column(column, justify="right")
    parts = [("all", summary)] + [(name.replace("_", " "), summary[name]) for name in ("new_compounds",
                                                                                     "training_compounds")
                                  if summary.get(name, {}).get("n_labelled_treatments")]
    for name, part in parts:
        grid.add_row(name, str(part.get("n_labelled_treatments", 0)),
                     f"{part['treatment_accuracy']:.3f}" if "treatment_accuracy" in part else "–",
                     f"{part['coverage']:.3f}" if "coverage" in part else "–")
    console.print(grid)
    novelty = summary.get("novelty")
    if novelty:
        flagged = novelty["novel_treatments"]
        pooled = ", each treatment scored by its compound" if novelty.get("pool") == "compound" else ""
        console.print(f"Novel (no known MoA fits; {novelty.get('score')}{pooled}, a new compound of a known MoA is "
                      f"flagged at most {settings.novelty_alpha:g} of the time): {len(flagged)} treatment(s)"
                      + (f": {', '.join(flagged[:20])}{' …' if len(flagged) > 20 else ''}" if flagged else ""),
                      highlight=False, soft_wrap=True)
    console.print(f"predictions: {out / 'treatments.csv'}")
    print_report(out)
    print(json.dumps(summary))


@command()
def report(
    run: Path = typer.Argument(..., help="a cv run directory, a predict output or a compare-inits output"),
) -> None:
    """Write RUN/report.html: what was run, called, how sure, and why, in one self-contained page that works offline."""
    from cellmorph.report import write_report

    console.print(f"report: {write_report(run)}", highlight=False, soft_wrap=True)
