"""Marginal against class-conditional (Mondrian) prediction sets, per MoA, on compounds held out (issue 31 item 4).

    python benchmarks/set_types.py RUN [RUN ...] [--alphas 0.1,0.2]

``RUN`` is a finished ``cv`` run whose held-out compounds were never trained on (loco or group-kfold; an ensemble
run is its members' mean). Each compound is new in turn: its treatments' sets are calibrated on every other
compound's out-of-fold treatment probabilities (``cellmorph.calibration.conformal_sets``, as ``predict`` makes
them), once with one threshold for all MoAs (``marginal``) and once per MoA (``mondrian``, crepes' class-conditional
classifier). Printed: overall coverage and mean set size, the worst MoA's coverage, and per MoA both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.calibration import SET_TYPES, conformal_sets
from cellmorph.cv.rundir import RunDir
from cellmorph.schema import TRUE_COLUMN, prob_column


def per_treatment(scores: pd.DataFrame, classes: list[str], alpha: float, sets: str) -> pd.DataFrame:
    labelled = scores[scores[TRUE_COLUMN].astype(str).isin(classes)].reset_index(drop=True)
    columns = [prob_column(c) for c in classes]
    rows = []
    for compound, held in labelled.groupby("Metadata_Compound", sort=True):
        members = conformal_sets(labelled.drop(index=held.index), held[columns].to_numpy(float), classes, alpha, sets)
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
            for sets in SET_TYPES:
                frame = per_treatment(scores, classes, alpha, sets)
                by_moa = frame.groupby("moa").agg(coverage=("covered", "mean"), size=("size", "mean"), n=("size", "size"))
                tables[(alpha, sets)] = by_moa
                print(f"| {alpha:g} | {sets} | {frame['covered'].mean():.3f} | {frame['size'].mean():.2f} | "
                      f"{by_moa['coverage'].min():.3f} | {int((by_moa['coverage'] < 1 - alpha).sum())} of {len(by_moa)} |")
        alpha = float(args.alphas.split(",")[-1])
        print(f"\nper MoA at α = {alpha:g}: coverage / mean set size\n| MoA | n | marginal | mondrian |\n|---|---|---|---|")
        marginal, mondrian = tables[(alpha, "marginal")], tables[(alpha, "mondrian")]
        for moa in marginal.index:
            print(f"| {moa} | {int(marginal.loc[moa, 'n'])} | {marginal.loc[moa, 'coverage']:.2f} / "
                  f"{marginal.loc[moa, 'size']:.1f} | {mondrian.loc[moa, 'coverage']:.2f} / {mondrian.loc[moa, 'size']:.1f} |")


if __name__ == "__main__":
    main()
