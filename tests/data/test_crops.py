"""Crop tables (real crops-week4 fixture) and generic CellProfiler-style layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from cellmorph.cache import TileCache
from cellmorph.data.crops import load_crop_table
from cellmorph.data.generic import GenericLayout, load_generic, load_generic_yaml
from cellmorph.errors import BadInputError
from cellmorph.preprocess import PrepareConfig, anscombe, prepare


def test_real_crop_table_loads(real_crops):
    table = load_crop_table(real_crops)
    assert len(table) == 1120
    assert table.is_stacked
    assert table.channels == ("DAPI", "Tubulin", "Actin")
    assert len(table.controls) == 480
    assert set(table.treated["Metadata_MoA"]) == {"Protein synthesis"}
    assert "Metadata_Cell" in table.frame.columns  # extra Metadata_* columns are kept
    assert set(table.frame["Metadata_Batch"]) == {"Week4"}


def test_real_crops_normalise_per_plate_from_dmso_only(real_crops, tmp_path):
    table = load_crop_table(real_crops)
    summary = prepare(table, tmp_path / "cache", PrepareConfig(tile_grid=(1, 1)), progress=False)
    assert summary["n_tiles"] == 1120 and summary["n_plates"] == 6
    cache = TileCache(tmp_path / "cache")
    assert cache.tile_shape == (3, 68, 68)
    stats = cache.norm_stats
    assert set(stats["group"]) == set(table.plates)
    # Recompute one plate's statistics by hand from its DMSO crops only.
    plate = "Week4_27801"
    dmso = table.controls[table.controls["Metadata_Plate"] == plate]
    pixels = np.concatenate([anscombe(np.load(p)).reshape(-1, 3) for p in dmso["Path_Stack"]]).astype(np.float64)
    got = stats[stats["group"] == plate].set_index("channel").loc[["DAPI", "Tubulin", "Actin"]]
    np.testing.assert_allclose(got["mean"], pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["std"], pixels.std(axis=0), rtol=1e-4)
    assert (got["n_images"] == 80).all()


def test_batch_normalisation_pools_the_week(real_crops, tmp_path):
    table = load_crop_table(real_crops)
    prepare(table, tmp_path / "cache", PrepareConfig(tile_grid=(1, 1), normalize="batch"), progress=False)
    stats = TileCache(tmp_path / "cache").norm_stats
    assert set(stats["group"]) == {"Week4"}
    assert (stats["n_images"] == 480).all()


def test_treated_pixels_never_enter_the_statistics(real_crops, tmp_path):
    """Doubling every treated crop must leave the DMSO statistics untouched."""
    index = pd.read_csv(real_crops)
    src = real_crops.parent
    (tmp_path / "crops").mkdir()
    for name, compound in zip(index["FileName"], index["Metadata_Compound"]):
        arr = np.load(src / name)
        if compound != "DMSO":
            arr = arr * 2
        np.save(tmp_path / name, arr)
    index.to_csv(tmp_path / "index.csv", index=False)
    prepare(load_crop_table(real_crops), tmp_path / "a", PrepareConfig(tile_grid=(1, 1)), progress=False)
    prepare(load_crop_table(tmp_path / "index.csv"), tmp_path / "b", PrepareConfig(tile_grid=(1, 1)), progress=False)
    a, b = TileCache(tmp_path / "a").norm_stats, TileCache(tmp_path / "b").norm_stats
    pd.testing.assert_frame_equal(a.drop(columns=[]), b)


def test_crop_labels_from_moa_table_and_absent_compound(real_crops, tmp_path):
    moa = tmp_path / "moa.csv"
    moa.write_text("compound,concentration,moa\nDMSO,0,DMSO\ncyclohexamide,5,Protein synthesis\n")
    table = load_crop_table(real_crops, moa_csv=moa)
    assert set(table.treated["Metadata_MoA"]) == {"Protein synthesis"}
    moa.write_text("compound,concentration,moa\nDMSO,0,DMSO\n")
    with pytest.raises(BadInputError, match=r"row \d+: compound 'cyclohexamide' is absent from the MoA table"):
        load_crop_table(real_crops, moa_csv=moa)


def test_generic_cellprofiler_layout_from_yaml(tiny_screen, tmp_path):
    images = pd.read_csv(tiny_screen / "BBBC021_v1_image.csv")
    moa = pd.read_csv(tiny_screen / "BBBC021_v1_moa.csv")
    cp = pd.DataFrame(
        {
            "Metadata_Barcode": images["Image_Metadata_Plate_DAPI"],
            "Metadata_WellName": images["Image_Metadata_Well_DAPI"],
            "Metadata_Treatment": images["Image_Metadata_Compound"],
            "Metadata_Dose": images["Image_Metadata_Concentration"],
            "FileName_DNA": images["Image_FileName_DAPI"],
            "PathName_DNA": images["Image_PathName_DAPI"],
            "FileName_Tub": images["Image_FileName_Tubulin"],
            "PathName_Tub": images["Image_PathName_Tubulin"],
        }
    )
    cp.to_csv(tmp_path / "Image.csv", index=False)
    moa.to_csv(tmp_path / "moa.csv", index=False)
    config = {
        "csv": str(tmp_path / "Image.csv"),
        "root": str(tiny_screen),
        "channels": {
            "DNA": {"file_column": "FileName_DNA", "folder_column": "PathName_DNA"},
            "Tubulin": {"file_column": "FileName_Tub", "folder_column": "PathName_Tub"},
        },
        "plate_column": "Metadata_Barcode",
        "well_column": "Metadata_WellName",
        "site_column": None,
        "compound_column": "Metadata_Treatment",
        "concentration_column": "Metadata_Dose",
        "moa_column": None,
        "moa_table": str(tmp_path / "moa.csv"),
    }
    (tmp_path / "layout.yaml").write_text(yaml.safe_dump(config))
    table = load_generic_yaml(tmp_path / "layout.yaml")
    assert table.origin == str(tmp_path / "Image.csv")
    pd.testing.assert_frame_equal(table.frame, load_generic(GenericLayout(**config)).frame)
    assert table.channels == ("DNA", "Tubulin")
    assert len(table) == len(images)
    assert set(table.treated["Metadata_MoA"]) <= set(moa["moa"])
    summary = prepare(table, tmp_path / "cache", PrepareConfig(), progress=False)
    assert TileCache(tmp_path / "cache").tile_shape[0] == 2
    assert summary["n_tiles"] == 4 * len(images)


def test_crop_tables_without_labels_load_for_predict(real_crops, tmp_path):
    """A crop table without Metadata_MoA is an error for training, but loads for `predict`, with the
    controls labelled DMSO and every other crop unlabelled; a MoA table labels only what it lists."""
    index = pd.read_csv(real_crops).drop(columns=["Metadata_MoA"])
    index["FileName"] = [str(real_crops.parent / name) for name in index["FileName"]]
    csv = tmp_path / "index.csv"
    index.to_csv(csv, index=False)
    with pytest.raises(BadInputError, match="Metadata_MoA"):
        load_crop_table(csv)
    frame = load_crop_table(csv, require_labels=False).frame
    assert len(frame) == 1120
    assert set(frame.loc[frame["Metadata_IsControl"], "Metadata_MoA"]) == {"DMSO"}
    assert set(frame.loc[~frame["Metadata_IsControl"], "Metadata_MoA"]) == {""}
    (tmp_path / "moa.csv").write_text("compound,moa\nDMSO,DMSO\nsomething-else,Epithelial\n")
    frame = load_crop_table(csv, moa_csv=tmp_path / "moa.csv", require_labels=False).frame
    assert set(frame["Metadata_MoA"]) == {"DMSO", ""}
