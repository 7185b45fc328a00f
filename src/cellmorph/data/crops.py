"""Crop tables and generic CellProfiler-style layouts.

A crop table is a CSV with ``FileName`` (relative to the CSV's folder) plus
``Metadata_Plate, Metadata_Well, Metadata_Site, Metadata_Compound,
Metadata_Concentration, Metadata_MoA``; each file is one H×W×C crop (``.npy``
or TIFF). Extra ``Metadata_*`` columns are kept.

A generic layout maps a user's own CSV (e.g. a CellProfiler image table with
``FileName_DNA`` / ``PathName_DNA`` columns) onto the same table through a
:class:`GenericLayout` config, so no code changes are needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from cellmorph.data.table import (
    CONTROL_COMPOUND,
    read_table_csv,
    STACK_COLUMN,
    ImageTable,
    batch_of_plate,
    channel_column,
)
from cellmorph.errors import BadInputError

DEFAULT_CHANNELS: tuple[str, ...] = ("DAPI", "Tubulin", "Actin")
CROP_COLUMNS: tuple[str, ...] = (
    "FileName",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Compound",
    "Metadata_Concentration",
    "Metadata_MoA",
)


def read_moa_table(path: Path) -> pd.DataFrame:
    """A ``compound,concentration,moa`` table (BBBC021_v1_moa.csv style)."""
    return read_table_csv(path, ("compound", "moa"))


def label_from_moa_table(frame: pd.DataFrame, moa: pd.DataFrame, source: Path, moa_path: Path) -> pd.Series:
    """MoA per row, by compound; every compound must be in the MoA table."""
    mapping = moa.drop_duplicates("compound").set_index("compound")["moa"].astype(str)
    compounds = frame["Metadata_Compound"].astype(str)
    labels = compounds.map(mapping)
    absent = labels.isna()
    if absent.any():
        row = int(np.flatnonzero(absent.to_numpy())[0])
        raise BadInputError(
            f"{source}: row {row + 2}: compound {compounds.iloc[row]!r} is absent from the MoA table {moa_path}"
        )
    return labels


def _finish(frame: pd.DataFrame, control_compound: str) -> pd.DataFrame:
    frame["Metadata_Plate"] = frame["Metadata_Plate"].astype(str)
    frame["Metadata_Well"] = frame["Metadata_Well"].astype(str)
    frame["Metadata_Compound"] = frame["Metadata_Compound"].astype(str)
    frame["Metadata_MoA"] = frame["Metadata_MoA"].astype(str)
    frame["Metadata_Concentration"] = pd.to_numeric(frame["Metadata_Concentration"], errors="coerce").astype(float)
    frame["Metadata_Site"] = pd.to_numeric(frame["Metadata_Site"], errors="coerce").fillna(0).astype(int)
    if "Metadata_Batch" not in frame.columns:
        frame["Metadata_Batch"] = frame["Metadata_Plate"].map(batch_of_plate)
    frame["Metadata_Batch"] = frame["Metadata_Batch"].astype(str)
    frame["Metadata_IsControl"] = frame["Metadata_Compound"] == control_compound
    return frame


def load_crop_table(
    index_csv: Path,
    channels: tuple[str, ...] = DEFAULT_CHANNELS,
    moa_csv: Path | None = None,
    control_compound: str = CONTROL_COMPOUND,
) -> ImageTable:
    """Load a crop table; ``FileName`` is relative to the CSV's folder.

    With ``moa_csv`` the labels come from that ``compound,moa`` table (a
    compound absent from it is an error); otherwise from ``Metadata_MoA``.
    """
    index_csv = Path(index_csv)
    required = CROP_COLUMNS if moa_csv is None else tuple(c for c in CROP_COLUMNS if c != "Metadata_MoA")
    raw = read_table_csv(index_csv, required)
    frame = raw.copy()
    if moa_csv is not None:
        frame["Metadata_MoA"] = label_from_moa_table(frame, read_moa_table(moa_csv), index_csv, Path(moa_csv))
    base = index_csv.parent.resolve()
    frame[STACK_COLUMN] = [str(base / name) for name in frame["FileName"].astype(str)]
    frame["Metadata_ImageID"] = frame["FileName"].astype(str)
    frame = _finish(frame.drop(columns=["FileName"]), control_compound)
    return ImageTable(frame.reset_index(drop=True), channels, source="crops", control_compound=control_compound)


class ChannelSpec(BaseModel):
    """Where one channel's file is: a file-name column and an optional folder column."""

    model_config = ConfigDict(extra="forbid")
    file_column: str
    folder_column: str | None = None


