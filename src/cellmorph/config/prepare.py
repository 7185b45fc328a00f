"""How ``cellmorph prepare`` turns fields into cached 8-bit tiles (:class:`PrepareConfig`), without numpy,
pandas or torch (:mod:`cellmorph.preprocess` does the work)."""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The input layouts that cellmorph reads (cellmorph.data.layouts loads each).
Layout = Literal["bbbc021", "bbbc014", "crops", "generic", "ome-zarr", "pattern"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

# The `cellmorph prepare` option that sets each PrepareConfig field (named in its errors).
PREPARE_OPTIONS: dict[str, str] = {
    "normalize": "--normalize", "tile_grid": "--tiles", "tile_size": "--tile-size", "scaling": "--scaling",
    "empty_tile_fraction": "--empty-tile-fraction", "include_controls": "--controls/--no-controls",
    "skip_bad": "--skip-bad", "fixed_range": "--fixed-range", "empty_tile_level": "--empty-tile-level",
    "pad_channels": "--pad-channels",
}
TileCount = Annotated[int, Field(ge=1)]


class PrepareConfig(BaseModel):
    """How ``cellmorph prepare`` turns fields into cached 8-bit tiles."""

    model_config = ConfigDict(extra="forbid")

    normalize: Literal["plate", "batch", "none"] = Field(
        "plate", description="z-score against the DMSO fields of the same plate, of the plate's batch "
        "(Metadata_Batch, the week prefix: for plates without DMSO), or none",
    )
    tile_grid: tuple[TileCount, TileCount] = Field(
        (2, 2), description="tiles per field as (rows, cols); 2×2 gives 640×512 on BBBC021")
    tile_size: int | None = Field(
        None, ge=1, description="resize every tile to this square size (e.g. the model's 224)")
    scaling: Literal["image", "tile", "fixed"] = Field(
        "image",
        description="8-bit map: 'image' min-max per field over all channels (the paper, BBBC021); "
        "'tile' min-max per tile (the paper's BBBC014 code); 'fixed' clips the DMSO z-score to fixed_range",
    )
    fixed_range: tuple[float, float] = Field(
        (-2.0, 10.0), description="scaling fixed: the DMSO z-scores mapped to 0 and 255 (LOW,HIGH)")
    empty_tile_fraction: float | None = Field(
        None, ge=0.0, lt=1.0, allow_inf_nan=False,
        description="drop a tile when at most this fraction of its pixels exceed empty_tile_level (paper: 0.002)"
    )
    # A tile keeps pixels above this level; at 255 none could, and every tile would be dropped.
    empty_tile_level: int = Field(50, ge=0, le=254, description="the 8-bit level a pixel must exceed to count as "
                                  "cell, for empty_tile_fraction")
    include_controls: bool = Field(True, description="also cache the DMSO tiles (needed to make DMSO a class)")
    pad_channels: int | None = Field(
        None, ge=1, description="append all-zero channels up to this count (BBBC014: DAPI, FITC + a zero third channel)"
    )
    skip_bad: bool = Field(False, description="log and exclude bad images (CACHE/skipped.csv) instead of stopping")

    @field_validator("fixed_range")
    @classmethod
    def _check_fixed_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(value[0]) and math.isfinite(value[1])) or value[0] >= value[1]:
            raise ValueError(f"expected (low, high) with low < high, got {tuple(value)}")
        return value
