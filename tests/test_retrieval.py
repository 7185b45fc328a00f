"""copairs mean average precision (cellmorph.retrieval) in profile-eval, embed, cv and the report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from cellmorph.errors import BadInputError
from cellmorph.retrieval import (
    INSTALL,
    MOA_FILE,
    REPLICATES_FILE,
    moa_map,
    replicate_map,
    retrieval,
    treatment_profiles,
)
from tests.conftest import one_line_error, quick_config, run_cli_here

FEATURES = [f"f{i}" for i in range(16)]
NULL = 2000  # a small null keeps the tests quick; the commands use retrieval.NULL_SIZE


def synthetic_wells(seed: int = 0, dmso_per_plate: int = 4) -> pd.DataFrame:
    """Per-well profiles of 4 MoAs (3 with two compounds, one with a single compound) at two doses, 3
    replicate wells on 3 plates, DMSO wells on each plate; a weak compound (near DMSO), and one treatment
    with a single well (no replicate to retrieve)."""
    rng = np.random.default_rng(seed)
    moa_of = {"a1": "alpha", "a2": "alpha", "b1": "beta", "b2": "beta", "g1": "gamma", "g2": "gamma",
              "d1": "delta", "weak": "beta"}
    direction = {moa: rng.normal(size=len(FEATURES)) * 2 for moa in sorted(set(moa_of.values()))}
    rows, wells = [], {plate: 0 for plate in ("P1", "P2", "P3")}

    def add(plate, compound, dose, moa, values):
        wells[plate] += 1
        rows.append({"Metadata_Plate": plate, "Metadata_Well": f"W{wells[plate]:02d}", "Metadata_Compound": compound,
                     "Metadata_Concentration": dose, "Metadata_MoA": moa, "Metadata_Batch": "Week1",
                     **dict(zip(FEATURES, values))})

    for compound, moa in moa_of.items():
        own = rng.normal(size=len(FEATURES))
        strength = 0.1 if compound == "weak" else 1.0
        for dose in (1.0, 3.0):
            centre = strength * (direction[moa] * dose / 2 + own)
            for plate in wells:
                add(plate, compound, dose, moa, centre + rng.normal(scale=0.6, size=len(FEATURES)))
    add("P1", "lonely", 1.0, "alpha", direction["alpha"] + rng.normal(scale=0.6, size=len(FEATURES)))
    for plate in list(wells):
        for _ in range(dmso_per_plate):
            add(plate, "DMSO", 0.0, "DMSO", rng.normal(scale=0.6, size=len(FEATURES)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the numbers are copairs'
@pytest.mark.parametrize("distance", ["correlation", "cosine"])
def test_replicate_and_moa_map_are_copairs_own_numbers(distance, tmp_path):
    """The same frame through copairs directly, set up as its phenotypic-activity and -consistency examples
    (DMSO wells each their own reference index; MoA positives of other compounds): the same mAP, p-values,
    corrected p-values and calls."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index

    wells = synthetic_wells()
    ours, summary = replicate_map(wells, FEATURES, distance, null_size=NULL, seed=0)
    frame = wells.assign(Metadata_Treatment=wells["Metadata_Compound"] + "@" + wells["Metadata_Concentration"].astype(str))
    frame = assign_reference_index(frame, "Metadata_Compound == 'DMSO'", reference_col="Metadata_Reference",
                                   default_value=-1)
    keys = ["Metadata_Treatment", "Metadata_Reference"]
    ap = average_precision(frame[keys + ["Metadata_Compound"]], frame[FEATURES].to_numpy(), pos_sameby=keys,
                           pos_diffby=[], neg_sameby=[], neg_diffby=keys, distance=distance, progress_bar=False)
    ap = ap[ap["Metadata_Compound"] != "DMSO"]
    theirs = mean_average_precision(ap, ["Metadata_Treatment"], null_size=NULL, threshold=0.05, seed=0,
                                    progress_bar=False, cache_dir=tmp_path / "replicates")
    ours = ours.assign(Metadata_Treatment=ours["Metadata_Compound"] + "@" + ours["Metadata_Concentration"].astype(str))
    _same_scores(ours, theirs, "Metadata_Treatment")
    assert len(ours) == 16 and summary["not_scored"] == ["lonely @ 1"]  # one well: no replicate to find
    assert summary["n_control_wells"] == 12 and summary["negatives"] == "DMSO wells"
    assert summary["fraction_retrieved"] == pytest.approx(ours["below_corrected_p"].mean())

    treatments = treatment_profiles(wells, FEATURES, "mean")
    ours, summary = moa_map(treatments, FEATURES, distance, null_size=NULL, seed=0)
    treated = treatments.reset_index(drop=True)
    ap = average_precision(treated[["Metadata_MoA", "Metadata_Compound"]], treated[FEATURES].to_numpy(),
                           pos_sameby=["Metadata_MoA"], pos_diffby=["Metadata_Compound"], neg_sameby=[],
                           neg_diffby=["Metadata_MoA"], distance=distance, progress_bar=False)
    theirs = mean_average_precision(ap, ["Metadata_MoA"], null_size=NULL, threshold=0.05, seed=0,
                                    progress_bar=False, cache_dir=tmp_path / "moa")
    _same_scores(ours, theirs, "Metadata_MoA")
    # delta has one compound: no positive pair, not scored; beta's weak compound still counts as beta.
    assert list(ours["Metadata_MoA"]) == ["alpha", "beta", "gamma"] and summary["not_scored"] == ["delta"]
    assert ours.set_index("Metadata_MoA").loc["beta", "n_compounds"] == 3