class GenericLayout(BaseModel):
    """Maps a user's CSV onto the ImageTable contract; load from YAML with ``GenericLayout(**yaml)``.

    Either ``channels`` (one single-channel file per channel, CellProfiler
    style) or ``stack_column`` + ``channel_names`` (one H×W×C file per row).
    Relative paths resolve against ``root`` (default: the CSV's folder).
    """

    model_config = ConfigDict(extra="forbid")
    csv: Path
    root: Path | None = None
    channels: dict[str, ChannelSpec] = Field(default_factory=dict)
    stack_column: str | None = None
    channel_names: list[str] = Field(default_factory=list)
    plate_column: str = "Metadata_Plate"
    well_column: str = "Metadata_Well"
    site_column: str | None = "Metadata_Site"
    compound_column: str = "Metadata_Compound"
    concentration_column: str = "Metadata_Concentration"
    moa_column: str | None = "Metadata_MoA"
    batch_column: str | None = None
    moa_table: Path | None = None
    control_compound: str = CONTROL_COMPOUND


def load_generic(layout: GenericLayout) -> ImageTable:
    if not layout.channels and not layout.stack_column:
        raise BadInputError(f"{layout.csv}: layout config names neither channels nor stack_column")
    if layout.stack_column and not layout.channel_names:
        raise BadInputError(f"{layout.csv}: layout config with stack_column needs channel_names")
    required = [layout.plate_column, layout.well_column, layout.compound_column, layout.concentration_column]
    if layout.moa_table is None:
        if not layout.moa_column:
            raise BadInputError(f"{layout.csv}: layout config needs moa_column or moa_table")
        required.append(layout.moa_column)
    if layout.stack_column:
        required.append(layout.stack_column)
    for spec in layout.channels.values():
        required.append(spec.file_column)
        if spec.folder_column:
            required.append(spec.folder_column)
    raw = read_table_csv(layout.csv, tuple(dict.fromkeys(required)))
    root = Path(layout.root) if layout.root is not None else Path(layout.csv).resolve().parent
    frame = raw[[c for c in raw.columns if c.startswith("Metadata_")]].copy()
    frame["Metadata_Plate"] = raw[layout.plate_column]
    frame["Metadata_Well"] = raw[layout.well_column]
    frame["Metadata_Site"] = raw[layout.site_column] if layout.site_column in raw.columns else 0
    frame["Metadata_Compound"] = raw[layout.compound_column]
    frame["Metadata_Concentration"] = raw[layout.concentration_column]
    if layout.batch_column:
        frame["Metadata_Batch"] = raw[layout.batch_column]
    if layout.moa_table is not None:
        frame["Metadata_MoA"] = label_from_moa_table(
            frame, read_moa_table(layout.moa_table), Path(layout.csv), Path(layout.moa_table)
        )
    else:
        frame["Metadata_MoA"] = raw[layout.moa_column]

    def resolve(folder_values, file_values):
        return [str(root / str(d) / str(f)) if d is not None else str(root / str(f)) for d, f in zip(folder_values, file_values)]

    if layout.stack_column:
        channels = tuple(layout.channel_names)
        frame[STACK_COLUMN] = resolve([None] * len(raw), raw[layout.stack_column])
        ids = raw[layout.stack_column].astype(str)
    else:
        channels = tuple(layout.channels)
        for name, spec in layout.channels.items():
            folders = raw[spec.folder_column] if spec.folder_column else [None] * len(raw)
            frame[channel_column(name)] = resolve(folders, raw[spec.file_column])
        ids = frame[channel_column(channels[0])]
    frame["Metadata_ImageID"] = ids.astype(str).to_numpy()
    frame = _finish(frame, layout.control_compound)
    return ImageTable(frame.reset_index(drop=True), channels, source="generic", control_compound=layout.control_compound)
