"""The BBBC021 layout: ``BBBC021_v1_image.csv`` + ``BBBC021_v1_moa.csv`` + TIFF folders.

Images live at ``<root>/<Image_PathName_<ch>>/<Image_FileName_<ch>>``, one
16-bit single-channel TIFF per channel. The annotated MoA subset is selected as
Kensert et al. (2019) did, which reproduces their Table 1: 1,208 images,
103 treatments, 38 compounds. Taxol counts only as its titration series on the
Week1 plates (wells D03–D05 at 3/1/0.3 µM); its 0.3 µM positive-control wells,
found on every plate, are not treatments of the experiment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.table import (
    CONTROL_COMPOUND,
    ImageTable,
    batch_of_plate,
    channel_column,
    check_no_blanks,
    numeric_column,
    read_table_csv,
)
from cellmorph.errors import BadInputError
from cellmorph.schema import UNLABELLED

IMAGE_CSV = "BBBC021_v1_image.csv"
MOA_CSV = "BBBC021_v1_moa.csv"
COMPOUND_CSV = "BBBC021_v1_compound.csv"
CHANNELS: tuple[str, ...] = ("DAPI", "Tubulin", "Actin")
IMAGE_COLUMNS: tuple[str, ...] = (
    "TableNumber",
    "ImageNumber",
    *[f"Image_{kind}_{ch}" for ch in CHANNELS for kind in ("FileName", "PathName")],
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Replicate",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
)
MOA_COLUMNS: tuple[str, ...] = ("compound", "concentration", "moa")

# The titration series that stands for taxol in the paper (Table 1: 36 images).
TAXOL = "taxol"
TAXOL_SERIES_BATCH = "Week1"
TAXOL_SERIES_WELLS = ("D03", "D04", "D05")

# Concentrations are floats in both CSVs; match them after rounding so that
# 0.3 and 0.30000001 written by different tools still pair up.
_CONC_DECIMALS = 6


def read_image_csv(metadata_dir: Path) -> pd.DataFrame:
    frame = read_table_csv(Path(metadata_dir) / IMAGE_CSV, ())
    missing = [c for c in IMAGE_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(f"{Path(metadata_dir) / IMAGE_CSV}: missing column(s) {', '.join(missing)}")
    key_cols = [
        "Image_Metadata_Plate_DAPI",
        "Image_Metadata_Well_DAPI",
        "Image_Metadata_Compound",
        "Image_Metadata_Concentration",
        *[f"Image_{kind}_{ch}" for ch in CHANNELS for kind in ("FileName", "PathName")],
    ]
    check_no_blanks(frame, key_cols, Path(metadata_dir) / IMAGE_CSV)
    # A concentration that is not a number would match no MoA row and drop its image unseen.
    column = "Image_Metadata_Concentration"
    numeric_column(frame[column], Path(metadata_dir) / IMAGE_CSV, column)
    return frame


def read_moa_csv(metadata_dir: Path) -> pd.DataFrame:
    frame = read_table_csv(Path(metadata_dir) / MOA_CSV, MOA_COLUMNS)
    numeric_column(frame["concentration"], Path(metadata_dir) / MOA_CSV, "concentration")
    return frame


def _conc_key(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").round(_CONC_DECIMALS)


def select_moa_subset(images: pd.DataFrame, moa: pd.DataFrame, keep_controls: bool = True) -> pd.DataFrame:
    """The paper's annotated subset, plus (optionally) DMSO fields of the same plates.

    Returns the image rows with a ``moa`` column. Controls are kept only on
    plates that hold at least one annotated image, since they serve as that
    plate's normalisation reference.
    """
    moa = moa.assign(_conc=_conc_key(moa["concentration"]))
    images = images.assign(_conc=_conc_key(images["Image_Metadata_Concentration"]))
    merged = images.merge(
        moa[["compound", "_conc", "moa"]],
        left_on=["Image_Metadata_Compound", "_conc"],
        right_on=["compound", "_conc"],
        how="inner",
    )
    is_control = merged["Image_Metadata_Compound"] == CONTROL_COMPOUND
    is_taxol = merged["Image_Metadata_Compound"] == TAXOL
    plate = merged["Image_Metadata_Plate_DAPI"].astype(str)
    in_taxol_series = (
        (plate.map(batch_of_plate) == TAXOL_SERIES_BATCH)
        & merged["Image_Metadata_Well_DAPI"].isin(TAXOL_SERIES_WELLS)
    )
    annotated = merged[~is_control & (~is_taxol | in_taxol_series)]
    parts = [annotated]
    if keep_controls:
        plates = set(annotated["Image_Metadata_Plate_DAPI"])
        parts.append(merged[is_control & merged["Image_Metadata_Plate_DAPI"].isin(plates)])
    out = pd.concat(parts).sort_values("ImageNumber" if "ImageNumber" in merged else "_conc")
    return out.drop(columns=["_conc", "compound"]).reset_index(drop=True)


def moa_subset_plates(metadata_dir: Path) -> list[str]:
    """Plates (``Image_PathName_DAPI`` folders, e.g. ``Week1/Week1_22123``) the MoA subset needs."""
    subset = select_moa_subset(read_image_csv(metadata_dir), read_moa_csv(metadata_dir))
    return sorted(subset["Image_PathName_DAPI"].astype(str).unique())


def unannotated_compounds(images: pd.DataFrame, moa: pd.DataFrame) -> dict[str, int]:
    """Images per compound of the image table that the MoA table does not list at any concentration."""
    compounds = images["Image_Metadata_Compound"].astype(str)
    absent = compounds[~compounds.isin(set(moa["compound"].astype(str)))]
    counts = absent.value_counts()
    return {str(name): int(n) for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def check_compounds_annotated(images: pd.DataFrame, moa: pd.DataFrame, metadata_dir: Path) -> None:
    """Every compound in the image table must appear in the MoA table (any concentration)."""
    known = set(moa["compound"].astype(str))
    compounds = images["Image_Metadata_Compound"].astype(str)
    unknown = ~compounds.isin(known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise BadInputError(
            f"{Path(metadata_dir) / IMAGE_CSV}: row {row + 2}: compound "
            f"{compounds.iloc[row]!r} is absent from {MOA_CSV}"
        )


def load_unlabelled(root: Path, metadata_dir: Path | None = None) -> ImageTable:
    """Every image of the image table, for ``predict``: compounds of unknown MoA are the point.

    ``BBBC021_v1_moa.csv`` is optional here; where it lists a compound and concentration, that
    MoA is kept (so accuracy and coverage can be reported), else the MoA is
    :data:`~cellmorph.schema.UNLABELLED`. DMSO fields are labelled DMSO.
    """
    root = Path(root)
    metadata_dir = Path(metadata_dir) if metadata_dir is not None else root
    if metadata_dir.is_file():
        raise BadInputError(f"{metadata_dir}: is a file, expected the folder holding {IMAGE_CSV}")
    images = read_image_csv(metadata_dir)
    labels = images["Image_Metadata_Compound"].astype(str).where(
        images["Image_Metadata_Compound"].astype(str) == CONTROL_COMPOUND, UNLABELLED)
    if (metadata_dir / MOA_CSV).is_file():
        moa = read_moa_csv(metadata_dir)
        known = moa.assign(_conc=_conc_key(moa["concentration"])).drop_duplicates(["compound", "_conc"])
        keys = pd.MultiIndex.from_arrays([images["Image_Metadata_Compound"].astype(str),
                                          _conc_key(images["Image_Metadata_Concentration"])])
        lookup = pd.Series(known["moa"].astype(str).to_numpy(),
                           index=pd.MultiIndex.from_arrays([known["compound"].astype(str), known["_conc"]]))
        labels = pd.Series(lookup.reindex(keys).to_numpy(), index=images.index).fillna(labels)
    return table_from_image_rows(images.assign(moa=labels), root, metadata_dir)


def load_bbbc021(
    root: Path,
    metadata_dir: Path | None = None,
    moa_subset: bool = True,
    keep_controls: bool = True,
    strict_compounds: bool = False,
) -> ImageTable:
    """Load the BBBC021 layout into an :class:`ImageTable`.

    ``root`` holds the week/plate folders; ``metadata_dir`` the two CSVs
    (defaults to ``root``). With ``moa_subset`` the rows are the paper's
    annotated subset plus DMSO of the same plates; otherwise every image whose
    compound/concentration is in the MoA table. Images of compounds absent
    from the MoA table are left out and counted in the table's ``excluded``;
    ``strict_compounds`` makes such a compound an error instead.
    """
    root = Path(root)
    metadata_dir = Path(metadata_dir) if metadata_dir is not None else root
    if metadata_dir.is_file():
        raise BadInputError(f"{metadata_dir}: is a file, expected the folder holding {IMAGE_CSV} and {MOA_CSV}")
    images = read_image_csv(metadata_dir)
    moa = read_moa_csv(metadata_dir)
    if strict_compounds:
        check_compounds_annotated(images, moa, metadata_dir)
    excluded = unannotated_compounds(images, moa)
    if moa_subset:
        rows = select_moa_subset(images, moa, keep_controls=keep_controls)
    else:
        rows = images.assign(_conc=_conc_key(images["Image_Metadata_Concentration"])).merge(
            moa.assign(_conc=_conc_key(moa["concentration"]))[["compound", "_conc", "moa"]],
            left_on=["Image_Metadata_Compound", "_conc"],
            right_on=["compound", "_conc"],
        )
        if not keep_controls:
            rows = rows[rows["Image_Metadata_Compound"] != CONTROL_COMPOUND]
        rows = rows.drop(columns=["_conc", "compound"]).reset_index(drop=True)
    if rows.empty:
        raise BadInputError(
            f"{metadata_dir / IMAGE_CSV}: no image has a compound and concentration listed in {MOA_CSV}"
            + (f" ({sum(excluded.values())} images of {len(excluded)} unlisted compounds)" if excluded else "")
        )
    return table_from_image_rows(rows, root, metadata_dir, excluded)


def table_from_image_rows(
    rows: pd.DataFrame, root: Path, metadata_dir: Path, excluded: dict[str, int] | None = None
) -> ImageTable:
    """Map BBBC021 image-CSV rows (with a ``moa`` column) read from ``metadata_dir`` onto the ImageTable contract."""
    root = Path(root)
    plate = rows["Image_Metadata_Plate_DAPI"].astype(str)
    well = rows["Image_Metadata_Well_DAPI"].astype(str)
    site = rows["Image_FileName_DAPI"].astype(str).str.extract(r"_s(\d+)_", expand=False)
    site = pd.to_numeric(site, errors="coerce").fillna(0).astype(int)
    frame = pd.DataFrame(
        {
            "Metadata_ImageID": plate + "/" + well + "/s" + site.astype(str) + "/" + rows["ImageNumber"].astype(str),
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": site,
            "Metadata_Compound": rows["Image_Metadata_Compound"].astype(str),
            "Metadata_Concentration": pd.to_numeric(rows["Image_Metadata_Concentration"]).astype(float),
            "Metadata_MoA": rows["moa"].astype(str),
            "Metadata_Batch": plate.map(batch_of_plate),
            "Metadata_IsControl": rows["Image_Metadata_Compound"].astype(str) == CONTROL_COMPOUND,
            "Metadata_Replicate": rows["Replicate"],
            "Metadata_ImageNumber": rows["ImageNumber"],
        }
    )
    for ch in CHANNELS:
        frame[channel_column(ch)] = [
            str(root / p / f) for p, f in zip(rows[f"Image_PathName_{ch}"], rows[f"Image_FileName_{ch}"])
        ]
    return ImageTable(
        frame,
        CHANNELS,
        source="bbbc021",
        notes={"labels_from": str(Path(metadata_dir) / MOA_CSV)},
        origin=str(Path(metadata_dir) / IMAGE_CSV),
        excluded=excluded or {},
    )
