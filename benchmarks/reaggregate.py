"""Treatment accuracy of finished cv runs under each aggregation (median, mean, logmean), from their stored
held-out tile probabilities: no network runs again.

    python benchmarks/reaggregate.py RUN [RUN ...] [--ensemble]   (RUN: a run directory, or a tile parquet)

Each run's ``predictions.parquet`` (held-out tiles, ``prob_<class>``) is aggregated tile → well → treatment
with ``cellmorph.metrics.aggregate``. ``--ensemble`` also averages the runs' treatment probabilities (each
run aggregated its own way first, as ``cv --ensemble-seeds`` combines members) and scores the mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.metrics import AGGREGATIONS, aggregate
from cellmorph.schema import CORRECT_COLUMN, PREDICTED_COLUMN, PROB_PREFIX, TRUE_COLUMN

KEYS = ["Metadata_Compound", "Metadata_Concentration"]


def treatments(run: Path, how: str) -> pd.DataFrame:
    tiles = pd.read_parquet(run if run.suffix == ".parquet" else run / "predictions.parquet")
    tiles = tiles.drop(columns=[c for c in (PREDICTED_COLUMN, CORRECT_COLUMN) if c in tiles.columns])
    return aggregate(tiles, how=how)[2].set_index(KEYS).sort_index()


def accuracy(frame: pd.DataFrame) -> tuple[int, int]:
    probs = [c for c in frame.columns if c.startswith(PROB_PREFIX)]
    calls = np.array([c[len(PROB_PREFIX):] for c in probs])[frame[probs].to_numpy(float).argmax(axis=1)]
    return int((calls == frame[TRUE_COLUMN].astype(str).to_numpy()).sum()), len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--ensemble", action="store_true")
    args = parser.parse_args()
    print("| run | " + " | ".join(AGGREGATIONS) + " |\n|---|" + "---|" * len(AGGREGATIONS))
    rows = {how: [treatments(run, how) for run in args.runs] for how in AGGREGATIONS}
    for k, run in enumerate(args.runs):
        cells = [f"{r / n:.3f} ({r}/{n})" for r, n in (accuracy(rows[how][k]) for how in AGGREGATIONS)]
        print(f"| {run} | " + " | ".join(cells) + " |")
    if args.ensemble and len(args.runs) > 1:
        cells = []
        for how in AGGREGATIONS:
            frames = rows[how]
            probs = [c for c in frames[0].columns if c.startswith(PROB_PREFIX)]
            mean = frames[0].copy()
            mean[probs] = sum(f[probs] for f in frames) / len(frames)
            r, n = accuracy(mean)
            cells.append(f"{r / n:.3f} ({r}/{n})")
        print("| the runs' mean | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
