"""BBBC014 end to end through the shared cv machinery: leave-one-cell-line-out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from cellmorph.cache import TileCache
from cellmorph.cv.splits import make_folds
from tests.conftest import run_cli_here


@pytest.fixture(scope="module")
def b14_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("b14")
    screen, cache = root / "b14", root / "cache"
    assert run_cli_here("synth", str(screen), "--dataset", "bbbc014", "--seed", "0").returncode == 0
    proc = run_cli_here("prepare", "--layout", "bbbc014", "--root", str(screen), "--out", str(cache), "--tile-size", "32")
    assert proc.returncode == 0, proc.stderr
    return cache


@pytest.mark.slow
def test_cell_line_cv_on_synthetic_bbbc014(b14_cache, tmp_path):
    cache, run = b14_cache, tmp_path / "run"
    tiles = TileCache(cache)
    assert tiles.tile_shape == (3, 32, 32)  # DAPI, FITC and the zero third channel
    assert len(tiles) == 64 * 16  # 64 labelled wells, 16 tiles each

    folds, _ = make_folds(tiles.index, "cell-line")
    assert [f.name for f in folds] == ["A549", "MCF-7"]
    lines = tiles.index["Metadata_Batch"].to_numpy()
    for fold in folds:
        assert set(lines[fold.test]) == {fold.name}
        assert fold.name not in set(lines[fold.train])  # the held-out cell line never trains

    proc = run_cli_here("cv", "--data", str(cache), "--cv", "cell-line", "--model", "resnet18", "--init", "xavier",
                   "--epochs", "1", "--image-size", "32", "--threads", "1", "--max-tiles-per-fold", "128",
                        "--out", str(run))  # the cache's size; 128 training tiles: every well is still scored
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_folds"] == 2
    called = pd.read_csv(run / "wells.csv")  # the accuracies are those of the written calls / probabilities
    assert metrics["well_accuracy"] == (called["Predicted_MoA"] == called["Metadata_MoA"]).mean()
    scored = pd.read_parquet(run / "predictions.parquet")
    probs = [c for c in scored.columns if c.startswith("prob_")]
    argmax = np.array([c[len("prob_"):] for c in probs])[scored[probs].to_numpy().argmax(axis=1)]
    assert metrics["tile_accuracy"] == (argmax == scored["Metadata_MoA"].to_numpy()).mean()
    wells = pd.read_csv(run / "wells.csv")
    assert len(wells) == 64 and set(wells["Metadata_MoA"]) == {"translocation", "no translocation"}
    assert np.isin(wells["Predicted_MoA"], ["translocation", "no translocation"]).all()
    # A compound translocates at some doses and not at others: no compound-level truth, said in the metrics
    compounds = pd.read_csv(run / "compounds.csv")
    assert metrics["n_compounds_of_several_labels"] == compounds["Metadata_MoA"].isna().sum() > 0
    assert metrics["n_compounds"] == compounds["Metadata_MoA"].notna().sum()


@pytest.mark.slow
def test_compare_inits_makes_the_fig4_plot_over_replicates(b14_cache, tmp_path):
    """Pretrained vs Xavier after 1 and 2 epochs, 2 replicates each, leave-one-cell-line-out."""
    out = tmp_path / "fig4"
    cfg = tmp_path / "cfg.yaml"
    # image_size: the cache's, not 224. Frozen stages (and their cached output) apply to the
    # ImageNet arm only; the Xavier arm trains every stage.
    cfg.write_text("max_tiles_per_fold: 32\nbatch_size: 16\nnum_threads: 1\nimage_size: 32\n"
                   "freeze_stages: 2\nfrozen_feature_cache: true\n")
    proc = run_cli_here("compare-inits", "--data", str(b14_cache), "--cv", "cell-line", "--model", "tf_efficientnet_lite0",
                   "--epochs", "1,2", "--replicates", "2", "--config", str(cfg), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    png = out / "init_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = pd.read_csv(out / "init_comparison.csv")
    assert len(table) == 2 * 2 * 2  # inits × replicates × scored epochs
    assert set(table["init"]) == {"imagenet", "xavier"} and set(table["epoch"]) == {1, 2}
    assert sorted(table["seed"].unique()) == [0, 1]
    for init in ("imagenet", "xavier"):
        metrics = json.loads((out / init / "metrics.json").read_text())
        assert metrics["n_replicates"] == 2 and metrics["n_folds"] == 2 and metrics["init"] == init
        for r in (0, 1):
            run = out / init / f"replicate-{r}"
            assert json.loads((run / "metrics.json").read_text())["n_wells"] == 64
            assert (run / "folds" / "0" / "predictions_epoch1.parquet").is_file()
    imagenet = yaml.safe_load((out / "imagenet" / "replicate-0" / "config.yaml").read_text())["config"]
    xavier = yaml.safe_load((out / "xavier" / "replicate-0" / "config.yaml").read_text())["config"]
    assert (imagenet["freeze_stages"], imagenet["frozen_feature_cache"]) == (2, True)
    assert (xavier["freeze_stages"], xavier["frozen_feature_cache"]) == (0, False)
    summary = json.loads((out / "init_comparison.json").read_text())
    assert set(summary["by_init"]["imagenet"]) == {"1", "2"}
    assert json.loads(proc.stdout.strip().splitlines()[-1]).keys() == {"imagenet", "xavier"}
    # compare-inits ends with its report: the Fig. 4 plot and the table of means, inline.
    page = (out / "report.html").read_text()
    assert "warning: no report" not in proc.stderr
    assert page.count('<img src="data:image/png;base64,') == 1 and "imagenet" in page and "xavier" in page


@pytest.mark.slow
def test_cv_replicates_flag(b14_cache, tmp_path):
    out = tmp_path / "reps"
    proc = run_cli_here("cv", "--data", str(b14_cache), "--cv", "cell-line", "--model", "resnet18", "--init", "xavier",
                   "--epochs", "1", "--replicates", "2", "--max-tiles-per-fold", "64", "--threads", "1", "--image-size", "32",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and len(metrics["replicates"]) == 2
    assert {"well_accuracy", "tile_accuracy", "well_accuracy_std"} <= metrics.keys()
    bad = run_cli_here("cv", "--data", str(b14_cache), "--cv", "cell-line", "--eval-epochs", "one", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--eval-epochs" in bad.stderr and "Traceback" not in bad.stderr
