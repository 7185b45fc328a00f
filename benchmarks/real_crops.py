"""Real-cell recipes on the 12-MoA development set (crops-moa-dev), leave-one-compound-out.

    python benchmarks/real_crops.py [--recipes probe,probe-c1] [--out runs/real-crops] [--threads 1]
    python benchmarks/real_crops.py --list

Each recipe is a ``cellmorph cv`` run (``cellmorph.cv.run_cv``, LOCO) on the development set
prepared as the CLI contract does (``prepare --layout crops --normalize batch``). For each it prints
treatment, well, single-cell and class-balanced single-cell accuracy, log-loss (treatments and
cells), the compounds that could not be scored and why, and the wall time, then a Markdown table
for ``benchmarks/RESULTS.md``. Reruns resume each run. Linear-probe recipes that embed alike share
the first one's embeddings (copied into their run directories; ``run_cv`` checks that they match),
so their wall time is that of the heads alone: the table says which.

The development set is 22 of the benchmark's 38 compounds; the other 16 are held out and never
shared. Choosing a default here and scoring it there is the point: nothing in this script may see
those compounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.cv import run_cv
from cellmorph.cv.features import HEAD_ONLY_FIELDS
from cellmorph.cv.rundir import EMBEDDINGS, EMBEDDINGS_MARKER
from cellmorph.data.layouts import load_table, prepare_config
from cellmorph.preprocess import prepare

DEV_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021" / "crops-moa-dev"
BASE = {"model": "tf_efficientnet_lite0", "init": "imagenet", "cv": "loco"}

# name → (config on top of BASE, what it is). Fixed-C probes are for reading the curve only: a C chosen
# by looking at these LOCO figures would have been chosen on the compounds it is scored on.
RECIPES: dict[str, tuple[dict, str]] = {
    "probe": ({"mode": "linear-probe"}, "the CLI contract's probe: crop defaults (centroid head, logmean)"),
    "probe-logistic": ({"mode": "linear-probe", "probe_head": "logistic", "aggregate": "median"},
                       "the logistic head, C chosen inside each fold, median (the default before the centroid head)"),
    "probe-logistic-logmean": ({"mode": "linear-probe", "probe_head": "logistic", "aggregate": "logmean"},
                               "the logistic head, C nested, logmean: logistic regression of mean profiles"),
    "probe-centroid-median": ({"mode": "linear-probe", "probe_head": "centroid", "aggregate": "median"},
                              "the centroid head with the median of per-cell probabilities"),
    "probe-centroid-mean": ({"mode": "linear-probe", "probe_head": "centroid", "aggregate": "mean"},
                            "the centroid head with the mean of per-cell probabilities"),
    "probe-c1": ({"mode": "linear-probe", "probe_c": 1.0}, "C = 1, scikit-learn's default (before issue 29)"),
    "probe-c0.1": ({"mode": "linear-probe", "probe_c": 0.1}, "fixed C, hindsight"),
    "probe-c0.01": ({"mode": "linear-probe", "probe_c": 0.01}, "fixed C, hindsight"),
    "probe-c0.003": ({"mode": "linear-probe", "probe_c": 0.003}, "fixed C, hindsight"),
    "probe-c0.001": ({"mode": "linear-probe", "probe_c": 0.001}, "fixed C, hindsight"),
    "probe-mean": ({"mode": "linear-probe", "probe_head": "logistic", "aggregate": "mean"},
                   "logistic head, nested C, mean instead of median aggregation"),
    "probe-stage3": ({"mode": "linear-probe", "features": "stage3"}, "crop defaults, stage 3 alone"),
    "probe-notta": ({"mode": "linear-probe", "tta": "none"}, "crop defaults, no dihedral averaging of embeddings"),
    "probe-96": ({"mode": "linear-probe", "image_size": 96}, "crop defaults, 96 px"),
    "probe-160": ({"mode": "linear-probe", "image_size": 160}, "crop defaults, 160 px"),
    "probe-lite2": ({"mode": "linear-probe", "model": "tf_efficientnet_lite2"}, "EfficientNet-Lite2"),
    "probe-lite1": ({"mode": "linear-probe", "model": "tf_efficientnet_lite1"}, "EfficientNet-Lite1"),
    "probe-mnv2": ({"mode": "linear-probe", "model": "mobilenetv2_100"}, "MobileNetV2"),
    "probe-stage4": ({"mode": "linear-probe", "features": "stage4"}, "crop defaults, stage 4 alone"),
    "probe-stage234": ({"mode": "linear-probe", "features": "stage2+stage3+stage4"}, "crop defaults, stages 2 to 4"),
    "probe-head": ({"mode": "linear-probe", "features": "head"}, "crop defaults, the backbone's pooled head features"),
    "probe-meanmax": ({"mode": "linear-probe", "features": "stage3+stage4/mean+max"},
                      "crop defaults, each stage pooled by the mean and the max"),
    "probe-gem": ({"mode": "linear-probe", "features": "stage3+stage4/gem"},
                  "crop defaults, each stage pooled by the generalised mean (p = 3)"),
    "finetune": ({"epochs": 5}, "the CLI contract's fine-tune: crop defaults, 5 epochs (about an hour on 2 cores)"),
    # Fine-tune levers, one change each from the contract's fine-tune (item 3 of issue 29).
    "ft-probe-head": ({"epochs": 5, "head_init": "probe"}, "head started from a logistic regression (LP-FT)"),
    "ft-cosine": ({"epochs": 5, "lr_schedule": "cosine"}, "cosine learning rate"),
    "ft-wd": ({"epochs": 5, "weight_decay": 5e-4}, "SGD weight decay 5e-4"),
    "ft-drop": ({"epochs": 5, "drop_rate": 0.3}, "dropout 0.3 before the classifier"),
    "ft-lr3e-3": ({"epochs": 5, "lr": 3e-3}, "learning rate 3e-3 instead of 1e-2"),
    "ft-10ep": ({"epochs": 10}, "10 epochs"),
    "ft-blr0.1": ({"epochs": 5, "backbone_lr_scale": 0.1}, "backbone at 0.1 of the head's rate"),
    "ft-freeze3": ({"epochs": 5, "freeze_stages": 3}, "one more trainable stage (3 frozen)"),
    "ft-compounds": ({"epochs": 5, "compound_weighting": True}, "every training compound of a class weighs alike"),
    "ft-seed1": ({"epochs": 5, "seed": 1}, "seed 1 (for a two-seed ensemble with finetune)"),
    "ft-seed2": ({"epochs": 5, "seed": 2}, "seed 2 (for a three-seed ensemble)"),
    "ft-compounds-seed1": ({"epochs": 5, "compound_weighting": True, "seed": 1}, "ft-compounds at seed 1"),
    "ft-96": ({"epochs": 5, "image_size": 96}, "96 px"),
    "ft-160": ({"epochs": 5, "image_size": 160}, "160 px"),
    "ft-lite1": ({"epochs": 5, "model": "tf_efficientnet_lite1", "ensemble": []},
                 "EfficientNet-Lite1, one network (a member of another backbone for the fine-tune's ensemble)"),
    "ft-snapshots": ({"epochs": 5, "eval_epochs": [3, 4]},
                     "the contract's fine-tune (its default ensemble), each network also scored after epochs 3 and 4"),
}
# name → member recipes, combined as `cv --ensemble…` combines members: each level's held-out probabilities
# averaged over them. Members must have run (same folds, same cells).
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "ens-lite0-lite2": ("probe", "probe-lite2"),
    "ens-lite0-stage3": ("probe", "probe-stage3"),
    "ens-lite0-lite2-stage3": ("probe", "probe-lite2", "probe-stage3"),
    "ens-ft-seeds": ("finetune", "ft-seed1"),
    "ens-ft-3seeds": ("finetune", "ft-seed1", "ft-seed2"),
    "ens-ft-compounds-seeds": ("ft-compounds", "ft-compounds-seed1"),
    "ens-ft-cosine": ("finetune", "ft-cosine"),
    "ens-probe-ft": ("probe", "finetune"),
    "ens-probe-lite0-lite1-lite2": ("probe", "probe-lite1", "probe-lite2"),
    "ens-probe-lite0-mnv2": ("probe", "probe-mnv2"),
    # the crop fine-tune's default (two Lite0 seeds and the probe), and with a Lite1 fine-tune instead of, or beside,
    # the second seed
    "ens-default": ("probe", "finetune", "ft-seed1"),
    "ens-ft-lite0-lite1": ("finetune", "ft-lite1"),
    "ens-probe-ft-lite0-lite1": ("probe", "finetune", "ft-lite1"),
    "ens-probe-ft-seeds-lite1": ("probe", "finetune", "ft-seed1", "ft-lite1"),
}
DEFAULT_RECIPES = ("probe,probe-logistic,probe-logistic-logmean,probe-centroid-median,probe-centroid-mean,probe-c1,"
                   "probe-c0.1,probe-c0.01,probe-c0.003,probe-c0.001,probe-mean")


def prepared_cache(dev_set: Path, cache: Path, **options) -> Path:
    """``cellmorph prepare --layout crops --normalize batch --index DEV_SET/index.csv --out CACHE`` (reused when
    made), with ``options`` (prepare's) on top."""
    prepare(load_table("crops", index=dev_set / "index.csv"), cache,
            prepare_config("crops", **({"normalize": "batch"} | options)), progress=False)
    return cache


def score(run: Path | list[Path]) -> dict:
    """The figures of a finished run (or of an ensemble of runs, combined as `cv` combines an ensemble's members:
    each level's probabilities averaged over them), from its written outputs."""
    if isinstance(run, list):
        from cellmorph.cv.ensemble import mean_levels

        first = json.loads((run[0] / "metrics.json").read_text())
        seconds = sum(json.loads((r / "metrics.json").read_text()).get("seconds") or 0 for r in run)
        return score_frames(mean_levels(run), first["n_folds"],
                            {"skipped_folds": first.get("skipped_folds", []), "seconds": seconds})
    metrics = json.loads((run / "metrics.json").read_text())
    cells = pd.read_parquet(run / "predictions.parquet")
    treatments = pd.read_csv(run / "treatments.csv")
    return level_figures(metrics, cells, treatments)


def score_frames(levels: dict[str, pd.DataFrame], n_folds: int, run_metrics: dict | None = None) -> dict:
    """The figures of held-out levels (``tiles``, ``wells``, ``treatments``, as ``RunDir.read_levels`` gives them)
    that no run wrote, e.g. re-combined from runs' outputs; ``run_metrics``: what a run would record beside them
    (``skipped_folds``, ``seconds``)."""
    from cellmorph.cv.run import score_levels

    classes = [c[len("prob_"):] for c in levels["tiles"].columns if c.startswith("prob_")]
    metrics = score_levels(levels["tiles"], levels["wells"], levels["treatments"], classes, n_folds)
    return level_figures(metrics | {"n_folds": n_folds} | (run_metrics or {}), levels["tiles"], levels["treatments"])


def level_figures(metrics: dict, cells: pd.DataFrame, treatments: pd.DataFrame) -> dict:
    """:func:`score`'s row from a run's metrics and its held-out cells and treatments."""
    probs = [c for c in cells.columns if c.startswith("prob_")]
    classes = [c[len("prob_"):] for c in probs]

    def log_loss(frame: pd.DataFrame) -> float:
        position = {c: i for i, c in enumerate(classes)}
        picked = frame[probs].to_numpy()[np.arange(len(frame)), frame["Metadata_MoA"].map(position).to_numpy()]
        return float(-np.log(np.clip(picked, 1e-15, 1.0)).mean())

    called = cells[probs].to_numpy().argmax(axis=1)
    correct = np.asarray(classes)[called] == cells["Metadata_MoA"].to_numpy()
    balanced = float(pd.Series(correct).groupby(cells["Metadata_MoA"].to_numpy()).mean().mean())
    return {
        "treatment": metrics["treatment_accuracy"],
        "treatment_ci95": metrics.get("treatment_accuracy_ci95"),
        "well": metrics["well_accuracy"],
        "cell": metrics["tile_accuracy"],
        "balanced_cell": balanced,
        "treatment_log_loss": log_loss(treatments),
        "cell_log_loss": log_loss(cells),
        "n_treatments": metrics["n_treatments"],
        "n_folds": metrics["n_folds"],
        "unscored": [s["name"] for s in metrics.get("skipped_folds", [])],
        "probe_c": sorted({float(v) for v in (metrics.get("probe_c") or {}).values()}),
        "probe_temperature": sorted({float(v) for v in (metrics.get("probe_temperature") or {}).values()}),
        "seconds": metrics.get("seconds"),
    }


FIGURES_HEADER = "treatment (95% interval) | well | cell | balanced cell | log-loss treatment / cell"


def figures(row: dict) -> str:
    """A :func:`score` row's figures as Markdown cells, in the order of :data:`FIGURES_HEADER`."""
    ci = row["treatment_ci95"]
    interval = f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
    return (f"{row['treatment']:.3f}{interval} | {row['well']:.3f} | {row['cell']:.3f} | {row['balanced_cell']:.3f} "
            f"| {row['treatment_log_loss']:.2f} / {row['cell_log_loss']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=DEFAULT_RECIPES,
                        help=f"comma-separated, of: {', '.join(RECIPES)}; ensembles: {', '.join(ENSEMBLES)}")
    parser.add_argument("--out", type=Path, default=Path("runs/real-crops"))
    parser.add_argument("--dev-set", type=Path, default=DEV_SET)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cv", default="loco", help="the scheme (loco, the issue's; group-kfold:4 screens a "
                        "fine-tune lever in a fifth of the time); runs other than loco go to OUT/<scheme>/")
    parser.add_argument("--list", action="store_true", help="print the recipes and stop")
    args = parser.parse_args()
    if args.list:
        for name, (config, what) in RECIPES.items():
            print(f"{name}: {what}; {json.dumps(config)}")
        for name, members in ENSEMBLES.items():
            print(f"{name}: each level averaged over {', '.join(members)}")
        return
    if not (args.dev_set / "index.csv").is_file():
        raise SystemExit(f"{args.dev_set}: no index.csv (the development set lives in ../shared; see its README)")
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES and n not in ENSEMBLES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {', '.join(unknown)}; see --list")
    cache = prepared_cache(args.dev_set, args.out / "cache")
    runs = args.out if args.cv == "loco" else args.out / args.cv.replace(":", "-")
    rows, first_probe = [], None  # the first probe recipe with the contract's embedding settings
    for name in names:
        if name in ENSEMBLES:
            members = [runs / m for m in ENSEMBLES[name]]
            missing = [m.name for m in members if not (m / "metrics.json").is_file()]
            if missing:
                raise SystemExit(f"{name}: run its members first ({', '.join(missing)})")
            row = {"recipe": name, "what": f"mean of {', '.join(ENSEMBLES[name])}", **score(members), "wall": 0.0,
                   "embeddings_shared": False}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        config, what = RECIPES[name]
        run = runs / name
        shared = False
        embeds_alike = config.get("mode") == "linear-probe" and set(config) - {"mode"} <= set(HEAD_ONLY_FIELDS)
        if embeds_alike:
            if first_probe is None:
                first_probe = run
            elif not (run / EMBEDDINGS_MARKER).is_file() and (first_probe / EMBEDDINGS_MARKER).is_file():
                run.mkdir(parents=True, exist_ok=True)
                for file in (EMBEDDINGS, EMBEDDINGS_MARKER):
                    shutil.copy2(first_probe / file, run / file)
                shared = True
        started = time.perf_counter()
        run_cv(cache, run, BASE | config | {"cv": args.cv, "num_threads": args.threads}, resume=(run / "metrics.json").is_file()
               or (run / "config.yaml").is_file(), progress=False)
        row = {"recipe": name, "what": what, **score(run), "wall": round(time.perf_counter() - started, 1),
               "embeddings_shared": shared}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| recipe | {FIGURES_HEADER} | C (or T) per fold | wall |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        cs = ", ".join(f"{c:g}" for c in r["probe_c"]) or ", ".join(f"T {t:g}" for t in r.get("probe_temperature", [])) or "–"
        wall = f"{r['seconds']:.0f} s" + (" (heads only)" if r["embeddings_shared"] else "")
        print(f"| `{r['recipe']}` | {figures(r)} | {cs} | {wall} |")
    if rows:
        print(f"\n{rows[0]['n_treatments']} treatments scored in {rows[0]['n_folds']} folds; not scored: "
              f"{', '.join(rows[0]['unscored']) or 'none'} (the only compound of its MoA here)")


if __name__ == "__main__":
    main()
