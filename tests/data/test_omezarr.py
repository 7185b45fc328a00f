"""OME-Zarr HCS plates: read lazily by name, in NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3), through prepare → cv → predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import QUICK_TRAIN, one_line_error, run_cli_here

pytest.importorskip("ome_zarr")
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

from cellmorph.data.bbbc021 import load_bbbc021
from cellmorph.data.images import read_planes
from cellmorph.data.omezarr import load_ome_zarr, write_hcs_plates
from cellmorph.data.platemap import write_plate_map

VERSIONS = ("0.4", "0.5")


@pytest.fixture(scope="module", params=VERSIONS)
def tiny_plates(request, tiny_screen, tmp_path_factory):
    """The tiny synthetic screen as HCS plates of one NGFF version, written by ome-zarr-py, and its plate map."""
    out = tmp_path_factory.mktemp(f"plates{request.param}")
    table = load_bbbc021(tiny_screen, tiny_screen)
    write_hcs_plates(table, out, version=request.param)
    write_plate_map(table, out / "platemap.csv")
    plate = next(out.glob("*.ome.zarr"))
    if request.param == "0.4":  # Zarr v2: the plate metadata in .zattrs
        assert json.loads((plate / ".zattrs").read_text())["plate"]["version"] == "0.4"
    else:  # Zarr v3: in zarr.json, under "ome"
        assert json.loads((plate / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    return out


def _fields_by_well(table):
    """Each field's row, keyed by (plate, well, rank of the site in its well): TIFF sites count from 1, NGFF fields from 0."""
    frame = table.frame.assign(rank=table.frame.groupby(["Metadata_Plate", "Metadata_Well"])["Metadata_Site"].rank(method="first"))
    return {(r.Metadata_Plate, r.Metadata_Well, int(r.rank)): r for r in frame.itertuples(index=False)}


def test_plates_of_both_versions_hold_the_screens_fields_pixel_for_pixel(tiny_plates, tiny_screen):
    tiffs = load_bbbc021(tiny_screen, tiny_screen)
    plates = load_ome_zarr([tiny_plates], tiny_plates / "platemap.csv")
    assert plates.channels == tiffs.channels == ("DAPI", "Tubulin", "Actin")
    assert plates.summary() | {"excluded_compounds": {}} == tiffs.summary() | {"excluded_compounds": {}}
    by_well = _fields_by_well(tiffs)
    for row in list(plates.frame.itertuples(index=False))[::7]:
        twin = by_well[(row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site + 1)]
        assert (row.Metadata_Compound, row.Metadata_Concentration, row.Metadata_MoA) == \
            (twin.Metadata_Compound, twin.Metadata_Concentration, twin.Metadata_MoA)
        np.testing.assert_array_equal(read_planes(plates, pd.Series(row._asdict())),
                                      read_planes(tiffs, pd.Series(twin._asdict())))


def test_a_coarser_level_and_a_channel_subset_are_read_by_name(tiny_plates):
    full = load_ome_zarr([tiny_plates], tiny_plates / "platemap.csv")
    half = load_ome_zarr([tiny_plates], tiny_plates / "platemap.csv", channels=["Actin", "DAPI"], level=1)
    row = full.frame.iloc[0]
    pixels, coarse = read_planes(full, row), read_planes(half, half.frame.iloc[0])
    assert half.channels == ("Actin", "DAPI")
    assert coarse.shape == (2, pixels.shape[1] // 2, pixels.shape[2] // 2)
    assert abs(float(coarse[1].mean()) - float(pixels[0].mean())) < 0.05 * float(pixels[0].mean())  # DAPI, halved


def _hand_made_plate(path, fmt, with_attributes=True):
    """A plate as an imaging facility writes it with ome-zarr-py: t, c, z, y, x axes, a z-stack of 3, four named
    channels in another order than cellmorph's, treatments in the wells' own attributes, two wells of two fields."""
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["A"], ["1", "2"], ["A/1", "A/2"], fmt=fmt, name="Facility_P1")
    stacks = {}
    for column, compound in (("1", "DMSO"), ("2", "taxol")):
        well = root.require_group("A").require_group(column)
        write_well_metadata(well, ["0", "1"], fmt=fmt)
        if with_attributes:
            well.attrs.update({"Metadata_Compound": compound, "Metadata_Concentration": 0.0 if compound == "DMSO" else 1.0,
                               "Metadata_MoA": "DMSO" if compound == "DMSO" else "Microtubule stabilizers"})
        for field in ("0", "1"):
            stack = rng.integers(100, 4000, size=(1, 4, 3, 40, 48), dtype=np.uint16)
            stacks[(column, field)] = stack
            channels = [{"label": n, "color": "FFFFFF", "window": {"min": 0, "max": 65535, "start": 0, "end": 4000}}
                        for n in ("Tubulin", "Mito", "DAPI", "Actin")]
            write_image(stack, well.require_group(field), scale_factors=[], axes="tczyx", fmt=fmt,
                        omero={"channels": channels})
    return stacks


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=VERSIONS)
def test_a_facility_plate_is_read_by_channel_name_with_its_stack_projected(tmp_path, fmt):
    stacks = _hand_made_plate(tmp_path / "P1.zarr", fmt)
    table = load_ome_zarr([tmp_path / "P1.zarr"], channels=["DAPI", "Tubulin", "Actin"])
    assert table.frame["Metadata_Plate"].unique().tolist() == ["Facility_P1"]
    assert sorted(table.frame["Metadata_Well"].unique()) == ["A01", "A02"]
    assert table.frame.groupby("Metadata_Well")["Metadata_Compound"].first().to_dict() == {"A01": "DMSO", "A02": "taxol"}
    assert table.frame["Metadata_IsControl"].sum() == 2
    row = table.frame[(table.frame["Metadata_Well"] == "A02") & (table.frame["Metadata_Site"] == 1)].iloc[0]
    expected = stacks[("2", "1")][0].max(axis=1)[[2, 0, 3]]  # DAPI, Tubulin, Actin of Tubulin, Mito, DAPI, Actin
    np.testing.assert_array_equal(read_planes(table, row), expected)


