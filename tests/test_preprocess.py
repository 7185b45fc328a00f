"""Preprocessing: transforms, the tile cache, idempotency and every bad-input case via the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from cellmorph.cache import TileCache
from cellmorph.data.bbbc021 import load_bbbc021
from cellmorph.data.table import batch_of_plate
from cellmorph.preprocess import (
    PrepareConfig,
    anscombe,
    is_empty_tile,
    prepare,
    resize_tiles,
    split_tiles,
    to_uint8,
)
from tests.conftest import PROGRESS_LINE, one_line_error, run_cli, run_cli_here


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


@pytest.mark.parametrize("scaling", ["image", "fixed", "tile"])
@pytest.mark.parametrize("with_stats", [True, False])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_the_fast_field_map_gives_the_bytes_of_the_three_steps(scaling, with_stats, dtype):
    """prepare maps a field by table lookup (8/16-bit) or in one float32 buffer; either must equal
    anscombe → zscore → to_uint8 exactly, or caches (and the bundles trained on them) would change."""
    from cellmorph.preprocess import PrepareConfig, field_to_uint8, zscore

    rng = np.random.default_rng(3)
    top = 255 if dtype == np.uint8 else 4096
    pixels = rng.integers(0, top, size=(64, 80, 3)).astype(dtype)
    pixels[0, 0] = [0, top, 7]  # the extremes sit in different channels
    planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # fields are mapped channel-first
    stats = np.stack([rng.uniform(20, 40, 3), np.array([3.0, 0.0, 5.5])]) if with_stats else None  # a zero std too
    config = PrepareConfig(scaling=scaling)
    expected = anscombe(pixels)
    if stats is not None:
        expected = zscore(expected, stats[0], stats[1])
    got = field_to_uint8(planes, stats, config)
    if scaling != "tile":  # float: mapped per tile later
        expected = to_uint8(expected, scaling, config.fixed_range)
    np.testing.assert_array_equal(got, expected.transpose(2, 0, 1))
    # a channel-first view of an H×W×C array (how stacked files come in) maps the same
    np.testing.assert_array_equal(field_to_uint8(pixels.transpose(2, 0, 1), stats, config), got)


def test_split_tiles_2x2_gives_quadrants_in_channel_first_order():
    field = np.arange(3 * 1024 * 1281, dtype=np.uint32).reshape(3, 1024, 1281)  # C×H×W; an odd column cropped
    tiles, where = split_tiles(field, (2, 2))
    assert tiles.shape == (4, 3, 512, 640)
    assert where == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(tiles[3], field[:, 512:, 640:1280])
    np.testing.assert_array_equal(tiles[1], field[:, :512, 640:1280])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_dmso_moments_of_a_field_are_those_of_its_anscombe_pixels(dtype):
    """The DMSO statistics sum a large 8/16-bit field from its histogram; they must equal the
    pixel-by-pixel moments of the Anscombe-transformed field (to float64 rounding)."""
    from cellmorph.preprocess import ChannelMoments

    rng = np.random.default_rng(5)
    top = 255 if dtype == np.uint8 else 4096
    planes = rng.integers(0, top, size=(3, 300, 260)).astype(dtype)  # > 65,536 pixels per channel
    count, total, total_sq = ChannelMoments.of_field(planes)
    exact = anscombe(planes).astype(np.float64).reshape(3, -1)
    assert count == 300 * 260
    np.testing.assert_allclose(total, exact.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(total_sq, (exact**2).sum(axis=1), rtol=1e-13)
    moments = ChannelMoments(3)
    moments.add((count, total, total_sq))
    moments.add(ChannelMoments.of_field(planes[:, :10]))  # a small field: summed pixel by pixel
    both = np.concatenate([exact, anscombe(planes[:, :10]).astype(np.float64).reshape(3, -1)], axis=1)
    np.testing.assert_allclose(moments.mean, both.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.std, both.std(axis=1), rtol=1e-9)
    assert moments.n_images == 2 and moments.count == both.shape[1]


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
    """`cellmorph prepare` in this process: a subprocess pays a second of imports, and the process boundary is
    tested by test_prepare_cli_is_idempotent_and_records_provenance and test_prepare_crops_cli."""
    return run_cli_here("prepare", "--layout", "bbbc021", "--root", str(root), "--out", str(out), *extra)


# Bad images and metadata rows, each made in a copy of the tiny screen: (the defect's file or row, the words the
# error must hold), and whether the compound check is strict. Each is one error naming the file or row, and
# nothing is written (the command line's side of that contract: the test after).
def _missing_image(root):
    _, path = _first_treated(root)
    path.unlink()
    return [str(path), "missing image"], False


def _truncated_tiff(root):
    _, path = _first_treated(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return [str(path), "corrupt or truncated TIFF"], False


def _wrong_shape(root):
    _, path = _first_treated(root)
    good = tifffile.imread(path)
    tifffile.imwrite(path, np.zeros((good.shape[0] // 2, good.shape[1]), np.uint16))
    return [str(path)], False


def _wrong_channel_count(root):
    _, path = _first_treated(root)
    good = tifffile.imread(path)
    tifffile.imwrite(path, np.zeros((*good.shape, 3), np.uint16), photometric="rgb")
    return [str(path), "single-channel"], False


def _blank_metadata(root):
    images = _image_csv(root)
    images.loc[5, "Image_Metadata_Well_DAPI"] = ""
    images.to_csv(root / "BBBC021_v1_image.csv", index=False)
    return ["BBBC021_v1_image.csv", "row 7", "Image_Metadata_Well_DAPI"], False


def _nan_concentration(root):
    images = _image_csv(root)
    images["Image_Metadata_Concentration"] = images["Image_Metadata_Concentration"].astype(object)
    images.loc[2, "Image_Metadata_Concentration"] = "NaN"
    images.to_csv(root / "BBBC021_v1_image.csv", index=False)
    return ["row 4", "Image_Metadata_Concentration"], False


def _compound_absent_from_moa_table(root):
    images = _image_csv(root)
    pos = int(np.flatnonzero((images["Image_Metadata_Compound"] != "DMSO").to_numpy())[4])
    images.loc[pos, "Image_Metadata_Compound"] = "mystery-compound"
    images.to_csv(root / "BBBC021_v1_image.csv", index=False)
    return [f"row {pos + 2}", "mystery-compound", "absent from BBBC021_v1_moa.csv"], True


BAD_INPUTS = {f.__name__.lstrip("_").replace("_", " "): f for f in (
    _missing_image, _truncated_tiff, _wrong_shape, _wrong_channel_count, _blank_metadata, _nan_concentration,
    _compound_absent_from_moa_table)}


@pytest.mark.parametrize("defect", list(BAD_INPUTS))
def test_bad_input_is_one_error_naming_its_file_or_row_and_leaves_nothing(defect, tiny_copy, tmp_path):
    from cellmorph.data.layouts import load_table
    from cellmorph.errors import CellmorphError

    needles, strict = BAD_INPUTS[defect](tiny_copy)
    with pytest.raises(CellmorphError) as caught:
        table = load_table("bbbc021", tiny_copy, strict_compounds=strict)
        prepare(table, tmp_path / "cache", PrepareConfig(), progress=False)
    message = str(caught.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    assert not (tmp_path / "cache").exists()


def test_the_command_line_reports_bad_input_as_one_line_exit_2_and_leaves_nothing(tiny_copy, tmp_path):
    needles, _ = BAD_INPUTS["compound absent from moa table"](tiny_copy)
    one_line_error(_prepare_cli(tiny_copy, tmp_path / "cache", "--strict-compounds"), *needles)
    _, path = _first_treated(tiny_copy)
    path.unlink()
    one_line_error(_prepare_cli(tiny_copy, tmp_path / "cache"), str(path), "missing image")
    assert not (tmp_path / "cache").exists()


def test_wrong_channel_count_in_a_crop(real_crops, tmp_path):
    index = pd.read_csv(real_crops).head(40)
    for name in index["FileName"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / name, np.load(real_crops.parent / name))
    bad = tmp_path / index["FileName"].iloc[3]
    np.save(bad, np.load(bad)[..., :2])
    index.to_csv(tmp_path / "index.csv", index=False)
    proc = run_cli_here("prepare", "--layout", "crops", "--index", str(tmp_path / "index.csv"), "--out", str(tmp_path / "c"))
    one_line_error(proc, str(bad), "H×W×3")
    assert not (tmp_path / "c").exists()


def test_plate_without_dmso_suggests_batch(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    plate = sorted(images["Image_Metadata_Plate_DAPI"].unique())[0]
    images = images[~((images["Image_Metadata_Plate_DAPI"] == plate) & (images["Image_Metadata_Compound"] == "DMSO"))]
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    one_line_error(proc, plate, "no DMSO", "--normalize batch")
    assert not (tmp_path / "cache").exists()
    # Pooling the batch's DMSO works while another plate of the batch has DMSO fields ...
    week = batch_of_plate(plate)
    others = [p for p in images["Image_Metadata_Plate_DAPI"].unique() if p != plate and batch_of_plate(p) == week]
    assert others, "the tiny screen has two plates per week"
    batch = _prepare_cli(tiny_copy, tmp_path / "cache", "--normalize", "batch")
    assert batch.returncode == 0, batch.stderr
    assert set(TileCache(tmp_path / "cache").norm_stats["group"]) == set(images["Image_Metadata_Plate_DAPI"].map(batch_of_plate))
    # ... and fails, naming the batch, once no plate of the batch has any.
    in_week = images["Image_Metadata_Plate_DAPI"].map(batch_of_plate) == week
    images[~(in_week & (images["Image_Metadata_Compound"] == "DMSO"))].to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    alone = _prepare_cli(tiny_copy, tmp_path / "cache2", "--normalize", "batch")
    one_line_error(alone, f"batch {week}", "no DMSO")
    assert not (tmp_path / "cache2").exists()


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


# ----------------------------------------------------------------------------- compounds left out
def _rename_compound(root: Path, new: str) -> int:
    """Give one treated compound of the image CSV a name the MoA table lacks; returns its image count."""
    images = _image_csv(root)
    old = sorted(set(images["Image_Metadata_Compound"]) - {"DMSO"})[0]
    hit = images["Image_Metadata_Compound"] == old
    images.loc[hit, "Image_Metadata_Compound"] = new
    images.to_csv(root / "BBBC021_v1_image.csv", index=False)
    return int(hit.sum())


def test_compounds_absent_from_the_moa_table_are_reported_not_silently_dropped(tiny_copy, tmp_path):
    n = _rename_compound(tiny_copy, "mystery-compound")
    expected = (f"note: left out {n} images of 1 compound absent from {tiny_copy / 'BBBC021_v1_moa.csv'}: "
                f"mystery-compound ({n})")
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert notes == [expected]
    # Not a terminal: one progress line per plate, each with the time left.
    plates = [line for line in proc.stderr.splitlines() if re.search(r"\] plates \d/4 \(Week\d_\d+\): \d+ tiles;", line)]
    assert len(plates) == 4 and all(line.endswith("left") for line in plates), proc.stderr
    cache = TileCache(tmp_path / "cache")
    assert cache.manifest["excluded_compounds"] == {"mystery-compound": n}
    assert cache.excluded_compounds == {"mystery-compound": n}
    assert "mystery-compound" not in set(cache.index["Metadata_Compound"])

    shown = run_cli_here("inspect", "--layout", "bbbc021", "--root", tiny_copy, "--json")
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.splitlines() == [expected]
    assert json.loads(shown.stdout)["excluded_compounds"] == {"mystery-compound": n}

    # --strict-compounds still refuses them, naming the CSV row.
    strict = _prepare_cli(tiny_copy, tmp_path / "strict", "--strict-compounds")
    one_line_error(strict, "BBBC021_v1_image.csv", "'mystery-compound' is absent from BBBC021_v1_moa.csv")
    assert not (tmp_path / "strict").exists()


# ----------------------------------------------------------------------------- where the cache goes
def _unwritable(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(--out value, path that must be unchanged afterwards) for each way an output folder is unusable."""
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("keep me\n")
    if kind == "existing file":
        return a_file, a_file
    if kind == "under a file":
        return a_file / "sub", a_file
    return Path("/proc/cellmorph-test/out"), Path("/proc/cellmorph-test")


