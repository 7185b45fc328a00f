"""Reading a tile cache written by :func:`cellmorph.preprocess.prepare`.

Layout of ``CACHE/``::

    manifest.json           channels, tile shape, counts, config, provenance; written last
    index.parquet           one row per tile: Metadata_* columns + Metadata_PlateOffset
    norm_stats.parquet      DMSO mean/std per plate (or batch) and channel
    plates/<plate>.npy      uint8 tiles, shape (n, C, h, w), memory-mapped on read
    plates/<plate>.parquet  that plate's rows of the index
    skipped.csv             images excluded with --skip-bad, and why

Training never re-reads TIFFs: it gathers tiles from the memory-mapped plate
arrays by global tile number (the row of ``index``).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.preprocess import INDEX_FILE, MANIFEST_FILE, PLATES_DIR, STATS_FILE


class TileCache:
    """A prepared dataset: ``index`` (a DataFrame, one row per tile) plus pixel access."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.is_file() or not (self.root / INDEX_FILE).is_file():
            raise CellmorphError(
                f"{self.root}: not a complete cellmorph cache (no {MANIFEST_FILE}/{INDEX_FILE}); "
                "run `cellmorph prepare` first"
            )
        self.manifest: dict = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise CellmorphError(f"{self.root}: cache is incomplete; rerun `cellmorph prepare`")
        self.index: pd.DataFrame = pd.read_parquet(self.root / INDEX_FILE)
        self._arrays: dict[str, np.ndarray] = {}

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

    @cached_property
    def norm_stats(self) -> pd.DataFrame | None:
        path = self.root / STATS_FILE
        return pd.read_parquet(path) if path.is_file() else None

    def plate_array(self, plate: str) -> np.ndarray:
        arr = self._arrays.get(plate)
        if arr is None:
            arr = np.load(self.root / PLATES_DIR / f"{plate}.npy", mmap_mode="r")
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
