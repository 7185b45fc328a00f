"""Scoring the paper's stored per-treatment predictions with the same code as `cellmorph cv`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cellmorph.errors import BadInputError
from cellmorph.stored import class_for_abbreviation, read_stored_predictions, score_stored_predictions
from tests.conftest import SHARED, run_cli_here

XLSX = SHARED / "reference" / "kensert2019_predictions_bbbc021v1.xlsx"


def test_paper_predictions_score_as_published(real_metadata):
    scores = score_stored_predictions(XLSX, real_metadata / "BBBC021_v1_moa.csv")
    assert scores["ResNet50"] == pytest.approx(100 / 103)  # 0.971
    assert scores["InceptionV3"] == pytest.approx(100 / 103)  # 0.971
    assert scores["InceptionResnetV2"] == pytest.approx(98 / 103)  # 0.951


def test_sheets_normalise_to_103_labelled_treatments(real_metadata):
    tables = read_stored_predictions(XLSX, real_metadata / "BBBC021_v1_moa.csv")
    table = tables["ResNet50"]
    assert len(table) == 103 and table["Metadata_Compound"].nunique() == 38
    probs = [c for c in table.columns if c.startswith("prob_")]
    assert len(probs) == 12 and "prob_Microtubule destabilizers" in probs


def test_abbreviations():
    classes = ["DNA damage", "DNA replication", "Kinase inhibitors", "Cholesterol-lowering", "Eg5 inhibitors"]
    assert class_for_abbreviation("DD", classes) == "DNA damage"
    assert class_for_abbreviation("KI", classes) == "Kinase inhibitors"
    assert class_for_abbreviation("Ch", classes) == "Cholesterol-lowering"
    with pytest.raises(BadInputError, match="matches 2"):
        class_for_abbreviation("DNA", classes)


def test_score_treatments_cli_contract(real_metadata, tmp_path):
    proc = run_cli_here("score-treatments", XLSX, "--moa", real_metadata / "BBBC021_v1_moa.csv")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert {k: round(v, 3) for k, v in scores.items()} == {"ResNet50": 0.971, "InceptionV3": 0.971,
                                                           "InceptionResnetV2": 0.951}


def test_unknown_treatment_is_named(real_metadata, tmp_path):
    sheet = pd.read_excel(XLSX, sheet_name="ResNet50")
    sheet.loc[0, "Compounds"] = "mystery"
    sheet.to_csv(tmp_path / "preds.csv", index=False)
    with pytest.raises(BadInputError, match="mystery"):
        read_stored_predictions(tmp_path / "preds.csv", real_metadata / "BBBC021_v1_moa.csv")
