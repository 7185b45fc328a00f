"""The tile cache format: cache.py writes and reads it; damaged caches fail as one line naming the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmorph import cache as C
from cellmorph import preprocess
from cellmorph.cache import TileCache
from cellmorph.data.bbbc021 import load_bbbc021
from cellmorph.errors import CellmorphError
from cellmorph.preprocess import PrepareConfig, prepare
from tests.conftest import one_line_error, run_cli_here


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A private copy of the tiny cache that a test may damage."""
    return Path(shutil.copytree(tiny_cache, tmp_path / "cache"))


def _first_plate(root: Path) -> Path:
    return sorted((root / C.PLATES_DIR).glob("*.npy"))[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_preprocess_uses_the_format_cache_owns():
    for name in ("CACHE_FORMAT", "finished_plate", "write_plate", "write_index_and_manifest", "write_norm_stats"):
        assert getattr(preprocess, name) is getattr(C, name)


def test_the_on_disk_layout_is_unchanged(tiny_cache):
    root = Path(tiny_cache)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["complete"] is True
    assert list(manifest)[:11] == ["format", "complete", "source", "channels", "tile_shape", "n_tiles", "n_images",
                                   "n_treated_tiles", "n_control_tiles", "n_skipped", "plates"]
    for name in ("index.parquet", "norm_stats.parquet", "norm_stats.parquet.json"):
        assert (root / name).is_file()
    for plate in manifest["plates"]:
        for suffix in (".npy", ".parquet", ".json"):
            assert (root / "plates" / f"{plate}{suffix}").is_file()
        sidecar = json.loads((root / "plates" / f"{plate}.json").read_text())
        # "inputs" (path: [size, mtime_ns] of every file read) is new; "skipped" appears with --skip-bad
        assert set(sidecar) == {"plate", "fingerprint", "n_tiles", "tile_shape", "inputs"}
        assert sidecar["inputs"] and all(
            [Path(p).stat().st_size, Path(p).stat().st_mtime_ns] == stat for p, stat in sidecar["inputs"].items())


def test_a_cache_from_before_excluded_compounds_still_opens(cache_copy):
    path = cache_copy / C.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest.pop("excluded_compounds") == {}
    path.write_text(json.dumps(manifest))
    cache = TileCache(cache_copy)
    assert cache.excluded_compounds == {}
    assert cache.tiles([0, 1]).shape == (2, *cache.tile_shape)


def test_truncated_plate_array_is_one_line_naming_the_file(cache_copy):
    victim = _first_plate(cache_copy)
    _truncate(victim)
    with pytest.raises(CellmorphError) as err:
        TileCache(cache_copy)
    message = str(err.value)
    assert message.startswith(f"{victim}: truncated or damaged plate array")
    assert "rerun `cellmorph prepare`" in message and "\n" not in message


def test_plate_array_of_the_wrong_length_or_missing(cache_copy):
    victim = _first_plate(cache_copy)
    np.save(victim, np.load(victim)[:-1])
    with pytest.raises(CellmorphError, match=f"{victim.name}: plate array holds .* tiles .*rerun `cellmorph prepare`"):
        TileCache(cache_copy)
    victim.unlink()
    with pytest.raises(CellmorphError, match=f"{victim.name}: plate array of the cache is missing"):
        TileCache(cache_copy)


def test_unreadable_manifest_or_index(cache_copy):
    (cache_copy / C.INDEX_FILE).write_bytes(b"not parquet")
    with pytest.raises(CellmorphError, match="index.parquet: unreadable cache index"):
        TileCache(cache_copy)
    (cache_copy / C.MANIFEST_FILE).write_text("{")
    with pytest.raises(CellmorphError, match="manifest.json: unreadable cache manifest"):
        TileCache(cache_copy)


def test_truncated_plate_through_the_cli(cache_copy, tmp_path):
    victim = _first_plate(cache_copy)
    _truncate(victim)
    out = tmp_path / "emb"
    proc = run_cli_here("embed", "--data", cache_copy, "--model", "mobilenetv2_100", "--image-size", "32", "--out", out)
    one_line_error(proc, str(victim), "truncated or damaged plate array", "rerun `cellmorph prepare`")
    assert not out.exists()


def test_rerunning_prepare_rebuilds_a_damaged_plate(tiny_screen, tmp_path):
    table = load_bbbc021(tiny_screen, tiny_screen)
    out = tmp_path / "cache"
    prepare(table, out, PrepareConfig(tile_size=32), progress=False)
    reference = TileCache(out).tiles(np.arange(len(TileCache(out))))
    victim = _first_plate(out)
    untouched = {p: p.stat().st_mtime_ns for p in (out / C.PLATES_DIR).glob("*.npy") if p != victim}
    _truncate(victim)
    prepare(table, out, PrepareConfig(tile_size=32), progress=False)
    np.testing.assert_array_equal(TileCache(out).tiles(np.arange(len(reference))), reference)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # only the damaged plate was redone


# --------------------------------------------------------------------------- plate names as file names (issue 28)
def test_plate_stems_are_flat_reversible_and_keep_ordinary_names():
    from urllib.parse import unquote

    for ordinary in ("Week1_22123", "Week10_40111", "BBBC014", "P-1.2", "a.b"):
        assert C.plate_stem(ordinary) == ordinary  # the file names of earlier releases
    hostile = ["../../../pwned", "a/b", "..", ".", ".hidden", "50%", "x y", "é", "a\\b", "nul\0byte", "A" * 300,
               "A" * 299 + "B", "%2E", "~", "é" * 200]
    stems = [C.plate_stem(name) for name in hostile]
    assert len(set(stems)) == len(hostile)  # every name its own file
    for name, stem in zip(hostile, stems):
        assert re.fullmatch(r"[A-Za-z0-9._%~-]+", stem) and not stem.startswith(".") and len(stem) <= C.MAX_STEM, stem
        assert stem not in (".", "..")
        if "~" not in stem:
            assert unquote(stem) == name
    with pytest.raises(CellmorphError, match="plate name is empty"):
        C.plate_stem("")
    assert C.case_collisions(["Week1_1", "week1_1"]) == ("Week1_1", "week1_1")
    assert C.case_collisions(["Week1_1", "Week1_2"]) is None


def test_a_cache_that_named_plate_files_by_the_raw_plate_still_opens(tiny_screen, tmp_path):
    """Before plate_stem a plate "My plate" was stored as plates/My plate.npy: such a cache still
    opens, and a rerun of prepare rebuilds it under the safe names, removing the old files."""
    from dataclasses import replace

    table = load_bbbc021(tiny_screen, tiny_screen)
    frame = table.frame.copy()
    first = sorted(frame["Metadata_Plate"].unique())[0]
    frame.loc[frame["Metadata_Plate"] == first, "Metadata_Plate"] = "My plate"
    table = replace(table, frame=frame)
    out = tmp_path / "cache"
    prepare(table, out, PrepareConfig(tile_size=16), progress=False)
    reference = TileCache(out).tiles(np.arange(len(TileCache(out))))
    for suffix in (".npy", ".parquet", ".json"):
        (out / "plates" / f"My%20plate{suffix}").rename(out / "plates" / f"My plate{suffix}")
    np.testing.assert_array_equal(TileCache(out).tiles(np.arange(len(reference))), reference)
    prepare(table, out, PrepareConfig(tile_size=16), progress=False)
    names = {p.name for p in (out / "plates").iterdir()}
    assert {"My%20plate.npy", "My%20plate.json", "My%20plate.parquet"} <= names and not any(" " in n for n in names)
    np.testing.assert_array_equal(TileCache(out).tiles(np.arange(len(reference))), reference)


def test_statistics_that_are_not_finite_are_never_reused(cache_copy):
    fingerprint = json.loads((cache_copy / C.STATS_SIDECAR).read_text())["fingerprint"]
    assert C.read_norm_stats(cache_copy, fingerprint) is not None
    stats = pd.read_parquet(cache_copy / C.STATS_FILE)
    stats.loc[2, "std"] = np.inf
    stats.to_parquet(cache_copy / C.STATS_FILE, index=False)
    assert C.read_norm_stats(cache_copy, fingerprint) is None


def test_cache_source_reads_the_layout_from_the_manifest_alone(tiny_cache, tmp_path):
    from cellmorph.cache import TileCache, cache_source

    assert cache_source(tiny_cache) == TileCache(tiny_cache).manifest["source"] == "bbbc021"
    assert cache_source(tmp_path / "missing") is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert cache_source(tmp_path) is None
