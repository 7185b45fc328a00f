"""BBBC014 layout: the paper's labels, the synthetic plate, preprocessing recipe, bad input, real-download import."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data.bbbc014 import (
    CHANNELS,
    IMAGE_CSV,
    NEGATIVE,
    POSITIVE,
    UNLABELLED,
    bbbc014_prepare_config,
    import_bbbc014,
    label_wells,
    load_bbbc014,
)
from cellmorph.data.synthetic.bbbc014 import (
    CONCENTRATIONS,
    generate_bbbc014,
    nuclear_cytoplasmic_ratio,
    plate_map,
    render_well,
)
from cellmorph.errors import BadInputError, CellmorphError


@pytest.fixture(scope="session")
def b14(tmp_path_factory) -> Path:
    """The tiny synthetic BBBC014 plate, built once. Do not modify."""
    out = tmp_path_factory.mktemp("b14") / "plate"
    generate_bbbc014(out, preset="tiny", seed=0, progress=False)
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rewrite_csv(src: Path, dest: Path, edit) -> Path:
    """A new root whose CSV is ``edit``(the source CSV) with absolute image paths into ``src``."""
    frame = pd.read_csv(src / IMAGE_CSV)
    for ch in CHANNELS:
        frame[f"FileName_{ch}"] = [str(src / f) for f in frame[f"FileName_{ch}"]]
    frame = edit(frame)
    dest.mkdir(parents=True, exist_ok=True)
    frame.to_csv(dest / IMAGE_CSV, index=False)
    return dest


# --------------------------------------------------------------------------- labels
def test_labels_follow_the_paper():
    wells = plate_map()
    assert len(wells) == 96
    assert wells.groupby("CellLine").size().to_dict() == {"A549": 48, "MCF-7": 48}
    assert wells.groupby("CellLine")["Concentration"].nunique().to_dict() == {"A549": 12, "MCF-7": 12}
    labels = label_wells(wells)
    labelled = wells[labels != UNLABELLED]
    assert len(labelled) == 64
    counts = pd.crosstab(labelled["CellLine"], labels[labels != UNLABELLED])
    assert counts.loc["MCF-7", POSITIVE] == counts.loc["MCF-7", NEGATIVE] == 16
    assert counts.loc["A549", POSITIVE] == counts.loc["A549", NEGATIVE] == 16
    levels = sorted(CONCENTRATIONS)
    # the 4 highest are positive, the 4 lowest (with 0) negative, the middle 4 excluded
    assert set(wells.loc[labels == POSITIVE, "Concentration"]) == set(levels[-4:])
    assert set(wells.loc[labels == NEGATIVE, "Concentration"]) == set(levels[:4])
    assert 0.0 in set(wells.loc[labels == NEGATIVE, "Concentration"])
    assert set(wells.loc[labels == UNLABELLED, "Concentration"]) == set(levels[4:8])
    # on this plate: columns 1–4 positive, 9–12 negative (as in the authors' code)
    assert set(wells.loc[labels == POSITIVE, "Column"]) == {1, 2, 3, 4}
    assert set(wells.loc[labels == NEGATIVE, "Column"]) == {9, 10, 11, 12}


def test_labels_rank_concentrations_not_columns():
    wells = plate_map().sample(frac=1.0, random_state=1).reset_index(drop=True)
    labels = label_wells(wells)
    top = wells.groupby("CellLine")["Concentration"].transform(lambda c: c >= sorted(c.unique())[-4])
    assert (labels[top] == POSITIVE).all()
    assert (labels == POSITIVE).sum() == 32


# --------------------------------------------------------------------------- loader + generator
def test_load_synthetic_plate(b14):
    table = load_bbbc014(b14)
    f = table.frame
    assert table.channels == ("DAPI", "FITC")
    assert len(f) == 64
    assert f.groupby("Metadata_CellLine").size().to_dict() == {"A549": 32, "MCF-7": 32}
    assert (f["Metadata_Batch"] == f["Metadata_CellLine"]).all()
    assert not f["Metadata_IsControl"].any()
    assert set(f["Metadata_Compound"]) == {"TNFa"}
    assert f["Metadata_Concentration"].dtype == float
    assert set(f["Metadata_MoA"]) == {POSITIVE, NEGATIVE}
    assert f.groupby(["Metadata_CellLine", "Metadata_MoA"]).size().eq(16).all()
    assert not set(f["Metadata_Column"]) & {5, 6, 7, 8}
    assert f["Metadata_ImageID"].is_unique
    assert all(Path(p).is_file() for ch in CHANNELS for p in f[f"Path_{ch}"])
    assert len(load_bbbc014(b14, labelled_only=False)) == 96


def test_images_are_two_uint8_channels(b14):
    f = load_bbbc014(b14).frame
    for _, row in f.iloc[[0, 17, 40, 63]].iterrows():
        planes = [tifffile.imread(row[f"Path_{ch}"]) for ch in CHANNELS]
        for p in planes:
            assert p.dtype == np.uint8
            assert p.shape == (256, 340)
        assert not np.array_equal(planes[0], planes[1])
    # file names follow the real BBBC014 naming, .tif instead of .Bmp
    assert Path(f["Path_FITC"].iloc[0]).name == "Channel 1-01-A-01-00.tif"
    assert Path(f["Path_DAPI"].iloc[0]).name == "Channel 2-01-A-01-00.tif"


def test_generator_is_deterministic(b14, tmp_path):
    again = tmp_path / "again"
    summary = generate_bbbc014(again, preset="tiny", seed=0, progress=False)
    assert summary["n_labelled"] == 64 and summary["image_shape"] == [256, 340]
    assert _digest(again) == _digest(b14)
    a = render_well(0, "E", 1, 100.0, "A549", 96, 128, 0.5)
    b = render_well(1, "E", 1, 100.0, "A549", 96, 128, 0.5)
    assert a.shape == (2, 96, 128) and not np.array_equal(a, b)
    assert not list(again.rglob("*.tmp")) and not list(again.rglob(".*"))


def test_translocation_is_nuclear_vs_cytoplasmic(b14):
    f = load_bbbc014(b14).frame
    ratios, means = [], []
    for _, row in f.iterrows():
        dapi, fitc = tifffile.imread(row["Path_DAPI"]), tifffile.imread(row["Path_FITC"])
        ratios.append(nuclear_cytoplasmic_ratio(dapi, fitc, ring=2))
        means.append(float(fitc.mean()))
    f = f.assign(ratio=ratios, fitc_mean=means)
    for line, g in f.groupby("Metadata_CellLine"):
        pos = g[g["Metadata_MoA"] == POSITIVE]
        neg = g[g["Metadata_MoA"] == NEGATIVE]
        assert pos["ratio"].min() > neg["ratio"].max(), line
        assert pos["ratio"].median() > 1.5 * neg["ratio"].median(), line
        # not a brightness change: mean FITC of the two classes overlaps
        assert pos["fitc_mean"].min() < neg["fitc_mean"].max() and neg["fitc_mean"].min() < pos["fitc_mean"].max()


def test_cell_lines_differ_in_morphology(b14):
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    f = load_bbbc014(b14).frame
    stats = {}
    for line, g in f.groupby("Metadata_CellLine"):
        areas, ecc = [], []
        for p in g["Path_DAPI"].iloc[:6]:
            dapi = tifffile.imread(p)
            for r in regionprops(label(dapi > threshold_otsu(dapi))):
                if r.area >= 10:
                    areas.append(r.area)
                    ecc.append(r.eccentricity)
        stats[line] = (np.median(areas), np.median(ecc))
    assert stats["A549"][0] > 1.3 * stats["MCF-7"][0]  # larger nuclei
    assert stats["A549"][1] > stats["MCF-7"][1]  # more elongated


def test_unknown_preset():
    with pytest.raises(CellmorphError, match="unknown BBBC014 preset"):
        generate_bbbc014("/nonexistent", preset="huge", progress=False)


# --------------------------------------------------------------------------- preprocessing recipe
def test_prepare_recipe(b14, tmp_path):
    from cellmorph.cache import TileCache
    from cellmorph.preprocess import prepare

    config = bbbc014_prepare_config()
    assert config.normalize == "none" and tuple(config.tile_grid) == (4, 4) and config.tile_size == 256
    table = load_bbbc014(b14)
    # a few wells of each class and cell line keep the run small
    pick = table.frame.groupby(["Metadata_CellLine", "Metadata_MoA"]).head(2).index
    table = table.subset(table.frame.index.isin(pick))
    summary = prepare(table, tmp_path / "cache", config, progress=False)
    assert summary["n_images"] == 8
    assert summary["n_tiles"] == 8 * 16
    cache = TileCache.open(tmp_path / "cache")
    assert cache.index.groupby("Metadata_ImageID").size().eq(16).all()
    assert set(cache.index["Metadata_Batch"]) == {"MCF-7", "A549"}
    assert cache.tile_shape[1:] == (256, 256)
    tiles = cache.tiles(range(16))
    assert tiles.dtype == np.uint8
    assert tiles[:, :2].max() > 0
    if cache.tile_shape[0] == 3:  # zero third channel (pad_channels)
        assert not tiles[:, 2].any()


# --------------------------------------------------------------------------- bad input
def test_missing_image_names_file_and_row(b14, tmp_path):
    def drop(frame):
        frame.loc[frame["Well"] == "A02", "FileName_FITC"] = str(tmp_path / "gone" / "Channel 1-02-A-02-00.tif")
        return frame

    root = _rewrite_csv(b14, tmp_path / "root", drop)
    with pytest.raises(BadInputError) as err:
        load_bbbc014(root)
    msg = str(err.value)
    assert "Channel 1-02-A-02-00.tif" in msg and "row 3" in msg and "A02" in msg


def test_blank_metadata_cell_names_row(b14, tmp_path):
    def blank(frame):
        frame["CellLine"] = frame["CellLine"].astype(object)
        frame.loc[5, "CellLine"] = ""
        return frame

    root = _rewrite_csv(b14, tmp_path / "root", blank)
    with pytest.raises(BadInputError, match=r"BBBC014_v1_image\.csv: row 7: blank or NaN value in column CellLine"):
        load_bbbc014(root)


def test_other_bad_metadata(b14, tmp_path):
    with pytest.raises(BadInputError, match="file not found"):
        load_bbbc014(tmp_path / "empty")

    def word(frame):
        frame["Concentration"] = frame["Concentration"].astype(object)
        frame.loc[3, "Concentration"] = "high"
        return frame

    with pytest.raises(BadInputError, match="row 5: Concentration 'high' is not a number"):
        load_bbbc014(_rewrite_csv(b14, tmp_path / "a", word))
    with pytest.raises(BadInputError, match="missing column"):
        load_bbbc014(_rewrite_csv(b14, tmp_path / "b", lambda f: f.drop(columns=["Well"])))
    with pytest.raises(BadInputError, match="distinct concentrations"):
        load_bbbc014(_rewrite_csv(b14, tmp_path / "c", lambda f: f[f["Column"] <= 6]))
    with pytest.raises(BadInputError, match="listed twice"):
        load_bbbc014(_rewrite_csv(b14, tmp_path / "d", lambda f: pd.concat([f, f.iloc[[0]]])))


# --------------------------------------------------------------------------- the real download
def _fake_download(b14: Path, dest: Path, dapi_number: int) -> Path:
    """The published BBBC014 layout (BMPs + plate map) made from the synthetic images."""
    from PIL import Image

    wells = pd.read_csv(b14 / IMAGE_CSV)
    images = dest / "BBBC014_v1_images"
    images.mkdir(parents=True)
    for rec in wells.itertuples():
        for ch, number in (("DAPI", dapi_number), ("FITC", 3 - dapi_number)):
            pixels = tifffile.imread(b14 / getattr(rec, f"FileName_{ch}"))
            name = f"Channel {number}-{rec.ImageNumber:02d}-{rec.Row}-{rec.Column:02d}-00.Bmp"
            Image.fromarray(pixels).save(images / name, format="BMP")
    # doses as published: 10^<exponent> g/mL, one line per well after a DESCRIPTION header
    exps = [-7 - 0.5 * k for k in range(11)] + [-13]
    lines = ["DESCRIPTION TNFa g/mL"] + [f"10^{exps[(i - 1) % 12]:g}" for i in range(1, 97)]
    (dest / "BBBC014_v1_platemap_all.txt").write_text("\r\n".join(lines) + "\r\n", encoding="latin-1")
    return dest


@pytest.mark.parametrize("dapi_number", [1, 2])
def test_import_real_layout(b14, tmp_path, dapi_number):
    root = _fake_download(b14, tmp_path / "real", dapi_number)
    summary = import_bbbc014(root)
    assert summary["dapi_channel"] == dapi_number  # detected from the images
    table = load_bbbc014(root)
    f = table.frame
    assert len(f) == 64 and set(f["Metadata_Plate"]) == {"BBBC014"}
    assert f.groupby(["Metadata_CellLine", "Metadata_MoA"]).size().eq(16).all()
    a01 = f[f["Metadata_Well"] == "A01"].iloc[0]
    assert a01["Metadata_Concentration"] == pytest.approx(100.0)  # 10^-7 g/mL in ng/mL
    assert a01["Metadata_MoA"] == POSITIVE and a01["Metadata_CellLine"] == "MCF-7"
    synthetic = load_bbbc014(b14).frame.set_index("Metadata_Well")
    assert np.array_equal(tifffile.imread(a01["Path_DAPI"]), tifffile.imread(synthetic.loc["A01", "Path_DAPI"]))


def test_import_real_layout_errors(b14, tmp_path):
    root = _fake_download(b14, tmp_path / "real", 2)
    (root / "BBBC014_v1_images" / "Channel 1-05-A-05-00.Bmp").unlink()
    with pytest.raises(BadInputError, match="missing image Channel 1-05-A-05-00.Bmp"):
        import_bbbc014(root)
    with pytest.raises(BadInputError, match="file not found"):
        import_bbbc014(tmp_path / "nothing")
