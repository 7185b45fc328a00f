"""Preprocessing: transforms, the tile cache, idempotency and every bad-input case via the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.cache import TileCache
from cellmorph.data.bbbc021 import load_bbbc021
from cellmorph.preprocess import (
    PrepareConfig,
    anscombe,
    is_empty_tile,
    prepare,
    resize_tiles,
    split_tiles,
    to_uint8,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellmorph.cli", *args], capture_output=True, text=True)


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- transforms
def test_anscombe_matches_definition():
    x = np.array([0, 1, 10, 65535], dtype=np.uint16)
    np.testing.assert_allclose(anscombe(x), 2 * np.sqrt(x.astype(np.float64) + 3 / 8), rtol=1e-6)


def test_to_uint8_image_scaling_spans_full_range():
    x = np.random.default_rng(0).normal(size=(8, 10, 3)).astype(np.float32)
    y = to_uint8(x, "image")
    assert y.dtype == np.uint8 and y.min() == 0 and y.max() == 255
    fixed = to_uint8(np.full((2, 2, 3), 100.0, np.float32), "fixed", (-2.0, 10.0))
    assert (fixed == 255).all()


def test_split_tiles_2x2_gives_quadrants_in_channel_first_order():
    field = np.arange(1024 * 1280 * 3, dtype=np.uint32).reshape(1024, 1280, 3)
    tiles, where = split_tiles(field, (2, 2))
    assert tiles.shape == (4, 3, 512, 640)
    assert where == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(tiles[3], field[512:, 640:].transpose(2, 0, 1))


def test_empty_tile_filter_and_resize():
    tile = np.zeros((3, 64, 80), np.uint8)
    assert is_empty_tile(tile, 50, 0.002)
    tile[:, :10, :10] = 200
    assert not is_empty_tile(tile, 50, 0.002)
    resized = resize_tiles(np.stack([tile, tile]), 32)
    assert resized.shape == (2, 3, 32, 32) and resized.dtype == np.uint8


# ----------------------------------------------------------------------------- the cache
def test_tiny_cache_contents(tiny_screen, tiny_cache):
    table = load_bbbc021(tiny_screen, tiny_screen)
    cache = TileCache(tiny_cache)
    assert len(cache) == 4 * len(table)
    assert cache.channels == ("DAPI", "Tubulin", "Actin")
    c, h, w = cache.tile_shape
    assert c == 3
    tiles = cache.tiles(np.arange(len(cache)))
    assert tiles.dtype == np.uint8 and tiles.shape == (len(cache), c, h, w)
    assert tiles.std() > 10  # real signal, not a constant
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_MoA", "Metadata_Tile"):
        assert col in cache.index.columns
    assert cache.manifest["provenance"]["packages"]["numpy"]
    stats = cache.norm_stats
    assert set(stats["group"]) == set(table.plates)
    assert not list(Path(tiny_cache).glob("**/.*tmp*"))


def test_prepare_cli_is_idempotent_and_records_provenance(tiny_screen, tmp_path):
    out = tmp_path / "cache"
    first = run_cli("prepare", "--layout", "bbbc021", "--root", str(tiny_screen), "--out", str(out), "--tile-size", "64")
    assert first.returncode == 0, first.stderr
    arrays = sorted((out / "plates").glob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in arrays]
    second = run_cli("prepare", "--layout", "bbbc021", "--root", str(tiny_screen), "--out", str(out), "--tile-size", "64")
    assert second.returncode == 0, second.stderr
    assert [p.stat().st_mtime_ns for p in sorted((out / "plates").glob("*.npy"))] == stamps
    cache = TileCache(out)
    assert cache.tile_shape[1:] == (64, 64)
    assert cache.manifest["config"]["tile_size"] == 64


def test_prepare_resumes_after_a_killed_run(tiny_screen, tmp_path):
    table = load_bbbc021(tiny_screen, tiny_screen)
    out = tmp_path / "cache"
    prepare(table, out, PrepareConfig(), progress=False)
    reference = TileCache(out).tiles(np.arange(8))
    # Simulate an interruption: the index/manifest and one plate are gone.
    (out / "manifest.json").unlink()
    (out / "index.parquet").unlink()
    victim = sorted((out / "plates").glob("*.json"))[0]
    victim.unlink()
    kept = sorted((out / "plates").glob("*.npy"))[-1].stat().st_mtime_ns
    prepare(table, out, PrepareConfig(), progress=False)
    assert sorted((out / "plates").glob("*.npy"))[-1].stat().st_mtime_ns == kept
    np.testing.assert_array_equal(TileCache(out).tiles(np.arange(8)), reference)


def test_prepare_crops_cli(real_crops, tmp_path):
    proc = run_cli("prepare", "--layout", "crops", "--index", str(real_crops), "--out", str(tmp_path / "c"),
                   "--normalize", "batch")
    assert proc.returncode == 0, proc.stderr
    assert TileCache(tmp_path / "c").tile_shape == (3, 68, 68)


# ----------------------------------------------------------------------------- bad input
def _image_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "BBBC021_v1_image.csv")


def _first_treated(root: Path) -> tuple[int, Path]:
    images = _image_csv(root)
    pos = int(np.flatnonzero((images["Image_Metadata_Compound"] != "DMSO").to_numpy())[0])
    row = images.iloc[pos]
    return pos, root / row["Image_PathName_Actin"] / row["Image_FileName_Actin"]


def _prepare_cli(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("prepare", "--layout", "bbbc021", "--root", str(root), "--out", str(out), *extra)


def test_missing_image(tiny_copy, tmp_path):
    _, path = _first_treated(tiny_copy)
    path.unlink()
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, str(path), "missing image")
    assert not (tmp_path / "cache").exists()


def test_corrupt_truncated_tiff(tiny_copy, tmp_path):
    _, path = _first_treated(tiny_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, str(path), "corrupt or truncated TIFF")
    assert not (tmp_path / "cache").exists()


def test_wrong_shape(tiny_copy, tmp_path):
    _, path = _first_treated(tiny_copy)
    good = tifffile.imread(path)
    tifffile.imwrite(path, np.zeros((good.shape[0] // 2, good.shape[1]), np.uint16))
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, str(path))
    assert not (tmp_path / "cache").exists()


def test_wrong_channel_count(tiny_copy, tmp_path):
    _, path = _first_treated(tiny_copy)
    good = tifffile.imread(path)
    tifffile.imwrite(path, np.zeros((*good.shape, 3), np.uint16), photometric="rgb")
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, str(path), "single-channel")
    assert not (tmp_path / "cache").exists()


def test_wrong_channel_count_in_a_crop(real_crops, tmp_path):
    index = pd.read_csv(real_crops).head(40)
    for name in index["FileName"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / name, np.load(real_crops.parent / name))
    bad = tmp_path / index["FileName"].iloc[3]
    np.save(bad, np.load(bad)[..., :2])
    index.to_csv(tmp_path / "index.csv", index=False)
    proc = run_cli("prepare", "--layout", "crops", "--index", str(tmp_path / "index.csv"), "--out", str(tmp_path / "c"))
    assert_clean_failure(proc, str(bad), "H×W×3")
    assert not (tmp_path / "c").exists()


def test_blank_metadata(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    images.loc[5, "Image_Metadata_Well_DAPI"] = ""
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, "BBBC021_v1_image.csv", "row 7", "Image_Metadata_Well_DAPI")
    assert not (tmp_path / "cache").exists()


def test_nan_concentration(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    images["Image_Metadata_Concentration"] = images["Image_Metadata_Concentration"].astype(object)
    images.loc[2, "Image_Metadata_Concentration"] = "NaN"
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, "row 4", "Image_Metadata_Concentration")


def test_plate_without_dmso_suggests_batch(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    plate = sorted(images["Image_Metadata_Plate_DAPI"].unique())[0]
    images = images[~((images["Image_Metadata_Plate_DAPI"] == plate) & (images["Image_Metadata_Compound"] == "DMSO"))]
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert_clean_failure(proc, plate, "no DMSO", "--normalize batch")
    assert not (tmp_path / "cache").exists()
    # Pooling the batch's DMSO works, unless the plate is alone in its batch.
    batch = _prepare_cli(tiny_copy, tmp_path / "cache", "--normalize", "batch")
    same_batch = [p for p in images["Image_Metadata_Plate_DAPI"].unique() if p.split("_")[0] == plate.split("_")[0]]
    assert (batch.returncode == 0) == (len(same_batch) > 0), batch.stderr


def test_compound_absent_from_moa_table(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    pos = int(np.flatnonzero((images["Image_Metadata_Compound"] != "DMSO").to_numpy())[4])
    images.loc[pos, "Image_Metadata_Compound"] = "mystery-compound"
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_cli(tiny_copy, tmp_path / "cache", "--strict-compounds")
    assert_clean_failure(proc, f"row {pos + 2}", "mystery-compound", "absent from BBBC021_v1_moa.csv")
    assert not (tmp_path / "cache").exists()


def test_skip_bad_logs_and_excludes(tiny_copy, tmp_path):
    _, missing = _first_treated(tiny_copy)
    missing.unlink()
    images = _image_csv(tiny_copy)
    pos = int(np.flatnonzero((images["Image_Metadata_Compound"] != "DMSO").to_numpy())[-1])
    row = images.iloc[pos]
    corrupt = tiny_copy / row["Image_PathName_DAPI"] / row["Image_FileName_DAPI"]
    corrupt.write_bytes(b"II*\x00garbage")
    proc = _prepare_cli(tiny_copy, tmp_path / "cache", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    skipped = pd.read_csv(tmp_path / "cache" / "skipped.csv")
    assert len(skipped) == 2
    assert skipped["reason"].str.contains("missing image").any()
    assert skipped["reason"].str.contains("corrupt").any()
    cache = TileCache(tmp_path / "cache")
    assert cache.manifest["n_images"] == len(images) - 2


def test_pad_channels_appends_zero_planes(real_crops, tmp_path):
    from cellmorph.data.crops import load_crop_table

    table = load_crop_table(real_crops)
    table = table.subset(table.frame["Metadata_Plate"] == "Week4_27801")
    prepare(table, tmp_path / "c", PrepareConfig(tile_grid=(1, 1), pad_channels=4), progress=False)
    cache = TileCache(tmp_path / "c")
    assert cache.tile_shape == (4, 68, 68)
    assert cache.channels == ("DAPI", "Tubulin", "Actin", "zero3")
    tiles = cache.tiles(np.arange(10))
    assert (tiles[:, 3] == 0).all() and tiles[:, :3].std() > 0