@pytest.mark.parametrize("kind, says", [("existing file", "is an existing file, not a folder"),
                                        ("under a file", "cannot write the cache folder"),
                                        ("under /proc", "cannot write the cache folder")])
def test_prepare_refuses_an_unusable_out(kind, says, tiny_screen, tmp_path):
    out, witness = _unwritable(tmp_path, kind)
    proc = _prepare_cli(tiny_screen, out)
    one_line_error(proc, str(out), says)
    if kind == "under /proc":
        assert not witness.exists()
    else:
        assert witness.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt"]


def test_prepare_api_refuses_an_existing_file(tiny_screen, tmp_path):
    from cellmorph.errors import CellmorphError

    target = tmp_path / "cache"
    target.write_text("")
    with pytest.raises(CellmorphError, match="cache folder is an existing file"):
        prepare(load_bbbc021(tiny_screen, tiny_screen), target, progress=False)


def test_failed_prepare_removes_the_parents_it_created(tiny_copy, tmp_path):
    _, path = _first_treated(tiny_copy)
    path.unlink()
    one_line_error(_prepare_cli(tiny_copy, tmp_path / "new" / "deeper" / "cache"), "missing image")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- inputs that are not what they claim
def _header_only(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(src.read_text().splitlines()[0] + "\n")
    return dest


def test_header_only_crop_table_names_the_file(real_crops, tmp_path):
    csv = _header_only(real_crops, tmp_path / "header_only.csv")
    proc = run_cli_here("prepare", "--layout", "crops", "--index", csv, "--out", tmp_path / "c")
    one_line_error(proc, str(csv), "no rows below the header")
    assert not (tmp_path / "c").exists()


def test_header_only_bbbc021_image_csv_names_the_file(tiny_copy, tmp_path):
    csv = _header_only(tiny_copy / "BBBC021_v1_image.csv", tiny_copy / "BBBC021_v1_image.csv")
    proc = _prepare_cli(tiny_copy, tmp_path / "cache")
    one_line_error(proc, str(csv), "no rows below the header")
    assert not (tmp_path / "cache").exists()


def test_no_annotated_image_names_the_table(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    treated = images["Image_Metadata_Compound"] != "DMSO"
    images.loc[treated, "Image_Metadata_Compound"] = "unknown-" + images.loc[treated, "Image_Metadata_Compound"]
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    for command, extra in (("inspect", []), ("prepare", ["--out", tmp_path / "cache"])):
        proc = run_cli_here(command, "--layout", "bbbc021", "--root", tiny_copy, *extra)
        one_line_error(proc, str(tiny_copy / "BBBC021_v1_image.csv"), "no image has a compound and concentration "
                       f"listed in BBBC021_v1_moa.csv ({int(treated.sum())} images of")
    assert not (tmp_path / "cache").exists()


def test_an_empty_table_names_its_origin(tmp_path):
    from cellmorph.data.crops import load_crop_table
    from cellmorph.errors import BadInputError

    csv = tmp_path / "crops.csv"
    csv.write_text("FileName,Metadata_Plate,Metadata_Well,Metadata_Site,Metadata_Compound,Metadata_Concentration,"
                   "Metadata_MoA\na.npy,P1,A01,1,DMSO,0,DMSO\n")
    table = load_crop_table(csv)
    with pytest.raises(BadInputError, match=re.escape(f"{csv}: no usable images left to prepare (none of its rows was loaded)")):
        prepare(table.subset(table.frame.index < 0), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option", ["--index", "--moa", "--layout-config", "--config", "metadata CSV"])
def test_a_directory_where_a_file_belongs(option, real_crops, tiny_copy, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    if option == "--index":
        args = ["--layout", "crops", "--index", folder]
    elif option == "--moa":
        args = ["--layout", "crops", "--index", real_crops, "--moa", folder]
    elif option == "--layout-config":
        args = ["--layout", "generic", "--layout-config", folder]
    elif option == "--config":
        args = ["--layout", "crops", "--index", real_crops, "--config", folder]
    else:
        (tiny_copy / "BBBC021_v1_image.csv").unlink()
        folder = tiny_copy / "BBBC021_v1_image.csv"
        folder.mkdir()
        args = ["--layout", "bbbc021", "--root", tiny_copy]
    for command in ("inspect", "prepare"):
        extra = ["--out", tmp_path / "cache"] if command == "prepare" else []
        if command == "inspect" and option == "--config":
            continue  # inspect has no --config
        one_line_error(run_cli_here(command, *args, *extra), str(folder), "is a directory")
    assert not (tmp_path / "cache").exists()


def test_fields_are_processed_in_a_bounded_pool_and_returned_in_order():
    """prepare's field pool: every item once, in order, never more than `ahead` in flight."""
    import threading
    import time

    from cellmorph.preprocess import _in_order
    from cellmorph.runtime import torch_threads

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def work(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002 * (i % 3))
        with lock:
            state["now"] -= 1
        return i * i

    with torch_threads(2):
        results = []
        for r in _in_order(work, range(23), ahead=4):
            time.sleep(0.003)  # a slow consumer must not let work pile up
            results.append(r)
    assert results == [i * i for i in range(23)]
    assert state["most"] <= 2


def test_a_plate_whose_first_field_is_empty_keeps_its_other_tiles(tiny_copy, tmp_path):
    """With the paper's empty-tile filter, a blank first field leaves no tile; the plate's other
    fields must still be cached (it once crashed on the unallocated plate array)."""
    from cellmorph.data.table import channel_column
    from cellmorph.preprocess import PrepareConfig, prepare

    table = load_bbbc021(tiny_copy, tiny_copy)
    plate = sorted(table.frame["Metadata_Plate"].unique())[0]
    first = table.frame[table.frame["Metadata_Plate"] == plate].iloc[0]  # the plate's first field read
    for ch in table.channels:
        path = first[channel_column(ch)]
        tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))
    rows = table.frame[table.frame["Metadata_Plate"] == plate]
    summary = prepare(table.subset(table.frame["Metadata_Plate"] == plate), tmp_path / "cache",
                      PrepareConfig(normalize="none", empty_tile_fraction=0.002), progress=False)
    index = TileCache(tmp_path / "cache").index
    assert first["Metadata_ImageID"] not in set(index["Metadata_ImageID"])
    assert 0 < summary["n_tiles"] <= 4 * (len(rows) - 1)


def test_an_odd_sized_field_is_the_one_skipped_whatever_the_thread_count(tiny_copy, tmp_path):
    """Fields are read by a 2-thread pool, but the reference size is that of the first field in table
    order: with --skip-bad, an odd-sized second field is the one skipped, with 1 thread or 2."""
    from cellmorph.data.table import channel_column
    from cellmorph.preprocess import PrepareConfig, prepare

    table = load_bbbc021(tiny_copy, tiny_copy)
    plate = sorted(table.frame["Metadata_Plate"].unique())[0]
    table = table.subset(table.frame["Metadata_Plate"] == plate)
    odd = table.frame.iloc[1]
    for ch in table.channels:
        path = odd[channel_column(ch)]
        tifffile.imwrite(path, tifffile.imread(path)[:-8, :-8])
    caches = {}
    for threads in (1, 2):
        out = tmp_path / f"cache{threads}"
        prepare(table, out, PrepareConfig(normalize="none", skip_bad=True), progress=False, threads=threads)
        caches[threads] = out
        skipped = pd.read_csv(out / "skipped.csv")
        assert skipped["Metadata_ImageID"].tolist() == [odd["Metadata_ImageID"]], skipped
    for plate_file in sorted((caches[1] / "plates").glob("*.npy")):
        assert plate_file.read_bytes() == (caches[2] / "plates" / plate_file.name).read_bytes()


# ----------------------------------------------------------------------------- hostile and broken input (issue 28)
def _cli(*args) -> subprocess.CompletedProcess:
    return run_cli_here(*args)


def _prepare_here(root: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return _cli("prepare", "--layout", "bbbc021", "--root", root, "--out", out, *extra)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hostile", ["../../../pwned", "a/b", "..", ".hidden", "50%/x y", "P" * 300])
def test_a_plate_name_never_writes_outside_the_cache(hostile, tiny_copy, tmp_path):
    """Plate names become file names: whatever the name, the plate's files stay in CACHE/plates,
    one flat file each, and the cache reads them back (case 2)."""
    from cellmorph.cache import plate_stem

    images = _image_csv(tiny_copy)
    victim = sorted(images["Image_Metadata_Plate_DAPI"].unique())[0]
    images.loc[images["Image_Metadata_Plate_DAPI"] == victim, "Image_Metadata_Plate_DAPI"] = hostile
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    out = tmp_path / "x" / "y" / "cache"  # ../../../ from plates/ would land in tmp_path/x
    before = _files_under(tmp_path)
    proc = _prepare_here(tiny_copy, out, "--tile-size", "16")
    assert proc.returncode == 0, proc.stderr
    written = _files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written), sorted(written)
    plates = out / "plates"
    assert all(p.parent in (out, plates) for p in written)
    stem = plate_stem(hostile)
    assert {p.name for p in plates.iterdir() if p.name.startswith(stem)} == {stem + s for s in
                                                                            (".npy", ".json", ".parquet")}
    cache = TileCache(out)
    assert hostile in cache.manifest["plates"]
    rows = np.flatnonzero(cache.index["Metadata_Plate"].to_numpy() == hostile)
    assert len(rows) and cache.tiles(rows).std() > 0
    # The ordinary plates keep the file names of earlier releases.
    ordinary = set(images["Image_Metadata_Plate_DAPI"].unique()) - {hostile}
    assert {p.name for p in plates.glob("Week*.npy")} == {f"{p}.npy" for p in ordinary}


def test_plates_that_differ_only_in_case_are_refused(tiny_copy, tmp_path):
    images = _image_csv(tiny_copy)
    first, second = sorted(images["Image_Metadata_Plate_DAPI"].unique())[:2]
    images.loc[images["Image_Metadata_Plate_DAPI"] == second, "Image_Metadata_Plate_DAPI"] = first.upper()
    images.to_csv(tiny_copy / "BBBC021_v1_image.csv", index=False)
    proc = _prepare_here(tiny_copy, tmp_path / "cache")
    one_line_error(proc, "BBBC021_v1_image.csv", repr(first), repr(first.upper()), "differ only in letter case")
    assert not (tmp_path / "cache").exists()


def _spoil(path: Path, defect: str) -> str:
    """Rewrite one single-channel TIFF with ``defect``; returns what the error says about it."""
    good = tifffile.imread(path)
    if defect == "complex":
        tifffile.imwrite(path, good.astype(np.complex64))
        return "complex pixel type"
    if defect == "negative int16":
        bad = good.astype(np.int16)
        bad[3, 4] = -2
        tifffile.imwrite(path, bad)
        return "1 negative pixel value(s) (lowest -2), the first at row 3, column 4"
    bad = good.astype(np.float32)
    bad[3, 4] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "negative float": -0.5}[defect]
    tifffile.imwrite(path, bad)
    if defect == "negative float":
        return "negative pixel value(s) (lowest -0.5), the first at row 3, column 4"
    return f"1 {'NaN' if defect == 'nan' else 'infinite'} pixel value(s), the first at row 3, column 4"


def _field_file(root: Path, control: bool, channel: str = "Tubulin") -> Path:
    """A channel file of the first DMSO (or treated) field of the first plate, the first of its kind read."""
    images = _image_csv(root)
    plate = sorted(images["Image_Metadata_Plate_DAPI"].unique())[0]
    is_control = images["Image_Metadata_Compound"] == "DMSO"
    row = images[(images["Image_Metadata_Plate_DAPI"] == plate) & (is_control == control)].iloc[0]
    return root / row[f"Image_PathName_{channel}"] / row[f"Image_FileName_{channel}"]


@pytest.mark.parametrize("defect, control", [("nan", True), ("inf", True), ("negative float", True), ("complex", True),
                                             ("nan", False), ("-inf", False), ("negative int16", False),
                                             ("complex", False)])
def test_nan_inf_negative_or_complex_pixels_are_refused_naming_the_file(defect, control, tiny_copy, tmp_path):
    """One NaN in one DMSO field once made the plate's statistics NaN and every tile blank (case 3):
    the DMSO fields are read by the statistics, the treated ones by the tiling, both refuse it."""
    path = _field_file(tiny_copy, control)
    says = _spoil(path, defect)
    proc = _prepare_here(tiny_copy, tmp_path / "cache")
    one_line_error(proc, str(path), says)
    assert not (tmp_path / "cache").exists()


def test_skip_bad_lists_bad_pixels_and_keeps_the_plate(tiny_copy, tmp_path):
    """With --skip-bad a field with bad pixels is left out, listed in skipped.csv, counted in the
    manifest and noted on stderr; the plate's statistics and tiles stay real. A rerun that reuses
    the cache lists the same fields again (it does not read them again)."""
    dmso, treated = _field_file(tiny_copy, True), _field_file(tiny_copy, False, "DAPI")
    _spoil(dmso, "nan")
    _spoil(treated, "negative float")
    out = tmp_path / "cache"
    runs = [_prepare_here(tiny_copy, out, "--skip-bad", "--tile-size", "16") for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        notes = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
        assert len(notes) == 2 and any(str(dmso) in n and "NaN" in n for n in notes) \
            and any(str(treated) in n and "negative" in n for n in notes), proc.stderr
        assert json.loads(proc.stdout)["n_skipped"] == 2
        skipped = pd.read_csv(out / "skipped.csv")
        assert len(skipped) == 2 and skipped["reason"].str.contains(str(dmso), regex=False).any()
    cache = TileCache(out)
    assert cache.manifest["n_skipped"] == 2
    assert np.isfinite(cache.norm_stats[["mean", "std"]].to_numpy()).all()
    plate = sorted(cache.manifest["plates"])[0]
    rows = np.flatnonzero(cache.index["Metadata_Plate"].to_numpy() == plate)
    assert cache.tiles(rows).std() > 10


def _crop_table(tmp_path: Path, real_crops: Path, column: str, value: str, row: int = 3) -> Path:
    index = pd.read_csv(real_crops).head(8)
    index[column] = index[column].astype(object)
    index.loc[row, column] = value
    csv = tmp_path / "index.csv"
    index.to_csv(csv, index=False)
    return csv


def _generic_layout(tmp_path: Path, real_crops: Path, value: str) -> Path:
    index = pd.read_csv(real_crops).head(8).rename(columns={"Metadata_Concentration": "Dose_uM"})
    index["Dose_uM"] = index["Dose_uM"].astype(object)
    index.loc[5, "Dose_uM"] = value
    index.to_csv(tmp_path / "images.csv", index=False)
    layout = {"csv": str(tmp_path / "images.csv"), "root": str(real_crops.parent), "stack_column": "FileName",
              "channel_names": ["DAPI", "Tubulin", "Actin"], "concentration_column": "Dose_uM"}
    (tmp_path / "layout.yaml").write_text(yaml.safe_dump(layout))
    return tmp_path / "images.csv"


@pytest.mark.parametrize("case", ["crop concentration", "crop site", "crop fractional site", "generic concentration",
                                  "bbbc021 concentration", "bbbc021 moa concentration"])
def test_metadata_that_is_not_a_number_names_the_file_and_row(case, real_crops, tiny_copy, tmp_path):
    """``abc`` as a concentration once became a NaN treatment, as a site 0, and in the BBBC021 layout
    dropped its image unseen (case 9): each is one line naming the CSV and its row as a
    spreadsheet shows it (the header is row 1)."""
    if case.startswith("crop"):
        column, value = ("Metadata_Site", "xyz") if case == "crop site" else \
            ("Metadata_Site", "1.5") if case == "crop fractional site" else ("Metadata_Concentration", "abc")
        csv = _crop_table(tmp_path, real_crops, column, value)
        shown = value if case == "crop fractional site" else repr(value)  # read as a number: shown as one
        args, needles = ["--layout", "crops", "--index", csv], [str(csv), "row 5", f"{column} {shown}"]
    elif case == "generic concentration":
        csv = _generic_layout(tmp_path, real_crops, "abc")
        args, needles = ["--layout", "generic", "--layout-config", tmp_path / "layout.yaml"], [str(csv), "row 7",
                                                                                             "Dose_uM 'abc'"]
    else:
        name, column = ("BBBC021_v1_image.csv", "Image_Metadata_Concentration") if case == "bbbc021 concentration" \
            else ("BBBC021_v1_moa.csv", "concentration")
        frame = pd.read_csv(tiny_copy / name)
        frame[column] = frame[column].astype(object)
        frame.loc[9, column] = "abc"
        frame.to_csv(tiny_copy / name, index=False)
        args = ["--layout", "bbbc021", "--root", tiny_copy]
        needles = [str(tiny_copy / name), "row 11", f"{column} 'abc'"]
    proc = _cli("prepare", *args, "--out", tmp_path / "cache")
    one_line_error(proc, *needles, "is not a")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option, value, says", [
    ("--tile-size", "0", "greater than or equal to 1"),
    ("--empty-tile-fraction", "nan", "finite number"),
    ("--empty-tile-fraction", "2", "less than 1"),
    ("--tiles", "500x500", "is a 192×240 field, too small to cut into 500×500 tiles"),
    ("--fixed-range", "5,1", "low < high"),  # the options generated from PrepareConfig's fields, too
    ("--empty-tile-level", "255", "less than or equal to 254"),
    ("--pad-channels", "0", "greater than or equal to 1"),
])
def test_prepare_options_that_cannot_work_name_the_option(option, value, says, tiny_screen, tiny_cache, tmp_path):
    """--tile-size 0 once meant no resize, --empty-tile-fraction nan went into the manifest, and
    --tiles 500x500 wrote 0×0 tiles (case 10). Into a new folder nothing is left; into an existing
    cache (--tiles is only found out at the first field) that cache stays as it was."""
    import shutil

    line = one_line_error(_prepare_here(tiny_screen, tmp_path / "new", option, value), f"{option} {value}", says)
    assert line.startswith(f"error: {option} ")
    assert not (tmp_path / "new").exists()
    if option == "--tiles":
        cache = Path(shutil.copytree(tiny_cache, tmp_path / "cache"))
        before = {p: p.stat().st_mtime_ns for p in _files_under(cache)}
        one_line_error(_prepare_here(tiny_screen, cache, option, value), f"{option} {value}", says)
        assert {p: p.stat().st_mtime_ns for p in _files_under(cache)} == before
        assert len(TileCache(cache)) == len(TileCache(tiny_cache))