def test_the_plate_map_overrides_well_attributes_and_names_wells_however_written(tmp_path):
    _hand_made_plate(tmp_path / "P1.zarr", FormatV05())
    plate_map = tmp_path / "map.csv"
    plate_map.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound,Metadata_Concentration,Metadata_MoA\n"
                         "Facility_P1,a1,DMSO,0,DMSO\nFacility_P1,A002,nocodazole,3,Microtubule destabilizers\n")
    table = load_ome_zarr([tmp_path / "P1.zarr"], plate_map, channels=["DAPI", "Tubulin", "Actin"])
    assert table.frame.groupby("Metadata_Well")["Metadata_MoA"].first().to_dict() == \
        {"A01": "DMSO", "A02": "Microtubule destabilizers"}


def test_bad_plates_and_plate_maps_are_one_line_naming_what_is_wrong(tmp_path, tiny_plates):
    _hand_made_plate(tmp_path / "P1.zarr", FormatV05(), with_attributes=False)
    (tmp_path / "empty").mkdir()
    partial = tmp_path / "partial.csv"
    partial.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound,Metadata_Concentration\nFacility_P1,A01,DMSO,0\n")
    bad_well = tmp_path / "bad_well.csv"
    bad_well.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound,Metadata_Concentration\nFacility_P1,A1x,DMSO,0\n")
    plate = ["--layout", "ome-zarr", "--root", tmp_path / "P1.zarr"]
    cases = [
        (plate, ("A02", "no compound and concentration", "--plate-map")),
        (plate + ["--plate-map", partial], ("partial.csv", "1 imaged well", "A02")),
        (plate + ["--plate-map", bad_well], ("bad_well.csv", "row 2", "A1x")),
        (plate + ["--plate-map", partial, "--channels", "DAPI,Nucleoli"], ("no channel named Nucleoli", "Mito")),
        (["--layout", "ome-zarr", "--root", tmp_path / "empty"], ("empty", "nor a folder holding any")),
        (["--layout", "ome-zarr"], ("--root",)),
        (["--layout", "ome-zarr", "--root", tiny_plates, "--plate-map", tiny_plates / "platemap.csv", "--level", "5"],
         ("--level 5", "pyramid level")),
        (["--layout", "bbbc021", "--root", tiny_plates, "--plate-map", partial], ("--plate-map", "ome-zarr")),
    ]
    for args, needles in cases:
        one_line_error(run_cli_here("inspect", *args), *needles)


