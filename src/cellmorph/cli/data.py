"""``inspect``, ``synth``, ``prepare`` and ``download``: from images to a tile cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.table import Table

from cellmorph.cli.common import (
    PROGRESS_HELP,
    THREADS_HELP,
    Dataset,
    ImageInput,
    log_line,
    command,
    input_options,
    out_console,
    shared_options,
)
from cellmorph.cli.options import config_options

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.prepare import PREPARE_OPTIONS, PrepareConfig
from cellmorph.errors import CellmorphError


# ----------------------------------------------------------------------------- inspect
@command()
@input_options()
def inspect(
    moa_subset: bool = typer.Option(True, "--moa-subset/--all-annotated", help="the paper's annotated subset"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    images: ImageInput | None = None,
) -> None:
    """Count images, treatments and compounds of a dataset (no pixels are read)."""
    table = images.load(moa_subset=moa_subset)
    layout = images.layout or "bbbc021"
    log_line(table.excluded_note())
    summary = table.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    grid = Table(title=f"{layout} dataset")
    grid.add_column("compound")
    grid.add_column("images", justify="right")
    for name, count in summary["images_per_compound"].items():
        grid.add_row(name, str(count))
    out_console.print(grid)
    out_console.print(
        f"{summary['n_images']} images, {summary['n_treatments']} treatments, {summary['n_compounds']} compounds, "
        f"{summary['n_moas']} MoAs on {summary['n_plates']} plates; {summary['n_control_images']} control images"
    )


# ----------------------------------------------------------------------------- synth
ImageFormat = Literal["tiff", "ome-zarr"]
NgffVersion = Literal["0.4", "0.5"]


@command()
def synth(
    out: Path = typer.Argument(..., help="output folder (BBBC021 layout)"),
    preset: str = typer.Option("tiny", help="tiny | mini | full"),
    seed: int = typer.Option(0, help="random seed; the same seed gives identical files"),
    dataset: Dataset = typer.Option("bbbc021", help="which dataset layout to synthesise"),
    workers: int = typer.Option(1, help="processes used to render images"),
    image_format: ImageFormat = typer.Option("tiff", "--format", help="tiff: the BBBC021 layout (CSVs + TIFFs); "
                                             "ome-zarr: HCS plates PLATE.ome.zarr + platemap.csv (bbbc021 only)"),
    ngff_version: NgffVersion = typer.Option("0.5", help="OME-Zarr version: 0.5 (Zarr v3) or 0.4 (Zarr v2)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """Write a synthetic screen in the BBBC021 (or BBBC014) layout: CSVs + TIFFs, or OME-Zarr plates."""
    if image_format == "ome-zarr":
        if dataset != "bbbc021":
            raise CellmorphError("--format ome-zarr writes the bbbc021 screen; BBBC014 is written as TIFFs")
        from cellmorph.data.synthetic import generate_ome_zarr_screen

        summary = generate_ome_zarr_screen(out, preset=preset, seed=seed, version=ngff_version, progress=progress,
                                           workers=workers)
        print(json.dumps(summary, default=str))
        return
    if dataset == "bbbc014":
        from cellmorph.data.synthetic import generate_bbbc014

        summary = generate_bbbc014(out, preset=preset, seed=seed, progress=progress)
    else:
        from cellmorph.data.synthetic import generate_bbbc021

        summary = generate_bbbc021(out, preset=preset, seed=seed, progress=progress, workers=workers)
    print(json.dumps(summary, default=str))


# ----------------------------------------------------------------------------- prepare
def _parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CellmorphError(f"--tiles {text!r}: expected ROWSxCOLS, e.g. 2x2") from None
    if rows < 1 or cols < 1:
        raise CellmorphError(f"--tiles {text!r}: rows and cols must be ≥ 1")
    return rows, cols


def _parse_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise CellmorphError(f"--fixed-range {text!r}: expected LOW,HIGH, e.g. -2,10") from None
    return low, high


# Every prepare setting as an option, from PrepareConfig's fields (cellmorph.cli.options), spelled as
# PREPARE_OPTIONS says (the flags prepare_config's errors name); the notes give the defaults that depend on the
# layout (cellmorph.data.layouts.prepare_config).
PREPARE_SETTINGS = config_options(
    PrepareConfig, names={field: flag.split("/")[0].removeprefix("--").replace("-", "_")
                          for field, flag in PREPARE_OPTIONS.items()},
    types_={"tile_grid": str, "fixed_range": str}, parsers={"tile_grid": _parse_grid, "fixed_range": _parse_range},
    notes={"normalize": "default plate; none for bbbc014", "tile_grid": "ROWSxCOLS; default 2x2, 1x1 for crops",
           "scaling": "default image; fixed for crops, tile for bbbc014", "pad_channels": "3 for bbbc014"})


@command()
@input_options()
@shared_options(PREPARE_SETTINGS.options, "options")
def prepare(
    out: Path = typer.Option(..., help="cache folder to write"),
    strict_compounds: bool = typer.Option(
        False, "--strict-compounds", help="bbbc021: a compound absent from the MoA table is an error"
    ),
    config: Optional[Path] = typer.Option(None, help="YAML PrepareConfig; command-line options override it"),
    paper: bool = typer.Option(False, "--paper", help="start from the paper's recipe for the layout: per-plate "
                               "DMSO z-score, 8-bit map stretched per field (crops default to a fixed map)"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    options: dict | None = None,
    images: ImageInput | None = None,
) -> None:
    """Normalise against DMSO, Anscombe-transform, map to 8 bits, tile, and cache."""
    from cellmorph.data.layouts import prepare_config
    from cellmorph.preprocess import prepare as run_prepare

    cfg = prepare_config(images.layout or "bbbc021", config, paper, **PREPARE_SETTINGS.settings(options))
    table = images.load(strict_compounds=strict_compounds)
    summary = run_prepare(table, out, cfg, progress=progress, log=log_line, threads=threads)
    print(json.dumps(summary))


# ----------------------------------------------------------------------------- download
@command()
def download(
    dataset: str = typer.Argument(..., help="bbbc021"),
    root: Path = typer.Option(..., help="where to put the metadata and plate folders"),
    base_url: Optional[str] = typer.Option(None, help="mirror URL (default: the BBBC site)"),
    metadata_only: bool = typer.Option(False, "--metadata-only", help="fetch only the CSVs"),
    all_plates: bool = typer.Option(False, "--all-plates", help="every plate, not just the MoA subset's"),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="keep the zip files after unpacking"),
) -> None:
    """Fetch a public dataset (network access happens only here, when you ask for it)."""
    from cellmorph.data.download import DEFAULT_BASE_URL, download_command

    download_command(dataset, root, base_url or DEFAULT_BASE_URL, metadata_only, all_plates, keep_archives)