def test_a_rerun_rebuilds_the_plates_whose_files_changed(tiny_copy, tmp_path):
    """A rerun into an existing cache once reused a plate whose TIFF had been replaced (case 11):
    each plate records its files' sizes and mtimes, and a changed one rebuilds that plate only,
    with a note naming it; the rebuilt plate is what a fresh cache holds."""
    out = tmp_path / "cache"
    assert _prepare_here(tiny_copy, out, "--tile-size", "16").returncode == 0
    changed = _field_file(tiny_copy, False, "Actin")
    plate = changed.parent.name
    pixels = tifffile.imread(changed)
    tifffile.imwrite(changed, pixels[::-1].copy())  # same size, other pixels
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "plates").glob("*.npy")}
    proc = _prepare_here(tiny_copy, out, "--tile-size", "16")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: rebuilt plate {plate}: input file {changed.resolve()} changed since it was cached"]
    now = {p.name: p.stat().st_mtime_ns for p in (out / "plates").glob("*.npy")}
    assert [name for name in now if now[name] != stamps[name]] == [f"{plate}.npy"]
    fresh = tmp_path / "fresh"
    assert _prepare_here(tiny_copy, fresh, "--tile-size", "16").returncode == 0
    assert (out / "plates" / f"{plate}.npy").read_bytes() == (fresh / "plates" / f"{plate}.npy").read_bytes()
    # A third run has nothing to rebuild.
    again = _prepare_here(tiny_copy, out, "--tile-size", "16")
    assert not [line for line in again.stderr.splitlines() if line.startswith("note:")], again.stderr


