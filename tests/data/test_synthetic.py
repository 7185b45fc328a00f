"""The synthetic BBBC021 generator: layout, loader round trip, structure, determinism, dose response."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data import synthetic as syn
from cellmorph.data.bbbc021 import IMAGE_COLUMNS, IMAGE_CSV, MOA_COLUMNS, MOA_CSV, load_bbbc021
from cellmorph.errors import CellmorphError
from tests.conftest import one_line_error, run_cli_here

UUID = r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"
FILE_RE = re.compile(r"^([B-G](?:0[2-9]|1[01]))_s(\d+)_(w[124])(" + UUID + r")\.tif$")
PATH_RE = re.compile(r"^(Week\d+)/(\1_\d{5})$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    summary = syn.generate_bbbc021(out, "tiny", seed=0, progress=True, workers=1)
    return out, summary


def _treatment_key(frame: pd.DataFrame) -> pd.Series:
    return frame["Image_Metadata_Compound"] + "@" + frame["Image_Metadata_Concentration"].astype(str)


# -- tiny: files, CSVs, loader -------------------------------------------------


def test_tiny_csvs_have_official_columns(tiny):
    out, summary = tiny
    images = pd.read_csv(out / IMAGE_CSV)
    assert tuple(images.columns) == IMAGE_COLUMNS
    assert (out / IMAGE_CSV).read_text().splitlines()[0] == ",".join(IMAGE_COLUMNS)
    moa = pd.read_csv(out / MOA_CSV)
    assert tuple(moa.columns) == MOA_COLUMNS
    dmso = moa[moa["compound"] == "DMSO"]
    assert len(dmso) == 1 and dmso["moa"].iloc[0] == "DMSO" and dmso["concentration"].iloc[0] == 0.0
    treated = images[images["Image_Metadata_Compound"] != "DMSO"]
    assert len(moa) - 1 == treated.groupby(["Image_Metadata_Compound", "Image_Metadata_Concentration"]).ngroups
    assert treated["Image_Metadata_Compound"].str.match(r"^syn-[A-Z0-9]{3}-\d+$").all()
    assert summary["n_images"] == len(treated)
    assert summary["n_control_images"] == len(images) - len(treated)
    assert summary["n_plates"] == images["Image_Metadata_Plate_DAPI"].nunique()
    assert summary["n_compounds"] == treated["Image_Metadata_Compound"].nunique()
    assert summary["seconds"] >= 0  # recorded, never bounded here: timings belong in benchmarks/


def test_tiny_names_paths_and_tiffs(tiny):
    out, _ = tiny
    images = pd.read_csv(out / IMAGE_CSV)
    spec = syn.PRESETS["tiny"]
    for _, row in images.iterrows():
        path = row["Image_PathName_DAPI"]
        m = PATH_RE.match(path)
        assert m, path
        assert m.group(2) == row["Image_Metadata_Plate_DAPI"]
        assert row["TableNumber"] == int(m.group(1)[4:])
        for ch, code in syn.CHANNEL_CODES.items():
            assert row[f"Image_PathName_{ch}"] == path
            fm = FILE_RE.match(row[f"Image_FileName_{ch}"])
            assert fm, row[f"Image_FileName_{ch}"]
            assert fm.group(1) == row["Image_Metadata_Well_DAPI"] and fm.group(3) == code
            assert (out / path / row[f"Image_FileName_{ch}"]).is_file()
    # every TIFF: 16-bit single channel of the preset's size, values like real microscopy
    medians = []
    for tif in sorted(out.glob("Week*/*/*.tif")):
        img = tifffile.imread(tif)
        assert img.dtype == np.uint16 and img.shape == (spec.height, spec.width)
        medians.append(np.median(img))
    assert len(medians) == 3 * len(images)
    assert 100 < min(medians) and max(medians) < 5000
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # no temporaries left
    # the CSVs are written after every image
    last_tiff = max(p.stat().st_mtime_ns for p in out.glob("Week*/*/*.tif"))
    assert (out / IMAGE_CSV).stat().st_mtime_ns >= last_tiff


def test_tiny_loads_with_the_bbbc021_loader(tiny):
    out, summary = tiny
    table = load_bbbc021(out, out)
    frame = table.frame
    treated = table.treated
    assert set(treated["Metadata_MoA"]) == set(syn.MOA_NAMES)
    assert (treated.groupby("Metadata_MoA")["Metadata_Compound"].nunique() >= 2).all()
    controls = table.controls
    assert set(controls["Metadata_Plate"]) == set(frame["Metadata_Plate"])
    assert len(frame) == summary["n_images"] + summary["n_control_images"]
    assert table.summary()["n_treatments"] == summary["n_treatments"]
    for ch in table.channels:
        assert frame[f"Path_{ch}"].map(lambda p: Path(p).is_file()).all()


def test_tiny_replicates_on_different_plates(tiny):
    out, _ = tiny
    images = pd.read_csv(out / IMAGE_CSV)
    treated = images[images["Image_Metadata_Compound"] != "DMSO"]
    per = treated.groupby(_treatment_key(treated))
    assert (per["Image_Metadata_Plate_DAPI"].nunique() >= 2).all()
    assert (per["Image_Metadata_Plate_DAPI"].nunique() == per["Replicate"].nunique()).all()


# -- determinism ---------------------------------------------------------------


def test_same_seed_same_bytes_independent_of_workers(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    syn.generate_bbbc021(again, "tiny", seed=0, progress=False, workers=2)
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_different_seed_differs(tiny):
    out, _ = tiny
    a = syn.build_plate_map("tiny", 0)
    b = syn.build_plate_map("tiny", 1)
    assert not a[list(IMAGE_COLUMNS)].equals(b[list(IMAGE_COLUMNS)])
    assert pd.read_csv(out / IMAGE_CSV).equals(a[list(IMAGE_COLUMNS)].reset_index(drop=True))
    # same plate, well and site under another seed: other pixels
    job0 = syn._jobs(syn.PRESETS["tiny"], 0, a)[0]
    job1 = dict(job0, seed=1)
    assert not np.array_equal(syn.render_job(job0), syn.render_job(job1))
    assert np.array_equal(syn.render_job(job0), syn.render_job(dict(job0)))


# -- structure of mini and full (no rendering) ---------------------------------


def _table1_images_per_compound() -> dict[str, int]:
    return {
        f"syn-{syn.MOA_CODES[moa]}-{j + 1}": n_img
        for moa, entries in syn.TABLE1.items()
        for j, (_, n_img) in enumerate(entries)
    }


@pytest.mark.parametrize("preset", ["mini", "full"])
def test_table1_structure(preset):
    spec = syn.PRESETS[preset]
    pm = syn.build_plate_map(preset, 0)
    treated = pm[pm["Image_Metadata_Compound"] != "DMSO"]
    assert treated["Image_Metadata_Compound"].nunique() == 38
    assert treated.groupby(["Image_Metadata_Compound", "Image_Metadata_Concentration"]).ngroups == 103
    assert set(treated["moa"]) == set(syn.MOA_NAMES) and len(syn.MOA_NAMES) == 12
    expected = {k: v * spec.sites // syn.TABLE1_SITES for k, v in _table1_images_per_compound().items()}
    assert treated.groupby("Image_Metadata_Compound").size().to_dict() == expected
    n_conc = treated.groupby("Image_Metadata_Compound")["Image_Metadata_Concentration"].nunique().to_dict()
    assert n_conc == {
        f"syn-{syn.MOA_CODES[moa]}-{j + 1}": c for moa, e in syn.TABLE1.items() for j, (c, _) in enumerate(e)
    }
    if preset == "full":
        assert len(treated) == 1208 and spec.sites == 4 and (spec.height, spec.width) == (1024, 1280)
    # replicate wells of a treatment on different plates, one well per plate
    wells = treated.drop_duplicates(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"])
    per = wells.groupby(_treatment_key(wells))
    assert (per.size() == per["Image_Metadata_Plate_DAPI"].nunique()).all()
    assert set(per.size()) == {2, 3}
    assert (per["Replicate"].nunique() == per.size()).all()
    # DMSO on every plate; no well holds two things; wells in rows B-G, columns 02-11
    dmso = pm[pm["Image_Metadata_Compound"] == "DMSO"]
    assert set(dmso["Image_Metadata_Plate_DAPI"]) == set(pm["Image_Metadata_Plate_DAPI"])
    assert (dmso.groupby("Image_Metadata_Plate_DAPI")["Image_Metadata_Well_DAPI"].nunique() == spec.dmso_wells).all()
    assert pm["Image_Metadata_Well_DAPI"].str.match(r"^[B-G](0[2-9]|1[01])$").all()
    content = pm.groupby(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"])
    assert (content.apply(lambda g: _treatment_key(g).nunique()) == 1).all()
    assert not pm.duplicated(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "site"]).any()
    assert pm["Image_Metadata_Plate_DAPI"].nunique() == spec.n_plates
    assert pm["week"].nunique() == spec.n_weeks


def test_compounds_agree_across_presets():
    full = {c.name: c for c in syn.compound_catalogue("full", 3)}
    for c in syn.compound_catalogue("tiny", 3):
        ref = full[c.name]
        assert c.moa == ref.moa and c.ec50 == ref.ec50 and c.knobs == ref.knobs
        assert set(c.concentrations) <= set(ref.concentrations)


# -- dose response and phenotype -----------------------------------------------


def test_strength_is_monotone_in_concentration():
    for comp in syn.compound_catalogue("full", 0):
        concs = sorted(comp.concentrations)
        s = [comp.strength(c) for c in concs]
        assert all(0 < v < 1 for v in s)
        assert all(b > a for a, b in zip(s, s[1:])), comp.name
        ladder = np.logspace(-4, 3, 50)
        assert np.all(np.diff(syn.phenotype_strength(ladder, comp.ec50, comp.hill, comp.emax)) > 0)
    assert syn.phenotype_strength(0.0, 1.0, 1.5) == 0.0
    pm = syn.build_plate_map("mini", 0)
    for _, g in pm[pm["Image_Metadata_Compound"] != "DMSO"].groupby("Image_Metadata_Compound"):
        per = g.groupby("Image_Metadata_Concentration")["strength"].first().sort_index()
        assert per.is_monotonic_increasing
    assert (pm.loc[pm["Image_Metadata_Compound"] == "DMSO", "strength"] == 0).all()



def test_annotated_concentrations_show_a_clear_phenotype():
    # BBBC021 annotates only compound-concentrations that clearly have their MoA, so none
    # of a compound's annotated concentrations may sit below its EC50 (a faint phenotype).
    for comp in syn.compound_catalogue("full", 0):
        assert comp.ec50 <= min(comp.concentrations), comp.name
        assert comp.strength(min(comp.concentrations)) >= 0.5 * comp.emax, comp.name

def _field(moa: str | None, strength: float, seed: int):
    spec = syn.PRESETS["mini"]
    if moa is None:
        knobs, kind = {}, "scattered"
    else:
        comp = next(c for c in syn.compound_catalogue("mini", 0) if c.moa == moa)
        knobs, kind = comp.knobs, comp.arrest_kind
    return syn.render_field(
        knobs, kind, strength, syn._plate_params(0, 1, 20001), np.random.default_rng(seed),
        spec.height, spec.width, spec.scale, syn._texture_bank(0, spec.height, spec.width, spec.scale),
        return_truth=True,
    )


def test_phenotype_follows_dose():
    """Eg5 inhibition arrests cells in mitosis in proportion to strength; DMSO hardly."""

    def arrested(moa, strength):
        counts = [(_field(moa, strength, s)[1]["state"] == 2).mean() for s in range(3)]
        return float(np.mean(counts))

    assert arrested(None, 0.0) == 0.0
    low, high = arrested("Eg5 inhibitors", 0.1), arrested("Eg5 inhibitors", 1.0)
    assert low < 0.15 < 0.3 < high
    img, truth = _field("Eg5 inhibitors", 1.0, 0)
    assert img.dtype == np.uint16 and img.shape == (3, 256, 320)
    assert 0 < truth["labels"].max() <= truth["n_cells"]


# -- errors ----------------------------------------------------------------------


def test_unknown_preset_raises(tmp_path):
    with pytest.raises(CellmorphError, match="tiny.*mini.*full"):
        syn.generate_bbbc021(tmp_path / "x", "huge", progress=False)
    with pytest.raises(CellmorphError, match="valid presets"):
        syn.build_plate_map("Tiny")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dataset", ["bbbc021", "bbbc014"])
@pytest.mark.parametrize("kind", ["existing file", "under a file", "under /proc"])
def test_synth_refuses_an_unusable_out(dataset, kind, tmp_path):
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("keep me\n")
    out = {"existing file": a_file, "under a file": a_file / "sub", "under /proc": Path("/proc/cellmorph-test/out")}[kind]
    line = one_line_error(run_cli_here("synth", out, "--dataset", dataset), str(out))
    assert ("is an existing file, not a folder" if kind == "existing file" else "cannot write the output folder") in line
    assert a_file.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt"]
    assert not Path("/proc/cellmorph-test").exists()
