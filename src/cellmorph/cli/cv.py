"""``cv``, ``train``, ``compare-inits`` and ``demo``: the cross-validation and the final model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cellmorph.cli.options import config_options
from cellmorph.cli.common import (
    PROGRESS_HELP,
    THREADS_HELP,
    ExecutorKind,
    print_metrics,
    print_report,
    command,
    console,
    shared_options,
)

# The settings records are light (no torch or pandas): options and their help are built from them at
# import time, and the commands import the modules that do the work when they run (start-up time).
from cellmorph.cv.config import CVConfig, ensemble_members, field_help, load_cv_config
from cellmorph.cv.executors import ExecutorConfig
from cellmorph.demo import DemoConfig
from cellmorph.errors import CellmorphError, validated

# Every cv setting as an option of `cv` and `train`, generated from CVConfig's fields (its type, default and
# description; cellmorph.cli.options). Not among them: `cv` (an option of `cv` only; `train` has --calibration)
# and `ensemble` (a list of records, given by the three options below).
CV_SETTINGS = config_options(
    CVConfig, exclude=("cv", "ensemble"),
    types_={"weights": Path, "eval_epochs": str, "probe_c": str, "features": str},
    parsers={"weights": str, "eval_epochs": lambda text: _int_list(text, "--eval-epochs"),
             "probe_c": lambda text: _probe_c(text)})
ENSEMBLE_OPTIONS: dict[str, tuple[object, object]] = {
    "ensemble_seeds": (Optional[int], typer.Option(
        None, min=1, help="an ensemble of N members that differ in their seed (seed, seed+1, …); with "
        "--ensemble-models, each model gets the N seeds")),
    "ensemble_models": (Optional[str], typer.Option(
        None, help="an ensemble whose further members are these backbones (comma-separated; --model is the first), "
        "e.g. tf_efficientnet_lite2,mobilenetv2_100")),
    "ensemble_probe": (Optional[bool], typer.Option(
        None, "--ensemble-probe", help="add a linear probe of --model to the ensemble these options give (a "
        "pretrained crop fine-tune is two seeds and a probe by default; --ensemble-seeds 2 alone leaves the "
        "probe out)")),
}
CV_OPTIONS = CV_SETTINGS.options | ENSEMBLE_OPTIONS


cv_options = shared_options(CV_OPTIONS, "options")


def _probe_c(text: str | None):
    """``--probe-c``: ``nested`` or a number (the config refuses numbers that are not positive)."""
    if text is None or text.strip().lower() == "nested":
        return None if text is None else "nested"
    try:
        return float(text)
    except ValueError:
        raise CellmorphError(f"--probe-c {text!r}: expected nested or a positive number") from None


def ensemble_from_options(seeds: int | None, models: str | None, given: dict, probe: bool | None = None) -> list[dict] | None:
    """``--ensemble-seeds``, ``--ensemble-models`` and ``--ensemble-probe`` as the config's ``ensemble`` list:
    exactly the members they name (None: none given, so the layout's default ensemble applies)."""
    if seeds is None and models is None and not probe:
        return None
    if probe and given.get("mode") == "linear-probe":
        raise CellmorphError("--ensemble-probe adds a linear probe to trained networks; --mode linear-probe is one")
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    if models is not None and not names:
        raise CellmorphError("--ensemble-models: expected backbone names separated by commas")
    return ensemble_members(given.get("seed") or 0, seeds or 1, names, probe=bool(probe))


def _cv_config(config: Optional[Path], options: dict, **more):
    """The CVConfig of a YAML file (optional) with the command's options on top."""
    given = CV_SETTINGS.settings(options) | {k: v for k, v in more.items() if v is not None}
    given["ensemble"] = ensemble_from_options(options["ensemble_seeds"], options["ensemble_models"], given,
                                              options["ensemble_probe"])
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
    print_metrics(metrics, out)
    open_set = Path(out) / "open_set.json"
    if open_set.is_file():  # lomo: its held-out MoAs are unseen, so their calls score 0; what it measures is this
        record = json.loads(open_set.read_text())
        console.print(f"open set (each MoA unseen in turn): AUROC {record['auroc']:.3f} against new compounds of known "
                      f"MoAs; {record['flagged_at_alpha']:.3f} of the unseen MoAs' treatments flagged Novel"
                      f"{' (each scored by its compound)' if record.get('pool') == 'compound' else ''} at "
                      f"{record['alpha']:g} false alarms (measured {record['false_alarm_rate']:.3f}): {open_set}",
                      highlight=False, soft_wrap=True)
    runs = sorted(Path(out).glob("replicate-*")) if replicates > 1 else [Path(out)]
    for run in runs + sorted(p for r in runs for p in r.glob("member-*") if (p / "metrics.json").is_file()):
        print_report(run)


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
        for line in expected_calibration_lines(summary.get("calibration")):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"model bundle: {out}")
        print(json.dumps(summary))