def test_a_cache_of_an_earlier_release_is_rebuilt_once(tiny_screen, tiny_cache, tmp_path):
    """Plate records without input files (and statistics with NaN, as the previous release could
    write) cannot vouch for their inputs: the rerun rebuilds those plates, saying so in one note."""
    import shutil

    cache = Path(shutil.copytree(tiny_cache, tmp_path / "cache"))
    for sidecar in (cache / "plates").glob("*.json"):
        record = json.loads(sidecar.read_text())
        del record["inputs"]
        sidecar.write_text(json.dumps(record))
    stats = pd.read_parquet(cache / "norm_stats.parquet")
    expected = stats.copy()
    stats.loc[0, "mean"] = np.nan
    stats.to_parquet(cache / "norm_stats.parquet", index=False)
    notes: list[str] = []
    prepare(load_bbbc021(tiny_screen, tiny_screen), cache, PrepareConfig(), progress=False, log=notes.append)
    plates = sorted(TileCache(cache).manifest["plates"])
    assert notes == [f"note: rebuilt {len(plates)} plate(s) cached without a record of their input files (an earlier "
                     f"cellmorph), so possibly stale: {', '.join(plates)}"]
    pd.testing.assert_frame_equal(pd.read_parquet(cache / "norm_stats.parquet"), expected)
    for plate in plates:
        assert (cache / "plates" / f"{plate}.npy").read_bytes() == (tiny_cache / "plates" / f"{plate}.npy").read_bytes()


