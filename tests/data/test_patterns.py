"""Folders of vendor-named TIFFs (--layout pattern): ImageXpress and Opera/Operetta namings, a user pattern,
unmatched files listed, z-planes projected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data.bbbc021 import load_bbbc021
from cellmorph.data.images import read_planes
from cellmorph.data.patterns import load_pattern, pattern_regex
from cellmorph.data.platemap import write_plate_map
from cellmorph.data.table import channel_column
from tests.conftest import one_line_error, run_cli_here

CHANNEL_NUMBER = {"DAPI": 1, "Tubulin": 2, "Actin": 3}


@pytest.fixture(scope="module")
def screen(tiny_screen):
    return load_bbbc021(tiny_screen, tiny_screen)


def _site_rank(table):
    frame = table.frame.assign(rank=table.frame.groupby(["Metadata_Plate", "Metadata_Well"])["Metadata_Site"]
                               .rank(method="first").astype(int))
    return {(r.Metadata_Plate, r.Metadata_Well, r.rank): r for r in frame.itertuples(index=False)}


@pytest.fixture(scope="module")
def imagexpress(screen, tmp_path_factory):
    """The tiny screen as an ImageXpress export: PLATE/B03_s1_w1.tif, …, a thumbnail beside each first channel."""
    root = tmp_path_factory.mktemp("ixm")
    for row in screen.frame.itertuples(index=False):
        rank = int(row.Metadata_Site)
        for name, number in CHANNEL_NUMBER.items():
            target = root / row.Metadata_Plate / f"{row.Metadata_Well}_s{rank}_w{number}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(getattr(row, channel_column(name)), target)
        (root / row.Metadata_Plate / f"{row.Metadata_Well}_s{rank}_w1_thumb.tif").write_bytes(b"")
    write_plate_map(screen, root / "platemap.csv")
    return root


def test_an_imagexpress_folder_reads_as_the_screen_it_was_exported_from(imagexpress, screen):
    table = load_pattern(imagexpress, "imagexpress", imagexpress / "platemap.csv", channels="1=DAPI,2=Tubulin,3=Actin")
    assert table.channels == ("DAPI", "Tubulin", "Actin")
    assert table.summary() | {"excluded_compounds": {}} == screen.summary() | {"excluded_compounds": {}}
    assert "match no pattern" in table.notes["unmatched_files"] and "_thumb.tif" in table.notes["unmatched_files"]
    twins = _site_rank(screen)
    for row in list(_site_rank(table).items())[::9]:
        key, ours = row
        np.testing.assert_array_equal(read_planes(table, pd.Series(ours._asdict())),
                                      read_planes(screen, pd.Series(twins[key]._asdict())))


def test_inspect_and_prepare_list_the_files_no_pattern_matched(imagexpress, tmp_path):
    args = ["--layout", "pattern", "--root", imagexpress, "--pattern", "imagexpress", "--plate-map",
            imagexpress / "platemap.csv", "--channels", "DAPI,Tubulin,Actin"]
    proc = run_cli_here("inspect", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_treatments"] == 44
    assert "100 image file(s) match no pattern and are not read" in proc.stderr
    proc = run_cli_here("prepare", *args, "--out", tmp_path / "cache", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_images"] == 100 and "match no pattern" in proc.stderr


def test_an_opera_export_numbers_its_rows_and_projects_its_planes(screen, tmp_path):
    """r02c03 is well B03; two planes of a channel become their maximum."""
    root = tmp_path / "opera"
    first = screen.frame.iloc[0]
    plate = root / first.Metadata_Plate / "Images"
    plate.mkdir(parents=True)
    row, col = ord(first.Metadata_Well[0]) - ord("A") + 1, int(first.Metadata_Well[1:])
    planes = {}
    for name, number in CHANNEL_NUMBER.items():
        low = tifffile.imread(first[channel_column(name)])
        high = low[::-1].copy()  # another plane: the field upside down
        for p, pixels in ((1, low), (2, high)):
            tifffile.imwrite(plate / f"r{row:02d}c{col:02d}f01p{p:02d}-ch{number}sk1fk1fl1.tiff", pixels)
        planes[name] = np.maximum(low, high)
    (plate / "Index.idx.xml").write_text("<xml/>")
    (plate / "r01c01f01p01-ch1.png").write_bytes(b"")  # not a TIFF: not listed either
    plate_map = tmp_path / "map.csv"
    plate_map.write_text(f"Metadata_Plate,Metadata_Well,Metadata_Compound,Metadata_Concentration,Metadata_MoA\n"
                         f"{first.Metadata_Plate},{first.Metadata_Well},x,1,y\n")
    pattern = "{plate}/Images/r{row:02d}c{col:02d}f{field:02d}p{plane:02d}-ch{channel:d}sk{any}.tiff"
    for given in ("opera", pattern):
        table = load_pattern(root, given, plate_map, channels="1=DAPI,2=Tubulin,3=Actin")
        assert table.frame[["Metadata_Well", "Metadata_Site"]].values.tolist() == [[first.Metadata_Well, 1]]
        np.testing.assert_array_equal(read_planes(table, table.frame.iloc[0]),
                                      np.stack([planes[n] for n in ("DAPI", "Tubulin", "Actin")]))
        assert "unmatched_files" not in table.notes


def test_bad_patterns_and_folders_are_one_line(imagexpress, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(imagexpress, broken)
    victim = next(broken.glob("*/B03_s1_w2.tif"))
    victim.unlink()
    lettered = tmp_path / "lettered" / "P1"
    lettered.mkdir(parents=True)
    (lettered / "B03_sa_w1.tif").write_bytes(b"")
    base = ["inspect", "--layout", "pattern", "--root"]
    plate_map = ["--plate-map", imagexpress / "platemap.csv"]
    cases = [
        (base + [broken, "--pattern", "imagexpress", *plate_map], ("B03 field 1", "no file of channel ch2")),
        (base + [imagexpress, "--pattern", "{plate}/{wel}_s{site}_w{channel}.tif", *plate_map], ("unknown field {wel}",)),
        (base + [imagexpress, "--pattern", "{plate}/{well}_s{site}.tif", *plate_map], ("needs a {channel} field",)),
        (base + [imagexpress, "--pattern", "{plate}/{well}_w{channel}.png", *plate_map], ("no file matches",)),
        (base + [imagexpress, "--pattern", "imagexpress", *plate_map, "--channels", "DAPI,Actin"],
         ("2 name(s) for the files' 3 channel(s)",)),
        (base + [imagexpress, *plate_map], ("--pattern",)),
        (base + [tmp_path / "lettered", "--pattern", "{plate}/{well}_s{site}_w{channel}.tif", *plate_map],
         ("B03_sa_w1.tif", "site (field) 'a' is not a number")),
        (base + [imagexpress, "--pattern", "imagexpress"], ("no compound and concentration", "--plate-map")),
        (["inspect", "--layout", "crops", "--index", imagexpress / "platemap.csv", "--pattern", "opera"],
         ("--pattern", "--layout pattern")),
    ]
    for args, needles in cases:
        one_line_error(run_cli_here(*args), *needles)


def test_the_presets_match_the_vendors_names_and_nothing_else():
    ixm, opera = pattern_regex("imagexpress"), pattern_regex("opera")
    assert ixm.match("P1/B03_s2_w1.tif").groupdict() == {"plate": "P1", "well": "B03", "site": "2", "channel": "1"}
    assert ixm.match("P1/B03_s2_w1_thumb.tif") is None
    found = opera.match("P1/r02c11f03p01-ch4sk1fk1fl1.tiff").groupdict()
    assert (found["row"], found["col"], found["field"], found["channel"]) == ("02", "11", "03", "4")
    assert opera.match("P1/r2c11f03p01-ch4sk1fk1fl1.tiff") is None