# Below this many calibration treatments a set's coverage on new compounds is uncertain by more
# than ±0.1 (binomial, at 1 − α = 0.8: 2·√(0.16/n) > 0.1 for n < 64).
FEW_CALIBRATION_TREATMENTS = 64


def expected_calibration_lines(calibration: dict | None) -> list[str]:
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


# The cv settings compare-inits takes: its runs differ only in init and epochs, so the rest is the recipe.
COMPARE_SETTINGS = config_options(CVConfig, only=("model", "batch_size", "lr", "image_size", "seed", "num_threads"))


@command("compare-inits")
@executor_options
@shared_options(COMPARE_SETTINGS.options, "options")
def compare_inits_command(
    data: Path = typer.Option(..., help="tile cache from `cellmorph prepare`"),
    out: Path = typer.Option(..., help="output directory (one sub-run per init)"),
    cv_scheme: Optional[str] = typer.Option(None, "--cv", help=field_help("cv")),
    epochs: str = typer.Option("1,5,20", help="score after these epochs (one training of the largest)"),
    replicates: int = typer.Option(3, min=1, help="seeds per init"),
    inits: str = typer.Option("imagenet,xavier", help="comma-separated: imagenet, xavier or checkpoint paths"),
    metric: str = typer.Option("well_accuracy", help="treatment_accuracy | well_accuracy | tile_accuracy"),
    config: Optional[Path] = typer.Option(None, help="YAML CVConfig; options given here override it"),
    resume: bool = typer.Option(False, "--resume", help="continue, skipping finished folds and replicates"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
    options: dict | None = None,
    executor=None,
) -> None:
    """Pretrained vs Xavier after 1, 5 and 20 epochs over replicates: the paper's Fig. 4 (init_comparison.png)."""
    from cellmorph.cv import compare_inits
    from cellmorph.cv.rundir import INIT_COMPARISON

    epoch_list = _int_list(epochs, "--epochs")
    cfg = load_cv_config(config, **COMPARE_SETTINGS.settings(options), cv=cv_scheme, epochs=max(epoch_list))
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
    print_report(out)
    print(json.dumps(result["by_init"]))


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
    image_format: str = _demo_option("image_format", "--format"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """synth tiny → prepare → cv (compound hold-out, offline ImageNet EfficientNet-Lite0): the linear probe,
    then the paper's fine-tune → summary tables and reports."""
    from cellmorph.demo import run_demo

    settings = validated(DemoConfig, dict(seed=seed, epochs=epochs, image_size=image_size, freeze_stages=freeze_stages,
                                           tta=tta, frozen_feature_cache=frozen_feature_cache, cv=cv_scheme,
                                           lr_schedule=lr_schedule, probe=probe, threads=threads,
                                           image_format=image_format), "demo options")
    result = run_demo(out, settings, progress=progress, say=lambda m: console.print(m, highlight=False))
    if result.probe is not None:
        print_metrics(result.probe, result.probe_dir)
        print_report(result.probe_dir)
    print_metrics(result.finetune, result.finetune_dir)
    print_report(result.finetune_dir)
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
