"""Ensembles in cross-validation: several members, each a complete run, and their mean.

::

    RUN/
      member-1/ … member-N/   each member's own run directory (resumable on its own; its own report)
      config.yaml             the ensemble's config, its members' configs and run fingerprints
      predictions.parquet, wells.csv, treatments.csv, confusion_matrix.*, metrics.json
                              each level's held-out probabilities averaged over the members

Members differ in the fields their entries of ``CVConfig.ensemble`` give (a seed, a backbone, an input
size, a head); they share the folds and classes (:data:`~cellmorph.cv.config.ENSEMBLE_SHARED_FIELDS`),
so every tile, well and treatment is held out by each member alike. Each level is averaged on its own:
a member's treatment probabilities are its own aggregation (median, mean or logmean, whichever the
member uses), so a linear probe whose strength is its profile-level call and a fine-tune whose strength
is its per-cell call each count with their own. ``predict`` averages a bundle's members the same way,
and ``train --calibration`` calibrates an ensemble bundle on this mean.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from cellmorph.cv.config import CVConfig
from cellmorph.cv.rundir import CONFIG_FILE, RunDir, what_differs
from cellmorph.errors import CellmorphError, option
from cellmorph.metrics import mean_of_levels
from cellmorph.runinfo import atomic_path, created_root, output_lock, require_output_dir, run_info

MEMBER_DIR = "member-{}"


def member_dir(out: Path, k: int) -> Path:
    """Member ``k`` (from 1) of the ensemble run in ``out``."""
    return Path(out) / MEMBER_DIR.format(k)


def run_ensemble_cv(data: Path, out: Path, base: CVConfig, resume: bool = False, progress: bool = True,
                    executor=None) -> dict:
    """Cross-validate every member of ``base.ensemble`` (``out/member-<k>/``), then write the mean of their
    held-out probabilities, level by level, as the run in ``out``. Returns its metrics."""
    from cellmorph.cv.executors import executor_scope
    from cellmorph.cv.run import run_cv

    started = time.perf_counter()
    members = base.members()
    out = require_output_dir(Path(out), "run directory")
    rundir = RunDir(out)
    if rundir.has_results() and not resume:
        raise CellmorphError(f"{out} already holds a run (finished): continue it with {option('resume')}, or choose another {option('out')}")
    if resume and not (out / CONFIG_FILE).is_file() and not member_dir(out, 1).is_dir():
        raise CellmorphError(f"{out}: {option('resume')}: not a cellmorph run (no {CONFIG_FILE}); check {option('out')}, or drop {option('resume')}")
    if (out / CONFIG_FILE).is_file() and not is_ensemble_run(out):
        # e.g. a crop fine-tune started before two seeds became its default: resume it as what it is
        raise CellmorphError(f"{out} holds a run of one network, not an ensemble's: continue it with "
                             f"{option('ensemble_seeds')} 1 (one network), or choose another {option('out')}")
    folders = [member_dir(out, k) for k in range(1, len(members) + 1)]
    created = created_root(out)
    with output_lock(out, "cv"), executor_scope(executor) as engine:
        try:
            for member, folder in zip(members, folders):
                # A member that a killed run never reached has nothing to resume: it starts.
                run_cv(data, folder, member, resume=resume and (folder / CONFIG_FILE).is_file(), progress=progress,
                       executor=engine)
        except CellmorphError:
            if created is not None and not any(RunDir(folder).has_results() for folder in folders):
                shutil.rmtree(created, ignore_errors=True)  # nothing worth resuming: leave nothing behind
            raise
        return combine_member_runs(out, base, folders, time.perf_counter() - started)


def mean_levels(runs: list[Path]) -> dict[str, pd.DataFrame]:
    """Each level (tiles, wells, treatments) of the finished runs, its ``prob_<class>`` averaged over them
    and the calls made again. The runs must hold out the same tiles with the same classes."""
    return mean_of_levels([RunDir(run).read_levels() for run in runs], [str(run) for run in runs])


def combine_member_runs(out: Path, base: CVConfig, runs: list[Path], seconds: float) -> dict:
    """Write the ensemble run in ``out`` from its finished member runs: config.yaml, the levels averaged,
    the tables and figures, and ``metrics.json`` last."""
    from cellmorph.cv.run import score_levels, write_levels, write_retrieval

    rundir = RunDir(out)
    headers = [RunDir(run).read_config() for run in runs]
    member_metrics = [RunDir(run).read_metrics() for run in runs]
    classes = list(headers[0]["classes"])
    levels = mean_levels(runs)
    tiles, wells, treatments = levels["tiles"], levels["wells"], levels["treatments"]
    metrics = score_levels(tiles, wells, treatments, classes, member_metrics[0]["n_folds"])
    first = headers[0]
    header = {
        "config": base.model_dump(mode="json"),
        "data": first["data"], "data_fingerprint": first["data_fingerprint"], "classes": classes,
        "model_input": first.get("model_input"), "model_init": first.get("model_init"),
        "device": first.get("device"), "threads": first.get("threads"), "seeds": first.get("seeds"),
        "cv": first.get("cv"),
        "ensemble": {"members": [{"run": run.name, "config": h["config"], "fingerprint": h.get("fingerprint")}
                                 for run, h in zip(runs, headers)],
                     "combination": "each level's probabilities averaged over the members"},
        "provenance": run_info(),
    }
    with atomic_path(rundir.path(CONFIG_FILE)) as tmp:
        tmp.write_text(yaml.safe_dump(header, sort_keys=False, allow_unicode=True))
    models = " + ".join(h["config"]["model"] for h in headers)
    write_levels(rundir, tiles, tiles, wells, treatments, classes, "mean over members",
                 f"ensemble of {len(runs)} ({models}) {base.cv}: treatment accuracy "
                 f"{metrics['treatment_accuracy']:.3f}")
    metrics.update({
        "cv": base.cv, "model": base.model, "init": base.init, "image_size": member_metrics[0].get("image_size"),
        "epochs": base.epochs, "skipped_folds": member_metrics[0].get("skipped_folds", []),
        "ensemble": [{"run": run.name, "model": m.get("model"), "treatment_accuracy": m["treatment_accuracy"],
                      "well_accuracy": m["well_accuracy"], "tile_accuracy": m["tile_accuracy"]}
                     for run, m in zip(runs, member_metrics)],
        "seconds": seconds,
        "fold_seconds_total": float(sum(m.get("fold_seconds_total") or 0.0 for m in member_metrics)),
        "device": member_metrics[0].get("device"),
        "map": write_retrieval(rundir, wells, treatments, classes),
    })
    rundir.write_metrics(metrics)
    return metrics


def is_ensemble_run(run: Path) -> bool:
    """Whether ``run`` is an ensemble's run directory (its config.yaml lists members)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return False
    return bool((yaml.safe_load(path.read_text()) or {}).get("ensemble"))