def test_a_rerun_removes_the_temporaries_a_killed_run_left(tiny_screen, tiny_cache, tmp_path):
    """kill -9 during prepare left plates/.*.tmp files forever (case 15): a rerun removes the
    temporaries of the cache's own writes that are older than it, and nothing else."""
    import os
    import shutil

    cache = Path(shutil.copytree(tiny_cache, tmp_path / "cache"))
    plate = sorted((cache / "plates").glob("*.npy"))[0].stem
    stale = [cache / "plates" / f".{plate}.npy.k9x2abcd.npy", cache / "plates" / f".{plate}.json.k9x2abce.tmp",
             cache / "plates" / f".{plate}.parquet.k9x2abcf.tmp", cache / ".manifest.json.k9x2abcg.tmp",
             cache / ".index.parquet.k9x2abch.tmp"]
    kept = [cache / "plates" / "notes.txt", cache / ".my-own.npy", cache / "sub" / f".{plate}.npy.k9x2abci.npy",
            cache / ".manifest.json.k9x2abcj.bak"]
    newer = cache / "plates" / f".{plate}.npy.k9x2abck.npy"  # as if a write had begun after the rerun started
    for path in stale + kept + [newer]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    for path in stale + kept:
        os.utime(path, ns=(0, 0))
    os.utime(newer, ns=(2**62, 2**62))
    proc = _prepare_here(tiny_screen, cache)
    assert proc.returncode == 0, proc.stderr
    assert f"note: removed {len(stale)} temporary file(s) an interrupted earlier run left in {cache}" in proc.stderr
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in kept + [newer])
    assert len(TileCache(cache)) == len(TileCache(tiny_cache))
    # A failed run cleans its own temporaries only: what is not a cache temporary stays.
    one_line_error(_prepare_here(tiny_screen, cache, "--tiles", "500x500"), "--tiles 500x500")
    assert all(p.exists() for p in kept)