def _same_scores(ours: pd.DataFrame, theirs: pd.DataFrame, key: str) -> None:
    merged = ours.merge(theirs, on=key, suffixes=("", "_copairs"), validate="one_to_one")
    assert len(merged) == len(ours) == len(theirs)
    for column in ("mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"):
        np.testing.assert_allclose(merged[column], merged[column + "_copairs"], rtol=1e-6, err_msg=column)
    assert (merged["below_corrected_p"] == merged["below_corrected_p_copairs"]).all()
    assert (merged["below_p"] == merged["below_p_copairs"]).all()


def test_strong_treatments_are_retrieved_and_the_weak_one_less_so():
    wells = synthetic_wells()
    first = retrieval(wells, None, FEATURES, null_size=NULL)
    table = first.replicates.set_index(["Metadata_Compound", "Metadata_Concentration"])
    strong = table.drop(index="weak", level=0)
    assert strong["below_corrected_p"].all() and (strong["mean_average_precision"] > 0.9).all()
    assert table.loc["weak", "mean_average_precision"].max() < strong["mean_average_precision"].min()
    # Seeded: the same profiles give the same numbers (the null is drawn afresh, not read from a cache).
    again = retrieval(wells, None, FEATURES, null_size=NULL)
    pd.testing.assert_frame_equal(first.replicates, again.replicates)
    pd.testing.assert_frame_equal(first.moa, again.moa)
    assert first.summary["seed"] == 0 and first.summary["null_size"] == NULL


# --------------------------------------------------------------------------- bad input
def test_without_dmso_wells_replicate_retrieval_is_a_clear_error_and_a_note():
    wells = synthetic_wells()
    treated = wells[wells["Metadata_Compound"] != "DMSO"]
    with pytest.raises(BadInputError, match="my wells: no DMSO wells: replicate retrieval ranks"):
        replicate_map(treated, FEATURES, source="my wells")
    notes: list[str] = []
    found = retrieval(treated, None, FEATURES, null_size=NULL, log=notes.append)
    assert found.replicates is None and "no DMSO wells" in found.summary["replicates"]["skipped"]
    assert found.moa is not None  # the other part stands
    assert len(notes) == 1 and notes[0].startswith("note: replicate retrieval (mAP) not scored:")
    one_compound = treatment_profiles(wells[wells["Metadata_MoA"].isin(["delta", "DMSO"])], FEATURES)
    with pytest.raises(BadInputError, match="two or more MoAs"):
        moa_map(one_compound, FEATURES)
    singles = treatment_profiles(wells[wells["Metadata_Compound"].isin(["a1", "b1", "DMSO"])], FEATURES)
    with pytest.raises(BadInputError, match="no MoA has two or more compounds"):
        moa_map(singles, FEATURES)


