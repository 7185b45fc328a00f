"""Generic layouts: a user's own CSV (e.g. a CellProfiler image table) mapped onto the ImageTable.

A :class:`GenericLayout` (usually a YAML file) names the CSV and which of its
columns hold the plate, well, compound, concentration and label, and where
each channel's file is (``FileName_DNA`` / ``PathName_DNA`` style columns, or
one H×W×C stack per row), so no code changes are needed for a new layout.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cellmorph.data.crops import complete_metadata, label_from_moa_table, read_moa_table, unlabelled_moa
from cellmorph.data.table import CONTROL_COMPOUND, STACK_COLUMN, ImageTable, channel_column, read_table_csv
from cellmorph.errors import BadInputError, validated
from cellmorph.runinfo import read_yaml_mapping


class ChannelSpec(BaseModel):
    """Where one channel's file is: a file-name column and an optional folder column."""

    model_config = ConfigDict(extra="forbid")
    file_column: str
    folder_column: str | None = None


class GenericLayout(BaseModel):
    """Maps a user's CSV onto the ImageTable contract; :func:`load_generic_yaml` reads one from YAML.

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


def load_generic(layout: GenericLayout, require_labels: bool = True) -> ImageTable:
    """The :class:`ImageTable` of ``layout``; without ``require_labels`` (``predict``) a compound of
    no known MoA is kept, labelled :data:`~cellmorph.schema.UNLABELLED`."""
    if not layout.channels and not layout.stack_column:
        raise BadInputError(f"{layout.csv}: layout config names neither channels nor stack_column")
    if layout.stack_column and not layout.channel_names:
        raise BadInputError(f"{layout.csv}: layout config with stack_column needs channel_names")
    required = [layout.plate_column, layout.well_column, layout.compound_column, layout.concentration_column]
    if layout.moa_table is None and require_labels:
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
            frame, read_moa_table(layout.moa_table), Path(layout.csv), Path(layout.moa_table), require_labels
        )
    elif layout.moa_column in raw.columns:
        frame["Metadata_MoA"] = raw[layout.moa_column]
    if not require_labels:
        frame["Metadata_MoA"] = unlabelled_moa(frame, layout.control_compound)

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
    frame = complete_metadata(frame, layout.control_compound, layout.csv, layout.concentration_column,
                              layout.site_column if layout.site_column in raw.columns else None)
    return ImageTable(
        frame.reset_index(drop=True),
        channels,
        source="generic",
        control_compound=layout.control_compound,
        origin=str(layout.csv),
    )


def load_generic_yaml(path: Path, require_labels: bool = True) -> ImageTable:
    """Load the table a YAML :class:`GenericLayout` file describes; config mistakes name the file."""
    return load_generic(validated(GenericLayout, read_yaml_mapping(path), str(path)), require_labels)
