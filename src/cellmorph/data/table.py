"""The one table type every input kind loads into.

An :class:`ImageTable` has one row per field of view (or per single-cell crop)
and follows pycytominer's ``Metadata_`` convention:

=========================  ==================================================
column                     meaning
=========================  ==================================================
``Metadata_ImageID``       unique id of the field (or crop)
``Metadata_Plate``         plate barcode
``Metadata_Well``          well name, e.g. ``B02``
``Metadata_Site``          field (site) number within the well
``Metadata_Compound``      compound name; controls use ``control_compound``
``Metadata_Concentration`` concentration (float, µM for BBBC021)
``Metadata_MoA``           label (the MoA); controls carry ``"DMSO"``
``Metadata_Batch``         batch; by default the week prefix of the plate
``Metadata_IsControl``     True for negative-control (DMSO) rows
=========================  ==================================================

Pixel data is referenced by either one ``Path_<channel>`` column per channel
(one single-channel file each, as in BBBC021) or a single ``Path_Stack`` column
holding an H×W×C ``.npy`` or TIFF (crop tables). Paths are absolute. Extra
``Metadata_*`` columns are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import BadInputError
from cellmorph.runinfo import require_file
from cellmorph.schema import TREATMENT_KEYS

REQUIRED_COLUMNS: tuple[str, ...] = (
    "Metadata_ImageID",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Compound",
    "Metadata_Concentration",
    "Metadata_MoA",
    "Metadata_Batch",
    "Metadata_IsControl",
)
STACK_COLUMN = "Path_Stack"
CONTROL_COMPOUND = "DMSO"
_WEEK_PREFIX = re.compile(r"^(Week\d+)[_-]")


def batch_of_plate(plate: str) -> str:
    """The batch a plate belongs to: its week prefix (``Week4_27481`` → ``Week4``).

    Plates without a ``WeekN_`` prefix use the part before the first ``_``; a
    plate name without one is its own batch.
    """
    match = _WEEK_PREFIX.match(plate)
    if match:
        return match.group(1)
    return plate.split("_", 1)[0]


def channel_column(channel: str) -> str:
    return f"Path_{channel}"


@dataclass
class ImageTable:
    """One row per field of view or crop; see the module docstring for columns.

    ``origin`` is the table file the rows came from (named in errors about the
    table as a whole). ``excluded`` counts the images per compound the loader
    left out because the label table does not know the compound; they are
    reported, never dropped silently.
    """

    frame: pd.DataFrame
    channels: tuple[str, ...]
    source: str = "generic"
    control_compound: str = CONTROL_COMPOUND
    notes: dict = field(default_factory=dict)
    origin: str | None = None
    excluded: dict[str, int] = field(default_factory=dict)
    # Stacked files only: the position in the file of each of ``channels`` (None: in file order).
    stack_positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        validate_frame(self.frame, self.channels, self.source)

    def names_same_channels(self, names) -> bool:
        """``names`` are this table's channel names, each once, in any order."""
        names = tuple(names)
        return sorted(names) == sorted(self.channels) and len(set(names)) == len(names)

    def in_channel_order(self, names) -> "ImageTable":
        """The same images with their channels read in the order ``names`` (the same names, another
        order): a model trained on crops stored DNA, actin, tubulin applies to fields named DAPI,
        Tubulin, Actin once both are named. Raises :class:`BadInputError` unless the names match as sets."""
        names = tuple(names)
        if not self.names_same_channels(names):
            raise BadInputError(f"{self.origin or self.source}: channels {list(self.channels)} cannot be read as "
                                f"{list(names)} (the same names are needed, in any order)")
        if names == self.channels:
            return self
        if not self.is_stacked:  # one file per channel: the order of the names is the order of reading
            return replace(self, channels=names, notes=dict(self.notes))
        positions = self.stack_positions or tuple(range(len(self.channels)))
        return replace(self, channels=names, notes=dict(self.notes),
                       stack_positions=tuple(positions[self.channels.index(n)] for n in names))

    def with_channels(self, names) -> "ImageTable":
        """The same images with only the channels ``names`` (each one of this table's), in that order:
        a plate imaged in five channels feeds a model of three, chosen by name."""
        names = tuple(names)
        unknown = [n for n in names if n not in self.channels]
        if unknown or len(set(names)) != len(names):
            raise BadInputError(f"{self.origin or self.source}: channels {list(self.channels)} hold no "
                                f"{', '.join(unknown) or 'repeated names'} (asked: {list(names)})")
        if not self.is_stacked:
            return replace(self, channels=names, notes=dict(self.notes))
        positions = self.stack_positions or tuple(range(len(self.channels)))
        return replace(self, channels=names, notes=dict(self.notes),
                       stack_positions=tuple(positions[self.channels.index(n)] for n in names))

    # -- views -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame)

    @property
    def is_stacked(self) -> bool:
        """True when each row points at one multi-channel file (``Path_Stack``)."""
        return STACK_COLUMN in self.frame.columns

    @property
    def plates(self) -> list[str]:
        return sorted(self.frame["Metadata_Plate"].unique())

    @property
    def treated(self) -> pd.DataFrame:
        return self.frame[~self.frame["Metadata_IsControl"]]

    @property
    def controls(self) -> pd.DataFrame:
        return self.frame[self.frame["Metadata_IsControl"]]

    def subset(self, mask) -> "ImageTable":
        return replace(self, frame=self.frame[mask].reset_index(drop=True), notes=dict(self.notes))

    def excluded_note(self, shown: int = 10) -> str | None:
        """One line saying which compounds' images the loader left out, or None if none were."""
        if not self.excluded:
            return None
        ranked = sorted(self.excluded.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = ", ".join(f"{name} ({n})" for name, n in ranked[:shown])
        more = f" and {len(ranked) - shown} more" if len(ranked) > shown else ""
        n_compounds = f"{len(ranked)} compound" + ("s" if len(ranked) != 1 else "")
        labels = self.notes.get("labels_from", "the label table")
        return (
            f"note: left out {sum(self.excluded.values())} images of {n_compounds} absent from {labels}: "
            f"{listed}{more}"
        )

    def summary(self) -> dict:
        """Counts of the annotated (non-control) part, as the paper's Table 1 reports them."""
        treated = self.treated
        treatments = treated.groupby(TREATMENT_KEYS).ngroups
        per_compound = treated.groupby("Metadata_Compound").size().sort_index()
        return {
            "n_images": int(len(treated)),
            "n_treatments": int(treatments),
            "n_compounds": int(treated["Metadata_Compound"].nunique()),
            "n_moas": int(treated["Metadata_MoA"].nunique()),
            "n_plates": int(self.frame["Metadata_Plate"].nunique()),
            "n_control_images": int(len(self.controls)),
            "images_per_compound": {str(k): int(v) for k, v in per_compound.items()},
            "images_per_moa": {
                str(k): int(v) for k, v in treated.groupby("Metadata_MoA").size().sort_index().items()
            },
            "excluded_compounds": dict(self.excluded),
        }


def validate_frame(frame: pd.DataFrame, channels: tuple[str, ...], source: str) -> None:
    """Check the table contract; raise :class:`BadInputError` naming the first bad row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(f"{source} table is missing columns: {', '.join(missing)}")
    if not channels:
        raise BadInputError(f"{source} table declares no channels")
    if STACK_COLUMN not in frame.columns:
        absent = [channel_column(c) for c in channels if channel_column(c) not in frame.columns]
        if absent:
            raise BadInputError(f"{source} table has no path column(s) {', '.join(absent)}")
    if frame["Metadata_ImageID"].duplicated().any():
        dup = frame.loc[frame["Metadata_ImageID"].duplicated(), "Metadata_ImageID"].iloc[0]
        raise BadInputError(f"{source} table: duplicate image id {dup!r}")
    check_one_treatment_per_well(frame, source)


def check_one_treatment_per_well(frame: pd.DataFrame, source: str) -> None:
    """A well holds one treatment: tiles are aggregated per well, then per treatment, so a well
    whose rows disagree on compound or concentration (a typo in one row) has no treatment to score."""
    keys = ["Metadata_Plate", "Metadata_Well"]
    if not set(keys + ["Metadata_Compound", "Metadata_Concentration"]) <= set(frame.columns):
        return
    treatment = frame["Metadata_Compound"].astype(str) + " at " + frame["Metadata_Concentration"].astype(str)
    counts = treatment.groupby([frame[k].astype(str) for k in keys]).nunique()
    if (counts > 1).any():
        plate, well = counts.index[int(np.flatnonzero(counts.to_numpy() > 1)[0])]
        inside = (frame["Metadata_Plate"].astype(str) == plate) & (frame["Metadata_Well"].astype(str) == well)
        found = sorted(set(treatment[inside]))
        raise BadInputError(f"{source} table: plate {plate} well {well} holds more than one treatment "
                            f"({', '.join(found[:3])}); every row of a well needs the same compound and concentration")


def read_table_csv(path: Path, required: tuple[str, ...], dtype: dict | None = None) -> pd.DataFrame:
    """A CSV with at least one row and the ``required`` columns, none of them blank."""
    path = require_file(path, "a CSV file", BadInputError)
    try:
        frame = pd.read_csv(path, dtype=dtype)
    except Exception as exc:  # pandas raises many parser error types
        raise BadInputError(f"{path}: cannot parse CSV ({exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise BadInputError(f"{path}: no rows below the header")
    check_no_blanks(frame, required, path)
    return frame


def check_no_blanks(frame: pd.DataFrame, columns, path: Path) -> None:
    """Raise naming the first CSV row (1-based, counting the header) with a blank/NaN value."""
    for col in columns:
        values = frame[col]
        blank = values.isna() | (values.astype(str).str.strip() == "")
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise BadInputError(f"{path}: row {row + 2}: blank or NaN value in column {col}")


def numeric_column(values: pd.Series, path, column: str, whole: bool = False) -> pd.Series:
    """``values`` (a CSV column, rows in file order) as floats, or with ``whole`` as ints; a cell
    that is not a finite number (a whole one) raises naming the CSV row as a spreadsheet shows it
    (1-based, counting the header), so ``abc`` is never a NaN treatment or a site 0."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    bad = ~np.isfinite(numbers.to_numpy())
    if whole:
        bad |= np.isfinite(numbers.to_numpy()) & (numbers.to_numpy() != np.round(numbers.to_numpy()))
        bad |= np.abs(numbers.to_numpy()) >= 2**31  # an int column: 1e308 would wrap to a negative site
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        given = values.iloc[row]
        if pd.isna(given) or str(given).strip() == "":
            raise BadInputError(f"{path}: row {row + 2}: blank or NaN value in column {column}")
        kind = "a whole number" if whole else "a finite number"
        shown = repr(given) if isinstance(given, str) else str(given)  # text quoted, numbers as written
        raise BadInputError(f"{path}: row {row + 2}: {column} {shown} is not {kind}")
    return numbers.astype(int) if whole else numbers

