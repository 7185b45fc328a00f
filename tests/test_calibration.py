"""Calibration from out-of-fold scores: conformal sets, temperature scaling, ECE.

The real-data checks use the paper's own leave-one-compound-out softmax outputs for the
103 BBBC021 treatments (ResNet50, InceptionV3, InceptionResNetV2), stored in shared/.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellmorph.calibration import (
    SET_SEPARATOR,
    TemperatureScaling,
    class_names_problem,
    conformal_sets,
    expected_calibration_error,
    held_out_calibration_error,
    held_out_coverage,
)
from tests.conftest import SHARED, quick_config, require

PAPER = SHARED / "reference" / "kensert2019_predictions_bbbc021v1.xlsx"


@pytest.fixture(scope="module")
def paper_predictions(real_metadata):
    from cellmorph.stored import read_stored_predictions

    return read_stored_predictions(require(PAPER), real_metadata / "BBBC021_v1_moa.csv")


def _classes(frame: pd.DataFrame) -> list[str]:
    return sorted(c[len("prob_"):] for c in frame.columns if c.startswith("prob_"))


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


def test_sets_cover_the_held_out_compounds_of_a_loco_run(tiny_cache, tmp_path):
    """LOCO on the tiny screen (24 compounds, 44 treatments). Each compound's treatments get sets
    calibrated on the out-of-fold scores of the other 23 compounds. Criterion: for α = 0.1 and 0.2
    the share of the 44 treatments whose set holds the true MoA is at least 1 − α − 2·√(α(1−α)/44)
    (two binomial standard errors: 0.81 and 0.68)."""
    from cellmorph.cv import RunDir, run_cv

    run_cv(tiny_cache, tmp_path / "loco", quick_config(epochs=2, cv="loco", max_tiles_per_fold=60), progress=False)
    scores = RunDir(tmp_path / "loco").read_treatments()
    classes = sorted(scores["Metadata_MoA"].unique())
    for alpha in (0.1, 0.2):
        result = held_out_coverage(scores, classes, alpha)
        assert result["n_treatments"] == 44
        assert result["coverage"] >= 1 - alpha - 2 * np.sqrt(alpha * (1 - alpha) / 44), result


def test_sets_cover_the_papers_own_held_out_compounds(paper_predictions):
    """Real cells: the paper's LOCO outputs, each compound's treatments given sets calibrated on the
    other 37 compounds. Criterion: coverage over the 103 treatments ≥ 1 − α − 2·√(α(1−α)/103)
    (0.84 at α = 0.1, 0.72 at α = 0.2). Measured: 0.90 / 0.81 (ResNet50), 0.90 / 0.79 (InceptionV3),
    0.89 / 0.81 (InceptionResNetV2), with mean set sizes 0.8–0.95: at 95–97 % accuracy the sets
    are single MoAs, and empty where a call is unlike any calibration treatment."""
    assert set(paper_predictions) == {"ResNet50", "InceptionV3", "InceptionResnetV2"}
    for name, frame in paper_predictions.items():
        for alpha in (0.1, 0.2):
            result = held_out_coverage(frame, _classes(frame), alpha)
            assert result["n_treatments"] == 103
            assert result["coverage"] >= 1 - alpha - 2 * np.sqrt(alpha * (1 - alpha) / 103), (name, result)
            assert result["mean_set_size"] < 1.5, (name, result)


def test_temperature_scaling_calibrates_the_papers_confidence(paper_predictions):
    """The median-of-medians confidence of the paper's models is under-confident (ECE 0.13–0.18 over
    10 bins). Temperature scaling fitted on the other compounds, applied to each held-out compound,
    must lower the ECE of every model; measured 0.058 / 0.054 / 0.057."""
    for name, frame in paper_predictions.items():
        result = held_out_calibration_error(frame, _classes(frame))
        assert result["n"] == 103
        assert result["ece_temperature_scaled"] < result["ece_raw"], (name, result)
        assert result["ece_temperature_scaled"] < 0.1, (name, result)


def test_temperature_scaling_recovers_a_known_temperature():
    """Labels drawn from softmax(z); the model reports softmax(3·z), three times too sharp."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 5))
    truth = np.array([rng.choice(5, p=p) for p in np.exp(logits) / np.exp(logits).sum(1, keepdims=True)])
    overconfident = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    scaling = TemperatureScaling.fit(overconfident, truth)
    assert scaling.temperature == pytest.approx(3.0, rel=0.1)
    calibrated = scaling.transform(overconfident)
    np.testing.assert_array_equal(calibrated.argmax(1), overconfident.argmax(1))  # the calls stay
    correct = overconfident.argmax(1) == truth
    assert expected_calibration_error(calibrated.max(1), correct) < 0.03
    assert expected_calibration_error(overconfident.max(1), correct) > 0.1


def test_expected_calibration_error_by_hand():
    # Two bins used: [0.2, 0.3) holds 0.25, 0.25 (1 of 2 right: |0.5 − 0.25| = 0.25);
    # [0.9, 1.0] holds 0.95, 0.95 (2 of 2 right: 0.05). Weighted: (0.25 + 0.05) / 2.
    assert expected_calibration_error(np.array([0.25, 0.25, 0.95, 0.95]), np.array([1, 0, 1, 1])) == pytest.approx(0.15)


def test_too_few_or_one_class_scores_leave_the_confidence_unscaled():
    """A handful of calibration rows, or one class, would drive T towards 0 (every confidence ~1)."""
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
    assert TemperatureScaling.fit(probs, np.array([0, 0, 0])).temperature == 1.0
    many = np.tile(probs, (10, 1))
    assert TemperatureScaling.fit(many, np.zeros(len(many), dtype=int)).temperature == 1.0