def test_profiles_without_any_finite_feature_are_left_out_and_counted():
    """A per-plate DMSO z-score of a plate with one DMSO well is NaN in every feature (crops-moa-dev has 19
    such plates): those wells are left out, said once, and counted; a feature NaN elsewhere is dropped."""
    wells = synthetic_wells()
    nan_plate = wells["Metadata_Plate"] == "P3"
    wells.loc[nan_plate, FEATURES] = np.nan
    wells.loc[0, "f0"] = np.inf
    notes: list[str] = []
    found = retrieval(wells, None, FEATURES, null_size=NULL, log=notes.append)
    summary = found.summary["replicates"]
    assert summary["n_dropped"] == int(nan_plate.sum()) and summary["n_features"] == len(FEATURES) - 1
    assert summary["n_control_wells"] == 8 and summary["n_scored"] == 16  # two wells left per treatment
    assert any(n.startswith(f"note: replicate retrieval (mAP): {int(nan_plate.sum())} of the wells have no finite "
                            "feature") for n in notes), notes


# --------------------------------------------------------------------------- profile-eval
def test_profile_eval_writes_the_map_tables_and_summary(tmp_path):
    path = tmp_path / "wells.parquet"
    synthetic_wells().to_parquet(path, index=False)
    proc = run_cli_here("profile-eval", path, "--out", tmp_path / "pe")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["map_replicates_fraction_retrieved"] > 0.8 and "map_moa" in printed
    assert "mAP: replicate retrieval mAP" in proc.stderr
    metrics = json.loads((tmp_path / "pe" / "metrics.json").read_text())
    summary = metrics["map"]
    assert summary["seed"] == 0 and summary["null_size"] == 10_000 and summary["distance"] == "correlation"
    assert summary["replicates"]["n_scored"] == 16 and summary["moa"]["n_scored"] == 3
    replicates = pd.read_csv(tmp_path / "pe" / REPLICATES_FILE)
    moa = pd.read_csv(tmp_path / "pe" / MOA_FILE)
    assert {"mean_average_precision", "p_value", "corrected_p_value", "below_p"} <= set(replicates.columns)
    assert len(replicates) == 16 and list(moa["Metadata_MoA"]) == ["alpha", "beta", "gamma"]
    assert summary["replicates"]["fraction_retrieved"] == pytest.approx(replicates["below_corrected_p"].mean())
    # One batch: NSCB scores no treatment, and its (empty) confusion matrix is still drawn.
    assert metrics["n_scored_nscb"] == 0 and (tmp_path / "pe" / "nscb_confusion_matrix.png").stat().st_size > 0
    # --no-map: no mAP, and no earlier run's tables left behind to be mistaken for this one's.
    proc = run_cli_here("profile-eval", path, "--out", tmp_path / "pe", "--no-map")
    assert proc.returncode == 0, proc.stderr
    assert "map" not in json.loads((tmp_path / "pe" / "metrics.json").read_text())
    assert not (tmp_path / "pe" / REPLICATES_FILE).exists() and not (tmp_path / "pe" / MOA_FILE).exists()


def test_profile_eval_without_dmso_scores_moa_retrieval_and_notes_the_rest(tmp_path):
    path = tmp_path / "treated.parquet"
    wells = synthetic_wells()
    wells[wells["Metadata_Compound"] != "DMSO"].to_parquet(path, index=False)
    proc = run_cli_here("profile-eval", path, "--standardize", "none", "--out", tmp_path / "pe")
    assert proc.returncode == 0, proc.stderr
    assert "note: replicate retrieval (mAP) not scored:" in proc.stderr and "no DMSO wells" in proc.stderr
    summary = json.loads((tmp_path / "pe" / "metrics.json").read_text())["map"]
    assert "no DMSO wells" in summary["replicates"]["skipped"] and summary["moa"]["n_scored"] == 3
    assert not (tmp_path / "pe" / REPLICATES_FILE).exists() and (tmp_path / "pe" / MOA_FILE).is_file()


