"""The ``cellmorph`` command line: a thin skin over the public Python API.

Every user-caused failure surfaces as :class:`~cellmorph.errors.CellmorphError`
and is printed here as one ``error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import functools
import inspect as introspect  # `inspect` is also a command below
import json
import sys
from pathlib import Path
from typing import Literal, Optional, get_args, get_origin

import typer
from rich.console import Console
from rich.table import Table

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.config.embed import EmbedConfig
from cellmorph.config.features import FeatureSpec
from cellmorph.config.predict import PredictConfig
from cellmorph.config.prepare import Layout, PrepareConfig
from cellmorph.config.visualize import FilterConfig
from cellmorph.cv.config import CVConfig, KeepCheckpoints, ensemble_members, field_help, load_cv_config  # help: the fields' descriptions
from cellmorph.cv.executors import ExecutorConfig
from cellmorph.demo import DemoConfig
from cellmorph.errors import CellmorphError, DiskFullError, is_disk_full, validated


def _choices(config, name: str):
    """The Literal type of a settings field (its None alternative dropped): an option's choices, written once."""
    options = [t for t in get_args(config.model_fields[name].annotation) if t is not type(None)]
    return options[0] if get_origin(options[0]) is Literal else config.model_fields[name].annotation


Normalize = _choices(PrepareConfig, "normalize")
Scaling = _choices(PrepareConfig, "scaling")
Mode = _choices(CVConfig, "mode")
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
            sys.stderr.write(f"error: {exc}\n")
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


def _log_line(message: str | None) -> None:
    """A note on stderr as one plain line (rich would wrap it and read brackets as markup)."""
    if message:
        sys.stderr.write(f"{message}\n")


