"""The Novel flag: a score of how unlike every known MoA a treatment is, and a threshold whose false-alarm rate on
new compounds of known MoAs is the one asked for."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellmorph.cv.probe import CentroidHead, held_out_novelty
from cellmorph.novelty import (CONTROL_CENTROID_DISTANCE, NOVELTY_COLUMN, ControlOrigin, centroid_distance,
                               level_profiles, novelty_threshold)


def test_the_threshold_flags_at_most_alpha_of_exchangeable_scores():
    """Calibration and new scores from one distribution: over many draws the flagged fraction is at most α, within
    binomial tolerance (3 standard errors of 20,000 draws), and close to it (the conformal bound is nearly tight)."""
    rng = np.random.default_rng(0)
    alpha, flagged = 0.1, []
    for _ in range(200):
        threshold = novelty_threshold(rng.gamma(2.0, size=60), alpha)
        flagged.append(rng.gamma(2.0, size=100) > threshold)
    rate = np.mean(flagged)
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / 20_000) and rate > alpha - 0.03
    assert novelty_threshold(np.arange(5.0), 0.1) == float("inf")  # 5 scores cannot promise 10 %: flag nothing


def test_centroid_distance_is_one_minus_the_nearest_cosine():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(centroid_distance(np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]), centroids),
                               [0.0, 1 - np.sqrt(0.5), 1.0])


def test_seen_from_the_controls_the_distance_is_the_larger_of_two_origins():
    """Centroids (2, 0) and (0, 2), controls at (1, 1). A profile at (1, 0) points at the first MoA from the average
    cell (distance 0), but from the controls it is (0, −1), 45° from the first MoA's (1, −1): distance 1 − cos 45°.
    (3, −1) is 1 − 3/√10 from the first MoA seen from the average cell, and points right at it from the controls."""
    class_means = np.array([[2.0, 0.0], [0.0, 2.0]])
    control = ControlOrigin.fit(np.array([[1.0, 0.5], [1.0, 1.5]]), class_means)
    np.testing.assert_allclose(control.profile, [1.0, 1.0])
    np.testing.assert_allclose(control.centroids, np.array([[1.0, -1.0], [-1.0, 1.0]]) / np.sqrt(2))
    unit = np.eye(2)
    profiles = np.array([[1.0, 0.0], [3.0, -1.0]])
    np.testing.assert_allclose(centroid_distance(profiles, unit), [0.0, 1 - 3 / np.sqrt(10)], atol=1e-12)
    np.testing.assert_allclose(centroid_distance(profiles, unit, control), [1 - np.sqrt(0.5), 1 - 3 / np.sqrt(10)])
    again = ControlOrigin.from_state(control.state())
    np.testing.assert_array_equal(again.centroids, control.centroids)
    assert again.problem(2, 2) is None and "2 centroids on 3-long" in again.problem(2, 3)


def _screen(seed: int = 0, moas: int = 4, compounds: int = 3, cells: int = 20, dims: int = 30, controls: int = 0):
    """Cells of ``moas`` known MoAs (``compounds`` compounds each, 2 concentrations) and of one planted MoA: each MoA
    a direction in feature space, each compound near it, cells noisy around their compound. With ``controls``, also
    that many untreated cells (noise about the origin, which every MoA moves away from), returned fourth."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(moas + 1, dims)) * 2.0
    rows, x = [], []
    for m in range(moas + 1):
        for c in range(compounds):
            offset = directions[m] + rng.normal(scale=0.6, size=dims)
            for dose in (1.0, 3.0):
                for k in range(cells):
                    rows.append({"Metadata_Compound": f"m{m}c{c}", "Metadata_Concentration": dose,
                                 "Metadata_Plate": "P1", "Metadata_Well": f"W{m}{c}{dose:g}", "y": m})
                    x.append(offset * (dose / 3.0) ** 0.5 + rng.normal(size=dims))
    index = pd.DataFrame(rows)
    screen = (np.asarray(x), index, index.pop("y").to_numpy())
    return screen + (rng.normal(size=(controls, dims)),) if controls else screen


