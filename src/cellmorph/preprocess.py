"""The paper's minimal preprocessing, written once into an on-disk tile cache.

Per field: Anscombe transform → per-channel z-score against the DMSO control
pixels of the same plate (or batch) → map to 8 bits → split into tiles
(2×2 for BBBC021) → optionally drop empty tiles and resize.

Order: the Anscombe transform is a variance stabiliser for photon counts and is
only defined for values ≥ -3/8, so it runs on the raw intensities, and the
DMSO statistics are those of the transformed control pixels. This is what the
authors' published code does (Kensert et al. 2019, ``generate_dataset_bbbc021``).

Scientific rule: normalisation statistics come only from control (DMSO)
fields. No treated image ever contributes to them, so leave-one-compound-out
evaluation downstream cannot leak a test compound through normalisation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cellmorph.cache import (
    CACHE_FORMAT,
    MANIFEST_FILE,
    UNTRACKED,
    case_collisions,
    finished_plate,
    input_record,
    read_norm_stats,
    remove_temporary_files,
    write_index_and_manifest,
    write_norm_stats,
    write_plate,
)
from cellmorph.config.prepare import PREPARE_OPTIONS, PrepareConfig, TileCount  # noqa: F401
from cellmorph.data.images import check_field_shape, missing_files, path_columns, read_planes, row_paths
from cellmorph.data.table import ImageTable
from cellmorph.errors import BadInputError, CellmorphError, disk_full_as_error, option
from cellmorph.progress import Progress
from cellmorph.runinfo import created_root, output_lock, require_output_dir, run_info


# --------------------------------------------------------------------------- transforms
def anscombe(x: np.ndarray) -> np.ndarray:
    """Anscombe variance-stabilising transform, 2·sqrt(x + 3/8), in float32."""
    return _normalise_in_place(np.array(x, dtype=np.float32), None)


def _normalise_in_place(x: np.ndarray, stats: np.ndarray | None) -> np.ndarray:
    """Anscombe, then (with ``stats``) the z-score of :func:`zscore`, on channel-first float32 ``x``
    in place: the one definition of these float32 steps, so every path through them gives the same
    bytes (per element, the operations of :func:`anscombe` and :func:`zscore` in their order)."""
    x += np.float32(3.0 / 8.0)
    np.sqrt(x, out=x)
    x *= 2.0
    if stats is not None:
        per_channel = (-1,) + (1,) * (x.ndim - 1)
        x -= stats[0].astype(np.float32).reshape(per_channel)
        x /= np.where(stats[1] > 0, stats[1], 1.0).astype(np.float32).reshape(per_channel)
    return x


@dataclass
class ChannelMoments:
    """Streaming per-channel mean/std (float64 sums; exact enough for 10^9 pixels)."""

    n_channels: int
    count: int = 0
    n_images: int = 0
    total: np.ndarray = field(default=None)
    total_sq: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.n_channels)
        self.total_sq = np.zeros(self.n_channels)

    @staticmethod
    def of_field(planes: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """The pixel count, per-channel sum and sum of squares (float64) of one raw C×H×W field after
        the Anscombe transform. A pure function of the field: prepare's worker threads compute it,
        and :meth:`add` sums the fields in table order, so the statistics never depend on threads.

        An 8/16-bit field with more pixels per channel than it has values is summed from its
        histogram: each value's float32 Anscombe value times its count (both products exact in
        float64), a 65,536-term sum instead of a 1.3 M-term one (6× faster on a BBBC021 field, and
        closer to the exact sums). Other fields are summed pixel by pixel.
        """
        channels = planes.shape[0]
        if planes.dtype in (np.uint8, np.uint16) and planes[0].size > np.iinfo(planes.dtype).max:
            values = anscombe(np.arange(np.iinfo(planes.dtype).max + 1)).astype(np.float64)
            counts = np.stack([np.bincount(planes[c].ravel(), minlength=len(values)) for c in range(channels)])
            weighted = counts * values
            return int(counts[0].sum()), weighted.sum(axis=1), (weighted * values).sum(axis=1)
        flat = np.moveaxis(anscombe(planes), 0, -1).astype(np.float64, order="C").reshape(-1, channels)
        return flat.shape[0], flat.sum(axis=0), np.einsum("ij,ij->j", flat, flat)

    def add(self, sums: tuple[int, np.ndarray, np.ndarray]) -> None:
        count, total, total_sq = sums
        self.count += count
        self.n_images += 1
        self.total += total
        self.total_sq += total_sq

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        var = self.total_sq / self.count - self.mean**2
        return np.sqrt(np.maximum(var, 0.0))


def zscore(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    std = np.where(std > 0, std, 1.0)
    return (x - mean.astype(np.float32)) / std.astype(np.float32)


def to_uint8(x: np.ndarray, scaling: str = "image", fixed_range: tuple[float, float] = (-2.0, 10.0)) -> np.ndarray:
    """Map a float field (H×W×C) to uint8: per-field min-max over all channels, or a fixed clip."""
    if scaling == "image":
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = fixed_range
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((x - lo) * scale), 0, 255).astype(np.uint8)


def check_tile_grid(path, shape, grid: tuple[int, int]) -> None:
    """Raise naming the option and ``path`` when a field of (H, W) ``shape`` cannot be cut into
    ``grid`` tiles of at least one pixel. A CellmorphError, not a BadInputError: the options are
    wrong, not the image, so ``--skip-bad`` must not skip field after field for it."""
    rows, cols = grid
    if shape[0] < rows or shape[1] < cols:
        raise CellmorphError(
            f"{option('tiles')} {rows}x{cols}: {path} is a {shape[0]}×{shape[1]} field, too small to cut into "
            f"{rows}×{cols} tiles (tile_grid)"
        )


def split_tiles(field8: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Split a C×H×W field into grid tiles → (n, C, h, w) and their (row, col); remainders are cropped."""
    rows, cols = grid
    h, w = field8.shape[1] // rows, field8.shape[2] // cols
    tiles, where = [], []
    for r in range(rows):
        for c in range(cols):
            tiles.append(field8[:, r * h : (r + 1) * h, c * w : (c + 1) * w])
            where.append((r, c))
    return np.stack(tiles), where


