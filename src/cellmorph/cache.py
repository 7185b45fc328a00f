"""The on-disk tile cache: its format, the writers :func:`cellmorph.preprocess.prepare` uses, and the reader.

Layout of ``CACHE/``::

    manifest.json             channels, tile shape, counts, config, provenance; written last
    index.parquet             one row per tile: Metadata_* columns + Metadata_PlateOffset
    norm_stats.parquet        DMSO mean/std per plate (or batch) and channel
    norm_stats.parquet.json   fingerprint of the inputs those statistics came from
    plates/<plate>.npy        uint8 tiles, shape (n, C, h, w), memory-mapped on read
    plates/<plate>.parquet    that plate's rows of the index
    plates/<plate>.json       that plate's fingerprint, tile count and shape, its input files (path, size,
                              mtime) and images skipped as bad; written after its array
    skipped.csv               images excluded with --skip-bad, and why

``<plate>`` is the plate name made safe as a file name (:func:`plate_stem`): plate names come
from the user's tables, so ``../x`` or ``a/b`` must not reach outside ``plates/``.

Training never re-reads TIFFs: it gathers tiles from the memory-mapped plate
arrays by global tile number (the row of ``index``). Every file is written
under a temporary name and renamed, so a file under its final name is complete;
a plate counts as finished once its ``.json`` exists, and the cache once
``manifest.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.runinfo import atomic_path, write_json

CACHE_FORMAT = 1
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "norm_stats.parquet"
STATS_SIDECAR = STATS_FILE + ".json"
SKIPPED_FILE = "skipped.csv"
PLATES_DIR = "plates"
_PLATE_PARTS = (".json", ".npy", ".parquet")
REBUILD_HINT = "rerun `cellmorph prepare` with the same options to rebuild it"


# Characters a plate's file name keeps as they are; any other is percent-encoded (its UTF-8 bytes).
_SAFE_CHARACTER = re.compile(r"[A-Za-z0-9._-]")
# A file name is at most 255 bytes, and atomic_path's temporary adds ".<name>.<8 random><suffix>"
# around it: 200 leaves room for ".parquet" and that.
MAX_STEM = 200
_HASH_CHARS = 16


def plate_stem(plate: str) -> str:
    """The file-name stem of ``plate``: one name inside ``plates/``, whatever the plate is called.

    Letters, digits, ``.``, ``_`` and ``-`` stay (so ``Week1_22123`` keeps the name earlier releases
    gave it); anything else, ``/``, ``%`` and a leading ``.`` included, becomes ``%XX`` per UTF-8 byte,
    so ``..`` cannot climb out, no plate file is hidden (or mistaken for a temporary), and
    ``urllib.parse.unquote`` gives the plate back. A stem over :data:`MAX_STEM` characters is cut,
    with ``~`` and a digest of the whole name appended (``~`` is never left as it is, so such a stem
    cannot equal another plate's).
    """
    plate = str(plate)
    if not plate:
        raise CellmorphError("a plate name is empty; every image needs its plate (Metadata_Plate)")
    stem = "".join(
        ch if _SAFE_CHARACTER.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in plate
    )
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > MAX_STEM:
        digest = hashlib.sha256(plate.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
        head = re.sub(r"%[0-9A-F]?$", "", stem[: MAX_STEM - _HASH_CHARS - 1])  # never half an escape
        stem = f"{head}~{digest}"
    return stem


def plate_file(root: Path, plate: str, suffix: str) -> Path:
    """``root/plates/<plate_stem(plate)><suffix>`` (suffix ``.npy``, ``.parquet`` or ``.json``)."""
    return Path(root) / PLATES_DIR / f"{plate_stem(plate)}{suffix}"


def _readable_plate_file(root: Path, plate: str, suffix: str) -> Path:
    """The plate's file to read: :func:`plate_file`, or where a release before :func:`plate_stem`
    put it (the raw name: only plate names with other characters, e.g. a space, differ) when only
    that exists and is a file directly in ``plates/``."""
    path = plate_file(root, plate, suffix)
    if path.exists():
        return path
    folder = Path(root) / PLATES_DIR
    if str(plate) and "\0" not in str(plate):
        legacy = folder / f"{plate}{suffix}"
        if legacy.parent == folder and legacy.is_file():
            return legacy
    return path


def case_collisions(plates) -> tuple[str, str] | None:
    """Two of ``plates`` whose file names differ only in letter case (they would overwrite each
    other on a case-insensitive file system: macOS, Windows), else None."""
    seen: dict[str, str] = {}
    for plate in sorted(map(str, plates)):
        key = plate_stem(plate).lower()
        if key in seen:
            return seen[key], plate
        seen[key] = plate
    return None


def open_plate_array(path: Path, n_tiles: int, tile_shape) -> np.ndarray:
    """Memory-map one plate array of ``n_tiles`` tiles of ``tile_shape`` (C, h, w).

    A missing, truncated, damaged or mis-sized file is one CellmorphError line naming it.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CellmorphError(f"{path}: plate array of the cache is missing; {REBUILD_HINT}") from None
    except (ValueError, OSError) as exc:
        # numpy checks the header against the file size when it maps the file:
        # a truncated array fails here with "mmap length is greater than file size".
        raise CellmorphError(f"{path}: truncated or damaged plate array ({exc}); {REBUILD_HINT}") from None
    if arr.shape != (n_tiles, *tile_shape):
        raise CellmorphError(
            f"{path}: plate array holds {arr.shape[0]} tiles of shape {tuple(arr.shape[1:])}, the cache expects "
            f"{n_tiles} of {tuple(tile_shape)}; {REBUILD_HINT}"
        )
    return arr


# --------------------------------------------------------------------------- writing
# Why a plate an earlier run cached is built again (None: it was not cached, or for other options).
UNTRACKED = "untracked"


def input_record(paths) -> dict[str, list[int]]:
    """{path: [size in bytes, mtime in ns]} of the input files ``paths``: what a plate was made
    from, so a rerun sees a file replaced since (a missing file has size and mtime -1)."""
    record = {}
    for path in paths:
        path = os.path.abspath(path)  # the same file whatever folder prepare runs from
        try:
            stat = os.stat(path)
            record[path] = [int(stat.st_size), int(stat.st_mtime_ns)]
        except OSError:
            record[path] = [-1, -1]
    return record


def _changed_inputs(recorded: dict, current: dict) -> str:
    """What differs between two :func:`input_record` results, in a few words naming a file."""
    differences = [(p, "changed") for p in sorted(current) if p in recorded and list(recorded[p]) != list(current[p])]
    differences += [(p, "is new") for p in sorted(set(current) - set(recorded))]
    differences += [(p, "is no longer listed") for p in sorted(set(recorded) - set(current))]
    if not differences:
        return "its input files changed"
    path, what = differences[0]
    more = f" (and {len(differences) - 1} more files)" if len(differences) > 1 else ""
    return f"input file {path} {what} since it was cached{more}"


def finished_plate(root: Path, plate: str, fingerprint: str,
                   inputs: dict | None = None) -> tuple[dict | None, str | None]:
    """(the summary of ``plate``, None) if an earlier run finished it with the same fingerprint from
    the same ``inputs`` (:func:`input_record`) and its files are intact; else (None, why it is built
    again): None when no earlier run finished it or one did with other options or images,
    :data:`UNTRACKED` when its record holds no input files (a release before they were recorded),
    else a short reason naming a file."""
    sidecar = plate_file(root, plate, ".json")
    if not sidecar.is_file() or not plate_file(root, plate, ".parquet").is_file():
        return None, None
    try:
        done = json.loads(sidecar.read_text())
    except ValueError:
        return None, f"its cache record {sidecar} is unreadable"
    if not isinstance(done, dict) or done.get("fingerprint") != fingerprint:
        return None, None
    if inputs is not None:
        if not isinstance(done.get("inputs"), dict):
            return None, UNTRACKED
        if done["inputs"] != inputs:
            return None, _changed_inputs(done["inputs"], inputs)
    try:
        open_plate_array(plate_file(root, plate, ".npy"), done["n_tiles"], done["tile_shape"])
    except CellmorphError:
        return None, f"its tile array {plate_file(root, plate, '.npy')} is damaged"
    return done, None


def write_plate(root: Path, plate: str, tiles: np.ndarray, index: pd.DataFrame, fingerprint: str,
                inputs: dict | None = None, skipped: list[dict] | None = None) -> dict:
    """Write one plate's tile array, its index rows and, last, the sidecar that marks it finished
    (with ``inputs``, the plate's :func:`input_record`, and ``skipped``, its images skipped as bad,
    so a rerun that reuses the plate lists them again)."""
    with atomic_path(plate_file(root, plate, ".npy"), suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(tiles))
    with atomic_path(plate_file(root, plate, ".parquet")) as tmp:
        index.to_parquet(tmp, index=False)
    summary = {"plate": plate, "fingerprint": fingerprint, "n_tiles": len(tiles), "tile_shape": list(tiles.shape[1:])}
    if inputs is not None:
        summary["inputs"] = inputs
    if skipped:
        summary["skipped"] = list(skipped)
    write_json(plate_file(root, plate, ".json"), summary)
    return summary


def read_norm_stats(root: Path, fingerprint: str) -> tuple[pd.DataFrame, list[dict]] | None:
    """(normalisation statistics an earlier run computed from the same inputs, the control images it
    skipped as bad), else None. Statistics that are not all finite numbers (a release before bad
    pixels were refused could write NaN) are never reused."""
    root = Path(root)
    sidecar, path = root / STATS_SIDECAR, root / STATS_FILE
    if not (sidecar.is_file() and path.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text())
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
            return None
        stats = pd.read_parquet(path)
        if not np.isfinite(stats[["mean", "std"]].to_numpy(dtype=float)).all():
            return None
        return stats, list(record.get("skipped", []))
    except (ValueError, OSError, KeyError, TypeError):
        return None  # unreadable: recompute


def write_norm_stats(root: Path, stats: pd.DataFrame, fingerprint: str, skipped: list[dict] | None = None) -> None:
    """The statistics and their sidecar (``skipped``: control images left out as bad, listed again
    when a rerun reuses the statistics)."""
    with atomic_path(Path(root) / STATS_FILE) as tmp:
        stats.to_parquet(tmp, index=False)
    write_json(Path(root) / STATS_SIDECAR, {"fingerprint": fingerprint} | ({"skipped": skipped} if skipped else {}))


def write_index_and_manifest(
    root: Path,
    plates: list[dict],
    skipped: pd.DataFrame,
    source: str,
    channels: list[str],
    **details,
) -> dict:
    """Finish a cache: the index of ``plates`` (summaries from :func:`write_plate`), ``skipped.csv``,
    then the manifest, whose presence marks the cache complete. Plates of an earlier, different
    table are removed. ``details`` (config, provenance, ...) go into the manifest after the counts."""
    root = Path(root)
    index = pd.concat([pd.read_parquet(plate_file(root, s["plate"], ".parquet")) for s in plates], ignore_index=True)
    with atomic_path(root / INDEX_FILE) as tmp:
        index.to_parquet(tmp, index=False)
    if len(skipped):
        with atomic_path(root / SKIPPED_FILE) as tmp:
            skipped.to_csv(tmp, index=False)
    else:
        (root / SKIPPED_FILE).unlink(missing_ok=True)  # an earlier run's list no longer holds
    current = {s["plate"] for s in plates}
    current_stems = {plate_stem(p) for p in current}
    for sidecar in (root / PLATES_DIR).glob("*.json"):
        # By file name, not plate name: a release before plate_stem named files after the raw plate.
        stem = sidecar.name[: -len(".json")]
        if stem not in current_stems and not stem.startswith("."):
            for suffix in _PLATE_PARTS:
                (sidecar.parent / f"{stem}{suffix}").unlink(missing_ok=True)
    treated = index[~index["Metadata_IsControl"]]
    manifest = {
        "format": CACHE_FORMAT,
        "complete": True,
        "source": source,
        "channels": list(channels),
        "tile_shape": list(plates[0]["tile_shape"]),
        "n_tiles": int(len(index)),
        "n_images": int(index["Metadata_ImageID"].nunique()),
        "n_treated_tiles": int(len(treated)),
        "n_control_tiles": int(len(index) - len(treated)),
        "n_skipped": int(len(skipped)),
        "plates": sorted(current),
        **details,
    }
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


# The temporaries atomic_path makes for the cache's files (``.<final name>.<random><suffix>``, the
# suffix .npy for plate arrays, else .tmp): nothing else in the cache folder is ever removed as one.
_ROOT_FILES = "|".join(re.escape(n) for n in (MANIFEST_FILE, INDEX_FILE, STATS_FILE, STATS_SIDECAR, SKIPPED_FILE))
_ROOT_TEMPORARY = re.compile(rf"^\.(?:{_ROOT_FILES})\.[A-Za-z0-9_]+\.tmp$")
# Plate stems never start with "." (plate_stem), so a hidden name in plates/ is no plate's file.
_PLATE_TEMPORARY = re.compile(r"^\..+\.(?:npy\.[A-Za-z0-9_]+\.npy|(?:parquet|json)\.[A-Za-z0-9_]+\.tmp)$")


def temporary_files(root: Path) -> list[Path]:
    """The temporaries of unfinished cache writes under ``root`` (its own files and ``plates/``)."""
    root = Path(root)
    found = []
    for folder, pattern in ((root, _ROOT_TEMPORARY), (root / PLATES_DIR, _PLATE_TEMPORARY)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if pattern.match(p.name) and p.is_file()]
    return sorted(found)


def remove_temporary_files(root: Path, older_than_ns: int | None = None) -> int:
    """Remove the temporary files an interrupted or failed write left behind (finished files stay);
    with ``older_than_ns`` (a :func:`time.time_ns` value) only those last modified before then, so a
    run that starts by clearing what a killed run left cannot touch a write begun since. Returns
    how many it removed."""
    removed = 0
    for tmp in temporary_files(root):
        try:
            if older_than_ns is not None and tmp.stat().st_mtime_ns >= older_than_ns:
                continue
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


# --------------------------------------------------------------------------- reading
def cache_source(root: Path) -> str | None:
    """The layout a cache was prepared from (its manifest's ``source``), read from the manifest alone, without
    opening the index or the plates; None where the manifest cannot be read (opening the cache says why)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("source") if isinstance(manifest, dict) else None


class TileCache:
    """A prepared dataset: ``index`` (a DataFrame, one row per tile) plus pixel access.

    Opening checks every plate array against the index (a cheap header-versus-size
    check), so a damaged cache fails here, naming the file, not mid-training.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.is_file() or not (self.root / INDEX_FILE).is_file():
            raise CellmorphError(
                f"{self.root}: not a complete cellmorph cache (no {MANIFEST_FILE}/{INDEX_FILE}); "
                "run `cellmorph prepare` first"
            )
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise CellmorphError(f"{manifest_path}: unreadable cache manifest ({exc}); {REBUILD_HINT}") from None
        if not self.manifest.get("complete"):
            raise CellmorphError(f"{self.root}: cache is incomplete; rerun `cellmorph prepare`")
        try:
            self.index: pd.DataFrame = pd.read_parquet(self.root / INDEX_FILE)
        except (ValueError, OSError) as exc:
            raise CellmorphError(f"{self.root / INDEX_FILE}: unreadable cache index ({exc}); {REBUILD_HINT}") from None
        self._arrays: dict[str, np.ndarray] = {}
        for plate in self.index["Metadata_Plate"].unique():
            self.plate_array(plate)

    @classmethod
    def open(cls, root: Path) -> "TileCache":
        return cls(root)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.manifest["channels"])

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of every tile."""
        return tuple(self.manifest["tile_shape"])

    @property
    def excluded_compounds(self) -> dict[str, int]:
        """Images per compound the loader left out (absent from the MoA table); empty for older caches."""
        return dict(self.manifest.get("excluded_compounds", {}))

    @cached_property
    def norm_stats(self) -> pd.DataFrame | None:
        path = self.root / STATS_FILE
        return pd.read_parquet(path) if path.is_file() else None

    @cached_property
    def _tiles_per_plate(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.index["Metadata_Plate"].value_counts().items()}

    def plate_array(self, plate: str) -> np.ndarray:
        arr = self._arrays.get(plate)
        if arr is None:
            arr = open_plate_array(
                _readable_plate_file(self.root, plate, ".npy"), self._tiles_per_plate[str(plate)], self.tile_shape
            )
            self._arrays[plate] = arr
        return arr

    def tiles(self, rows) -> np.ndarray:
        """uint8 tiles (n, C, h, w) for global tile numbers ``rows`` (positions in ``index``)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.tile_shape), dtype=np.uint8)
        sub = self.index.iloc[rows]
        plates = sub["Metadata_Plate"].to_numpy()
        offsets = sub["Metadata_PlateOffset"].to_numpy()
        for plate in np.unique(plates):
            sel = np.flatnonzero(plates == plate)
            out[sel] = self.plate_array(plate)[offsets[sel]]
        return out

    def __getstate__(self):
        # Memory maps are reopened in worker processes rather than pickled.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state