def test_without_copairs_profile_eval_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "wells.parquet"
    synthetic_wells().to_parquet(path, index=False)
    monkeypatch.setitem(sys.modules, "copairs", None)
    monkeypatch.setitem(sys.modules, "copairs.map", None)
    line = one_line_error(run_cli_here("profile-eval", path, "--out", tmp_path / "asked", "--map"), INSTALL)
    assert "copairs" in line and not (tmp_path / "asked").exists()
    proc = run_cli_here("profile-eval", path, "--out", tmp_path / "pe")  # not asked for: NSC, and a note
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"note: no mAP: mean average precision (mAP) needs copairs: {INSTALL}" in proc.stderr
    metrics = json.loads((tmp_path / "pe" / "metrics.json").read_text())
    assert "copairs" in metrics["map"]["skipped"] and metrics["nsc_accuracy"] >= 0
    assert not (tmp_path / "pe" / REPLICATES_FILE).exists()


# --------------------------------------------------------------------------- embed
def test_embed_scores_its_well_profiles_and_notes_without_copairs(tmp_path, monkeypatch):
    from cellmorph.config.embed import EmbedConfig
    from cellmorph.embed import _retrieval

    wells = synthetic_wells()
    notes: list[str] = []
    summary = _retrieval(wells, FEATURES, True, EmbedConfig(), tmp_path, notes.append)
    assert summary["distance"] == "cosine" and summary["replicates"]["profiles"] == "normalised well profiles"
    assert summary["moa"]["profiles"] == "treatment profiles (median of the normalised well profiles)"
    assert (tmp_path / REPLICATES_FILE).is_file() and (tmp_path / MOA_FILE).is_file()
    assert notes and notes[-1].startswith("mAP: replicate retrieval mAP")
    monkeypatch.setitem(sys.modules, "copairs", None)
    monkeypatch.setitem(sys.modules, "copairs.map", None)
    notes.clear()
    assert _retrieval(wells, FEATURES, True, EmbedConfig(), tmp_path, notes.append) == {
        "skipped": "copairs is not installed"}
    assert notes == [f"note: no mAP: mean average precision (mAP) needs copairs: {INSTALL}"]
    assert not (tmp_path / REPLICATES_FILE).exists()


# --------------------------------------------------------------------------- cv and its report
@pytest.fixture(scope="module")
def cv_run(tiny_cache, tmp_path_factory):
    from cellmorph.cv import run_cv

    out = tmp_path_factory.mktemp("map") / "run"
    run_cv(tiny_cache, out, quick_config(cv="group-kfold:2"), progress=False)
    return out


@pytest.mark.slow
def test_cv_scores_its_held_out_probabilities_and_the_report_shows_them(cv_run):
    from markupsafe import escape

    from cellmorph.report import write_report

    metrics = json.loads((cv_run / "metrics.json").read_text())
    summary = metrics["map"]
    assert summary["distance"] == "cosine" and summary["moa"]["profiles"] == "held-out treatment probabilities"
    # The tiny cache holds no DMSO wells (cv holds them out only as a class): replicate retrieval is skipped.
    assert "no DMSO wells" in summary["replicates"]["skipped"] and not (cv_run / REPLICATES_FILE).exists()
    moa = pd.read_csv(cv_run / MOA_FILE)
    assert len(moa) == summary["moa"]["n_scored"] == 12  # every MoA of the tiny screen has two compounds
    page = write_report(cv_run, visualise=False).read_text()
    section = page[page.index('<section id="retrieval"'):]
    section = section[:section.index("</section>")]
    assert "MoA retrieval" in section and f"{summary['moa']['mean_map']:.3f}" in section
    assert str(escape("Replicate retrieval not scored: no DMSO wells among the held-out wells (DMSO is not a class; "
                      "cv --include-controls)")) in section
    assert section.count("<tr>") == 1 + 1 + 1 + len(moa)  # summary heading + row, MoA heading + rows
