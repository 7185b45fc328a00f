"""BBBC021 layout on the real official metadata: the paper's Table 1 subset."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cellmorph.data.bbbc021 import load_bbbc021, moa_subset_plates, read_image_csv, read_moa_csv, select_moa_subset
from cellmorph.errors import BadInputError
from tests.conftest import run_cli

# Kensert et al. 2019, Table 1 (images per compound in the annotated subset).
TABLE1 = {
    "ALLN": 24, "AZ-A": 72, "AZ-C": 84, "AZ-J": 36, "AZ-U": 36, "AZ138": 60, "AZ258": 36, "AZ841": 36,
    "MG-132": 24, "PD-169316": 16, "PP-2": 16, "alsterpaullone": 16, "anisomycin": 24, "bryostatin": 8,
    "camptothecin": 36, "chlorambucil": 12, "cisplatin": 12, "colchicine": 12, "cyclohexamide": 36,
    "cytochalasin B": 24, "cytochalasin D": 12, "demecolcine": 48, "docetaxel": 36, "emetine": 36,
    "epothilone B": 36, "etoposide": 36, "floxuridine": 24, "lactacystin": 12, "latrunculin B": 24,
    "methotrexate": 12, "mevinolin/lovastatin": 36, "mitomycin C": 48, "mitoxantrone": 24, "nocodazole": 24,
    "proteasome inhibitor I": 24, "simvastatin": 36, "taxol": 36, "vincristine": 84,
}


def test_moa_subset_matches_table1(real_metadata):
    table = load_bbbc021(root=real_metadata, metadata_dir=real_metadata)
    summary = table.summary()
    assert summary["n_images"] == 1208
    assert summary["n_treatments"] == 103
    assert summary["n_compounds"] == 38
    assert summary["n_moas"] == 12
    assert summary["images_per_compound"] == TABLE1


def test_taxol_is_only_its_week1_titration(real_metadata):
    table = load_bbbc021(root=real_metadata, metadata_dir=real_metadata)
    taxol = table.treated[table.treated["Metadata_Compound"] == "taxol"]
    assert set(taxol["Metadata_Batch"]) == {"Week1"}
    assert set(taxol["Metadata_Well"]) == {"D03", "D04", "D05"}
    assert sorted(taxol["Metadata_Concentration"].unique()) == [0.3, 1.0, 3.0]


def test_dmso_of_the_same_plates_is_kept_as_controls(real_metadata):
    table = load_bbbc021(root=real_metadata, metadata_dir=real_metadata)
    controls = table.controls
    assert (controls["Metadata_Compound"] == "DMSO").all()
    assert set(controls["Metadata_Plate"]) == set(table.treated["Metadata_Plate"])
    # 6 DMSO wells × 4 sites on each of the 49 plates
    assert len(controls) == 49 * 24
    assert len(moa_subset_plates(real_metadata)) == 49


def test_paths_follow_the_official_layout(real_metadata, tmp_path):
    table = load_bbbc021(root=tmp_path, metadata_dir=real_metadata)
    row = table.frame.iloc[0]
    assert row["Path_DAPI"].startswith(str(tmp_path / row["Metadata_Batch"] / row["Metadata_Plate"]))
    assert row["Path_DAPI"].endswith(".tif")


def test_inspect_cli_contract(real_metadata):
    proc = run_cli("inspect", "--layout", "bbbc021", "--metadata", real_metadata, "--moa-subset", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert (payload["n_images"], payload["n_treatments"], payload["n_compounds"]) == (1208, 103, 38)
    assert payload["images_per_compound"]["Vincristine".lower()] == 84
    assert payload["images_per_compound"]["AZ-A"] == 72


def test_blank_metadata_names_the_row(real_metadata, tmp_path):
    images = pd.read_csv(real_metadata / "BBBC021_v1_image.csv")
    images.loc[7, "Image_Metadata_Compound"] = None
    images.to_csv(tmp_path / "BBBC021_v1_image.csv", index=False)
    (tmp_path / "BBBC021_v1_moa.csv").write_text((real_metadata / "BBBC021_v1_moa.csv").read_text())
    with pytest.raises(BadInputError, match=r"row 9: blank or NaN value in column Image_Metadata_Compound"):
        read_image_csv(tmp_path)


def test_strict_compounds_rejects_unannotated(real_metadata):
    with pytest.raises(BadInputError, match="absent from BBBC021_v1_moa.csv"):
        load_bbbc021(real_metadata, real_metadata, strict_compounds=True)


def test_concentrations_match_despite_float_noise(real_metadata):
    images = read_image_csv(real_metadata)
    moa = read_moa_csv(real_metadata).copy()
    moa["concentration"] = moa["concentration"] * (1 + 1e-9)
    assert len(select_moa_subset(images, moa, keep_controls=False)) == 1208


def test_predict_loads_every_image_and_keeps_the_labels_it_knows(real_metadata, tmp_path):
    """Without required labels (what `predict` loads), no compound is left out: the 7,040 images of
    the 74 compounds absent from the MoA table stay, unlabelled; listed treatments keep their MoA."""
    from cellmorph.data.layouts import load_table

    frame = load_table("bbbc021", tmp_path, real_metadata, require_labels=False).frame
    assert len(frame) == 13_200
    moa = read_moa_csv(real_metadata)
    assert (frame.loc[frame["Metadata_IsControl"], "Metadata_MoA"] == "DMSO").all()
    unlisted = ~frame["Metadata_Compound"].isin(set(moa["compound"]))
    assert unlisted.sum() == 7_040 and (frame.loc[unlisted, "Metadata_MoA"] == "").all()
    labelled = load_bbbc021(tmp_path, real_metadata, moa_subset=False)
    merged = frame.merge(labelled.frame[["Metadata_ImageID", "Metadata_MoA"]], on="Metadata_ImageID")
    assert len(merged) == len(labelled.frame) and (merged["Metadata_MoA_x"] == merged["Metadata_MoA_y"]).all()
    # The MoA table is optional then.
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "BBBC021_v1_image.csv").write_bytes((real_metadata / "BBBC021_v1_image.csv").read_bytes())
    bare = load_table("bbbc021", tmp_path, meta, require_labels=False).frame
    assert len(bare) == 13_200 and set(bare["Metadata_MoA"]) == {"", "DMSO"}
