"""Snapshot ensembles of a finished fine-tune: each network's held-out probabilities after its last epochs averaged.

    python benchmarks/real_crops.py --out OUT --threads 2 --recipes ft-snapshots
    python benchmarks/snapshot_ensemble.py OUT/ft-snapshots

A cross-validation run with ``eval_epochs`` (here 3 and 4 of 5) keeps every fold's held-out tile probabilities
after those epochs beside the final ones. At a constant learning rate the last epochs' networks differ a good deal
(their weights averaged lost: RESULTS.md, 'Weight averaging'), so averaging their *predictions* is an ensemble at
no extra training. For each fine-tune member of the run (``member-<k>/``, or the run itself) and each set of
epochs, the tile probabilities are averaged over the epochs, then aggregated as the member aggregates (median by
default); members of the ensemble (the probe too) are combined as ``cv`` combines them, level by level. Nothing here
trains or sees more than the run's held-out outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_crops import FIGURES_HEADER, figures, score_frames  # noqa: E402

from cellmorph.cv.ensemble import is_ensemble_run, member_dir  # noqa: E402
from cellmorph.cv.rundir import RunDir  # noqa: E402
from cellmorph.metrics import aggregate, mean_of_levels, prob_columns  # noqa: E402
from cellmorph.schema import CACHE_ROW_COLUMN  # noqa: E402


def member_runs(run: Path) -> list[Path]:
    """An ensemble run's member directories in order, or the run itself where it is one network's."""
    if not is_ensemble_run(run):
        return [run]
    members = []
    while member_dir(run, len(members) + 1).is_dir():
        members.append(member_dir(run, len(members) + 1))
    return members


def snapshot_levels(member: Path, epochs: tuple[int, ...]) -> dict[str, pd.DataFrame]:
    """The member's three levels with each tile's probabilities averaged over ``epochs`` (its last epoch is read
    from ``predictions.parquet``, the others from ``predictions_epoch<e>.parquet``)."""
    config = RunDir(member).read_config()["config"]
    last = int(config["epochs"])
    frames = []
    for e in epochs:
        name = "predictions.parquet" if e == last else f"predictions_epoch{e}.parquet"
        folds = sorted((member / "folds").glob(f"*/{name}"))
        if not folds:
            raise SystemExit(f"{member}: no {name} (run with eval_epochs {list(epochs)})")
        frames.append(pd.concat([pd.read_parquet(f) for f in folds], ignore_index=True)
                      .sort_values(CACHE_ROW_COLUMN, kind="stable").reset_index(drop=True))
    tiles = frames[0].copy()
    probs = prob_columns(tiles)
    tiles[probs] = sum(f[probs].to_numpy() for f in frames) / len(frames)
    tiles = tiles.drop(columns=[c for c in tiles.columns if c not in probs and not c.startswith("Metadata_")])
    t, w, tr = aggregate(tiles, how=config.get("aggregate") or "median")
    return {"tiles": t, "wells": w, "treatments": tr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished cv run (an ensemble's, or one network's) with eval_epochs")
    parser.add_argument("--snapshots", default="5;4,5;3,4,5", help="epoch sets, ';'-separated")
    args = parser.parse_args()
    sets = [tuple(int(e) for e in s.split(",")) for s in args.snapshots.split(";")]
    members = member_runs(args.run)
    networks = [m for m in members if RunDir(m).read_config()["config"].get("mode") != "linear-probe"]
    others = [m for m in members if m not in networks]
    n_folds = RunDir(members[0]).read_metrics()["n_folds"]
    rows = []
    for epochs in sets:
        levels = {m: snapshot_levels(m, epochs) for m in networks}
        for m in networks:
            rows.append((f"{m.name}, epochs {'+'.join(map(str, epochs))}", score_frames(levels[m], n_folds)))
        if len(members) > 1:
            combined = mean_of_levels([levels[m] for m in networks] + [RunDir(m).read_levels() for m in others],
                                      [m.name for m in networks + others])
            label = " + ".join([m.name for m in networks] + [f"{m.name} (probe)" for m in others])
            rows.append((f"{label}, epochs {'+'.join(map(str, epochs))}", score_frames(combined, n_folds)))
    print(f"| members, snapshots averaged | {FIGURES_HEADER} |\n|---|---|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {figures(row)} |")


if __name__ == "__main__":
    main()