@pytest.mark.parametrize("with_controls", [False, True])
def test_a_planted_moa_is_flagged_far_more_often_than_new_compounds_of_known_moas(with_controls):
    """Criterion: trained on the known MoAs, at least half of the planted MoA's treatments are flagged, and at least
    3 times as many (as a fraction) as of the known MoAs' compounds, each held out from the head that scores it;
    from the average cell alone, and from it and the controls."""
    x, index, y, controls = _screen(controls=40)
    controls = controls if with_controls else None
    known = y < y.max()
    held_out = held_out_novelty(x[known], y[known], index[known], controls)
    calibration = held_out["treatments"]
    # a compound's profile is its treatments' mean, each concentration alike, whatever its cells' numbers
    first = index["Metadata_Compound"] == "m0c0"
    fewer = (~first | (index["Metadata_Concentration"] == 3.0) | (index.groupby(
        ["Metadata_Compound", "Metadata_Concentration"]).cumcount() < 2)).to_numpy()  # m0c0 at 1 µM: 2 cells
    keys, means = level_profiles(index[fewer], x[fewer], "treatments")
    names, pooled = level_profiles(index[fewer], x[fewer], "compounds")
    assert names["Metadata_Compound"].iloc[0] == "m0c0"
    assert np.allclose(pooled[0], means[(keys["Metadata_Compound"] == "m0c0").to_numpy()].mean(axis=0))
    assert not np.allclose(pooled[0], x[fewer & first.to_numpy()].mean(axis=0))
    assert len(held_out["compounds"]) == 4 * 3
    threshold = novelty_threshold(calibration[NOVELTY_COLUMN].to_numpy(), 0.1)
    head = CentroidHead.fit(x[known], y[known], index[known], controls=controls)
    assert (head.control is not None) == with_controls
    keys, profiles = level_profiles(index[~known], (x[~known] - head.mean_) / head.scale_, "treatments")
    planted = centroid_distance(profiles, head.centroids, head.control) > threshold
    assert len(calibration) == 4 * 3 * 2 and set(calibration.columns) >= {"Metadata_Compound", NOVELTY_COLUMN}
    assert planted.mean() >= 0.5
    known_rate = (calibration[NOVELTY_COLUMN].to_numpy() > threshold).mean()
    assert planted.mean() >= 3 * max(known_rate, 0.05)