__all__ = ["MEMBER_DIR", "combine_member_runs", "is_ensemble_run", "mean_levels", "member_dir", "run_ensemble_cv"]


def check_finished_run(data: Path, run: Path, config: CVConfig) -> dict:
    """The metrics of ``run`` if it is a finished CV of ``config`` (a one-network run or an ensemble's, as
    ``cv`` would run it) on the cache ``data``: the same fingerprint (recipe, data, classes, weights) and
    every fold done. Else one error line saying what differs. Nothing in ``run`` is written."""
    from cellmorph.cache import cache_source
    from cellmorph.cv.config import RUNTIME_FIELDS, with_layout_defaults
    from cellmorph.cv.run import plan_run

    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise CellmorphError(f"{run}: not a cellmorph run (no {CONFIG_FILE})")
    if not RunDir(run).has_results():
        raise CellmorphError(f"{run}: the run is not finished; finish it with `cellmorph cv ... --resume --out {run}`")
    resolved = with_layout_defaults(config, cache_source(data))
    members = resolved.members() if resolved.ensemble else [resolved]
    if bool(resolved.ensemble) != is_ensemble_run(run):
        has, wants = ("an ensemble's", "one network") if is_ensemble_run(run) else ("one network's", "an ensemble")
        raise CellmorphError(f"{run} holds {has} run, but the recipe trains {wants} ({option('ensemble_seeds')}, "
                             f"{option('ensemble_models')})")
    folders = [member_dir(run, k) for k in range(1, len(members) + 1)] if resolved.ensemble else [run]
    for member, folder in zip(members, folders):
        if not (folder / CONFIG_FILE).is_file() or not RunDir(folder).has_results():
            raise CellmorphError(f"{folder}: the member's run is missing or not finished")
        previous = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
        plan = plan_run(data, member, with_folds=False)
        if previous.get("fingerprint") != plan.fingerprint:
            what = what_differs(previous.get("config", {}), plan.config.model_dump(mode="json"), RUNTIME_FIELDS)
            raise CellmorphError(f"{folder}: not a CV of this recipe on {data}: {what} differ")
    return RunDir(run).read_metrics()
