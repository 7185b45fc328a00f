"""The use case of an ensemble whose members were trained apart: several finished ``dev_usecase.py`` runs of
the same outer folds, combined as one bundle of all their members would predict (issue 29).

    python benchmarks/usecase_ensemble.py DIR [DIR ...]

Each run's ``fold-k/pred/treatments.parquet`` holds its bundle's treatment probabilities (``prob_<class>``, the
mean over that bundle's members, each aggregated its own way) and ``fold-k/model/calibration_treatments.parquet``
its calibration CV's out-of-fold scores (the same mean). A bundle holding every member of the runs averages all
members alike, so each run counts with its number of members (``bundle.json``). The calls, and the conformal
sets at ``--alpha`` from the combined calibration scores (``cellmorph.calibration.conformal_sets``, as
``predict`` makes them), are scored on the held-out compounds' treatments. Confidence (temperature scaling) is
not recomputed: it never changes a call or a set. No network runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.calibration import conformal_sets, group_bootstrap
from cellmorph.schema import prob_column

KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def n_members(model: Path) -> int:
    return 1 + len(json.loads((model / "bundle.json").read_text()).get("members") or [])


def combined_fold(runs: list[Path], fold: str, alpha: float) -> pd.DataFrame:
    """One outer fold's held-out treatments: the combined call, whether the set covers the MoA, its size."""
    preds, calibrations, weights = [], [], []
    for run in runs:
        treatments = pd.read_parquet(run / fold / "pred" / "treatments.parquet")
        preds.append(treatments[~treatments["Metadata_InTraining"].astype(bool)].sort_values(KEYS).reset_index(drop=True))
        calibrations.append(pd.read_parquet(run / fold / "model" / "calibration_treatments.parquet")
                            .sort_values(KEYS).reset_index(drop=True))
        weights.append(n_members(run / fold / "model"))
    for frames in (preds, calibrations):
        if any(not f[KEYS].astype(str).equals(frames[0][KEYS].astype(str)) for f in frames[1:]):
            raise SystemExit(f"{fold}: the runs hold other treatments (not the same outer folds or calibration CV)")
    classes = [c[len("prob_"):] for c in preds[0].columns if c.startswith("prob_")]
    columns = [prob_column(c) for c in classes]
    w = np.asarray(weights, float) / sum(weights)
    probs = sum(wk * f[columns].to_numpy(float) for wk, f in zip(w, preds))
    calibration = calibrations[0].copy()
    calibration[columns] = sum(wk * f[columns].to_numpy(float) for wk, f in zip(w, calibrations))
    sets = conformal_sets(calibration, probs, classes, alpha)
    out = preds[0][KEYS + ["Metadata_MoA"]].copy()
    truth = out["Metadata_MoA"].astype(str).map({c: i for i, c in enumerate(classes)})
    labelled = truth.notna().to_numpy()
    out, sets, probs, truth = out[labelled], sets[labelled], probs[labelled], truth[labelled].astype(int).to_numpy()
    out["correct"] = probs.argmax(axis=1) == truth
    out["covered"] = sets[np.arange(len(truth)), truth]
    out["set_size"] = sets.sum(axis=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished dev_usecase.py output folders")
    parser.add_argument("--alpha", type=float, default=0.2)
    args = parser.parse_args()
    folds = sorted(p.name for p in args.runs[0].glob("fold-*") if (p / "pred" / "summary.json").is_file())
    records = pd.concat([combined_fold(args.runs, fold, args.alpha) for fold in folds], ignore_index=True)
    compounds = records["Metadata_Compound"].to_numpy()
    correct, covered = records["correct"].to_numpy(float), records["covered"].to_numpy(float)
    low, high = group_bootstrap(compounds, lambda r: correct[r].mean())
    clow, chigh = group_bootstrap(compounds, lambda r: covered[r].mean())
    members = " + ".join(f"{run.name} ({n_members(run / folds[0] / 'model')})" for run in args.runs)
    print(f"{members}: {len(records)} treatments of {len(set(compounds))} compounds, {len(folds)} outer folds")
    print(f"| {members} | {correct.mean():.3f} ({low:.2f}–{high:.2f}) | {covered.mean():.3f} ({clow:.2f}–{chigh:.2f}) "
          f"| {records['set_size'].mean():.2f} | {(records['set_size'] == 0).mean():.2f} |")


if __name__ == "__main__":
    main()
