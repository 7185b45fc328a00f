"""Replicates of a whole cross-validation run, and the paper's Fig. 4 (pretrained vs Xavier).

A replicate is a complete :func:`~cellmorph.cv.run.run_cv` run that differs only in its
seed; each is a normal, resumable run directory under ``out/replicate-<r>/``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.cv.config import CVConfig, validate_config
from cellmorph.cv.rundir import CONFIG_FILE, INIT_COMPARISON, METRICS_FILE, REPLICATE_DIR, REPLICATES_CSV, RunDir
from cellmorph.cv.executors import executor_scope
from cellmorph.cv.run import run_cv
from cellmorph.errors import CellmorphError, option
from cellmorph.metrics import ACCURACY_KEYS
from cellmorph.models.factory import INITS
from cellmorph.runinfo import require_output_dir, run_info, write_csv, write_json


def run_replicates(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    replicates: int = 1,
    resume: bool = False,
    progress: bool = True,
    executor=None,
) -> dict:
    """``replicates`` complete :func:`run_cv` runs that differ only in their seed (seed, seed+1, …).

    Each goes to ``out/replicate-<r>/`` (a normal run directory, resumable on its own).
    ``out/replicates.csv`` holds one row per replicate and scored epoch; ``out/metrics.json``
    holds the mean and standard deviation over replicates of every accuracy (the ``*_accuracy``
    keys are the means, so the file reads like a single run's) and the per-replicate figures.
    """
    if replicates < 1:
        raise CellmorphError(f"replicates must be ≥ 1, got {replicates}")
    base = validate_config(config if config is not None else {}, "config")
    out = require_output_dir(out)
    rows, runs = [], []
    for r in range(replicates):
        run_dir = out / REPLICATE_DIR.format(r)
        if RunDir(run_dir).has_results() and not resume:
            raise CellmorphError(f"{run_dir} already holds a run (finished): continue it with {option('resume')}, or choose another {option('out')}")
    with executor_scope(executor) as engine:  # one cluster for every replicate
        for r in range(replicates):
            run_dir = out / REPLICATE_DIR.format(r)
            # A replicate that a killed run never reached has nothing to resume: it starts.
            started = (run_dir / CONFIG_FILE).is_file()
            runs.append(run_cv(data, run_dir, base.model_copy(update={"seed": base.seed + r}),
                               resume=resume and started, progress=progress, executor=engine))
    for r, metrics in enumerate(runs):
        seed = base.seed + r
        scored = metrics.get("by_epoch") or {str(metrics["epochs"]): {k: metrics[k] for k in ACCURACY_KEYS}}
        for epoch, values in scored.items():
            rows.append({"replicate": r, "seed": seed, "init": metrics["init"], "model": metrics["model"],
                         "epoch": int(epoch), **{k: values[k] for k in ACCURACY_KEYS}})
    table = pd.DataFrame(rows)
    write_csv(out / REPLICATES_CSV, table)
    summary = summarise_replicates(table)
    last = runs[-1]
    final = summary["by_epoch"][str(last["epochs"])]
    result = {
        **{k: final[k]["mean"] for k in ACCURACY_KEYS},
        **{f"{k}_std": final[k]["std"] for k in ACCURACY_KEYS},
        "n_replicates": replicates,
        "seeds": [base.seed + r for r in range(replicates)],
        "n_treatments": last["n_treatments"],
        "n_wells": last["n_wells"],
        "n_tiles": last["n_tiles"],
        "n_folds": last["n_folds"],
        "classes": last["classes"],
        "cv": last["cv"],
        "model": last["model"],
        "init": last["init"],
        "epochs": last["epochs"],
        "image_size": last["image_size"],
        "by_epoch": summary["by_epoch"],
        "replicates": [{"replicate": r, "seed": base.seed + r, **{k: m[k] for k in ACCURACY_KEYS}}
                       for r, m in enumerate(runs)],
        "seconds": float(sum(m["seconds"] for m in runs)),
        "provenance": run_info(),
    }
    write_json(out / METRICS_FILE, result)
    return result


def summarise_replicates(table: pd.DataFrame) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one replicate), min and max per scored epoch."""
    by_epoch = {}
    for epoch, group in table.groupby("epoch", sort=True):
        stats = {}
        for key in ACCURACY_KEYS:
            values = group[key].to_numpy(dtype=float)
            stats[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "n": int(len(values)),
            }
        by_epoch[str(int(epoch))] = stats
    return {"by_epoch": by_epoch}


def compare_inits(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    inits: tuple[str, ...] = ("imagenet", "xavier"),
    epochs: tuple[int, ...] = (1, 5, 20),
    replicates: int = 3,
    metric: str = "well_accuracy",
    resume: bool = False,
    progress: bool = True,
    executor=None,
) -> dict:
    """The paper's Fig. 4: accuracy after each of ``epochs`` for every init, over replicates.

    One training of max(epochs) epochs per fold and replicate, scored after each listed
    epoch (``eval_epochs``), for each init in ``out/<init>/``; then
    ``out/init_comparison.csv`` and ``out/init_comparison.png``.
    """
    if metric not in ACCURACY_KEYS:
        raise CellmorphError(f"metric must be one of {', '.join(ACCURACY_KEYS)}, got {metric!r}")
    if not epochs or min(epochs) < 1:
        raise CellmorphError("epochs must be a non-empty list of positive integers")
    base = validate_config(config if config is not None else {}, "config")
    require_output_dir(out)
    last = max(epochs)
    tables = []
    summary = {}
    with executor_scope(executor) as engine:  # one cluster for every init and replicate
        for init in inits:
            update = {"init": init, "epochs": last, "eval_epochs": sorted(set(epochs) - {last})}
            if init == "xavier":
                update["freeze_stages"] = 0  # a from-scratch network trains every stage (see CVConfig)
                update["frozen_feature_cache"] = False  # so nothing is frozen to cache
            cfg = base.model_copy(update=update)
            replicate_metrics = run_replicates(data, Path(out) / _safe_name(init), cfg, replicates, resume, progress,
                                               executor=engine)
            table = pd.read_csv(Path(out) / _safe_name(init) / REPLICATES_CSV)
            table["init"] = init
            tables.append(table[table["epoch"].isin(epochs)])
            summary[init] = {e: replicate_metrics["by_epoch"][str(e)][metric] for e in sorted(epochs)}
    combined = pd.concat(tables, ignore_index=True)
    write_csv(Path(out) / f"{INIT_COMPARISON}.csv", combined)
    from cellmorph.figures import plot_init_comparison

    n_classes = len(replicate_metrics["classes"])
    plot_init_comparison(combined, Path(out) / f"{INIT_COMPARISON}.png", metric=metric,
                         title=f"{base.model}, {base.cv} CV, {replicates} replicate(s)", chance=1.0 / n_classes)
    result = {"metric": metric, "epochs": sorted(epochs), "replicates": replicates,
              "by_init": {init: {str(e): v for e, v in s.items()} for init, s in summary.items()}}
    write_json(Path(out) / f"{INIT_COMPARISON}.json", result)
    return result


def _safe_name(init: str) -> str:
    return init if init in INITS else "checkpoint-" + hashlib.sha256(init.encode()).hexdigest()[:8]
