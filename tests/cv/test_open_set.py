"""Leave one MoA out (``cv --cv lomo``): each MoA unseen in turn, and how novel it looks against new compounds of
the known MoAs (open_set.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellmorph.cache import TileCache
from cellmorph.cv.open_set import auroc, fold_novelty
from cellmorph.cv.splits import make_folds
from cellmorph.errors import CellmorphError
from tests.conftest import QUICK_TRAIN, one_line_error, run_cli_here
from tests.test_novelty import _screen


def test_lomo_holds_out_every_compound_of_one_moa_per_fold(tiny_cache):
    index = TileCache(tiny_cache).index
    folds, skipped = make_folds(index, "lomo")
    moas = sorted(set(index.loc[~index["Metadata_IsControl"], "Metadata_MoA"].astype(str)))
    assert [f.name for f in folds] == moas and not skipped
    for fold in folds:
        test_moas = set(index["Metadata_MoA"].iloc[fold.test].astype(str))
        assert test_moas == {fold.name} and fold.name not in set(index["Metadata_MoA"].iloc[fold.train].astype(str))
        assert not set(index["Metadata_Compound"].iloc[fold.train]) & set(fold.test_compounds)
    two = index[index["Metadata_MoA"].isin(moas[:2]) | index["Metadata_IsControl"]]
    with pytest.raises(CellmorphError, match="at least 3 MoAs"):
        make_folds(two.reset_index(drop=True), "lomo")


def test_an_unseen_moa_is_flagged_and_known_compounds_are_not_more_than_alpha():
    """On a screen with a planted MoA and controls (tests/test_novelty.py): at least half of its treatments are flagged, and the
    known compounds, each scored against a threshold set without it, are flagged at most α + 3 standard errors."""
    x, index, y, controls = _screen(moas=6, compounds=4, controls=40)
    held = y == y.max()
    result = fold_novelty(x[~held], y[~held], index[~held], x[held], index[held], alpha=0.1, controls=controls)
    # each treatment scored by its compound (the default pool), and each alone: the same two promises
    assert result["pool"] == "compound"
    assert (result["unseen"].groupby("Metadata_Compound")["Novelty_Score"].nunique() == 1).all()
    for level in (result, result["treatments_alone"]):
        flagged = level["unseen"]["Novelty_Score"].to_numpy() > level["threshold"]
        n = len(level["false_alarms"])
        assert flagged.mean() >= 0.5 and n == 6 * 4 * 2
        assert level["false_alarms"].mean() <= 0.1 + 3 * np.sqrt(0.09 / n)
    # Each compound scored once from its treatments together: the same two promises, per compound
    compounds = result["compounds"]
    flagged = compounds["unseen"]["Novelty_Score"].to_numpy() > compounds["threshold"]
    n = len(compounds["false_alarms"])
    assert len(flagged) == 4 and flagged.mean() >= 0.5 and n == 6 * 4
    assert compounds["false_alarms"].mean() <= 0.1 + 3 * np.sqrt(0.09 / n)
    assert auroc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


def test_cv_lomo_writes_open_set_json_and_only_the_probe_runs_it(tiny_cache, tmp_path):
    proc = run_cli_here("cv", "--data", tiny_cache, *QUICK_TRAIN, "--mode", "linear-probe", "--probe-head", "centroid",
                        "--features", "stage2", "--cv", "lomo", "--out", tmp_path / "run", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "open_set.json").read_text())
    assert record["scheme"] == "lomo" and record["alpha"] == 0.1
    assert record["score"] == "centroid distance, from the average cell and from the controls"  # its DMSO tiles:
    assert len(np.load(tmp_path / "run" / "control_embeddings.npy")) == TileCache(tiny_cache).index[
        "Metadata_IsControl"].sum()
    assert 0 <= record["auroc"] <= 1 and 0 <= record["flagged_at_alpha"] <= 1 and 0 <= record["false_alarm_rate"] <= 1
    assert len(record["per_moa"]) == 12 and record["n_unseen_treatments"] == 44
    kinds = [t["kind"] for t in record["treatments"]]
    assert kinds.count("unseen") == 44 and kinds.count("known") == record["n_known_treatments"]
    assert np.mean([t["novel"] for t in record["treatments"] if t["kind"] == "unseen"]) == record["flagged_at_alpha"]
    unseen_compounds = {t["compound"] for t in record["treatments"] if t["kind"] == "unseen"}
    assert record["compounds"]["n_unseen_compounds"] == len(unseen_compounds) and 0 <= record["compounds"]["auroc"] <= 1
    assert 0 <= record["compounds"]["flagged_at_alpha"] <= 1 and record["compounds"]["n_known_compounds"] > 0
    assert (tmp_path / "run" / "open_set_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "open set (each MoA unseen in turn)" in proc.stderr + proc.stdout
    page = (tmp_path / "run" / "report.html").read_text()  # the report's "Unknown MoA" section: ROC and the treatments
    section = page[page.index('id="unknown"'):page.index('id="confusion"')]
    assert f"AUROC {record['auroc']:.3f}" in section and section.count("data:image/png;base64,") == 1
    assert f"compounds.parquet): AUROC {record['compounds']['auroc']:.3f}" in section  # (the quote is escaped)
    assert record["pool"] == "compound" and record["treatments_alone"]["n_unseen_treatments"] == 44
    assert f"novelty-pool treatment): AUROC {record['treatments_alone']['auroc']:.3f}" in section
    assert all(f"{t['compound']}" in section for t in record["treatments"] if t["kind"] == "unseen")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *QUICK_TRAIN, "--cv", "lomo", "--out", tmp_path / "ft"),
                   "lomo", "--mode linear-probe")
    one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--mode", "linear-probe",
                                "--calibration", "lomo", "--out", tmp_path / "m"), "--calibration lomo")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "m").exists()


def test_cv_lomo_of_a_network_takes_the_new_compounds_of_known_moas_from_its_loco_run(tiny_cache, tmp_path):
    """A network's lomo run: its unseen treatments scored by 1 − the largest probability among the fold's known MoAs,
    against the treatments of the other MoAs in a LOCO run of the same recipe (each called by a network that never
    saw its compound). The reference must be a finished LOCO run of that recipe on this cache."""
    import pandas as pd

    from cellmorph.cv import RunDir
    from cellmorph.metrics import aggregate_compounds

    quick = (*QUICK_TRAIN, "--no-progress")
    loco, lomo = tmp_path / "loco", tmp_path / "lomo"
    assert run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "loco", "--out", loco).returncode == 0
    proc = run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "lomo", "--open-set-reference", loco, "--out", lomo)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((lomo / "open_set.json").read_text())
    assert record["score"] == "1 - max probability" and record["reference"] == str(loco)
    assert len(record["per_moa"]) == 12 and record["n_unseen_treatments"] == 44
    reference = RunDir(loco).read_treatments()
    assert record["n_known_treatments"] == sum(int((reference["Metadata_MoA"] != m["moa"]).sum())
                                               for m in record["per_moa"])
    called = pd.read_csv(lomo / "treatments.csv")  # each treatment is in one fold: its own MoA's
    probs = [c for c in called.columns if c.startswith("prob_")]
    first = called.iloc[0]
    # the treatment takes its compound's score (the default pool): the call from the compound's treatments together
    compound = aggregate_compounds(called[called["Metadata_Compound"] == first["Metadata_Compound"]]).iloc[0]
    known = np.array([compound[c] for c in probs if c != f"prob_{first['Metadata_MoA']}"], float)
    unseen = [t for t in record["treatments"] if t["kind"] == "unseen" and t["compound"] == first["Metadata_Compound"]
              and t["concentration"] == float(first["Metadata_Concentration"])]
    assert unseen[0]["score"] == pytest.approx(1 - known.max() / known.sum())
    assert record["pool"] == "compound" and record["treatments_alone"]["n_known_treatments"] == record[
        "n_known_treatments"] and record["compounds"]["n_unseen_compounds"] == called["Metadata_Compound"].nunique()
    assert (lomo / "open_set_roc.png").is_file() and 'id="unknown"' in (lomo / "report.html").read_text()

    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "lomo", "--out", tmp_path / "a"),
                   "--open-set-reference", "loco run of the same recipe")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "lomo", "--open-set-reference", loco,
                                "--lr", "0.5", "--out", tmp_path / "b"), "another recipe", "lr")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "lomo", "--open-set-reference", lomo,
                                "--out", tmp_path / "c"), "a run of cv lomo, not loco")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, "--open-set-reference", loco,
                                "--out", tmp_path / "d"), "is for cv lomo")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, *quick, "--cv", "lomo", "--open-set-reference", loco,
                                "--ensemble-seeds", "2", "--out", tmp_path / "e"), "one network", "--ensemble")
    assert not any((tmp_path / name).exists() for name in "abcde")
