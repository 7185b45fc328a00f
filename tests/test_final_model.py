"""`train --calibration-run RUN`: a finished CV run calibrates the bundle without being run again."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
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


# --------------------------------------------------------------------------- a linear probe as the final model
PROBE_TRAIN = (*QUICK_TRAIN, "--mode", "linear-probe", "--features", "stage2", "--tta", "dihedral")


@pytest.fixture(scope="module")
def probe_bundle(tiny_cache, tmp_path_factory):
    """`train --mode linear-probe --calibration group-kfold:2` on the tiny cache, and its output."""
    out = tmp_path_factory.mktemp("probe") / "model"
    proc = run_cli_here("train", "--data", tiny_cache, *PROBE_TRAIN, "--calibration", "group-kfold:2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout + proc.stderr


def test_train_saves_a_linear_probe_that_scores_as_its_calibration_cv_did(probe_bundle, tiny_cache):
    """The bundle holds the frozen backbone, the profile's recipe and the head fitted on every labelled tile;
    its network reproduces the head applied to the calibration CV's own embeddings (the same tiles, views and
    weights), which the final model reused instead of embedding again."""
    from cellmorph.bundle import PROBE_FORMAT, load_bundle
    from cellmorph.cache import TileCache
    from cellmorph.cv.run import plan_run
    from cellmorph.cv.rundir import EMBEDDINGS
    from cellmorph.datasets import InputPipeline
    from cellmorph.models.heads import LinearProbeHead
    from cellmorph.train import PredictSettings, predict_tiles

    out, log = probe_bundle
    assert "embeddings of" in log and "those of the calibration run" in log
    bundle = load_bundle(out)
    assert bundle.manifest["format"] == PROBE_FORMAT and bundle.is_probe
    assert bundle.manifest["probe"] == {"features": "stage2/mean", "head": "logistic",
                                        "head_weights": "head.safetensors"}
    assert bundle.manifest["training"]["choices"][0]["probe_c"] > 0  # chosen by an inner split, recorded
    member = bundle.members[0]
    plan = plan_run(tiny_cache, bundle.manifest["training"]["config"], with_folds=False)
    rows = np.flatnonzero(plan.targets >= 0)
    embeddings = np.load(out.parent / "model.cv" / EMBEDDINGS)
    expected = LinearProbeHead.from_state(member.head).predict_proba(embeddings, len(bundle.classes))
    scored = predict_tiles(member.network(), InputPipeline.from_spec(member.input), TileCache(tiny_cache), rows,
                           PredictSettings(tta=member.scoring_tta), torch.device("cpu"))
    np.testing.assert_allclose(scored, expected, atol=1e-5)


def test_predict_applies_a_probe_bundle(probe_bundle, tiny_cache, tmp_path):
    out, _ = probe_bundle
    proc = run_cli_here("predict", "--model", out, "--data", tiny_cache, "--alpha", "0.2", "--out", tmp_path / "pred",
                        "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["n_treatments"] > 0 and 0 <= summary["treatment_accuracy"] <= 1
    treatments = pd.read_parquet(tmp_path / "pred" / "treatments.parquet")
    assert treatments["Set_Size"].ge(0).all() and treatments["Confidence"].between(0, 1).all()


def test_a_probe_head_that_does_not_fit_its_backbone_is_one_line(probe_bundle, tmp_path):
    """A head file of another shape (sealed again, so only the shape check can refuse it) is named by entry."""
    from safetensors.torch import save_file

    from tests.bundle_helpers import edited_bundle, seal_bundle

    out, _ = probe_bundle
    copy = edited_bundle(out, tmp_path / "m")
    head = load_file(copy / "head.safetensors")
    save_file(head | {"mean": head["mean"][:-1].contiguous(), "scale": head["scale"][:-1].contiguous(),
                      "weight": head["weight"][:, :-1].contiguous()}, str(copy / "head.safetensors"))
    seal_bundle(copy)
    one_line_error(run_cli_here("predict", "--model", copy, "--data", tmp_path, "--out", tmp_path / "p"),
                   "head_weights", "stage2/mean")
    format_edit = edited_bundle(out, tmp_path / "f", lambda m: m.update(format=1), seal=True)
    one_line_error(run_cli_here("predict", "--model", format_edit, "--data", tmp_path, "--out", tmp_path / "q"),
                   "format", "linear probe")
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
