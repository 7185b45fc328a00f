"""Re-score a finished ``cellmorph cv`` run's fold models with and without dihedral TTA.

    python benchmarks/rescore.py RUN [--data CACHE] [--threads N]

Each fold's ``state.pt`` (loaded with ``weights_only=True``) predicts its own held-out tiles
again, once plainly and once with ``tta="dihedral"``; both go through the paper's median
aggregation tile → well → treatment. Nothing is retrained, so the difference is the
test-time augmentation alone. The plain predictions must match the run's own (checked).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellmorph.cache import TileCache
from cellmorph.cv import RunDir
from cellmorph.datasets import InputPipeline
from cellmorph.metrics import accuracy, aggregate
from cellmorph.models import InputSpec, create_model
from cellmorph.schema import CACHE_ROW_COLUMN, prob_column
from cellmorph.train import PredictSettings, predict_tiles


def rescore(run: Path, data: Path | None = None) -> dict:
    """Needs a run made with ``--keep-checkpoints all`` (every fold's weights)."""
    rundir = RunDir(run)
    config = rundir.read_config()
    cache = TileCache(Path(data or config["data"]))
    scored: dict[str, list[pd.DataFrame]] = {"none": [], "dihedral": []}
    for fold in rundir.finished_folds():
        state = rundir.fold_state(fold)
        stored = rundir.read_fold_predictions(fold)
        columns = [prob_column(c) for c in state["classes"]]
        model = create_model(state["model_name"], len(state["classes"]), init="xavier", in_chans=cache.tile_shape[0])
        model.load_state_dict(state["model"])
        spec = InputSpec.from_record(state["input"])
        pipeline = InputPipeline.from_spec(spec)
        rows = stored[CACHE_ROW_COLUMN].to_numpy()
        for tta in scored:
            probs = predict_tiles(model, pipeline, cache, rows, PredictSettings(batch_size=64, tta=tta), torch.device("cpu"))
            if tta == config["config"].get("tta", "none") and not np.allclose(probs, stored[columns], atol=1e-4):
                raise SystemExit(f"{rundir.fold_dir(fold)}: re-scored predictions differ from the stored ones")
            frame = stored.copy()
            frame[columns] = probs
            scored[tta].append(frame)
    result = {"run": str(run)}
    for tta, frames in scored.items():
        tiles, wells, treatments = aggregate(pd.concat(frames, ignore_index=True))
        result[tta] = {"treatment_accuracy": accuracy(treatments), "well_accuracy": accuracy(wells),
                       "tile_accuracy": accuracy(tiles)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=None, help="tile cache (default: the one the run used)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(rescore(args.run, args.data)))


if __name__ == "__main__":
    main()