def is_empty_tile(tile: np.ndarray, level: int, fraction: float) -> bool:
    """The paper's filter: a tile with at most ``fraction`` of pixels above ``level`` holds no cells."""
    return float((tile > level).mean()) <= fraction


def resize_tiles(tiles: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of uint8 (n, C, h, w) tiles to (n, C, size, size)."""
    if tiles.shape[-2:] == (size, size):
        return tiles
    t = torch.from_numpy(tiles).float()
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


# --------------------------------------------------------------------------- statistics
def _group_key(frame: pd.DataFrame, mode: str) -> pd.Series:
    return frame["Metadata_Plate"] if mode == "plate" else frame["Metadata_Batch"]


def check_controls(table: ImageTable, mode: str) -> list[str]:
    """Groups (plates or batches) with treated images but no control fields."""
    if mode == "none":
        return []
    keys = _group_key(table.frame, mode)
    have_controls = set(keys[table.frame["Metadata_IsControl"]])
    return sorted(set(keys[~table.frame["Metadata_IsControl"]]) - have_controls)


# --------------------------------------------------------------------------- the job
@dataclass
class _Bad:
    rows: list[dict] = field(default_factory=list)

    def add(self, row: pd.Series, reason: str) -> None:
        # str: the rows are also kept in JSON records (a plate's, the statistics'), and read back
        self.rows.append({"Metadata_ImageID": str(row["Metadata_ImageID"]), "reason": reason})


class _CacheWrites:
    """Marks the cache incomplete (removes its manifest) before this run first changes a file of it:
    an earlier manifest describes the earlier plates, so a run that fails after rewriting some must
    not leave it to vouch for a mixture. Until then a failed rerun leaves the earlier cache as it was."""

    def __init__(self, out: Path) -> None:
        self.out, self.started = out, False

    def __call__(self) -> None:
        if not self.started:
            (self.out / MANIFEST_FILE).unlink(missing_ok=True)
            self.started = True


def _config_hash(table: ImageTable, config: PrepareConfig) -> str:
    payload = {"config": config.model_dump(mode="json"), "channels": table.channels, "format": CACHE_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _inputs_of(table: ImageTable, rows: pd.DataFrame) -> dict[str, list[int]]:
    """The :func:`~cellmorph.cache.input_record` of every file ``rows`` read."""
    return input_record(p for col in path_columns(table) for p in rows[col].astype(str))


def _plate_fingerprint(config_hash: str, rows: pd.DataFrame, stats: np.ndarray | None) -> str:
    h = hashlib.sha256(config_hash.encode())
    h.update("\n".join(rows["Metadata_ImageID"].astype(str)).encode())
    if stats is not None:
        h.update(np.round(stats, 6).tobytes())
    return h.hexdigest()[:16]


def prepare(
    table: ImageTable,
    out: Path,
    config: PrepareConfig | None = None,
    progress: bool = True,
    log=print,
    threads: int | None = None,
) -> dict:
    """Preprocess ``table`` into a tile cache at ``out``; returns a summary dict.

    Idempotent: plates already written with the same config and inputs are
    skipped. On bad input (without ``skip_bad``) nothing is left behind: a
    cache directory this call created is removed again. ``log`` receives one
    line per note (compounds the loader left out, images skipped as bad). ``progress``:
    bars on a terminal, one line per plate otherwise. ``threads``: torch CPU threads for
    the resize (default: :func:`cellmorph.runtime.default_threads`).
    """
    from cellmorph.runtime import torch_threads

    config = config or PrepareConfig()
    out = Path(out)
    started_ns = time.time_ns()
    created = created_root(out)
    require_output_dir(out, "cache folder")
    with output_lock(out, "prepare"):  # one prepare per cache: a second fails here, touching nothing
        # Temporaries of writes a killed run (kill -9, power loss) never finished; only those older
        # than this run, so nothing this run writes is touched.
        leftovers = remove_temporary_files(out, older_than_ns=started_ns)
        try:
            with torch_threads(threads), disk_full_as_error():
                return _prepare(table, out, config, progress, log, leftovers)
        except BaseException as exc:
            remove_temporary_files(out)
            # Bad input or a full disk: remove what this call created. An interrupt keeps finished
            # plates (each is complete on its own), so a rerun resumes.
            if created is not None and isinstance(exc, CellmorphError) and created.exists():
                shutil.rmtree(created)
            raise


def _prepare(table: ImageTable, out: Path, config: PrepareConfig, progress: bool, log, leftovers: int = 0) -> dict:
    bad = _Bad()
    _check_plate_names(table)
    table = _usable_images(table, config, bad)
    config_hash = _config_hash(table, config)
    reader = _FieldReader(table, config.tile_grid)
    writes = _CacheWrites(out)
    rebuilt: dict[str, str] = {}
    with Progress(progress) as bar:
        stats = _dmso_statistics(table, config, out, config_hash, reader, bad, bar, writes)
        keep = table.frame if config.include_controls else table.frame[~table.frame["Metadata_IsControl"]]
        keep = keep[~keep["Metadata_ImageID"].isin({r["Metadata_ImageID"] for r in bad.rows})]
        plates = list(keep.groupby("Metadata_Plate", sort=True))
        task = bar.task("plates", len(plates))
        plate_summaries = []
        for plate, rows in plates:
            group = {"plate": plate, "batch": rows["Metadata_Batch"].iloc[0]}.get(config.normalize)
            plate_stats = stats.get(group) if group is not None else None
            fingerprint = _plate_fingerprint(config_hash, rows, plate_stats)
            # Recorded before the files are read, so a file replaced while it is read shows next time.
            inputs = _inputs_of(table, rows)
            summary, why = finished_plate(out, plate, fingerprint, inputs)
            if summary is not None:
                bad.rows.extend(summary.get("skipped", []))  # listed again though not read again
            else:
                if why is not None:
                    rebuilt[str(plate)] = why
                plate_bad = _Bad()
                tiles = _plate_tiles(table, rows, plate_stats, config, reader, plate_bad)
                bad.rows.extend(plate_bad.rows)
                if tiles:
                    writes()
                    summary = write_plate(out, plate, *tiles, fingerprint, inputs, plate_bad.rows)
            if summary is not None:
                plate_summaries.append(summary)
            task.advance(info=f"({plate}): {summary['n_tiles'] if summary else 0} tiles")

    # The index and manifest, written last: their presence marks a complete cache.
    if not plate_summaries:
        raise BadInputError("no tiles were produced (every image was bad or empty)")
    shapes = {tuple(s["tile_shape"]) for s in plate_summaries}
    if len(shapes) != 1:
        raise BadInputError(f"plates produced different tile shapes {sorted(shapes)}; fields must share one size")
    skipped = pd.DataFrame(bad.rows, columns=["Metadata_ImageID", "reason"])
    writes()
    manifest = write_index_and_manifest(
        out,
        plate_summaries,
        skipped,
        source=table.source,
        channels=list(table.channels) + [f"zero{i}" for i in range(len(table.channels), config.pad_channels or 0)],
        excluded_compounds=dict(table.excluded),
        config=config.model_dump(mode="json"),
        config_hash=config_hash,
        provenance=run_info(),
    )
    # Notes come after success, so a failure ends in its one error line alone.
    if table.excluded:
        log(table.excluded_note())
    if leftovers:
        log(f"note: removed {leftovers} temporary file(s) an interrupted earlier run left in {out}")
    for line in _rebuild_notes(rebuilt):
        log(line)
    for r in bad.rows:
        log(f"skipped {r['Metadata_ImageID']}: {r['reason']}")
    return {k: manifest[k] for k in ("n_tiles", "n_images", "n_treated_tiles", "n_control_tiles", "n_skipped", "tile_shape")} | {
        "n_plates": len(manifest["plates"]),
        "cache": str(out),
    }


def _rebuild_notes(rebuilt: dict[str, str], shown: int = 10) -> list[str]:
    """One note per plate built again because its inputs changed or its files were damaged, and one
    for all plates an earlier release cached without recording their inputs."""
    untracked = sorted(p for p, why in rebuilt.items() if why == UNTRACKED)
    notes = [f"note: rebuilt plate {plate}: {why}" for plate, why in sorted(rebuilt.items()) if why != UNTRACKED]
    if untracked:
        more = f" and {len(untracked) - shown} more" if len(untracked) > shown else ""
        notes.append(f"note: rebuilt {len(untracked)} plate(s) cached without a record of their input files "
                     f"(an earlier cellmorph), so possibly stale: {', '.join(untracked[:shown])}{more}")
    return notes


def _check_plate_names(table: ImageTable) -> None:
    """Every plate name must give its own file name (:func:`~cellmorph.cache.plate_stem`): not empty,
    and not the name of another plate but for letter case."""
    where = table.origin or f"{table.source} table"
    plates = table.frame["Metadata_Plate"].astype(str)
    empty = plates.str.strip() == ""
    if empty.any():
        image = table.frame["Metadata_ImageID"].iloc[int(np.argmax(empty.to_numpy()))]
        raise BadInputError(f"{where}: image {image!r} has an empty plate name")
    clash = case_collisions(plates.unique())
    if clash:
        raise BadInputError(
            f"{where}: plates {clash[0]!r} and {clash[1]!r} differ only in letter case; their cache files would "
            "overwrite each other on a case-insensitive file system (macOS, Windows): rename one"
        )


def _usable_images(table: ImageTable, config: PrepareConfig, bad: _Bad) -> ImageTable:
    """Cheap checks before any pixel is read: missing files and plates (or batches) without DMSO."""
    frame = table.frame
    missing = missing_files(table)
    if missing:
        if not config.skip_bad:
            pos, path = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise BadInputError(f"{path}: missing image (table row {pos + 1}, {frame.iloc[pos]['Metadata_ImageID']}){more}")
        drop = sorted({pos for pos, _ in missing})
        for pos, path in missing:
            bad.add(frame.iloc[pos], f"missing image {path}")
        frame = frame.drop(index=frame.index[drop])
    lacking = check_controls(replace(table, frame=frame.reset_index(drop=True)), config.normalize)
    if lacking:
        what = "plate" if config.normalize == "plate" else "batch"
        hint = " Use --normalize batch to pool the DMSO of the plate's batch." if what == "plate" else ""
        if not config.skip_bad:
            raise BadInputError(f"{what} {lacking[0]} has no DMSO control fields to normalise against.{hint}")
        keys = _group_key(frame, config.normalize)
        for _, row in frame[keys.isin(lacking)].iterrows():
            bad.add(row, f"{what} {row['Metadata_Plate' if what == 'plate' else 'Metadata_Batch']} has no DMSO")
        frame = frame[~keys.isin(lacking)]
    if frame.empty:
        why = f"all {len(table)} images were bad" if len(table) else "none of its rows was loaded"
        raise BadInputError(f"{table.origin or table.source + ' table'}: no usable images left to prepare ({why})")
    return replace(table, frame=frame.reset_index(drop=True))


class _FieldReader:
    """Reads fields of one table (safe from several threads); :meth:`check`, called by the consumer in
    table order, holds every field to the size of the first one, so the outcome never depends on
    which thread finished first."""

    def __init__(self, table: ImageTable, grid: tuple[int, int] = (1, 1)) -> None:
        self.table, self.grid = table, grid
        self.shape: tuple[int, int] | None = None

    def __call__(self, row) -> np.ndarray:
        """The field's C×H×W pixels."""
        return read_planes(self.table, row)

    def check(self, row, shape) -> None:
        """``shape``: the field's (H, W)."""
        if self.shape is None:
            check_tile_grid(row_paths(self.table, row)[0], shape, self.grid)
            self.shape = tuple(shape)
        else:
            check_field_shape(row_paths(self.table, row)[0], shape, self.shape)


def _dmso_statistics(table, config: PrepareConfig, out: Path, config_hash: str, read: _FieldReader, bad: _Bad,
                     bar: Progress, writes=lambda: None) -> dict[str, np.ndarray]:
    """{plate or batch: (2, channels) mean and std} of the Anscombe-transformed DMSO fields only.

    Read back from the cache when its controls (their ids and files' sizes and mtimes) and config
    are unchanged. ``writes`` is called before the statistics file is (re)written.
    """
    if config.normalize == "none":
        return {}
    controls = table.frame[table.frame["Metadata_IsControl"]]
    stats_fingerprint = hashlib.sha256(
        (config_hash + "\n".join(controls["Metadata_ImageID"].astype(str))
         + json.dumps(_inputs_of(table, controls), sort_keys=True)).encode()
    ).hexdigest()[:16]
    stats: dict[str, np.ndarray] = {}
    saved = read_norm_stats(out, stats_fingerprint)
    if saved is not None:
        saved_stats, skipped = saved
        bad.rows.extend(skipped)
        for key, rows in saved_stats.groupby("group", sort=True):
            rows = rows.set_index("channel").loc[list(table.channels)]
            stats[key] = np.stack([rows["mean"].to_numpy(), rows["std"].to_numpy()])
        return stats
    stats_bad = _Bad()
    groups = list(controls.groupby(_group_key(controls, config.normalize), sort=True))
    task = bar.task(f"DMSO statistics per {config.normalize}", len(groups))
    stat_rows = []

    def field_sums(row):
        """(the field's (H, W), its moments), or the BadInputError reading it."""
        try:
            planes = read(row)
        except BadInputError as exc:
            return exc
        return planes.shape[1:], ChannelMoments.of_field(planes)

    for key, rows in groups:
        moments = ChannelMoments(len(table.channels))
        records = [row for _, row in rows.iterrows()]
        # Fields are read and summed in a small pool; the sums are added here in table order, so
        # the statistics are the same bits whatever the thread count.
        for row, result in zip(records, _in_order(field_sums, records)):
            try:
                if isinstance(result, BadInputError):
                    raise result
                shape, sums = result
                read.check(row, shape)
            except BadInputError as exc:
                if not config.skip_bad:
                    raise
                stats_bad.add(row, str(exc))
                continue
            moments.add(sums)
        if moments.n_images == 0:
            raise BadInputError(f"{config.normalize} {key}: no readable DMSO control fields")
        stats[key] = np.stack([moments.mean, moments.std])
        if not np.isfinite(stats[key]).all():
            # read_planes refuses NaN, ±inf and negative pixels, so this is a guard, not a path:
            # non-finite statistics would turn every tile of the group into zeros.
            raise BadInputError(f"{config.normalize} {key}: the DMSO statistics are not finite numbers "
                                f"(mean {moments.mean.tolist()}, std {moments.std.tolist()})")
        for i, ch in enumerate(table.channels):
            stat_rows.append({"group": key, "level": config.normalize, "channel": ch, "mean": moments.mean[i],
                              "std": moments.std[i], "n_images": moments.n_images, "n_pixels": moments.count})
        task.advance(info=f"({key}): {moments.n_images} DMSO fields")
    bad.rows.extend(stats_bad.rows)
    writes()
    write_norm_stats(out, pd.DataFrame(stat_rows), stats_fingerprint, stats_bad.rows)
    return stats


class FieldMap:
    """Anscombe → z-score → 8-bit map of the C×H×W fields of one plate (one set of DMSO statistics).

    The result is byte for byte that of :func:`anscombe`, :func:`zscore` and :func:`to_uint8`:
    the same float32 operations in the same order, applied per pixel value instead of per pixel
    for 8/16-bit fields (a 16-bit field has at most 65,536 values, against 1.3 M pixels per
    channel), else in one float32 buffer without their full-field temporaries (a 1280×1024×3
    field is 15.7 MB per copy). The value tables depend only on the statistics, so they are made
    once per plate and shared by prepare's worker threads. ``scaling="tile"`` returns the float
    field, mapped per tile afterwards.
    """

    def __init__(self, stats: np.ndarray | None, config: PrepareConfig) -> None:
        self.stats, self.scaling, self.fixed_range = stats, config.scaling, config.fixed_range
        self._tables: dict = {}
        self._lock = threading.Lock()

    def __call__(self, planes: np.ndarray) -> np.ndarray:
        planes = np.asarray(planes)
        if planes.dtype in (np.uint8, np.uint16) and self.scaling != "tile":
            return self._lookup(planes)
        x = _normalise_in_place(planes.astype(np.float32), self.stats)
        if self.scaling == "tile":
            return x
        lo, hi = (float(x.min()), float(x.max())) if self.scaling == "image" else self.fixed_range
        return _scale_to_uint8(x, lo, hi)

    def _table(self, dtype, channels: int) -> np.ndarray:
        """(channels, levels) float32: every stored value through Anscombe and the z-score, laid out
        like a channel-first field so :func:`_normalise_in_place` does exactly a field's arithmetic;
        for fixed scaling already mapped to 8 bits."""
        key = (np.dtype(dtype).str, channels)
        with self._lock:
            if key not in self._tables:
                levels = np.arange(np.iinfo(dtype).max + 1, dtype=np.float32)
                table = _normalise_in_place(np.repeat(levels[None, :], channels, axis=0), self.stats)
                self._tables[key] = table if self.scaling == "image" else _scale_to_uint8(table, *self.fixed_range)
            return self._tables[key]

    def _lookup(self, planes: np.ndarray) -> np.ndarray:
        channels = planes.shape[0]
        table = self._table(planes.dtype, channels)
        if self.scaling == "image":
            # Anscombe and the z-score are non-decreasing, so the field's float extremes are the
            # table's values at each channel's raw extremes.
            lo = float(min(table[c, planes[c].min()] for c in range(channels)))
            hi = float(max(table[c, planes[c].max()] for c in range(channels)))
            table = _scale_to_uint8(table.copy(), lo, hi)
        out = np.empty(planes.shape, dtype=np.uint8)
        for c in range(channels):
            np.take(table[c], planes[c], out=out[c])
        return out


def field_to_uint8(planes: np.ndarray, stats: np.ndarray | None, config: PrepareConfig) -> np.ndarray:
    """One C×H×W field through Anscombe → z-score → 8-bit map (:class:`FieldMap`)."""
    return FieldMap(stats, config)(planes)


def _scale_to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """:func:`to_uint8`'s map of float32 ``x`` onto 0–255, in place."""
    x -= lo
    x *= 255.0 / (hi - lo) if hi > lo else 0.0
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def _in_order(work, items, ahead: int = 4):
    """``work`` over ``items`` in a pool of up to 2 threads (TIFF decoding, numpy and torch release
    the GIL; torch_threads has set the count), yielding results in the items' order.

    At most ``ahead`` items are in flight, so memory stays bounded by a few fields however slow
    the consumer, and a consumer that stops early (bad input) waits for those few only.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    remaining = iter(items)
    with ThreadPoolExecutor(max(1, min(2, torch.get_num_threads()))) as pool:
        in_flight = deque(pool.submit(work, item) for item in islice(remaining, ahead))
        while in_flight:
            result = in_flight.popleft().result()
            for item in remaining:
                in_flight.append(pool.submit(work, item))
                break
            yield result


def _field_tiles(row, field_map: FieldMap, config: PrepareConfig, read: _FieldReader):
    """(uint8 tiles (k, C, h, w) kept, their tile numbers, the field's (H, W)) of one field, or the
    BadInputError reading it. A field too small for the tile grid is not cut (no tiles, no tile
    numbers): the consumer's ``read.check`` refuses it in table order."""
    try:
        planes = read(row)
    except BadInputError as exc:
        return exc
    if planes.shape[1] < config.tile_grid[0] or planes.shape[2] < config.tile_grid[1]:
        return None, None, planes.shape[1:]
    field = field_map(planes)
    tiles, _ = split_tiles(field, config.tile_grid)
    if config.scaling == "tile":
        tiles = np.stack([to_uint8(t, "image") for t in tiles])
    kept = [
        k
        for k, tile in enumerate(tiles)
        if config.empty_tile_fraction is None
        or not is_empty_tile(tile, config.empty_tile_level, config.empty_tile_fraction)
    ]
    # Resize per field, not per plate, so memory stays bounded by one field.
    resized = resize_tiles(tiles[kept], config.tile_size) if config.tile_size and kept else tiles[kept]
    return resized, kept, planes.shape[1:]


def _plate_tiles(table, rows: pd.DataFrame, plate_stats, config: PrepareConfig, read: _FieldReader,
                 bad: _Bad) -> tuple[np.ndarray, pd.DataFrame] | None:
    """One plate's fields → (uint8 tiles (n, C, h, w), their index rows); None when no tile is left.

    Fields are processed by a small thread pool (TIFF decoding, numpy and torch release the GIL),
    results taken in table order, so the cache is the same bytes whatever the thread count. Tiles
    go into one array allocated for the plate: per-field arrays kept alive between each field's
    large temporaries fragmented the heap, and one 240-field plate held ~3 GB (benchmarks/RESULTS.md).
    """
    records = [row for _, row in rows.iterrows()]
    per_field = config.tile_grid[0] * config.tile_grid[1]
    field_map = FieldMap(plate_stats, config)
    tiles_out: np.ndarray | None = None
    n, fields, tile_numbers = 0, [], []
    for pos, (row, result) in enumerate(zip(records, _in_order(lambda r: _field_tiles(r, field_map, config, read),
                                                                records))):
        try:
            if isinstance(result, BadInputError):
                raise result
            resized, kept, shape = result
            read.check(row, shape)
        except BadInputError as exc:
            if not config.skip_bad:
                raise
            bad.add(row, str(exc))
            continue
        if not len(resized):  # every tile of the field was empty
            continue
        if tiles_out is None:
            tiles_out = np.empty((len(records) * per_field, *resized.shape[1:]), dtype=np.uint8)
        tiles_out[n : n + len(resized)] = resized
        n += len(resized)
        fields += [pos] * len(kept)
        tile_numbers += kept
    if not fields:
        return None
    arr = tiles_out[:n]
    if config.pad_channels and config.pad_channels > arr.shape[1]:
        pad = np.zeros((arr.shape[0], config.pad_channels - arr.shape[1], *arr.shape[2:]), np.uint8)
        arr = np.concatenate([arr, pad], axis=1)
    return arr, _tile_index(table, rows, np.array(fields), np.array(tile_numbers), config.tile_grid)


def _tile_index(table, rows: pd.DataFrame, fields: np.ndarray, tile_numbers: np.ndarray,
                grid: tuple[int, int]) -> pd.DataFrame:
    """The plate's index rows: each kept tile's field metadata (``fields``: positions in ``rows``),
    its number and grid position, the field's first file, and its offset in the plate array."""
    metadata = [c for c in table.frame.columns if c.startswith("Metadata_")]
    index = rows[metadata].iloc[fields].reset_index(drop=True)
    index["Metadata_Tile"] = tile_numbers
    index["Metadata_TileRow"], index["Metadata_TileCol"] = np.divmod(tile_numbers, grid[1])
    index["Metadata_SourcePath"] = rows[path_columns(table)[0]].iloc[fields].to_numpy()
    index["Metadata_PlateOffset"] = np.arange(len(index))
    return index