# ----------------------------------------------------------------------------- inspect
@command()
def inspect(
    layout: Layout = typer.Option("bbbc021", help="input layout"),
    metadata: Optional[Path] = typer.Option(None, help="folder with BBBC021_v1_image.csv and BBBC021_v1_moa.csv"),
    root: Optional[Path] = typer.Option(None, help="image root (bbbc021 layout)"),
    index: Optional[Path] = typer.Option(None, help="crop table CSV (crops layout)"),
    layout_config: Optional[Path] = typer.Option(None, help="YAML GenericLayout (generic layout)"),
    moa: Optional[Path] = typer.Option(None, help="compound,moa table to label crops"),
    channels: Optional[str] = typer.Option(None, help="comma-separated channel names (crops)"),
    moa_subset: bool = typer.Option(True, "--moa-subset/--all-annotated", help="the paper's annotated subset"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Count images, treatments and compounds of a dataset (no pixels are read)."""
    from cellmorph.data.layouts import load_table

    table = load_table(layout, root, metadata, index, layout_config, moa, channels, moa_subset)
    _log_line(table.excluded_note())
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


@command()
def synth(
    out: Path = typer.Argument(..., help="output folder (BBBC021 layout)"),
    preset: str = typer.Option("tiny", help="tiny | mini | full"),
    seed: int = typer.Option(0, help="random seed; the same seed gives identical files"),
    dataset: Dataset = typer.Option("bbbc021", help="which dataset layout to synthesise"),
    workers: int = typer.Option(1, help="processes used to render images"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """Write a synthetic screen in the BBBC021 (or BBBC014) layout: CSVs + TIFFs."""
    if dataset == "bbbc014":
        from cellmorph.data.synthetic_bbbc014 import generate_bbbc014

        summary = generate_bbbc014(out, preset=preset, seed=seed, progress=progress)
    else:
        from cellmorph.data.synthetic import generate_bbbc021

        summary = generate_bbbc021(out, preset=preset, seed=seed, progress=progress, workers=workers)
    print(json.dumps(summary, default=str))


# ----------------------------------------------------------------------------- prepare
def _prepare_help(name: str, defaults: str = "") -> str:
    """A PrepareConfig field's description as the option's help (plus its per-layout defaults)."""
    text = PrepareConfig.model_fields[name].description or ""
    return f"{text} ({defaults})" if defaults else text


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CellmorphError(f"--tiles {text!r}: expected ROWSxCOLS, e.g. 2x2") from None
    if rows < 1 or cols < 1:
        raise CellmorphError(f"--tiles {text!r}: rows and cols must be ≥ 1")
    return rows, cols


@command()
def prepare(
    out: Path = typer.Option(..., help="cache folder to write"),
    layout: Layout = typer.Option("bbbc021", help="input layout"),
    root: Optional[Path] = typer.Option(None, help="image root (bbbc021 layout)"),
    metadata: Optional[Path] = typer.Option(None, help="folder with the BBBC021 CSVs (default: --root)"),
    index: Optional[Path] = typer.Option(None, help="crop table CSV (crops layout)"),
    layout_config: Optional[Path] = typer.Option(None, help="YAML GenericLayout (generic layout)"),
    moa: Optional[Path] = typer.Option(None, help="compound,moa table to label crops"),
    channels: Optional[str] = typer.Option(None, help="comma-separated channel names (crops)"),
    normalize: Optional[Normalize] = typer.Option(
        None, help=_prepare_help("normalize", "default plate; none for bbbc014")),
    tiles: Optional[str] = typer.Option(None, help="ROWSxCOLS: " + _prepare_help("tile_grid", "default 2x2; 1x1 for crops")),
    tile_size: Optional[int] = typer.Option(None, help=_prepare_help("tile_size")),
    scaling: Optional[Scaling] = typer.Option(None, help=_prepare_help("scaling", "default image; fixed for crops, "
                                              "tile for bbbc014")),
    empty_tile_fraction: Optional[float] = typer.Option(None, help=_prepare_help("empty_tile_fraction")),
    controls: Optional[bool] = typer.Option(None, "--controls/--no-controls", help=_prepare_help("include_controls")),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_prepare_help("skip_bad")),
    strict_compounds: bool = typer.Option(
        False, "--strict-compounds", help="bbbc021: a compound absent from the MoA table is an error"
    ),
    config: Optional[Path] = typer.Option(None, help="YAML PrepareConfig; command-line options override it"),
    paper: bool = typer.Option(False, "--paper", help="start from the paper's recipe for the layout: per-plate "
                               "DMSO z-score, 8-bit map stretched per field (crops default to a fixed map)"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """Normalise against DMSO, Anscombe-transform, map to 8 bits, tile, and cache."""
    from cellmorph.data.layouts import load_table, prepare_config
    from cellmorph.preprocess import prepare as run_prepare

    cfg = prepare_config(
        layout,
        config,
        paper,
        normalize=normalize,
        scaling=scaling,
        include_controls=controls,
        tile_grid=_parse_grid(tiles) if tiles is not None else None,
        tile_size=tile_size,
        empty_tile_fraction=empty_tile_fraction,
        skip_bad=True if skip_bad else None,
    )
    table = load_table(layout, root, metadata, index, layout_config, moa, channels, strict_compounds=strict_compounds)
    summary = run_prepare(table, out, cfg, progress=progress, log=_log_line, threads=threads)
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


# ----------------------------------------------------------------------------- cv / demo


def _write_report(out: Path) -> None:
    """``OUT/report.html`` after a command's results are written; its path on the console. The
    results stand without it, so a report that cannot be made is a warning, not a failure."""
    from cellmorph.report import write_report

    try:
        console.print(f"report: {write_report(out)}", highlight=False, soft_wrap=True)
    except CellmorphError as error:
        console.print(f"warning: no report: {error}", highlight=False)


def _print_metrics(metrics: dict, out: Path) -> None:
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


FEATURES_HELP = ("head (the backbone's pooled output), or timm feature stages counted from 0 with their "
                 "spatial pools: stage3 (mean-pooled), stage3+stage4/mean+max, stage3/gem (default stage3; "
                 "stage3+stage4 for crop tables)")


# The cv settings that `cv` and `train` share: one definition each, help from the config's fields.
CV_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (Optional[str], typer.Option(None, help=field_help("model"))),
    "init": (Optional[str], typer.Option(None, help=field_help("init"))),
    "epochs": (Optional[int], typer.Option(None, help=field_help("epochs"))),
    "mode": (Optional[Mode], typer.Option(None, help=field_help("mode"))),
    "weights": (Optional[Path], typer.Option(None, help=field_help("weights"))),
    "batch_size": (Optional[int], typer.Option(None, help=field_help("batch_size"))),
    "lr": (Optional[float], typer.Option(None, help=field_help("lr"))),
    "image_size": (Optional[int], typer.Option(None, help=field_help("image_size"))),
    "drop_rate": (Optional[float], typer.Option(None, help=field_help("drop_rate"))),
    "seed": (Optional[int], typer.Option(None, help=field_help("seed"))),
    "include_controls": (Optional[bool], typer.Option(None, "--include-controls/--no-include-controls",
                                                      help=field_help("include_controls_as_class"))),
    "max_tiles_per_fold": (Optional[int], typer.Option(None, help=field_help("max_tiles_per_fold"))),
    "strict": (Optional[bool], typer.Option(None, "--strict/--no-strict", help=field_help("strict"))),
    "freeze_stages": (Optional[int], typer.Option(None, help=field_help("freeze_stages"))),
    "frozen_feature_cache": (Optional[bool], typer.Option(
        None, "--frozen-feature-cache/--no-frozen-feature-cache", help=field_help("frozen_feature_cache"))),
    "eval_epochs": (Optional[str], typer.Option(None, help=field_help("eval_epochs"))),
    "tta": (Optional[str], typer.Option(None, help=field_help("tta"))),
    "backbone_lr_scale": (Optional[float], typer.Option(None, help=field_help("backbone_lr_scale"))),
    "unfreeze_every": (Optional[int], typer.Option(None, help=field_help("unfreeze_every"))),
    "head_init": (Optional[str], typer.Option(None, help=field_help("head_init"))),
    "aggregate": (Optional[str], typer.Option(None, help=field_help("aggregate"))),
    "probe_c": (Optional[str], typer.Option(None, help=field_help("probe_c"))),
    "probe_head": (Optional[str], typer.Option(None, help=field_help("probe_head"))),
    "ensemble_seeds": (Optional[int], typer.Option(
        None, min=1, help="an ensemble of N members that differ in their seed (seed, seed+1, …); with "
        "--ensemble-models, each model gets the N seeds")),
    "ensemble_models": (Optional[str], typer.Option(
        None, help="an ensemble whose further members are these backbones (comma-separated; --model is the first), "
        "e.g. tf_efficientnet_lite2,mobilenetv2_100")),
    "compound_weighting": (Optional[bool], typer.Option(None, "--compound-weighting/--no-compound-weighting",
                                                        help=field_help("compound_weighting"))),
    "features": (Optional[str], typer.Option(None, help=field_help("features"))),
    "device": (Optional[str], typer.Option(None, help=field_help("device"))),
    "num_workers": (Optional[int], typer.Option(None, help=field_help("num_workers"))),
    "threads": (Optional[int], typer.Option(None, help=THREADS_HELP)),
    "keep_checkpoints": (Optional[KeepCheckpoints], typer.Option(None, help=field_help("keep_checkpoints"))),
    "online": (Optional[bool], typer.Option(None, "--online/--offline", help=field_help("allow_network"))),
}


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


# The options of :data:`CV_OPTIONS`, received as a dict ``options``.
cv_options = shared_options(CV_OPTIONS, "options")


def _probe_c(text: str | None):
    """``--probe-c``: ``nested`` or a number (the config refuses numbers that are not positive)."""
    if text is None or text.strip().lower() == "nested":
        return None if text is None else "nested"
    try:
        return float(text)
    except ValueError:
        raise CellmorphError(f"--probe-c {text!r}: expected nested or a positive number") from None


def _ensemble_members(seeds: int | None, models: str | None, given: dict) -> list[dict] | None:
    """``--ensemble-seeds`` and ``--ensemble-models`` as the config's ``ensemble`` list (None: neither given)."""
    if seeds is None and models is None:
        return None
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    if models is not None and not names:
        raise CellmorphError("--ensemble-models: expected backbone names separated by commas")
    return ensemble_members(given.get("seed") or 0, seeds or 1, names)


def _cv_config(config: Optional[Path], options: dict, **more):
    """The CVConfig of a YAML file (optional) with the command's options on top."""
    given = dict(options) | more
    renamed = {"include_controls": "include_controls_as_class", "threads": "num_threads", "online": "allow_network"}
    for option, field in renamed.items():
        given[field] = given.pop(option)
    given["eval_epochs"] = _int_list(given["eval_epochs"], "--eval-epochs")
    given["probe_c"] = _probe_c(given["probe_c"])
    given["ensemble"] = _ensemble_members(given.pop("ensemble_seeds"), given.pop("ensemble_models"), given)
    given["weights"] = str(given["weights"]) if given["weights"] else None
    return load_cv_config(config, **given)


EXECUTOR_OPTIONS = {
    "executor": (Optional[ExecutorKind], typer.Option(
        None, help="where folds run: local (this process), dask (a Dask cluster), slurm (a job array)")),
    "scheduler": (Optional[str], typer.Option(
        None, help="dask: a running scheduler's address, e.g. tcp://HOST:8786 (default: start a LocalCluster)")),
    "workers": (Optional[int], typer.Option(None, min=1, help="dask: LocalCluster workers (default: one per core)")),
    "executor_config": (Optional[Path], typer.Option(
        None, help="YAML ExecutorConfig: Slurm partition, time, CPUs, GPUs, memory, max running; Dask settings")),
}


def _executor_config(given: dict):
    """The ExecutorConfig of ``--executor-config`` (optional) with the executor options on top."""
    from cellmorph.cv.executors import executor_config

    path = given.pop("executor_config")
    given["kind"] = given.pop("executor")
    if given["kind"] is None and (given["scheduler"] or given["workers"]):
        given["kind"] = "dask"
    if path is not None:
        return ExecutorConfig.from_yaml(path, **given)
    return executor_config({k: v for k, v in given.items() if v is not None})


# The options of :data:`EXECUTOR_OPTIONS`, received as an ExecutorConfig ``executor``.
executor_options = shared_options(EXECUTOR_OPTIONS, "executor", _executor_config)


@command()
@executor_options
@cv_options
def cv(
    data: Path = typer.Option(..., help="tile cache from `cellmorph prepare`"),
    out: Path = typer.Option(..., help="run directory to write"),
    cv_scheme: Optional[str] = typer.Option(None, "--cv", help=field_help("cv")),
    replicates: int = typer.Option(1, min=1, help="repeat the whole CV with seeds seed, seed+1, … (RUN/replicate-<r>)"),
    config: Optional[Path] = typer.Option(None, help="YAML CVConfig; options given here override it"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run, skipping finished folds"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    options: dict | None = None,
    executor=None,
) -> None:
    """Cross-validate a CNN on a prepared cache (the paper's experiment: --cv loco)."""
    from cellmorph.cv import run_cv, run_replicates

    cfg = _cv_config(config, options, cv=cv_scheme)
    if replicates > 1:
        metrics = run_replicates(data, out, cfg, replicates, resume=resume, progress=progress, executor=executor)
    else:
        metrics = run_cv(data, out, cfg, resume=resume, progress=progress, executor=executor)
    for member in metrics.get("ensemble") or []:
        console.print(f"{member['run']} ({member['model']}): treatment {member['treatment_accuracy']:.3f}, well "
                      f"{member['well_accuracy']:.3f}, tile {member['tile_accuracy']:.3f}", highlight=False)
    _print_metrics(metrics, out)
    runs = sorted(Path(out).glob("replicate-*")) if replicates > 1 else [Path(out)]
    for run in runs + sorted(p for r in runs for p in r.glob("member-*") if (p / "metrics.json").is_file()):
        _write_report(run)


@command()
@executor_options
@cv_options
def train(
    data: Path = typer.Option(..., help="tile cache from `cellmorph prepare`"),
    out: Path = typer.Option(..., help="model folder (bundle) to write"),
    calibration: Optional[str] = typer.Option(
        None, help="also run this CV (loco | group-kfold:K | well:K | …) into OUT.cv/ and store its out-of-fold "
        "probabilities in the bundle, for calibrated confidence and prediction sets"),
    calibration_run: Optional[Path] = typer.Option(
        None, help="instead of --calibration: a finished `cellmorph cv` run of this recipe on this cache (its "
        "fingerprint is checked), whose out-of-fold probabilities calibrate the bundle without running the CV again"),
    config: Optional[Path] = typer.Option(None, help="YAML CVConfig (every cv setting); options given here override it"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed calibration CV"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    options: dict | None = None,
    executor=None,
) -> None:
    """Train the final model on every labelled treatment and save it as a bundle (same recipe as cv).

    The executor options say where the calibration CV's folds run; the final model trains here
    (data-parallel when launched by torchrun)."""
    from cellmorph.distributed import current
    from cellmorph.final_model import train_final

    summary = train_final(data, out, _cv_config(config, options), calibration=calibration, resume=resume,
                          progress=progress, executor=executor, calibration_run=calibration_run)
    if current().is_main:  # under torchrun: once, not once per process
        for line in _expected_calibration(summary.get("calibration")):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"model bundle: {out}")
        print(json.dumps(summary))


# Below this many calibration treatments a set's coverage on new compounds is uncertain by more
# than ±0.1 (binomial, at 1 − α = 0.8: 2·√(0.16/n) > 0.1 for n < 64).
FEW_CALIBRATION_TREATMENTS = 64


def _expected_calibration(calibration: dict | None) -> list[str]:
    """What the calibration CV says the bundle's sets and confidence will do on new compounds."""
    if not calibration:
        return []
    lines = []
    for cover in calibration.get("held_out_coverage") or []:
        low, high = cover.get("coverage_ci95") or (float("nan"), float("nan"))
        lines.append(f"expected on new compounds: sets at alpha {cover['alpha']:g} cover {cover['coverage']:.3f} "
                     f"(95% interval {low:.3f}–{high:.3f}, compounds resampled; nominal {1 - cover['alpha']:.2f}), "
                     f"mean size {cover['mean_set_size']:.2f}, from {cover['n_treatments']} calibration treatments "
                     f"of {cover.get('n_compounds', '?')} compounds")
    error = calibration.get("held_out_calibration_error") or {}
    if error:
        raw, scaled = error.get("ece_raw_ci95"), error.get("ece_temperature_scaled_ci95")
        span = lambda ci: f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""  # noqa: E731
        used = "used" if error.get("temperature_used") else "not used: it did not lower the held-out log-loss"
        lines.append(f"expected calibration error of the confidence: {error['ece_raw']:.3f}{span(raw)} raw, "
                     f"{error['ece_temperature_scaled']:.3f}{span(scaled)} temperature-scaled (T "
                     f"{error['median_temperature']:.2f}, {used})")
    n = calibration.get("n_treatments") or 0
    if n < FEW_CALIBRATION_TREATMENTS:
        lines.append(f"warning: {n} calibration treatments cannot promise a set's coverage within ±0.1; "
                     "calibrate with --calibration loco, or on more compounds")
    return lines


def _embed_help(name: str) -> str:
    return EmbedConfig.model_fields[name].description or ""


def _predict_help(name: str) -> str:
    return PredictConfig.model_fields[name].description or ""


@command()
def predict(
    model: Path = typer.Option(..., help="model bundle from `cellmorph train`"),
    out: Path = typer.Option(..., help="folder for tiles/wells/treatments tables"),
    data: Optional[Path] = typer.Option(None, help="tile cache of the screen, prepared with the model's recipe "
                                        "(else give the images: --layout with --root, --index or --layout-config)"),
    layout: Optional[Layout] = typer.Option(None, help="input layout of raw images, prepared with the model's "
                                            "recipe into OUT/cache; labels are optional"),
    root: Optional[Path] = typer.Option(None, help="image root (bbbc021 layout)"),
    metadata: Optional[Path] = typer.Option(None, help="folder with BBBC021_v1_image.csv (default: --root); "
                                            "BBBC021_v1_moa.csv there is optional"),
    index: Optional[Path] = typer.Option(None, help="crop table CSV (crops layout)"),
    layout_config: Optional[Path] = typer.Option(None, help="YAML GenericLayout (generic layout)"),
    moa: Optional[Path] = typer.Option(None, help="compound,moa table of the compounds whose MoA is known"),
    channels: Optional[str] = typer.Option(None, help="comma-separated channel names (crops)"),
    normalize: Optional[Normalize] = typer.Option(None, help=_predict_help("normalize")),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_predict_help("skip_bad")),
    alpha: float = typer.Option(0.1, help=_predict_help("alpha")),
    mc_dropout: int = typer.Option(0, help=_predict_help("mc_dropout")),
    seed: int = typer.Option(0, help=_predict_help("seed")),
    batch_size: int = typer.Option(16, help=_predict_help("batch_size")),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """Call the MoA of every treatment of a screen, with confidence and a conformal prediction set."""
    from cellmorph.predict import predict as run_predict

    settings = validated(PredictConfig, dict(
        alpha=alpha, batch_size=batch_size, threads=threads, mc_dropout=mc_dropout, seed=seed, skip_bad=skip_bad,
        normalize=normalize,
        reuse_freed_memory=True), "predict options")  # a short-lived process: about 2x faster scoring
    if (data is None) == (layout is None):
        raise CellmorphError("predict needs the screen as one of: --data CACHE, or --layout with "
                             "--root/--index/--layout-config")
    if moa is not None and layout != "crops":
        raise CellmorphError("--moa labels crop tables (--layout crops); BBBC021 reads BBBC021_v1_moa.csv beside "
                             "the image table, a generic layout its YAML's moa_table")
    if data is not None and (normalize is not None or skip_bad):
        raise CellmorphError("--normalize and --skip-bad apply to images (--layout); a cache is already prepared")
    if layout is not None:
        from cellmorph.data.layouts import load_table

        data = load_table(layout, root, metadata, index, layout_config, moa, channels, require_labels=False)
    summary = run_predict(model, data, out, settings, progress=progress, log=_log_line)
    grid = Table(title=f"{summary['n_treatments']} treatments, sets at 1 − α = {1 - alpha:.2f}: "
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
    console.print(f"predictions: {out / 'treatments.csv'}")
    _write_report(out)
    print(json.dumps(summary))


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CellmorphError(f"{option}: expected comma-separated integers such as '1,5,20', got {text!r}") from None
    if not values or min(values) < 1:
        raise CellmorphError(f"{option}: expected positive integers, got {text!r}")
    return values


@command("compare-inits")
@executor_options
def compare_inits_command(
    data: Path = typer.Option(..., help="tile cache from `cellmorph prepare`"),
    out: Path = typer.Option(..., help="output directory (one sub-run per init)"),
    model: Optional[str] = typer.Option(None, help=field_help("model")),
    cv_scheme: Optional[str] = typer.Option(None, "--cv", help=field_help("cv")),
    epochs: str = typer.Option("1,5,20", help="score after these epochs (one training of the largest)"),
    replicates: int = typer.Option(3, min=1, help="seeds per init"),
    inits: str = typer.Option("imagenet,xavier", help="comma-separated: imagenet, xavier or checkpoint paths"),
    metric: str = typer.Option("well_accuracy", help="treatment_accuracy | well_accuracy | tile_accuracy"),
    batch_size: Optional[int] = typer.Option(None, help=field_help("batch_size")),
    lr: Optional[float] = typer.Option(None, help=field_help("lr")),
    image_size: Optional[int] = typer.Option(None, help=field_help("image_size")),
    seed: Optional[int] = typer.Option(None, help=field_help("seed")),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    config: Optional[Path] = typer.Option(None, help="YAML CVConfig; options given here override it"),
    resume: bool = typer.Option(False, "--resume", help="continue, skipping finished folds and replicates"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    executor=None,
) -> None:
    """Pretrained vs Xavier after 1, 5 and 20 epochs over replicates: the paper's Fig. 4 (init_comparison.png)."""
    from cellmorph.cv import compare_inits
    from cellmorph.cv.rundir import INIT_COMPARISON

    epoch_list = _int_list(epochs, "--epochs")
    cfg = load_cv_config(config, model=model, cv=cv_scheme, batch_size=batch_size, lr=lr, image_size=image_size,
                         seed=seed, epochs=max(epoch_list), num_threads=threads)
    result = compare_inits(data, out, cfg, tuple(i for i in inits.split(",") if i), tuple(epoch_list),
                           replicates, metric, resume=resume, progress=progress, executor=executor)
    grid = Table(title=f"{metric} (mean ± SD over {replicates} replicate(s))")
    grid.add_column("init")
    for e in result["epochs"]:
        grid.add_column(f"{e} ep", justify="right")
    for init, values in result["by_init"].items():
        grid.add_row(init, *[f"{values[str(e)]['mean']:.3f} ± {values[str(e)]['std']:.3f}" for e in result["epochs"]])
    console.print(grid)
    console.print(f"figure: {out / (INIT_COMPARISON + '.png')}")
    _write_report(out)
    print(json.dumps(result["by_init"]))


@command()
def report(
    run: Path = typer.Argument(..., help="a cv run directory, a predict output or a compare-inits output"),
) -> None:
    """Write RUN/report.html: what was run, called, how sure, and why, in one self-contained page that works offline."""
    from cellmorph.report import write_report

    console.print(f"report: {write_report(run)}", highlight=False, soft_wrap=True)


def _demo_option(name: str, *flags: str):
    """A typer option whose default and help are DemoConfig's (one place for both)."""
    field = DemoConfig.model_fields[name]
    return typer.Option(field.default, *flags, help=field.description or "")


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run directory (the synthetic data and cache go beside it)"),
    seed: int = _demo_option("seed"),
    epochs: int = _demo_option("epochs"),
    image_size: int = _demo_option("image_size"),
    freeze_stages: int = _demo_option("freeze_stages"),
    tta: str = _demo_option("tta"),
    frozen_feature_cache: bool = _demo_option("frozen_feature_cache", "--frozen-feature-cache/--no-frozen-feature-cache"),
    cv_scheme: str = _demo_option("cv", "--cv"),
    lr_schedule: str = _demo_option("lr_schedule"),
    probe: bool = _demo_option("probe", "--probe/--no-probe"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """synth tiny → prepare → cv (compound hold-out, offline ImageNet EfficientNet-Lite0): the linear probe,
    then the paper's fine-tune → summary tables and reports."""
    from cellmorph.demo import run_demo

    settings = validated(DemoConfig, dict(seed=seed, epochs=epochs, image_size=image_size, freeze_stages=freeze_stages,
                                           tta=tta, frozen_feature_cache=frozen_feature_cache, cv=cv_scheme,
                                           lr_schedule=lr_schedule, probe=probe, threads=threads), "demo options")
    result = run_demo(out, settings, progress=progress, say=lambda m: console.print(m, highlight=False))
    if result.probe is not None:
        _print_metrics(result.probe, result.probe_dir)
        _write_report(result.probe_dir)
    _print_metrics(result.finetune, result.finetune_dir)
    _write_report(result.finetune_dir)
    if result.probe is not None:
        console.print(_demo_summary(result), highlight=False, soft_wrap=True)


def _demo_summary(result) -> str:
    """Both headline figures side by side, with what each promises across machines."""
    def figure(metrics: dict) -> str:
        low, high = metrics.get("treatment_accuracy_ci95") or (float("nan"), float("nan"))
        return f"{metrics['treatment_accuracy']:.3f} (95% interval {low:.3f}–{high:.3f})"

    return (f"treatment accuracy, {result.finetune['n_treatments']} held-out treatments (chance 1/12 = 0.083): "
            f"linear probe {figure(result.probe)}, a convex fit that float rounding does not move; fine-tune "
            f"{figure(result.finetune)}, bit-identical only on the same CPU type and thread count (README, "
            "'Reproducibility')")


# ----------------------------------------------------------------------------- embed / profiles


@command()
def embed(
    data: Path = typer.Option(..., help="tile cache from `cellmorph prepare`"),
    model: str = typer.Option("tf_efficientnet_lite0", help=_embed_help("model")),
    out: Optional[Path] = typer.Option(None, help="output folder (default: DATA/embeddings/MODEL)"),
    init: str = typer.Option("imagenet", help=_embed_help("init")),
    weights: Optional[Path] = typer.Option(None, help=_embed_help("weights")),
    image_size: Optional[int] = typer.Option(None, help=_embed_help("image_size")),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu", help=_embed_help("device")),
    online: bool = typer.Option(False, "--online", help=_embed_help("allow_network")),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    features: Optional[str] = typer.Option(None, help=FEATURES_HELP),
    tta: Optional[str] = typer.Option(None, help=_embed_help("tta")),
    aggregate: ProfileAggregate = typer.Option("median", help=_embed_help("aggregate")),
    standardize: Standardize = typer.Option("plate", help=_embed_help("standardize")),
    whiten: Whiten = typer.Option("none", help=_embed_help("whiten")),
    strength: Optional[float] = typer.Option(None, help=_embed_help("strength")),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Frozen-backbone embeddings per tile, aggregated to wells (pycytominer-style parquet)."""
    from cellmorph.embed import embed as run_embed
    from cellmorph.runtime import keep_freed_memory

    config = validated(EmbedConfig, dict(
        model=model, init=init, weights=str(weights) if weights else None, allow_network=online,
        image_size=image_size, features=FeatureSpec.parse(features) if features else None, tta=tta,
        batch_size=batch_size, device=device, threads=threads, aggregate=aggregate, standardize=standardize, whiten=whiten,
        strength=strength), "embed options")
    target = out or Path(data) / "embeddings" / model
    keep_freed_memory()  # a short-lived scoring process: about 2x faster on glibc (see runtime)
    summary = run_embed(data, target, config, progress, log=_log_line)
    print(json.dumps(summary | {"out": str(target)}))


@command("profile-eval")
def profile_eval(
    profiles: Path = typer.Argument(..., help="per-well profiles: CellProfiler CSV or a cellmorph wells.parquet"),
    out: Path = typer.Option(..., help="output folder"),
    metadata: Optional[Path] = typer.Option(None, help="BBBC021 metadata folder (labels for CellProfiler CSVs)"),
    standardize: Standardize = typer.Option("plate", help="z-score features to the DMSO wells of each "
                                            "plate, batch or of all plates (a plate without DMSO: its batch's)"),
    whiten: Whiten = typer.Option("none", help="then whiten on DMSO: spherize (ZCA), tvn (PCA whitening) or "
                                  "coral (per-batch DMSO covariance aligned)"),
    strength: Optional[float] = typer.Option(None, help="whitening regulariser: ridge for spherize/coral (default "
                                             "10), components for tvn (default 100)"),
    aggregate: ProfileAggregate = typer.Option("mean", help="treatment profile = mean or median of its wells"),
    metric: Metric = typer.Option("correlation", help="1-NN similarity"),
) -> None:
    """NSC / NSCB nearest-neighbour MoA matching of treatment profiles (NSCB leaves out MoAs of one batch)."""
    from cellmorph.profiles import profile_eval as run_profile_eval

    metrics = run_profile_eval(profiles, out, metadata, standardize, aggregate, metric,
                               whiten, strength, log=_log_line)
    print(json.dumps({k: metrics[k] for k in ("nsc_accuracy", "nscb_accuracy", "n_treatments")}))


@command("score-treatments")
def score_treatments_cmd(
    predictions: Path = typer.Argument(..., help="stored per-treatment probabilities (.xlsx sheet per model, or CSV)"),
    moa: Path = typer.Option(..., help="compound,concentration,moa table (BBBC021_v1_moa.csv)"),
) -> None:
    """Treatment accuracy of stored predictions, scored by the same code as `cellmorph cv`."""
    from cellmorph.stored import score_stored_predictions

    print(json.dumps(score_stored_predictions(predictions, moa)))


# ----------------------------------------------------------------------------- visualize
visualize_app = typer.Typer(help="What the network looks at: filter images of the ImageNet and the fine-tuned "
                            "network (the paper's Fig. 5).", no_args_is_help=True, pretty_exceptions_enable=False,
                            add_completion=False)


def _visualize_help(name: str) -> str:
    return FilterConfig.model_fields[name].description or ""


@visualize_app.command("filters")
@user_errors
def visualize_filters_command(
    out: Path = typer.Option(..., help="folder for the PNGs (one per layer) and filters.json"),
    run: Optional[Path] = typer.Option(None, help="a cv run directory with fold weights (kept by cv's default, --keep-checkpoints last)"),
    model: Optional[Path] = typer.Option(None, help="a model bundle (cellmorph train)"),
    layers: str = typer.Option("stage1,stage2,stage3", help=_visualize_help("layers")),
    filters: int = typer.Option(6, help=_visualize_help("filters")),
    steps: int = typer.Option(128, help=_visualize_help("steps")),
    size: int = typer.Option(128, help=_visualize_help("size")),
    seed: int = typer.Option(0, help=_visualize_help("seed")),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Images that maximise chosen filters of the ImageNet network and of the fine-tuned one, side by side."""
    from cellmorph.visualize import visualize_filters

    config = validated(FilterConfig, dict(layers=layers, filters=filters, steps=steps, size=size, seed=seed,
                                          threads=threads), "visualize options")
    print(json.dumps(visualize_filters(out, config, run=run, model=model)))


app.add_typer(visualize_app, name="visualize")


def _mount_optional() -> None:
    """Sub-apps that live in their own modules."""
    try:
        from cellmorph.cli_weights import weights_app
    except ImportError:  # pragma: no cover - only while the module is absent
        return
    app.add_typer(weights_app, name="weights", help="Offline-first ImageNet weights: list, verify, import.")


_mount_optional()


def main() -> None:
    """Console entry point (standalone click handling of usage errors, --help and exit codes)."""
    app()


if __name__ == "__main__":
    main()