def test_predict_flags_novel_treatments_from_the_probe_bundle(tiny_cache, tmp_path):
    """A probe bundle holds the flag's calibration (its compounds held out one by one); `predict` writes
    Novelty_Score and Novel per well and treatment and says in summary.json how the threshold was set."""
    from cellmorph.bundle import load_bundle
    from cellmorph.novelty import per_treatment
    from tests.conftest import QUICK_TRAIN, run_cli_here

    proc = run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--mode", "linear-probe", "--probe-head",
                        "centroid", "--features", "stage2", "--calibration", "group-kfold:2", "--out", tmp_path / "m2",
                        "--no-progress")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(tmp_path / "m2")
    assert set(bundle.novelty) == {"wells", "treatments", "compounds"} and bundle.novelty_member == 0
    assert (tmp_path / "m2" / "novelty_treatments.parquet").is_file()
    proc = run_cli_here("predict", "--model", tmp_path / "m2", "--data", tiny_cache, "--novelty-alpha", "0.2",
                        "--out", tmp_path / "pred", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for level in ("wells", "treatments", "compounds"):
        frame = pd.read_parquet(tmp_path / "pred" / f"{level}.parquet")
        assert frame[NOVELTY_COLUMN].between(0, 2).all() and frame["Novel"].dtype == bool
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    novelty, per_compound = summary["novelty"], summary["compounds"]["novelty"]
    # a compound's score: its treatments' mean profile, calibrated on the bundle's held-out compounds' such scores
    assert per_compound["n_calibration"] == len(bundle.novelty["compounds"]) == bundle.novelty["compounds"][
        "Metadata_Compound"].nunique()
    assert per_compound["n_novel_compounds"] == len(per_compound["novel_compounds"])
    assert novelty["score"] == CONTROL_CENTROID_DISTANCE and novelty["alpha"] == 0.2  # the tiny screen has DMSO
    assert bundle.novelty_control.problem(*bundle.members[0].head["weight"].shape) is None
    assert novelty["n_calibration"] == len(load_bundle(tmp_path / "m2").novelty["treatments"])
    assert novelty["n_novel_treatments"] == len(novelty["novel_treatments"])
    # each treatment scored by its compound (the default pool), its calibration treatments too
    treatments = pd.read_parquet(tmp_path / "pred" / "treatments.parquet")
    compounds = pd.read_parquet(tmp_path / "pred" / "compounds.parquet").set_index("Metadata_Compound")
    np.testing.assert_allclose(treatments[NOVELTY_COLUMN],
                               compounds[NOVELTY_COLUMN].loc[treatments["Metadata_Compound"]].to_numpy())
    assert novelty["pool"] == "compound" and novelty["threshold"] == novelty_threshold(
        per_treatment(bundle.novelty["treatments"], bundle.novelty["compounds"]), 0.2)
    proc = run_cli_here("predict", "--model", tmp_path / "m2", "--data", tiny_cache, "--novelty-alpha", "0.2",
                        "--novelty-pool", "treatment", "--out", tmp_path / "alone", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())["novelty"]
    assert alone["pool"] == "treatment" and alone["threshold"] == novelty_threshold(
        bundle.novelty["treatments"][NOVELTY_COLUMN].to_numpy(), 0.2)
    scores = pd.read_parquet(tmp_path / "alone" / "treatments.parquet")[NOVELTY_COLUMN]
    assert not np.allclose(scores, treatments[NOVELTY_COLUMN])  # the tiny screen's compounds have several doses
    _a_bundle_without_compound_scores_flags_each_treatment_alone(tmp_path / "m2", tiny_cache, tmp_path / "old",
                                                                 alone["threshold"])
    page = (tmp_path / "pred" / "report.html").read_text()
    assert "Novel: no known MoA fits" in page and "Novel compounds, from their treatments together" in page
    _a_control_origin_that_does_not_fit_the_head_is_refused_by_name(tmp_path / "m2", tmp_path / "bad")


def _a_bundle_without_compound_scores_flags_each_treatment_alone(bundle_dir, cache, dest, threshold_alone):
    """A probe bundle written before compounds were scored (no novelty_compounds in bundle.json): predict cannot pool
    a treatment's score by its compound, so it scores each alone and says so (pool: treatment)."""
    from cellmorph.predict import PredictConfig, predict
    from tests.bundle_helpers import edited_bundle

    def drop_compounds(manifest: dict) -> None:
        del manifest["probe"]["novelty"]["compounds"]
        del manifest["files"]["novelty_compounds.parquet"]

    edited_bundle(bundle_dir, dest / "model", drop_compounds, seal=True)
    (dest / "model" / "novelty_compounds.parquet").unlink()
    summary = predict(dest / "model", cache, dest / "pred", PredictConfig(novelty_alpha=0.2, threads=1),
                      progress=False, log=lambda *a: None)
    assert summary["novelty"]["pool"] == "treatment" and summary["novelty"]["threshold"] == threshold_alone
    assert "novelty" not in summary["compounds"]


def _a_control_origin_that_does_not_fit_the_head_is_refused_by_name(bundle_dir, bad):
    """A bundle whose control origin has a profile of another length (its digests recorded again, so only the check
    can refuse it): one error naming the file and the shapes."""
    import torch
    from safetensors.torch import save_file

    from cellmorph.bundle import load_bundle
    from cellmorph.errors import CellmorphError
    from tests.bundle_helpers import edited_bundle, seal_bundle

    edited_bundle(bundle_dir, bad)
    name = json.loads((bad / "bundle.json").read_text())["probe"]["novelty_control"]
    save_file({"control_profile": torch.zeros(3, dtype=torch.float64),
               "control_centroids": torch.zeros(2, 3, dtype=torch.float64)}, str(bad / name))
    with pytest.raises(CellmorphError, match=f"novelty_control: {name}: control_profile \\(3,\\)"):
        load_bundle(seal_bundle(bad))


def test_a_bundle_without_a_probe_flags_by_the_calls_probability_and_makes_mondrian_sets(tiny_bundle, tiny_cache,
                                                                                          tmp_path):
    """A fine-tune bundle: Novelty_Score is one minus the call's probability, thresholded on its out-of-fold
    calibration calls: by default a treatment takes its compound's (the call from the compound's treatments
    together), and so do the calibration treatments; --novelty-pool treatment scores each treatment alone.
    --sets mondrian thresholds each MoA on its own calibration treatments (a handful each here), so its sets hold at
    least the marginal ones' MoAs, treatment by treatment."""
    from cellmorph.calibration import conformal_sets
    from cellmorph.bundle import load_bundle
    from cellmorph.metrics import aggregate_compounds
    from cellmorph.novelty import novelty_threshold
    from cellmorph.predict import PredictConfig, predict

    summary = predict(tiny_bundle, tiny_cache, tmp_path / "pred", PredictConfig(novelty_alpha=0.2, sets="mondrian",
                                                                               threads=1),
                      progress=False, log=lambda *a: None)
    assert summary["novelty"]["score"] == "1 - max probability" and summary["novelty"]["alpha"] == 0.2
    assert summary["novelty"]["pool"] == "compound"
    treatments = pd.read_parquet(tmp_path / "pred" / "treatments.parquet")
    compounds = pd.read_parquet(tmp_path / "pred" / "compounds.parquet").set_index("Metadata_Compound")
    columns = [c for c in treatments.columns if c.startswith("prob_")]
    probs = treatments[columns].to_numpy()
    np.testing.assert_allclose(compounds[NOVELTY_COLUMN], 1 - compounds[columns].to_numpy().max(axis=1))
    np.testing.assert_allclose(treatments[NOVELTY_COLUMN],
                               compounds[NOVELTY_COLUMN].loc[treatments["Metadata_Compound"]].to_numpy())
    assert (treatments.groupby("Metadata_Compound")[NOVELTY_COLUMN].nunique() == 1).all()
    bundle = load_bundle(tiny_bundle)
    calibration = bundle.calibration["treatments"]
    by_compound = aggregate_compounds(calibration).set_index("Metadata_Compound")[columns].to_numpy().max(axis=1)
    by_compound = pd.Series(1 - by_compound, aggregate_compounds(calibration)["Metadata_Compound"].to_numpy())
    assert summary["novelty"]["threshold"] == novelty_threshold(
        by_compound.loc[calibration["Metadata_Compound"]].to_numpy(), 0.2)
    summary = predict(tiny_bundle, tiny_cache, tmp_path / "alone", PredictConfig(novelty_alpha=0.2, threads=1,
                                                                                novelty_pool="treatment"),
                      progress=False, log=lambda *a: None)
    alone = pd.read_parquet(tmp_path / "alone" / "treatments.parquet")
    np.testing.assert_allclose(alone[NOVELTY_COLUMN], 1 - alone[columns].to_numpy().max(axis=1))
    assert summary["novelty"]["pool"] == "treatment" and summary["novelty"]["threshold"] == novelty_threshold(
        1 - calibration[columns].to_numpy().max(axis=1), 0.2)
    marginal = conformal_sets(bundle.calibration["treatments"], probs, bundle.classes, 0.1).sum(axis=1)
    assert (treatments["Set_Size"].to_numpy() >= marginal).all() and treatments["Set_Size"].sum() > marginal.sum()
