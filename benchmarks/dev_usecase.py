"""The use case itself, on real cells: `train --calibration` on some compounds, `predict` on compounds the
model never saw, scored (issue 29, items 6 and the bars' second line), with the CLI contract's commands.

    python benchmarks/dev_usecase.py --out DIR [--outer group-kfold:4] [--alpha 0.2] [--threads 2]
                                     [--train-args "--epochs 5 --calibration group-kfold:4"]

The development set's compounds (crops-moa-dev) are dealt into outer folds (``cellmorph.cv.splits.make_folds``,
``group-kfold:4`` by default: a MoA's only compound always stays in training, as ``cv`` does). For each outer
fold, exactly what a user runs:

1. ``cellmorph prepare --layout crops --normalize batch --index TRAIN.csv --out DIR/fold-k/cache``
   (the other folds' compounds and every DMSO cell);
2. ``cellmorph train --data DIR/fold-k/cache --model tf_efficientnet_lite0 --init imagenet --epochs 5
   --calibration group-kfold:4 --out DIR/fold-k/model`` (the crop defaults: a two-seed ensemble);
3. ``cellmorph predict --model DIR/fold-k/model --layout crops --index TEST.csv --alpha A --out DIR/fold-k/pred``
   (the fold's compounds and the DMSO cells of their batches, which the batch normalisation needs).

Then every held-out treatment's call, set and confidence are scored against its MoA: treatment accuracy,
coverage of the sets at ``α`` and their size, and the ECE of ``Confidence`` (temperature-scaled where
``predict`` uses it) against ``Raw_Confidence``. Intervals resample compounds. Reruns skip finished steps.
The index CSVs go into each fold's folder beside a link to the set's ``crops/`` folder: nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from cellmorph.cache import TileCache
from cellmorph.calibration import SET_SEPARATOR, expected_calibration_error, group_bootstrap
from cellmorph.cv.splits import make_folds

DEV_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021" / "crops-moa-dev"
CONTROL = "DMSO"


def cellmorph(args: list[str], threads: int, log: Path) -> float:
    """Run one CLI command (its output appended to ``log``); its wall seconds."""
    env = os.environ | {"CELLMORPH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write("$ cellmorph " + shlex.join(args) + "\n")
        sink.flush()
        done = subprocess.run([sys.executable, "-m", "cellmorph", *args], stdout=sink, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode:
        raise SystemExit(f"cellmorph {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def batch_of(plates: pd.Series) -> pd.Series:
    return plates.astype(str).str.split("_").str[0]  # BBBC021's week prefix, as prepare's --normalize batch


def outer_folds(out: Path, scheme: str, seed: int, threads: int, log: Path):
    """The outer folds, made by the project's own rule from the whole set's prepared index."""
    cache = out / "cache-all"
    if not (cache / "manifest.json").exists():
        cellmorph(["prepare", "--layout", "crops", "--normalize", "batch", "--index", str(DEV_SET / "index.csv"),
                   "--out", str(cache)], threads, log)
    index = TileCache(cache).index
    folds, unscored = make_folds(index, scheme, seed=seed)
    return [(f.index, sorted(index.iloc[f.test]["Metadata_Compound"].astype(str).unique())) for f in folds], unscored


def write_fold_tables(folder: Path, table: pd.DataFrame, test_compounds: list[str]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "crops"
    if not link.exists():
        link.symlink_to(DEV_SET / "crops", target_is_directory=True)
    held = table["Metadata_Compound"].isin(test_compounds)
    batches = set(batch_of(table.loc[held, "Metadata_Plate"]))
    controls = (table["Metadata_Compound"] == CONTROL) & batch_of(table["Metadata_Plate"]).isin(batches)
    train_csv, test_csv = folder / "train.csv", folder / "test.csv"
    table[~held].to_csv(train_csv, index=False)
    table[held | controls].to_csv(test_csv, index=False)
    return train_csv, test_csv


def score(records: pd.DataFrame, alpha: float) -> dict:
    correct = records["Correct"].to_numpy(float)
    covered = records["covered"].to_numpy(float)
    compounds = records["Metadata_Compound"].to_numpy()
    return {
        "alpha": alpha, "n_treatments": len(records), "n_compounds": int(records["Metadata_Compound"].nunique()),
        "accuracy": correct.mean(), "accuracy_ci95": group_bootstrap(compounds, lambda r: correct[r].mean()),
        "coverage": covered.mean(), "coverage_ci95": group_bootstrap(compounds, lambda r: covered[r].mean()),
        "mean_set_size": records["Set_Size"].mean(), "empty": float((records["Set_Size"] == 0).mean()),
        "ece": expected_calibration_error(records["Confidence"], records["Correct"]),
        "ece_raw": expected_calibration_error(records["Raw_Confidence"], records["Correct"]),
        "mean_confidence": records["Confidence"].mean()} | ({
            # every scored treatment is a new compound of a known MoA: Novel is a false alarm on each
            "novel_false_alarms": float(records["Novel"].astype(bool).mean())} if "Novel" in records.columns else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--outer", default="group-kfold:4")
    parser.add_argument("--seed", type=int, default=0, help="seed of the outer deal")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--train-args", default="--epochs 5 --calibration group-kfold:4")
    parser.add_argument("--folds", default=None, help="comma-separated outer folds to run (default: all)")
    args = parser.parse_args()
    if not (DEV_SET / "index.csv").exists():
        raise SystemExit(f"{DEV_SET}: the development set is not here (see ../shared/README.md)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    recipe = {"outer": args.outer, "seed": args.seed, "alpha": args.alpha, "model": args.model,
              "train_args": args.train_args}
    recorded = out / "recipe.json"
    if recorded.exists() and json.loads(recorded.read_text()) != recipe:
        raise SystemExit(f"{out}: holds a run of another recipe ({recorded}); choose another --out")
    recorded.write_text(json.dumps(recipe, indent=1))
    table = pd.read_csv(DEV_SET / "index.csv")
    folds, unscored = outer_folds(out, args.outer, args.seed, args.threads, log)
    walls, parts, n_calibration, expected = {}, [], {}, {}
    if args.folds is not None:
        folds = [(k, c) for k, c in folds if str(k) in args.folds.split(",")]
    for k, compounds in folds:
        folder = out / f"fold-{k}"
        train_csv, test_csv = write_fold_tables(folder, table, compounds)
        cache, model, pred = folder / "cache", folder / "model", folder / "pred"
        wall = {}
        if not (cache / "manifest.json").exists():
            wall["prepare"] = cellmorph(["prepare", "--layout", "crops", "--normalize", "batch", "--index",
                                         str(train_csv), "--out", str(cache)], args.threads, log)
        if not (model / "bundle.json").exists():
            wall["train"] = cellmorph(["train", "--data", str(cache), "--model", args.model, "--init", "imagenet",
                                       *shlex.split(args.train_args), "--out", str(model)], args.threads, log)
        if not (pred / "summary.json").exists():
            wall["predict"] = cellmorph(["predict", "--model", str(model), "--layout", "crops", "--index",
                                         str(test_csv), "--alpha", str(args.alpha), "--out", str(pred)],
                                        args.threads, log)
        walls[k] = wall
        treatments = pd.read_parquet(pred / "treatments.parquet")
        treatments = treatments[treatments["Metadata_Compound"].astype(str).isin(compounds)].copy()
        treatments["covered"] = [moa in str(s).split(SET_SEPARATOR) for moa, s in
                                 zip(treatments["Metadata_MoA"].astype(str), treatments["Prediction_Set"])]
        treatments["fold"] = k
        parts.append(treatments)
        n_calibration[k] = len(pd.read_parquet(model / "calibration_treatments.parquet"))
        expected[k] = _expected_coverage(model, args.alpha)
        print(f"fold {k}: {', '.join(compounds)}: accuracy {treatments['Correct'].mean():.3f}, coverage "
              f"{treatments['covered'].mean():.3f} of {len(treatments)} treatments; "
              + ", ".join(f"{s} {v:.0f} s" for s, v in wall.items()), flush=True)
    records = pd.concat(parts, ignore_index=True)
    records["Correct"] = records["Correct"].astype(bool)
    result = score(records, args.alpha) | {
        "outer": args.outer, "train_args": args.train_args, "model": args.model,
        "not_scored": [u["name"] for u in unscored], "folds": {k: c for k, c in folds}, "walls_s": walls,
        "n_calibration_treatments": n_calibration, "expected_coverage_by_train": expected}
    records.to_parquet(out / "treatments.parquet", index=False)
    (out / "usecase.json").write_text(json.dumps(result, indent=1, default=str))
    low, high = result["accuracy_ci95"]
    clow, chigh = result["coverage_ci95"]
    print(f"\n{result['n_treatments']} held-out treatments of {result['n_compounds']} compounds "
          f"(not scored: {', '.join(result['not_scored']) or 'none'})")
    print("| outer split | treatment accuracy (95%) | α | coverage (95%) | mean set size | empty | ECE (raw) | "
          "calibration treatments | coverage train expected |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.outer} | {result['accuracy']:.3f} ({low:.2f}–{high:.2f}) | {args.alpha} | "
          f"{result['coverage']:.3f} ({clow:.2f}–{chigh:.2f}) | {result['mean_set_size']:.2f} | "
          f"{result['empty']:.2f} | {result['ece']:.3f} ({result['ece_raw']:.3f}) | "
          f"{', '.join(str(v) for v in result['n_calibration_treatments'].values())} | "
          f"{', '.join(f'{v:.2f}' for v in expected.values() if v is not None)} |")
    if "novel_false_alarms" in result:
        print(f"Novel flagged {result['novel_false_alarms']:.3f} of these new compounds of known MoAs (false alarms)")


def _expected_coverage(model: Path, alpha: float) -> float | None:
    """The coverage ``train`` promised at ``alpha`` (its calibration CV's held-out treatments)."""
    record = json.loads((model / "bundle.json").read_text())["training"].get("calibration") or {}
    return next((r["coverage"] for r in record.get("held_out_coverage", []) if abs(r["alpha"] - alpha) < 1e-9), None)


if __name__ == "__main__":
    main()