def test_a_plate_whose_field_array_is_gone_names_it(tmp_path):
    import shutil

    _hand_made_plate(tmp_path / "P1.zarr", FormatV04())
    shutil.rmtree(tmp_path / "P1.zarr" / "A" / "2" / "1" / "s0")
    proc = run_cli_here("prepare", "--layout", "ome-zarr", "--root", tmp_path / "P1.zarr", "--channels",
                        "DAPI,Tubulin,Actin", "--out", tmp_path / "cache", "--no-progress")
    one_line_error(proc, "A/2/1/s0", "missing image")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_prepare_cv_and_predict_run_from_plates_as_from_tiffs(tiny_plates, tiny_cache, tiny_bundle, tmp_path):
    """prepare writes the TIFF route's tiles byte for byte; cv runs on them; predict on the plates calls
    what it calls on the TIFF cache."""
    args = ["--layout", "ome-zarr", "--root", tiny_plates, "--plate-map", tiny_plates / "platemap.csv"]
    proc = run_cli_here("prepare", *args, "--out", tmp_path / "cache", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = (pd.read_parquet(c / "index.parquet") for c in (tmp_path / "cache", tiny_cache))
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Tile"]
    for frame in (ours, theirs):
        frame["rank"] = frame.groupby(keys)["Metadata_Site"].rank(method="first")
    pairs = ours.merge(theirs, on=keys + ["rank"], suffixes=("_zarr", "_tiff"))
    assert len(pairs) == len(ours) == len(theirs)
    for plate, part in pairs.groupby("Metadata_Plate"):
        a = np.load(tmp_path / "cache" / "plates" / f"{plate}.npy", mmap_mode="r")
        b = np.load(tiny_cache / "plates" / f"{plate}.npy", mmap_mode="r")
        np.testing.assert_array_equal(a[part["Metadata_PlateOffset_zarr"].to_numpy()],
                                      b[part["Metadata_PlateOffset_tiff"].to_numpy()])
    proc = run_cli_here("cv", "--data", tmp_path / "cache", *QUICK_TRAIN, "--cv", "group-kfold:2",
                        "--out", tmp_path / "run", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_treatments"] == 44
    proc = run_cli_here("predict", "--model", tiny_bundle, *args, "--out", tmp_path / "pred", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--out", tmp_path / "ref", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    zarr_calls, tiff_calls = (pd.read_parquet(p / "treatments.parquet").sort_values(["Metadata_Compound",
                              "Metadata_Concentration"]).reset_index(drop=True) for p in (tmp_path / "pred", tmp_path / "ref"))
    probs = [c for c in tiff_calls.columns if c.startswith("prob_")]
    np.testing.assert_allclose(zarr_calls[probs].to_numpy(), tiff_calls[probs].to_numpy(), atol=1e-6)


def test_synth_writes_plates_and_a_plate_map_that_inspect_reads(tmp_path):
    proc = run_cli_here("synth", tmp_path / "plates", "--format", "ome-zarr", "--ngff-version", "0.4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ngff_version"] == "0.4" and len(summary["plates"]) == summary["n_plates"] == 4
    assert not (tmp_path / "plates" / ".synthetic-tiff").exists()
    proc = run_cli_here("inspect", "--layout", "ome-zarr", "--root", tmp_path / "plates", "--plate-map",
                        tmp_path / "plates" / "platemap.csv", "--json")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert (counts["n_treatments"], counts["n_plates"], counts["n_moas"]) == (summary["n_treatments"], 4, 12)


@pytest.mark.slow
@pytest.mark.parametrize("tiny_plates", ["0.5"], indirect=True)  # reading 0.4 is the same code, tested above
def test_embed_takes_plates_as_it_takes_their_cache(tiny_plates, tiny_cache, tmp_path):
    """embed --layout ome-zarr prepares the plates with the layout's defaults, then embeds: the well profiles
    of the TIFF route's cache, well for well."""
    options = ["--image-size", "32", "--threads", "1", "--no-progress"]
    proc = run_cli_here("embed", "--layout", "ome-zarr", "--root", tiny_plates, "--plate-map",
                        tiny_plates / "platemap.csv", "--out", tmp_path / "plates", *options)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plates" / "cache" / "manifest.json").is_file()
    proc = run_cli_here("embed", "--data", tiny_cache, "--out", tmp_path / "tiffs", *options)
    assert proc.returncode == 0, proc.stderr
    keys = ["Metadata_Plate", "Metadata_Well"]
    ours, theirs = (pd.read_parquet(tmp_path / p / "wells.parquet").sort_values(keys).reset_index(drop=True)
                    for p in ("plates", "tiffs"))
    features = [c for c in theirs.columns if c.startswith("emb_")]
    assert ours[keys].equals(theirs[keys])
    np.testing.assert_allclose(ours[features].to_numpy(), theirs[features].to_numpy(), rtol=1e-5, atol=1e-6)
    one_line_error(run_cli_here("embed", "--layout", "ome-zarr", "--root", tiny_plates, "--plate-map",
                                tiny_plates / "platemap.csv"), "--out")
    one_line_error(run_cli_here("embed"), "--data", "--layout")
