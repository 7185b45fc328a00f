"""What every command shares: the typer app, the one-line error contract, the option types and helpers."""

from __future__ import annotations

import functools
import inspect as introspect  # `inspect` is also a command name
import json
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Literal, Optional, get_args, get_origin

import typer
from rich.console import Console
from rich.table import Table

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.embed import EmbedConfig
from cellmorph.config.prepare import Layout
from cellmorph.cv.config import field_help
from cellmorph.cv.executors import ExecutorConfig
from cellmorph.cli.options import OPTION_FLAGS
from cellmorph.errors import CellmorphError, DiskFullError, is_disk_full


def _choices(config, name: str):
    """The Literal type of a settings field (its None alternative dropped): an option's choices, written once."""
    options = [t for t in get_args(config.model_fields[name].annotation) if t is not type(None)]
    return options[0] if get_origin(options[0]) is Literal else config.model_fields[name].annotation


ExecutorKind = _choices(ExecutorConfig, "kind")
Standardize = _choices(EmbedConfig, "standardize")
Whiten = _choices(EmbedConfig, "whiten")
Dataset = Literal["bbbc021", "bbbc014"]
Metric = Literal["correlation", "cosine"]
ProfileAggregate = Literal["mean", "median"]

app = typer.Typer(
    name="cellmorph",
    help="Mechanism-of-action classification of cell morphology with fine-tuned ImageNet CNNs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()
THREADS_HELP = field_help("num_threads")
PROGRESS_HELP = "progress bars on a terminal, one line per step in a log (--no-progress: silent)"


def user_errors(func):
    """Turn a CellmorphError (or Ctrl-C) into one stderr line and a non-zero exit, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            _check_path_options(kwargs)
            return func(*args, **kwargs)
        except CellmorphError as exc:
            sys.stderr.write(f"error: {exc.command_line_text(OPTION_FLAGS)}\n")
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # A full disk can strike any write, including one outside the atomic-write helpers
            # (which already name their file); it is the user's to fix, so it is one line too.
            if not is_disk_full(exc):
                raise
            sys.stderr.write(f"error: {DiskFullError.from_os_error(exc)}\n")
            raise typer.Exit(DiskFullError.exit_code) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None

    return wrapper


def _check_path_options(options: dict) -> None:
    """Every path option must be text that files, logs and reports can hold.

    Linux accepts any bytes in a file name, and Python hands undecodable ones over as lone
    surrogates; they fail only much later, when the path is written into ``config.yaml`` or a
    report, after an output folder was made. So they are refused before any work.
    """
    for name, value in options.items():
        if isinstance(value, Path):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:
                shown = str(value).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
                raise CellmorphError(f"--{name.replace('_', '-')} {shown}: the path is not valid UTF-8; "
                                     "rename it or choose another") from None


def command(*args, **kwargs):
    """``app.command`` with :func:`user_errors` applied."""

    def register(func):
        return app.command(*args, **kwargs)(user_errors(func))

    return register


def log_line(message: str | None) -> None:
    """A note on stderr as one plain line (rich would wrap it and read brackets as markup)."""
    if message:
        sys.stderr.write(f"{message}\n")


def print_report(out: Path) -> None:
    """``OUT/report.html`` after a command's results are written; its path on the console. The
    results stand without it, so a report that cannot be made is a warning, not a failure."""
    from cellmorph.report import write_report

    try:
        console.print(f"report: {write_report(out)}", highlight=False, soft_wrap=True)
    except CellmorphError as error:
        console.print(f"warning: no report: {error}", highlight=False)


def print_metrics(metrics: dict, out: Path) -> None:
    grid = Table(title=f"{metrics.get('model')} ({metrics.get('init')}), cv {metrics.get('cv')}, {metrics['n_folds']} folds")
    grid.add_column("level")
    grid.add_column("accuracy", justify="right")
    grid.add_column("n", justify="right")
    interval = metrics.get("treatment_accuracy_ci95")
    grid.add_column("95% interval", justify="right")
    grid.add_row("treatment", f"{metrics['treatment_accuracy']:.3f}", str(metrics["n_treatments"]),
                 f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "")
    grid.add_row("well", f"{metrics['well_accuracy']:.3f}", str(metrics.get("n_wells", "")), "")
    grid.add_row("tile", f"{metrics['tile_accuracy']:.3f}", str(metrics.get("n_tiles", "")), "")
    console.print(grid)
    if interval and metrics.get("probe_head") == "centroid":
        console.print("95% interval: the treatments resampled. The centroid head is a mean and a cosine: float "
                      "rounding on another CPU moves its calls only at ties (README, 'Reproducibility').",
                      highlight=False, soft_wrap=True)
    elif interval and metrics.get("probe_c"):  # only a linear probe records its C
        console.print("95% interval: the treatments resampled. A linear probe's heads are convex fits: float "
                      "rounding on another CPU moves its probabilities, not its calls, but for ties "
                      "(README, 'Reproducibility').", highlight=False, soft_wrap=True)
    elif interval:
        console.print("95% interval: the treatments resampled. The figures repeat bit for bit only on the same "
                      "CPU type and thread count; elsewhere float rounding moves them, within the interval "
                      "(README, 'Reproducibility').", highlight=False, soft_wrap=True)
    for entry in metrics.get("skipped_folds") or []:
        console.print(f"note: {entry['reason']}", highlight=False, soft_wrap=True)
    console.print(f"run directory: {out}")
    print(json.dumps({k: metrics[k] for k in ("treatment_accuracy", "well_accuracy", "tile_accuracy",
                                                "n_treatments", "n_folds")}))


def shared_options(options: dict, parameter: str, collect=lambda values: values):
    """A decorator giving a command the typer ``options`` (name → (type, Option)); the command
    receives ``collect(their values)`` as its parameter ``parameter``.

    typer reads a command's options off its signature, so the wrapper's signature is the command's
    own parameters followed by the shared ones.
    """
    def decorate(func):
        signature = introspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != parameter]
        shared = [introspect.Parameter(name, introspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                  for name, (kind, option) in options.items()]

        @functools.wraps(func)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in options}
            return func(**{parameter: collect(values)}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


# ----------------------------------------------------------------------------- the input-options group
@dataclass
class ImageInput:
    """Where a screen's images and tables are, as ``inspect``, ``prepare`` and ``predict`` take them (one group of
    options): the layout and its folders and tables. ``load(**kwargs)`` reads it as an ImageTable."""

    layout: str | None
    root: list[Path] | None
    metadata: Path | None
    index: Path | None
    layout_config: Path | None
    moa: Path | None
    channels: str | None
    plate_map: Path | None = None
    level: int = 0
    pattern: str | None = None

    def load(self, default_layout: str = "bbbc021", **kwargs):
        from cellmorph.data.layouts import load_table

        table = load_table(self.layout or default_layout, self.root or None, self.metadata, self.index,
                           self.layout_config, self.moa, self.channels, plate_map=self.plate_map, level=self.level,
                           pattern=self.pattern, **kwargs)
        log_line(table.notes.get("unmatched_files"))  # files a pattern did not read are listed, never dropped silently
        return table


def input_options(layout_help: str = "input layout (default bbbc021)"):
    """The input-options group, received as an :class:`ImageInput` ``images`` (``layout_help``: what the layout
    means to the command)."""
    options = {
        "layout": (Optional[Layout], typer.Option(None, help=layout_help)),
        "root": (Optional[list[Path]], typer.Option(None, help="image root (bbbc021 and bbbc014 layouts); an OME-Zarr "
                                                     "plate or a folder of plates, repeatable (ome-zarr)")),
        "metadata": (Optional[Path], typer.Option(
            None, help="folder with BBBC021_v1_image.csv (default: --root); BBBC021_v1_moa.csv there labels the MoAs")),
        "index": (Optional[Path], typer.Option(None, help="crop table CSV (crops layout)")),
        "layout_config": (Optional[Path], typer.Option(None, help="YAML GenericLayout (generic layout)")),
        "moa": (Optional[Path], typer.Option(None, help="compound,moa table to label crops or plates (crops, ome-zarr)")),
        "channels": (Optional[str], typer.Option(None, help="comma-separated channel names (crops layout); the "
                                                 "channels to read, by name (ome-zarr); 1=DAPI,2=Actin,... (pattern)")),
        "plate_map": (Optional[Path], typer.Option(None, help="CSV Metadata_Plate, Metadata_Well, Metadata_Compound, "
                                                   "Metadata_Concentration[, Metadata_MoA] (ome-zarr, pattern)")),
        "level": (int, typer.Option(0, min=0, help="pyramid level to read, 0 = full resolution (ome-zarr)")),
        "pattern": (Optional[str], typer.Option(None, help="file names below --root: imagexpress "
                                                "({plate}/{well}_s{site}_w{channel}.tif), opera (r{row:02d}c{col:02d}"
                                                "f{field:02d}p{plane:02d}-ch{channel}…tiff) or your own (pattern layout)")),
    }
    return shared_options(options, "images", lambda values: ImageInput(**values))

