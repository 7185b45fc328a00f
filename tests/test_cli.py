"""The command-line contracts that outside checks call exactly, on tiny synthetic caches."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellmorph.cli", *args], capture_output=True, text=True)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cv_linear_probe_loco_writes_the_run_directory(tiny_cache, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("cv", "--data", str(tiny_cache), "--model", "tf_efficientnet_lite0", "--init", "imagenet",
                   "--cv", "loco", "--mode", "linear-probe", "--image-size", "64", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("treatment_accuracy", "well_accuracy", "tile_accuracy", "n_treatments", "n_folds"):
        assert key in metrics
    assert metrics["n_folds"] == 24 and metrics["n_treatments"] == 44
    called = pd.read_csv(run / "treatments.csv")  # the accuracy is that of the written calls
    assert metrics["treatment_accuracy"] == (called["Predicted_MoA"] == called["Metadata_MoA"]).mean()
    # Embeddings were computed once for the whole run, not per fold.
    assert json.loads((run / "embeddings.json").read_text())["rows"] == 352
    predictions = pd.read_parquet(run / "predictions.parquet")
    probs = [c for c in predictions.columns if c.startswith("prob_")]
    assert len(probs) == 12
    np.testing.assert_allclose(predictions[probs].sum(axis=1), 1.0, rtol=1e-5)
    # No test compound was ever in its fold's training set.
    for fold_json in (run / "folds").glob("*/fold.json"):
        fold = json.loads(fold_json.read_text())
        assert fold["n_train_used"] > 0
    treatments = pd.read_csv(run / "treatments.csv")
    assert {"Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Predicted_MoA"} <= set(treatments.columns)
    config = (run / "config.yaml").read_text()
    assert "git_commit" in config and "seed" in config and "torch" in config
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_cv_unknown_model_is_one_line(tiny_cache, tmp_path):
    line = one_line_error(run_cli("cv", "--data", str(tiny_cache), "--model", "resnet5O", "--out", str(tmp_path / "r")))
    assert "resnet5O" in line
    assert not (tmp_path / "r").exists()


def test_cv_empty_fold_is_one_line(tiny_cache, tmp_path):
    line = one_line_error(run_cli("cv", "--data", str(tiny_cache), "--model", "tf_efficientnet_lite0",
                                  "--cv", "group-kfold:99", "--out", str(tmp_path / "r")))
    assert "cv group-kfold:99: 99 folds but only 24 compounds; fold(s) would be empty" in line  # tiny: 24 treated
    assert not (tmp_path / "r").exists()


def test_cv_missing_cache_is_one_line(tmp_path):
    line = one_line_error(run_cli("cv", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")))
    assert "nope" in line


@pytest.fixture(scope="module")
def crops_cache(real_crops, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops") / "cache"
    proc = run_cli("prepare", "--layout", "crops", "--index", str(real_crops), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_embed_and_linear_probe_on_real_crops(crops_cache, tmp_path):
    """Issue 5: embeddings and the linear probe on the real crops-week4 fixture (well holdout)."""
    emb = run_cli("embed", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--image-size", "64",
                  "--out", str(tmp_path / "emb"))
    assert emb.returncode == 0, emb.stderr
    wells = pd.read_parquet(tmp_path / "emb" / "wells.parquet")
    assert len(wells) == 14 and wells["Metadata_NTiles"].sum() == 1120
    run = tmp_path / "run"
    proc = run_cli("cv", "--data", str(crops_cache), "--model", "mobilenetv2_100", "--mode", "linear-probe",
                   "--cv", "well:3", "--include-controls", "--image-size", "64", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"DMSO", "Protein synthesis"}
    # Real cells: frozen ImageNet features separate cycloheximide from DMSO well above chance (0.57).
    assert metrics["tile_accuracy"] > 0.75, metrics
    assert metrics["well_accuracy"] > 0.8, metrics


def test_demo_writes_the_run_directory(tmp_path):
    """`make demo`'s command end to end (synth tiny → prepare → cv), shrunk to seconds."""
    run = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(run), "--epochs", "1", "--image-size", "64", "--cv", "group-kfold:2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary == {k: metrics[k] for k in summary}
    assert metrics["n_folds"] == 2 and metrics["n_treatments"] == 44
    assert (run / "confusion_matrix.png").is_file() and (run / "treatments.csv").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())["config"]
    assert (config["model"], config["init"], config["freeze_stages"], config["tta"]) == (
        "tf_efficientnet_lite0", "imagenet", 4, "dihedral")
    assert config["frozen_feature_cache"] is True
    assert not list(run.glob("frozen_features*"))  # the run finished, so its feature pool is gone
    assert (tmp_path / "demo-data" / "screen" / "BBBC021_v1_image.csv").is_file()
