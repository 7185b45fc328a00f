"""`train --calibration-run RUN`: a finished CV run calibrates the bundle without being run again."""

from __future__ import annotations

import json
import shutil

import pandas as pd
from safetensors.torch import load_file

from tests.conftest import QUICK_TRAIN, one_line_error, run_cli_here


def test_a_finished_calibration_run_is_reused_and_checked(tiny_bundle, tiny_cache, tmp_path):
    run = tiny_bundle.parent / "model.cv"  # the calibration CV that `train --calibration group-kfold:2` ran
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "model"
    proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration-run", run, "--out", out,
                        "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # The same recipe and seeds: the same network and the same calibration scores as the bundle that ran the CV.
    new, old = load_file(out / "weights.safetensors"), load_file(tiny_bundle / "weights.safetensors")
    assert new.keys() == old.keys() and all((new[k] == old[k]).all() for k in new)
    for level in ("treatments", "wells"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"calibration_{level}.parquet"),
                                      pd.read_parquet(tiny_bundle / f"calibration_{level}.parquet"))
    record = json.loads((out / "bundle.json").read_text())["training"]["calibration"]
    assert record["reused"] is True and record["cv"] == "group-kfold:2" and record["run"] == str(run.resolve())
    assert not (tmp_path / "model.cv").exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == written  # the run is only read


def test_a_calibration_run_of_another_recipe_or_unfinished_is_one_line(tiny_bundle, tiny_cache, tmp_path):
    run = tiny_bundle.parent / "model.cv"
    other = [a if a != "1" or QUICK_TRAIN[i - 1] != "--epochs" else "2" for i, a in enumerate(QUICK_TRAIN)]
    one_line_error(run_cli_here("train", "--data", tiny_cache, *other, "--calibration-run", run,
                                "--out", tmp_path / "a"), "epochs", "differ")
    one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration-run", run,
                                "--calibration", "loco", "--out", tmp_path / "b"), "not both")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "metrics.json").unlink()
    one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration-run", unfinished,
                                "--out", tmp_path / "c"), "not finished")
    one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--calibration-run", tmp_path,
                                "--out", tmp_path / "d"), "not a cellmorph run")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_train_continues_the_calibration_cv_of_an_ensemble_that_a_kill_interrupted(tiny_cache, tmp_path):
    """A killed `train` of an ensemble (the crop fine-tune's default) leaves member runs but no run of its
    own yet; the same command again continues them instead of refusing the finished member's folder."""
    out = tmp_path / "model"
    args = ("train", "--data", tiny_cache, *QUICK_TRAIN, "--ensemble-seeds", "2", "--calibration", "group-kfold:2",
            "--out", out, "--no-progress")
    assert run_cli_here(*args).returncode == 0
    first = pd.read_parquet(out / "calibration_treatments.parquet")
    run = tmp_path / "model.cv"
    # as a kill between the second member's last fold and the ensemble's own files leaves it
    shutil.rmtree(out)
    for name in ("config.yaml", "metrics.json", "treatments.csv"):
        (run / name).unlink()
    proc = run_cli_here(*args)
    assert proc.returncode == 0, proc.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "calibration_treatments.parquet"), first)
