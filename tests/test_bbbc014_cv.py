"""BBBC014 end to end through the shared cv machinery: leave-one-cell-line-out."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd

from cellmorph.cache import TileCache
from cellmorph.evaluate import make_folds


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellmorph.cli", *args], capture_output=True, text=True)


def test_cell_line_cv_on_synthetic_bbbc014(tmp_path):
    screen, cache, run = tmp_path / "b14", tmp_path / "cache", tmp_path / "run"
    assert run_cli("synth", str(screen), "--dataset", "bbbc014", "--seed", "0").returncode == 0
    proc = run_cli("prepare", "--layout", "bbbc014", "--root", str(screen), "--out", str(cache), "--tile-size", "32")
    assert proc.returncode == 0, proc.stderr
    tiles = TileCache(cache)
    assert tiles.tile_shape == (3, 32, 32)  # DAPI, FITC and the zero third channel
    assert len(tiles) == 64 * 16  # 64 labelled wells, 16 tiles each

    folds, _ = make_folds(tiles.index, "cell-line")
    assert [f.name for f in folds] == ["A549", "MCF-7"]
    lines = tiles.index["Metadata_Batch"].to_numpy()
    for fold in folds:
        assert set(lines[fold.test]) == {fold.name}
        assert fold.name not in set(lines[fold.train])  # the held-out cell line never trains

    proc = run_cli("cv", "--data", str(cache), "--cv", "cell-line", "--model", "resnet18", "--init", "xavier",
                   "--epochs", "1", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_folds"] == 2
    assert 0.0 <= metrics["well_accuracy"] <= 1.0 and 0.0 <= metrics["tile_accuracy"] <= 1.0
    wells = pd.read_csv(run / "wells.csv")
    assert len(wells) == 64 and set(wells["Metadata_MoA"]) == {"translocation", "no translocation"}
    assert np.isin(wells["Predicted_MoA"], ["translocation", "no translocation"]).all()
