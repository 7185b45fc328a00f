"""`cellmorph predict`: every treatment called, with confidence and a conformal prediction set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cellmorph.predict import conformal_sets, held_out_coverage
from tests.conftest import one_line_error, run_cli


def test_predict_writes_every_treatment_with_its_set(tiny_bundle, tiny_cache, tmp_path):
    runs = {}
    for alpha in ("0.1", "0.3"):
        out = tmp_path / f"pred{alpha}"
        proc = run_cli("predict", "--model", tiny_bundle, "--data", tiny_cache, "--alpha", alpha, "--out", out,
                       "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        runs[alpha] = (pd.read_parquet(out / "treatments.parquet"), json.loads(proc.stdout.strip().splitlines()[-1]))
    treatments, summary = runs["0.1"]
    contract = ["Metadata_Compound", "Metadata_Concentration", "Predicted_MoA", "Confidence", "Prediction_Set",
                "Set_Size", "Metadata_MoA"]
    assert set(contract) <= set(treatments.columns) and len(treatments) == 44
    probs = [c for c in treatments.columns if c.startswith("prob_")]
    classes = [c[len("prob_"):] for c in probs]
    members = [set(s.split("|")) if s else set() for s in treatments["Prediction_Set"]]
    assert all(m <= set(classes) for m in members)
    assert [len(m) for m in members] == treatments["Set_Size"].tolist()
    np.testing.assert_allclose(treatments["Confidence"], treatments[probs].max(axis=1))
    covered = [moa in m for moa, m in zip(treatments["Metadata_MoA"], members)]
    assert summary["coverage"] == pytest.approx(np.mean(covered))
    assert summary["treatment_accuracy"] == pytest.approx((treatments["Predicted_MoA"] == treatments["Metadata_MoA"]).mean())
    # Wells and tiles get sets too, calibrated at their own level.
    for level, n in (("wells", 88), ("tiles", 352)):
        frame = pd.read_parquet(tmp_path / "pred0.1" / f"{level}.parquet")
        assert len(frame) == n and {"Prediction_Set", "Set_Size", "Empty_Set", "Confidence"} <= set(frame.columns)
        assert (frame["Set_Size"] == frame["Prediction_Set"].map(lambda s: len(s.split("|")) if s else 0)).all()
    # A larger alpha can only shrink a set: the sets at 0.3 are subsets of those at 0.1.
    looser = [set(s.split("|")) if s else set() for s in runs["0.3"][0]["Prediction_Set"]]
    assert all(small <= big for small, big in zip(looser, members))


def test_conformal_sets_cover_at_their_level_on_exchangeable_scores():
    """Calibration and test treatments drawn from one distribution: empirical coverage ≥ 1 − α
    minus three binomial standard errors of the test size (n = 2,000), for α = 0.1 and 0.2."""
    rng = np.random.default_rng(0)
    classes = ["A", "B", "C", "D"]

    def draw(n):
        truth = rng.integers(0, 4, n)
        logits = rng.normal(size=(n, 4))
        logits[np.arange(n), truth] += 1.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return probs, truth

    cal_probs, cal_truth = draw(500)
    calibration = pd.DataFrame(cal_probs, columns=[f"prob_{c}" for c in classes])
    calibration["Metadata_MoA"] = np.array(classes)[cal_truth]
    test_probs, test_truth = draw(2000)
    for alpha in (0.1, 0.2):
        members = conformal_sets(calibration, test_probs, classes, alpha)
        coverage = members[np.arange(len(test_truth)), test_truth].mean()
        assert coverage >= 1 - alpha - 3 * np.sqrt(alpha * (1 - alpha) / len(test_truth)), (alpha, coverage)
        assert members.sum(axis=1).mean() < 4  # informative: not every class in every set


def test_bad_predict_inputs_are_one_line(tiny_bundle, tiny_cache, tmp_path):
    for alpha in ("0", "1.5"):
        one_line_error(run_cli("predict", "--model", tiny_bundle, "--data", tiny_cache, "--alpha", alpha,
                               "--out", tmp_path / "p"), "alpha")
    other = tmp_path / "other-cache"
    shutil.copytree(tiny_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["channels"] = ["DAPI", "Actin", "Tubulin"]  # another order than the model was trained on
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run_cli("predict", "--model", tiny_bundle, "--data", other, "--out", tmp_path / "p"),
                   str(other), "channels")
    assert not (tmp_path / "p").exists()


def test_sets_cover_the_held_out_compounds_of_a_loco_run(tiny_cache, tmp_path):
    """LOCO on the tiny screen (24 compounds, 44 treatments). Each compound's treatments get sets
    calibrated on the out-of-fold scores of the other 23 compounds. Criterion: for α = 0.1 and 0.2
    the share of the 44 treatments whose set holds the true MoA is at least 1 − α − 2·√(α(1−α)/44)
    (two binomial standard errors: 0.81 and 0.68)."""
    from cellmorph.cv import RunDir, run_cv

    run_cv(tiny_cache, tmp_path / "loco", dict(model="test_resnet", init="xavier", image_size=32, epochs=2,
                                               cv="loco", max_tiles_per_fold=60, num_threads=1), progress=False)
    scores = RunDir(tmp_path / "loco").read_treatments()
    classes = sorted(scores["Metadata_MoA"].unique())
    for alpha in (0.1, 0.2):
        result = held_out_coverage(scores, classes, alpha)
        assert result["n_treatments"] == 44
        assert result["coverage"] >= 1 - alpha - 2 * np.sqrt(alpha * (1 - alpha) / 44), result


def test_a_saved_fold_model_reproduces_the_cv_predictions_of_its_held_out_compounds(tiny_cache, tmp_path):
    """Fold weights (--keep-checkpoints all) applied to the fold's held-out tiles through the
    prediction code give the probabilities the CV run wrote, to 1e-6 on the CPU."""
    import torch

    from cellmorph.cache import TileCache
    from cellmorph.cv import RunDir, run_cv
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import InputSpec, create_model
    from cellmorph.runtime import torch_threads
    from cellmorph.train import PredictSettings, predict_tiles

    out = tmp_path / "run"
    run_cv(tiny_cache, out, dict(model="test_resnet", init="xavier", image_size=32, epochs=1, cv="group-kfold:2",
                                 max_tiles_per_fold=40, num_threads=1, keep_checkpoints="all"), progress=False)
    rundir, cache = RunDir(out), TileCache(tiny_cache)
    for fold in rundir.finished_folds():
        state, written = rundir.fold_state(fold), rundir.read_fold_predictions(fold)
        model = create_model(state["model_name"], len(state["classes"]), init="xavier")
        model.load_state_dict(state["model"])
        with torch_threads(1):
            probs = predict_tiles(model, InputPipeline.from_spec(InputSpec.from_record(state["input"])), cache,
                                  written["Metadata_CacheRow"].to_numpy(), PredictSettings(batch_size=64),
                                  torch.device("cpu"))
        np.testing.assert_allclose(probs, written[[f"prob_{c}" for c in state["classes"]]].to_numpy(), atol=1e-6)
