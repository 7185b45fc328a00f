"""Plate maps: which treatment is in which well, for layouts whose images carry no treatment metadata
(OME-Zarr HCS plates, folders of vendor TIFFs).

A plate map is a CSV with one row per treated or control well::

    Metadata_Plate,Metadata_Well,Metadata_Compound,Metadata_Concentration[,Metadata_MoA][,Metadata_<any>]

Wells are matched however they are written (``B3``, ``B03``, ``b03`` are one well). Labels come from
``Metadata_MoA`` or, as for crop tables, from a ``compound,moa`` table (``--moa``). Extra ``Metadata_*``
columns travel with the wells (pycytominer's convention).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.crops import complete_metadata, label_from_moa_table, read_moa_table, unlabelled_moa
from cellmorph.data.table import CONTROL_COMPOUND, ImageTable, read_table_csv
from cellmorph.errors import BadInputError
from cellmorph.runinfo import atomic_path

PLATE_MAP_COLUMNS: tuple[str, ...] = ("Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration")
_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")


def well_name(row: str, column: str | int) -> str:
    """The canonical well name of a plate row and column: ``("B", "3")`` → ``B03``."""
    return f"{str(row).strip().upper()}{int(column):02d}"


def canonical_well(text: str) -> str | None:
    """``B3``, ``b03``, ``B003`` → ``B03``; None when ``text`` is not a well name."""
    match = _WELL.match(str(text))
    return well_name(match.group(1), match.group(2)) if match else None


def read_plate_map(path: Path) -> pd.DataFrame:
    """The plate map at ``path``: its rows with ``Metadata_Well`` canonical; a bad or repeated well names its row."""
    frame = read_table_csv(path, PLATE_MAP_COLUMNS, dtype={"Metadata_Plate": str, "Metadata_Well": str})
    wells = frame["Metadata_Well"].map(canonical_well)
    if wells.isna().any():
        row = int(np.flatnonzero(wells.isna().to_numpy())[0])
        raise BadInputError(f"{path}: row {row + 2}: Metadata_Well {frame['Metadata_Well'].iloc[row]!r} is not a "
                            "well name like B03")
    frame["Metadata_Well"] = wells
    frame["Metadata_Plate"] = frame["Metadata_Plate"].astype(str).str.strip()
    repeated = frame.duplicated(["Metadata_Plate", "Metadata_Well"])
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        raise BadInputError(f"{path}: row {row + 2}: plate {frame['Metadata_Plate'].iloc[row]} well "
                            f"{frame['Metadata_Well'].iloc[row]} is listed twice")
    return frame


def annotate_fields(fields: pd.DataFrame, plate_map: Path | None, moa: Path | None, source: str,
                    require_labels: bool = True, control_compound: str = CONTROL_COMPOUND) -> pd.DataFrame:
    """The fields (one row each: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``, their image
    reference, and any treatment columns the images carried) with the table contract's treatment columns.

    The plate map's columns override what the images carried. Every imaged well needs a compound and a
    concentration: wells with neither are one error that lists them (a plate map that misses wells is
    usually the wrong plate's map), never silently dropped. ``source`` names the images in errors.
    """
    frame = fields.copy()
    where = str(plate_map) if plate_map is not None else source
    if plate_map is not None:
        table = read_plate_map(Path(plate_map))
        known = set(frame["Metadata_Plate"].astype(str))
        strangers = sorted(set(table["Metadata_Plate"]) - known)
        if strangers and not (set(table["Metadata_Plate"]) & known):
            raise BadInputError(f"{plate_map}: none of its plates ({', '.join(strangers[:5])}) is among the images' "
                                f"plates ({', '.join(sorted(known)[:5])})")
        given = [c for c in table.columns if c.startswith("Metadata_") and c not in ("Metadata_Plate", "Metadata_Well")]
        frame = frame.drop(columns=[c for c in given if c in frame.columns])
        frame = frame.merge(table[["Metadata_Plate", "Metadata_Well"] + given], how="left",
                            on=["Metadata_Plate", "Metadata_Well"], validate="many_to_one")
    for column in ("Metadata_Compound", "Metadata_Concentration"):
        if column not in frame.columns:
            frame[column] = np.nan
    blank = frame["Metadata_Compound"].isna() | frame["Metadata_Concentration"].isna()
    if blank.any():
        wells = frame.loc[blank, ["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
        listed = ", ".join(f"{p} {w}" for p, w in wells.head(8).itertuples(index=False))
        more = f" and {len(wells) - 8} more" if len(wells) > 8 else ""
        hint = "add them to the plate map" if plate_map is not None else f"pass --plate-map CSV ({', '.join(PLATE_MAP_COLUMNS)})"
        raise BadInputError(f"{where}: {len(wells)} imaged well(s) have no compound and concentration: {listed}{more}; {hint}")
    if moa is not None:
        frame["Metadata_MoA"] = label_from_moa_table(frame, read_moa_table(Path(moa)), Path(where), Path(moa),
                                                     require_labels)
    elif require_labels:
        labels = frame["Metadata_MoA"] if "Metadata_MoA" in frame.columns else pd.Series(np.nan, index=frame.index)
        missing = labels.isna() | (labels.astype(str).str.strip() == "")
        missing &= frame["Metadata_Compound"].astype(str) != control_compound
        if missing.any():
            first = frame[missing].iloc[0]
            raise BadInputError(f"{where}: plate {first['Metadata_Plate']} well {first['Metadata_Well']} "
                                f"({first['Metadata_Compound']}) has no Metadata_MoA; add the column or pass --moa CSV")
        blank = labels.isna() | (labels.astype(str).str.strip() == "")
        frame["Metadata_MoA"] = labels.where(~blank, frame["Metadata_Compound"])  # DMSO wells: the label DMSO
    if not require_labels:
        frame["Metadata_MoA"] = unlabelled_moa(frame, control_compound)
    return complete_metadata(frame, control_compound, where)


def write_plate_map(table: ImageTable, path: Path) -> Path:
    """The plate map CSV of ``table``'s wells (what :func:`read_plate_map` reads), written atomically."""
    columns = [*PLATE_MAP_COLUMNS, "Metadata_MoA"]
    wells = table.frame[columns].drop_duplicates(["Metadata_Plate", "Metadata_Well"]).sort_values(columns[:2])
    with atomic_path(Path(path)) as tmp:
        wells.to_csv(tmp, index=False)
    return Path(path)
