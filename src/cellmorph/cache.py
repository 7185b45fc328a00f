"""The on-disk tile cache: its format, the writers :func:`cellmorph.preprocess.prepare` uses, and the reader.

Layout of ``CACHE/``::

    manifest.json             channels, tile shape, counts, config, provenance; written last
    index.parquet             one row per tile: Metadata_* columns + Metadata_PlateOffset
    norm_stats.parquet        DMSO mean/std per plate (or batch) and channel
    norm_stats.parquet.json   fingerprint of the inputs those statistics came from
    plates/<plate>.npy        uint8 tiles, shape (n, C, h, w), memory-mapped on read
    plates/<plate>.parquet    that plate's rows of the index
    plates/<plate>.json       that plate's fingerprint, tile count and shape; written after its array
    skipped.csv               images excluded with --skip-bad, and why

Training never re-reads TIFFs: it gathers tiles from the memory-mapped plate
arrays by global tile number (the row of ``index``). Every file is written
under a temporary name and renamed, so a file under its final name is complete;
a plate counts as finished once its ``.json`` exists, and the cache once
``manifest.json`` exists.
"""

from __future__ import annotations

import json
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


def plate_file(root: Path, plate: str, suffix: str) -> Path:
    """``root/plates/<plate><suffix>`` (suffix ``.npy``, ``.parquet`` or ``.json``)."""
    return Path(root) / PLATES_DIR / f"{plate}{suffix}"


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
def finished_plate(root: Path, plate: str, fingerprint: str) -> dict | None:
    """The summary of ``plate`` if an earlier run finished it from the same inputs and its files are intact."""
    sidecar = plate_file(root, plate, ".json")
    if not sidecar.is_file() or not plate_file(root, plate, ".parquet").is_file():
        return None
    try:
        done = json.loads(sidecar.read_text())
    except ValueError:
        return None
    if done.get("fingerprint") != fingerprint:
        return None
    try:
        open_plate_array(plate_file(root, plate, ".npy"), done["n_tiles"], done["tile_shape"])
    except CellmorphError:
        return None  # damaged since: rebuild it
    return done


def write_plate(root: Path, plate: str, tiles: np.ndarray, index: pd.DataFrame, fingerprint: str) -> dict:
    """Write one plate's tile array, its index rows and, last, the sidecar that marks it finished."""
    with atomic_path(plate_file(root, plate, ".npy"), suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(tiles))
    with atomic_path(plate_file(root, plate, ".parquet")) as tmp:
        index.to_parquet(tmp, index=False)
    summary = {"plate": plate, "fingerprint": fingerprint, "n_tiles": len(tiles), "tile_shape": list(tiles.shape[1:])}
    write_json(plate_file(root, plate, ".json"), summary)
    return summary


def read_norm_stats(root: Path, fingerprint: str) -> pd.DataFrame | None:
    """Normalisation statistics an earlier run computed from the same inputs, else None."""
    root = Path(root)
    sidecar, path = root / STATS_SIDECAR, root / STATS_FILE
    if not (sidecar.is_file() and path.is_file()):
        return None
    try:
        if json.loads(sidecar.read_text()).get("fingerprint") != fingerprint:
            return None
        return pd.read_parquet(path)
    except (ValueError, OSError):
        return None  # unreadable: recompute


def write_norm_stats(root: Path, stats: pd.DataFrame, fingerprint: str) -> None:
    with atomic_path(Path(root) / STATS_FILE) as tmp:
        stats.to_parquet(tmp, index=False)
    write_json(Path(root) / STATS_SIDECAR, {"fingerprint": fingerprint})


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
    current = {s["plate"] for s in plates}
    for sidecar in (root / PLATES_DIR).glob("*.json"):
        if sidecar.stem not in current:
            for suffix in _PLATE_PARTS:
                plate_file(root, sidecar.stem, suffix).unlink(missing_ok=True)
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


def remove_temporary_files(root: Path) -> None:
    """Temporary files an interrupted or failed write left behind (finished files stay)."""
    root = Path(root)
    if not root.is_dir():
        return
    for pattern in ("**/.*.tmp*", "**/.*.npy"):
        for tmp in root.glob(pattern):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading
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
                plate_file(self.root, plate, ".npy"), self._tiles_per_plate[str(plate)], self.tile_shape
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