def test_class_names_that_cannot_name_prediction_sets_are_said_why():
    assert class_names_problem(["Actin disruptors", "DNA damage"]) is None
    for classes, why in ((["DNA damage"], "at least 2 classes"), (["a", " "], "empty"),
                         (["a", f"b{SET_SEPARATOR}c"], "'b|c' contains '|'"), (["a", "b", "a"], "'a' is listed more")):
        assert why in class_names_problem(classes), classes


def _scores(seed: int, overconfident: bool, compounds: int = 10, per_compound: int = 6, k: int = 3) -> pd.DataFrame:
    """Treatment scores of ``compounds`` compounds: calibrated probabilities with the truth drawn from
    them, or the same calls made overconfident (their probability pushed to 0.97)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(compounds):
        for t in range(per_compound):
            p = rng.dirichlet(np.ones(k) * 0.7)
            truth = rng.choice(k, p=p)
            if overconfident:
                p = np.full(k, 0.03 / (k - 1))
                p[rng.choice(k, p=rng.dirichlet(np.ones(k)))] = 0.97
            rows.append({"Metadata_Compound": f"c{c}", "Metadata_Concentration": float(t),
                         "Metadata_MoA": f"m{truth}", **{f"prob_m{j}": p[j] for j in range(k)}})
    return pd.DataFrame(rows)


def test_temperature_is_used_only_where_it_lowers_the_held_out_log_loss():
    from cellmorph.calibration import held_out_calibration_error, temperature_helps

    classes = ["m0", "m1", "m2"]
    over = _scores(0, overconfident=True)
    assert temperature_helps(over, classes)
    error = held_out_calibration_error(over, classes)
    assert error["temperature_used"] and error["log_loss_temperature_scaled"] < error["log_loss_renormalised"]
    assert error["ece_raw_ci95"][0] <= error["ece_raw"] <= error["ece_raw_ci95"][1] and error["n_compounds"] == 10
    calibrated = _scores(1, overconfident=False, compounds=30)
    assert not temperature_helps(calibrated, classes)
    assert not temperature_helps(over[over["Metadata_Compound"] == "c0"], classes)  # one compound: no held-out check


def test_a_statistic_that_resampling_biases_gets_the_standard_interval_around_its_value():
    """The share of distinct groups among the rows is 1 on the data and below 1 in nearly every resample (it
    repeats groups), as a binned ECE is higher in them: the percentile interval misses the value, the standard
    one (± 1.96 bootstrap standard errors) holds it, with the resamples' spread."""
    from cellmorph.calibration import group_bootstrap

    groups = np.repeat(np.arange(20), 3)
    distinct = lambda rows: len(np.unique(groups[rows])) / (len(rows) / 3)  # noqa: E731
    low, high = group_bootstrap(groups, distinct)
    assert high < 1.0
    low, high = group_bootstrap(groups, distinct, standard=True)
    assert low < 1.0 < high and 0.05 < (high - low) / 2 / 1.96 < 0.2


def test_held_out_coverage_has_an_interval_over_compounds():
    from cellmorph.calibration import held_out_coverage

    cover = held_out_coverage(_scores(2, overconfident=False), ["m0", "m1", "m2"], 0.2)
    low, high = cover["coverage_ci95"]
    assert low <= cover["coverage"] <= high and high - low > 0.05 and cover["n_compounds"] == 10


def test_train_says_what_coverage_and_error_to_expect_and_warns_of_few_treatments(tiny_bundle):
    from cellmorph.cli.cv import expected_calibration_lines

    calibration = json.loads((tiny_bundle / "bundle.json").read_text())["training"]["calibration"]
    lines = expected_calibration_lines(calibration)
    assert lines[0].startswith("expected on new compounds: sets at alpha 0.1 cover ") and "95% interval" in lines[0]
    assert "from 44 calibration treatments of 24 compounds" in lines[0], lines[0]
    assert lines[2].startswith("expected calibration error of the confidence: ")
    assert lines[-1].startswith("warning: 44 calibration treatments cannot promise")


def test_mondrian_sets_cover_every_class_where_marginal_sets_leave_a_hard_one_short():
    """Three classes, the third hard to call (its true-class probabilities low): at α 0.2 marginal sets cover it
    well under 0.8 while covering the easy ones more; Mondrian sets cover each class at 0.8 within 3 standard
    errors of its test rows."""
    from cellmorph.calibration import conformal_sets
    from cellmorph.schema import TRUE_COLUMN, prob_column

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def draw(n):
        truth = rng.integers(0, 3, n)
        strength = np.where(truth == 2, 0.6, 4.0)
        logits = rng.normal(size=(n, 3))
        logits[np.arange(n), truth] += strength
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return probs, truth

    cal_probs, cal_truth = draw(3000)
    calibration = pd.DataFrame(cal_probs, columns=[prob_column(c) for c in classes])
    calibration[TRUE_COLUMN] = np.array(classes)[cal_truth]
    probs, truth = draw(6000)
    coverage = {}
    for sets in ("marginal", "mondrian"):
        members = conformal_sets(calibration, probs, classes, 0.2, sets)
        covered = members[np.arange(len(truth)), truth]
        coverage[sets] = [covered[truth == c].mean() for c in range(3)]
    tolerance = 3 * np.sqrt(0.16 / 2000)
    assert coverage["marginal"][2] < 0.8 - 3 * tolerance and min(coverage["marginal"][:2]) > 0.8
    assert all(abs(c - 0.8) < tolerance + 0.01 for c in coverage["mondrian"])
    from cellmorph.errors import CellmorphError

    with pytest.raises(CellmorphError, match="sets .aps."):
        conformal_sets(calibration, probs, classes, 0.2, "aps")
