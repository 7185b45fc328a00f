"""Marginal against class-conditional (Mondrian) prediction sets, per MoA, on compounds held out (issue 31 item 4).

    python benchmarks/set_types.py RUN [RUN ...] [--alphas 0.1,0.2]

``RUN`` is a finished ``cv`` run whose held-out compounds were never trained on (loco or group-kfold; an ensemble
run is its members' mean). Each compound is new in turn: its treatments' sets are calibrated on every other
compound's out-of-fold treatment probabilities (``cellmorph.calibration.conformal_sets``, as ``predict`` makes
them), once with one threshold for all MoAs (``marginal``) and once per MoA (``mondrian``, crepes' class-conditional
classifier). Adaptive sets are measured beside them through MAPIE (``pip install mapie``; not a cellmorph
dependency): APS (adaptive prediction sets) and RAPS (regularised APS; MAPIE holds part of the calibration
scores back to tune it, and refuses where too few remain). Printed: overall coverage and mean set size, the
worst MoA's coverage, and per MoA both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.calibration import SET_TYPES, conformal_sets
from cellmorph.cv.rundir import RunDir
from cellmorph.schema import TRUE_COLUMN, prob_column


ADAPTIVE = ("aps", "raps")  # MAPIE's conformity scores, beside cellmorph's own SET_TYPES


def mapie_sets(calibration: pd.DataFrame, probabilities: np.ndarray, classes: list[str], alpha: float,
               score: str) -> np.ndarray:
    """(n, classes) membership of MAPIE's split-conformal sets with conformity ``score`` on fixed probabilities
    (a pass-through estimator: the cv run's probabilities are the model)."""
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class FixedProbabilities(ClassifierMixin, BaseEstimator):
        def __init__(self, n_classes: int = 2):
            self.n_classes = n_classes

        def fit(self, x, y=None):
            self.classes_ = np.arange(self.n_classes)
            return self

        def predict_proba(self, x):
            # a treatment's probabilities are medians over its tiles: rescaled to sum to 1, as MAPIE requires
            x = np.asarray(x, float)
            return x / x.sum(axis=1, keepdims=True)

        def predict(self, x):
            return np.asarray(x).argmax(axis=1)

    columns = [prob_column(c) for c in classes]
    model = SplitConformalClassifier(estimator=FixedProbabilities(len(classes)).fit(None), confidence_level=1 - alpha,
                                     conformity_score=score, prefit=True, random_state=0)
    model.conformalize(calibration[columns].to_numpy(float),
                       calibration[TRUE_COLUMN].astype(str).map(classes.index).to_numpy())
    return model.predict_set(probabilities)[1][:, :, 0]


def per_treatment(scores: pd.DataFrame, classes: list[str], alpha: float, sets: str) -> pd.DataFrame:
    labelled = scores[scores[TRUE_COLUMN].astype(str).isin(classes)].reset_index(drop=True)
    columns = [prob_column(c) for c in classes]
    rows = []
    for compound, held in labelled.groupby("Metadata_Compound", sort=True):
        others = labelled.drop(index=held.index)
        if sets in ADAPTIVE:
            members = mapie_sets(others, held[columns].to_numpy(float), classes, alpha, sets)
        else:
            members = conformal_sets(others, held[columns].to_numpy(float), classes, alpha, sets)
        truth = held[TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
        rows.append(pd.DataFrame({"moa": held[TRUE_COLUMN].astype(str).to_numpy(), "compound": compound,
                                  "covered": members[np.arange(len(truth)), truth], "size": members.sum(axis=1)}))
    return pd.concat(rows, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--alphas", default="0.1,0.2")
    args = parser.parse_args()
    for run in args.runs:
        rundir = RunDir(run)
        classes = list(rundir.read_config()["classes"])
        scores = rundir.read_levels()["treatments"]
        per_moa_counts = scores[scores[TRUE_COLUMN].astype(str).isin(classes)][TRUE_COLUMN].value_counts()
        print(f"\n{run}: {int(per_moa_counts.sum())} treatments, {per_moa_counts.min()}–{per_moa_counts.max()} per MoA")
        print("| α | sets | coverage | mean set size | worst MoA's coverage | MoAs under 1 − α |\n|---|---|---|---|---|---|")
        tables = {}
        for alpha in (float(a) for a in args.alphas.split(",")):
            for sets in (*SET_TYPES, *ADAPTIVE):
                try:
                    frame = per_treatment(scores, classes, alpha, sets)
                except ValueError as error:  # MAPIE's RAPS: too few calibration scores left to tune it
                    print(f"| {alpha:g} | {sets} | not computed: {str(error).splitlines()[0]} | | | |")
                    continue
                by_moa = frame.groupby("moa").agg(coverage=("covered", "mean"), size=("size", "mean"), n=("size", "size"))
                tables[(alpha, sets)] = by_moa
                print(f"| {alpha:g} | {sets} | {frame['covered'].mean():.3f} | {frame['size'].mean():.2f} | "
                      f"{by_moa['coverage'].min():.3f} | {int((by_moa['coverage'] < 1 - alpha).sum())} of {len(by_moa)} |")
        alpha = float(args.alphas.split(",")[-1])
        kinds = [k for k in (*SET_TYPES, *ADAPTIVE) if (alpha, k) in tables]
        print(f"\nper MoA at α = {alpha:g}: coverage / mean set size\n| MoA | n | {' | '.join(kinds)} |\n"
              f"|---|---|{'---|' * len(kinds)}")
        for moa in tables[(alpha, "marginal")].index:
            cells = " | ".join(f"{tables[(alpha, k)].loc[moa, 'coverage']:.2f} / {tables[(alpha, k)].loc[moa, 'size']:.1f}"
                               for k in kinds)
            print(f"| {moa} | {int(tables[(alpha, 'marginal')].loc[moa, 'n'])} | {cells} |")


if __name__ == "__main__":
    main()
