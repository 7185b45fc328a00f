"""The linear probe's regularisation, chosen inside each fold from its training compounds only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cellmorph.cv import probe as probe_module
from cellmorph.cv.probe import PROBE_C_GRID, choose_probe_c, treatment_balanced_log_loss
from cellmorph.errors import CellmorphError


def _cells(signal: float, seed: int = 0, moas: int = 3, compounds_per_moa: int = 3, cells: int = 12, dims: int = 40):
    """Cells of compounds of MoAs: the MoA shifts the first dimension by ``signal``; the rest is noise."""
    rng = np.random.default_rng(seed)
    rows, x = [], []
    for m in range(moas):
        for c in range(compounds_per_moa):
            for k in range(cells):
                rows.append({"Metadata_Compound": f"m{m}c{c}", "Metadata_Concentration": 1.0,
                             "Metadata_MoA": f"moa{m}", "Metadata_Batch": "Week1", "Metadata_Plate": "Week1_1",
                             "Metadata_Well": f"W{m}{c}", "Metadata_IsControl": False})
                vector = rng.normal(size=dims)
                vector[m] += signal
                x.append(vector)
    index = pd.DataFrame(rows)
    y = index["Metadata_MoA"].str[3:].astype(int).to_numpy()
    return np.asarray(x, dtype=np.float32), y, index


def test_noise_chooses_the_strongest_regularisation_and_signal_a_weak_one():
    x, y, index = _cells(signal=0.0)
    c, record = choose_probe_c(x, y, index, class_weighting=True, seed=0)
    assert c == min(PROBE_C_GRID)  # no signal: the flattest probabilities lose least
    assert set(record["scores"]) == {str(v) for v in PROBE_C_GRID} and record["inner_folds"] >= 2
    assert record["scores"][str(c)] == min(record["scores"].values())
    x, y, index = _cells(signal=6.0)
    strong, _ = choose_probe_c(x, y, index, class_weighting=True, seed=0)
    assert strong >= 0.1  # well separated: heavy regularisation only flattens right calls
    again, _ = choose_probe_c(x, y, index, class_weighting=True, seed=0)
    assert again == strong  # seeded: the same choice every time


def test_too_few_compounds_fall_back_to_the_grid_start_and_say_why():
    x, y, index = _cells(signal=1.0, compounds_per_moa=1)  # every compound is its MoA's only one
    c, record = choose_probe_c(x, y, index, class_weighting=True, seed=0)
    assert c == PROBE_C_GRID[0] and "too few compounds" in record["reason"]


def test_treatment_balanced_log_loss_weighs_treatments_not_cells():
    probs = np.array([[0.9, 0.1]] * 9 + [[0.1, 0.9]])
    targets = np.zeros(10, dtype=int)
    treatments = np.array(["big"] * 9 + ["small"])
    expected = (-np.log(0.9) - np.log(0.1)) / 2
    assert treatment_balanced_log_loss(probs, targets, treatments) == pytest.approx(expected)


def test_cv_chooses_c_per_fold_from_its_training_compounds_only(tiny_cache, tmp_path, monkeypatch):
    """The inner selection sees the fold's training rows and nothing of its held-out compounds;
    each fold records what it chose, and metrics.json lists the choices."""
    from cellmorph.cache import TileCache
    from cellmorph.cv import run_cv

    seen = []
    real = probe_module.choose_probe_c

    def spy(x, y, index, *args, **kwargs):
        seen.append(set(index["Metadata_Compound"]))
        return real(x, y, index, *args, **kwargs)

    monkeypatch.setattr(probe_module, "choose_probe_c", spy)
    run = tmp_path / "run"
    metrics = run_cv(tiny_cache, run, dict(model="tf_efficientnet_lite0", init="imagenet", mode="linear-probe",
                                           cv="group-kfold:3", image_size=32, num_threads=1), progress=False)
    folds = [json.loads(p.read_text()) for p in sorted((run / "folds").glob("*/fold.json"))]
    assert len(seen) == len(folds) == 3
    compounds = set(TileCache(tiny_cache).index.query("not Metadata_IsControl")["Metadata_Compound"])
    for fold in folds:
        training = next(s for s in seen if not s & set(fold["test_compounds"]))
        assert training == compounds - set(fold["test_compounds"])
        assert fold["probe_c"] in PROBE_C_GRID and fold["probe_c_choice"]["C"] == fold["probe_c"]
    assert sorted(metrics["probe_c"].values()) == sorted(f["probe_c"] for f in folds)
    from cellmorph.report import write_report

    report = write_report(run, visualise=False).read_text()
    assert "The linear probe&#39;s C per fold" in report or "The linear probe's C per fold" in report
    # A run that differs only in the head's settings embeds alike: seeded with the first run's
    # embeddings, it takes them (the marker matches) instead of embedding again.
    (tmp_path / "given").mkdir()
    for name in ("embeddings.npy", "embeddings.json"):
        shutil.copy2(run / name, tmp_path / "given" / name)
    monkeypatch.setattr("cellmorph.cv.features.embed_probe_rows", _must_not_embed)
    given = run_cv(tiny_cache, tmp_path / "given", dict(model="tf_efficientnet_lite0", init="imagenet",
                                                        mode="linear-probe", cv="loco", image_size=32,
                                                        num_threads=1, probe_c=0.05), progress=False)
    assert set(given["probe_c"].values()) == {0.05} and len(seen) == 3  # a given C is not searched
    assert given["n_folds"] == 24


def _must_not_embed(*args, **kwargs):
    raise AssertionError("embedded again although the run directory held matching embeddings")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "auto"])
def test_bad_probe_c_is_refused(bad):
    from cellmorph.cv import load_cv_config

    with pytest.raises(CellmorphError, match="probe_c"):
        load_cv_config(None, mode="linear-probe", probe_c=bad)
    with pytest.raises(CellmorphError, match="probe_c"):
        load_cv_config(None, mode="finetune", probe_c=0.1)


# --------------------------------------------------------------------------- the centroid head
def test_centroid_head_weighs_compounds_alike_not_cells():
    """A MoA's centroid is the mean of its compounds' profiles: a compound with ten times the cells (a
    plate's positive control) counts once, as taxol must on the development set."""
    from cellmorph.cv.probe import CentroidHead

    rows, x = [], []
    for compound, moa, vector, n in (("big", 0, [1.0, 0.0], 30), ("small", 0, [0.0, 1.0], 3),
                                     ("other", 1, [-1.0, -1.0], 3)):
        for _ in range(n):
            rows.append({"Metadata_Compound": compound, "Metadata_Concentration": 1.0})
            x.append(vector)
    x, index = np.asarray(x), pd.DataFrame(rows)
    y = np.array([0] * 33 + [1] * 3)
    head = CentroidHead.fit(x, y, index)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    expected = (z[0] + z[30]) / 2  # the two compounds' profiles, not the 33 cells' mean
    assert list(head.classes_) == [0, 1]
    np.testing.assert_allclose(head.centroids[0], expected / np.linalg.norm(expected))
    np.testing.assert_allclose(np.linalg.norm(head.centroids, axis=1), 1.0)


def test_centroid_logits_are_linear_so_logmean_calls_the_mean_profile():
    """The mean of a treatment's cell logits is the logit of its mean profile, so logmean aggregation
    (mean log-probability, renormalised) gives the nearest centroid, in cosine, of the mean profile."""
    from cellmorph.cv.probe import CentroidHead
    from cellmorph.metrics import aggregate_wells

    x, y, index = _cells(signal=1.0, seed=3)
    head = CentroidHead.fit(x, y, index, temperature=2.0)
    cells = x[:12]
    probs = head.predict_proba(cells)
    np.testing.assert_allclose(head.logits(cells).mean(axis=0), head.logits(cells.mean(axis=0, keepdims=True))[0],
                               atol=1e-5)
    frame = pd.DataFrame(probs, columns=[f"prob_moa{k}" for k in range(3)]).assign(
        Metadata_Plate="P", Metadata_Well="A01")
    well = aggregate_wells(frame, how="logmean")
    np.testing.assert_allclose(well[[f"prob_moa{k}" for k in range(3)]].to_numpy()[0],
                               head.predict_proba(cells.mean(axis=0, keepdims=True))[0], rtol=1e-6)
    z = (cells.mean(axis=0) - head.mean_) / head.scale_
    cosine = head.centroids @ (z / np.linalg.norm(z))
    assert well["Predicted_MoA"].iloc[0] == f"moa{int(np.argmax(cosine))}"


def test_centroid_temperature_is_chosen_on_held_out_compounds_and_never_moves_a_call():
    from cellmorph.cv.probe import CENTROID_TEMPERATURE_GRID, CentroidHead, choose_centroid_temperature

    x, y, index = _cells(signal=0.0)
    flat, record = choose_centroid_temperature(x, y, index, seed=0)
    assert flat == max(CENTROID_TEMPERATURE_GRID)  # no signal: the flattest probabilities lose least
    assert set(record["scores"]) == {str(t) for t in CENTROID_TEMPERATURE_GRID}
    x, y, index = _cells(signal=6.0)
    sharp, _ = choose_centroid_temperature(x, y, index, seed=0)
    assert sharp < flat
    head = CentroidHead.fit(x, y, index)
    assert (head.with_temperature(0.1).predict_proba(x).argmax(1) == head.with_temperature(10).predict_proba(x)
            .argmax(1)).all()
    _, record = choose_centroid_temperature(*_cells(signal=1.0, compounds_per_moa=1), seed=0)
    assert "too few compounds" in record["reason"]


def test_cv_with_the_centroid_head_records_each_folds_temperature(tiny_cache, tmp_path):
    from cellmorph.cv import run_cv
    from cellmorph.cv.probe import CENTROID_TEMPERATURE_GRID
    from cellmorph.report import write_report

    run = tmp_path / "run"
    metrics = run_cv(tiny_cache, run, dict(model="tf_efficientnet_lite0", init="imagenet", mode="linear-probe",
                                           probe_head="centroid", aggregate="logmean", cv="group-kfold:3",
                                           image_size=32, num_threads=1), progress=False)
    folds = [json.loads(p.read_text()) for p in sorted((run / "folds").glob("*/fold.json"))]
    assert metrics["probe_head"] == "centroid" and "probe_c" not in metrics
    assert sorted(metrics["probe_temperature"].values()) == sorted(f["probe_temperature"] for f in folds)
    assert all(f["probe_temperature"] in CENTROID_TEMPERATURE_GRID for f in folds)
    treatments = pd.read_csv(run / "treatments.csv")
    probs = treatments[[c for c in treatments.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)  # logmean renormalises
    assert "temperature per fold" in write_report(run, visualise=False).read_text()


def test_crop_tables_default_to_the_centroid_head_and_a_given_c_to_the_logistic_one():
    from cellmorph.cv import load_cv_config
    from cellmorph.cv.config import with_layout_defaults

    crops = with_layout_defaults(load_cv_config(None, mode="linear-probe"), "crops").resolved()
    assert (crops.probe_head, crops.aggregate, crops.probe_c) == ("centroid", "logmean", None)
    given_c = with_layout_defaults(load_cv_config(None, mode="linear-probe", probe_c=0.01), "crops").resolved()
    assert (given_c.probe_head, given_c.aggregate, given_c.probe_c) == ("logistic", "median", 0.01)
    chosen = with_layout_defaults(load_cv_config(None, mode="linear-probe", probe_head="logistic"), "crops")
    assert chosen.resolved().probe_c == "nested"
    fields = with_layout_defaults(load_cv_config(None, mode="linear-probe"), "bbbc021").resolved()
    assert (fields.probe_head, fields.aggregate) == ("logistic", "median")
    finetune = with_layout_defaults(load_cv_config(None, mode="finetune"), "crops").resolved()
    assert (finetune.probe_head, finetune.aggregate) == (None, "median")


@pytest.mark.parametrize("options, message", [
    ({"mode": "finetune", "probe_head": "centroid"}, "probe_head"),
    ({"mode": "linear-probe", "probe_head": "centroid", "probe_c": 0.1}, "centroid head has none"),
    ({"mode": "linear-probe", "probe_head": "knn"}, "probe_head"),
    ({"mode": "linear-probe", "aggregate": "max"}, "aggregate"),
])
def test_probe_head_options_that_cannot_work_are_refused(options, message):
    from cellmorph.cv import load_cv_config

    with pytest.raises(CellmorphError, match=message):
        load_cv_config(None, **options)
