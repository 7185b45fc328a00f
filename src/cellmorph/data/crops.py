"""Crop tables, and the MoA-table labelling shared with generic layouts.

A crop table is a CSV with ``FileName`` (relative to the CSV's folder) plus
``Metadata_Plate, Metadata_Well, Metadata_Site, Metadata_Compound,
Metadata_Concentration, Metadata_MoA``; each file is one H×W×C crop (``.npy``
or TIFF). Extra ``Metadata_*`` columns are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cellmorph.data.table import (
    CONTROL_COMPOUND,
    STACK_COLUMN,
    ImageTable,
    batch_of_plate,
    numeric_column,
    read_table_csv,
)
from cellmorph.errors import BadInputError
from cellmorph.schema import UNLABELLED

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


def label_from_moa_table(frame: pd.DataFrame, moa: pd.DataFrame, source: Path, moa_path: Path,
                         require_labels: bool = True) -> pd.Series:
    """MoA per row, by compound; every compound must be in the MoA table unless not ``require_labels``
    (then an absent compound is :data:`~cellmorph.schema.UNLABELLED`)."""
    mapping = moa.drop_duplicates("compound").set_index("compound")["moa"].astype(str)
    compounds = frame["Metadata_Compound"].astype(str)
    labels = compounds.map(mapping)
    absent = labels.isna()
    if not require_labels:
        return labels.fillna(UNLABELLED)
    if absent.any():
        row = int(np.flatnonzero(absent.to_numpy())[0])
        raise BadInputError(
            f"{source}: row {row + 2}: compound {compounds.iloc[row]!r} is absent from the MoA table {moa_path}"
        )
    return labels


def unlabelled_moa(frame: pd.DataFrame, control_compound: str) -> pd.Series:
    """The label column of a table without labels: the control compound's, else UNLABELLED."""
    compounds = frame["Metadata_Compound"].astype(str)
    given = frame["Metadata_MoA"] if "Metadata_MoA" in frame.columns else pd.Series(pd.NA, index=frame.index)
    blank = given.isna() | (given.astype(str).str.strip() == "")
    fallback = compounds.where(compounds == control_compound, UNLABELLED)
    return given.astype(object).where(~blank, fallback).astype(str)


def complete_metadata(frame: pd.DataFrame, control_compound: str, source: Path | str = "table",
                      concentration_column: str = "Metadata_Concentration",
                      site_column: str | None = "Metadata_Site") -> pd.DataFrame:
    """Cast the Metadata_* columns to the table contract's types; derive Batch (if absent) and IsControl.

    ``frame`` holds the CSV ``source``'s rows in file order; a concentration that is not a finite
    number, or a site that is not a whole number, is an error naming the row and the CSV's column
    (``concentration_column``, ``site_column``; None: the CSV has no site column, every site is 0).
    """
    frame["Metadata_Plate"] = frame["Metadata_Plate"].astype(str)
    frame["Metadata_Well"] = frame["Metadata_Well"].astype(str)
    frame["Metadata_Compound"] = frame["Metadata_Compound"].astype(str)
    frame["Metadata_MoA"] = frame["Metadata_MoA"].astype(str)
    frame["Metadata_Concentration"] = numeric_column(frame["Metadata_Concentration"], source, concentration_column)
    frame["Metadata_Site"] = numeric_column(frame["Metadata_Site"], source, site_column or "Metadata_Site", whole=True)
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
    require_labels: bool = True,
) -> ImageTable:
    """Load a crop table; ``FileName`` is relative to the CSV's folder.

    With ``moa_csv`` the labels come from that ``compound,moa`` table (a
    compound absent from it is an error); otherwise from ``Metadata_MoA``.
    Without ``require_labels`` (``predict``), labels are optional: a crop of a compound
    with no known MoA is kept, labelled :data:`~cellmorph.schema.UNLABELLED`.
    """
    index_csv = Path(index_csv)
    labelled = require_labels and moa_csv is None
    required = CROP_COLUMNS if labelled else tuple(c for c in CROP_COLUMNS if c != "Metadata_MoA")
    raw = read_table_csv(index_csv, required)
    frame = raw.copy()
    if moa_csv is not None:
        frame["Metadata_MoA"] = label_from_moa_table(frame, read_moa_table(moa_csv), index_csv, Path(moa_csv),
                                                     require_labels)
    if not require_labels:
        frame["Metadata_MoA"] = unlabelled_moa(frame, control_compound)
    base = index_csv.parent.resolve()
    frame[STACK_COLUMN] = [str(base / name) for name in frame["FileName"].astype(str)]
    frame["Metadata_ImageID"] = frame["FileName"].astype(str)
    frame = complete_metadata(frame.drop(columns=["FileName"]), control_compound, index_csv)
    return ImageTable(
        frame.reset_index(drop=True), channels, source="crops", control_compound=control_compound, origin=str(index_csv)
    )
