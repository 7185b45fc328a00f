"""OME-Zarr HCS plates (``--layout ome-zarr``): read lazily, written for tests and ``synth --format ome-zarr``.

This module owns the format: it lists a plate's fields (:func:`load_ome_zarr`), reads one field's pixels
(:func:`read_field`) and writes plates (:func:`write_hcs_plates`). It uses **ome-zarr-py**, OME's reference
implementation, rather than iohub, ngff-zarr or bioio-ome-zarr: it reads and writes both NGFF 0.4
(Zarr v2) and 0.5 (Zarr v3, metadata under ``ome``) with one API, its plate/well/image metadata
helpers are the specification's own vocabulary, and it brings no dependency beyond zarr and dask, which
cellmorph's cluster support already uses. Pixels are read with zarr, one field at one pyramid level at a
time (only that array's chunks), so memory stays bounded by a field, whatever the plate's size.

A row of the :class:`~cellmorph.data.table.ImageTable` is one field of view (an image of a well), and its
``Path_Stack`` is the Zarr array of the chosen pyramid level, e.g. ``/data/P1.ome.zarr/B/3/0/0``.
Channels are named by the image's ``omero`` metadata and matched by name, as in the other layouts.
Treatments come from a plate map CSV (:mod:`cellmorph.data.platemap`) and from well attributes named
``Metadata_*`` where present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd

from cellmorph.data.platemap import annotate_fields, well_name
from cellmorph.data.table import CONTROL_COMPOUND, STACK_COLUMN, ImageTable
from cellmorph.errors import BadInputError, CellmorphError

NgffVersion = Literal["0.4", "0.5"]
INSTALL_HINT = "pip install 'cellmorph[ome-zarr]'"
# ome-zarr-py logs a warning each time it opens a 0.4 group while expecting its current format (it then
# reads it as 0.4, correctly); every field of a 0.4 plate would print one.
logging.getLogger("ome_zarr").setLevel(logging.ERROR)


def _ome_zarr():
    """The ome_zarr modules, or one clear line on how to install them."""
    try:
        import ome_zarr.format
        import ome_zarr.io
        import ome_zarr.writer
        import zarr
    except ImportError:
        raise CellmorphError(f"--layout ome-zarr needs ome-zarr-py and zarr: {INSTALL_HINT}") from None
    return ome_zarr, zarr


def is_zarr_array(path) -> bool:
    """``path`` is a Zarr array folder (v2 ``.zarray`` or v3 ``zarr.json`` of an array)."""
    path = Path(path)
    if (path / ".zarray").is_file():
        return True
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        import json

        return json.loads(meta.read_text(encoding="utf-8")).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def _location(path: Path):
    """ome-zarr-py's view of the group at ``path`` (its ``root_attrs`` are the OME metadata, unwrapped
    from 0.5's ``ome`` namespace), or None where there is no Zarr group."""
    ome_zarr, _ = _ome_zarr()
    try:
        return ome_zarr.io.parse_url(str(path), mode="r")
    except Exception:  # zarr raises several kinds for a folder that is not a group
        return None


def _custom_attributes(path: Path) -> dict:
    """A group's own attributes outside the OME metadata (where a well may carry ``Metadata_*``)."""
    _, zarr = _ome_zarr()
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return {}
    return {k: v for k, v in attrs.items() if k.startswith("Metadata_")}


def is_plate(path) -> bool:
    location = _location(Path(path)) if Path(path).is_dir() else None
    return bool(location is not None and "plate" in location.root_attrs)


def find_plates(roots: Iterable[Path]) -> list[Path]:
    """The HCS plates among ``roots``: each root is a plate or a folder holding plates (``*.zarr``)."""
    _ome_zarr()
    plates: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise BadInputError(f"{root}: no such OME-Zarr plate or folder of plates")
        if is_plate(root):
            plates.append(root.resolve())
            continue
        inside = sorted(p.resolve() for p in root.iterdir() if p.is_dir() and is_plate(p))
        if not inside:
            raise BadInputError(f"{root}: neither an OME-Zarr HCS plate (a Zarr group with 'plate' metadata) "
                                "nor a folder holding any")
        plates.extend(inside)
    return plates


def plate_name(path: Path, attrs: dict) -> str:
    """A plate's name: its metadata's ``name``, else the folder name without ``.ome.zarr``/``.zarr``."""
    given = attrs.get("plate", {}).get("name")
    if given:
        return str(given)
    name = path.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _channel_labels(image: Path, attrs: dict) -> tuple[str, ...] | None:
    channels = (attrs.get("omero") or {}).get("channels")
    if not channels:
        return None
    return tuple(str(c.get("label") or f"channel{k}") for k, c in enumerate(channels))


def _plate_fields(plate: Path, level: int) -> tuple[str, tuple[str, ...] | None, list[dict]]:
    """(plate name, channel labels, one record per field) of the plate at ``plate``."""
    location = _location(plate)
    attrs = location.root_attrs
    name = plate_name(plate, attrs)
    wells = attrs["plate"].get("wells") or []
    if not wells:
        raise BadInputError(f"{plate}: the plate lists no wells")
    rows, columns = attrs["plate"].get("rows", []), attrs["plate"].get("columns", [])
    labels: tuple[str, ...] | None = None
    fields: list[dict] = []
    for well in wells:
        well_path = str(well["path"])
        row_name, column_name = well_path.split("/")[:2]
        if "rowIndex" in well and rows:
            row_name = rows[well["rowIndex"]]["name"]
        if "columnIndex" in well and columns:
            column_name = columns[well["columnIndex"]]["name"]
        well_location = _location(plate / well_path)
        if well_location is None or "well" not in well_location.root_attrs:
            raise BadInputError(f"{plate / well_path}: the plate lists well {well_path}, but it is missing or has no "
                                "'well' metadata")
        custom = _custom_attributes(plate / well_path)
        for site, image in enumerate(well_location.root_attrs["well"].get("images") or []):
            image_path = plate / well_path / str(image["path"])
            image_location = _location(image_path)
            multiscales = image_location.root_attrs.get("multiscales") if image_location is not None else None
            if not multiscales:
                raise BadInputError(f"{image_path}: a field listed by well {well_path} is missing or has no "
                                    "'multiscales' metadata")
            datasets = multiscales[0].get("datasets") or []
            if level >= len(datasets):
                raise BadInputError(f"{image_path}: --level {level} asked, the image has {len(datasets)} pyramid "
                                    f"level(s) (0–{len(datasets) - 1})")
            found = _channel_labels(image_path, image_location.root_attrs)
            if labels is None:
                labels = found
            elif found is not None and found != labels:
                raise BadInputError(f"{image_path}: channels {list(found)} differ from the plate's first field's "
                                    f"{list(labels)}")
            fields.append({
                "Metadata_Plate": name, "Metadata_Well": well_name(row_name, column_name), "Metadata_Site": site,
                "Metadata_ImageID": f"{name}/{well_path}/{image['path']}",
                STACK_COLUMN: str(image_path / str(datasets[level]["path"])), **custom,
            })
    return name, labels, fields


def load_ome_zarr(roots: Iterable[Path], plate_map: Path | None = None, moa: Path | None = None,
                  channels: Iterable[str] | None = None, level: int = 0, require_labels: bool = True,
                  control_compound: str = CONTROL_COMPOUND) -> ImageTable:
    """The :class:`ImageTable` of the HCS plates in ``roots`` (each a plate or a folder of plates).

    Only metadata is read here. ``channels`` (names from the images' ``omero`` metadata) picks and
    orders the channels to use (default: all, in the file's order); ``level`` is the pyramid level
    (0: full resolution). Treatments come from ``plate_map`` and the wells' ``Metadata_*``
    attributes; labels from the plate map's ``Metadata_MoA`` or the ``moa`` table.
    """
    if level < 0:
        raise CellmorphError(f"--level {level}: expected 0 (full resolution) or a coarser level 1, 2, …")
    plates = find_plates(roots)
    records: list[dict] = []
    labels: tuple[str, ...] | None = None
    seen: dict[str, Path] = {}
    for plate in plates:
        name, found, fields = _plate_fields(plate, level)
        if name in seen:
            raise BadInputError(f"{plate}: plate name {name!r} is also that of {seen[name]}; plate names must differ")
        seen[name] = plate
        if labels is None:
            labels = found
        elif found is not None and found != labels:
            raise BadInputError(f"{plate}: channels {list(found)} differ from {list(labels)} of {plates[0]}")
        records.extend(fields)
    file_channels = labels
    wanted = tuple(c.strip() for c in channels if c.strip()) if channels else None
    positions = None
    if file_channels is None and wanted is None:
        raise BadInputError(f"{plates[0]}: its images name no channels (no 'omero' metadata); pass --channels "
                            "with a name per channel, in the file's order")
    if file_channels is not None and wanted is not None:
        unknown = [c for c in wanted if c not in file_channels]
        if unknown:
            raise BadInputError(f"{plates[0]}: no channel named {', '.join(unknown)}; its channels are "
                                f"{', '.join(file_channels)}")
        positions = tuple(file_channels.index(c) for c in wanted)
    frame = annotate_fields(pd.DataFrame.from_records(records), plate_map, moa, str(plates[0].parent),
                            require_labels, control_compound)
    return ImageTable(frame, wanted or file_channels, source="ome-zarr", control_compound=control_compound,
                      origin=str(plates[0]), notes={"level": level}, stack_positions=positions)


def read_field(path: str) -> np.ndarray:
    """The C×H×W pixels (all channels, in the file's order) of the field whose level array is at ``path``.

    The first time point is read; a z-stack becomes its maximum-intensity projection (what a
    widefield HCS analysis of one focal plane sees best). One field is read at a time.
    """
    array = Path(path)
    location = _location(array.parent)
    multiscales = location.root_attrs.get("multiscales") if location is not None else None
    if not multiscales or not is_zarr_array(array):
        raise BadInputError(f"{path}: missing OME-Zarr image array")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in (multiscales[0].get("axes") or "tczyx")]
    _, zarr = _ome_zarr()
    try:
        # zarr reads the one field's chunks directly: through a dask graph (ome-zarr-py's load) a 256x320 field
        # took 2.5x as long (10.7 against 3.5-4.6 ms)
        data = zarr.open_array(str(array), mode="r")
        if data.ndim != len(axes):
            raise ValueError(f"{data.ndim} dimensions, but the metadata names {len(axes)} axes {axes}")
        index = tuple(0 if name == "t" else slice(None) for name in axes)
        kept = [name for name in axes if name != "t"]
        pixels = np.asarray(data[index])
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path}: unreadable OME-Zarr array ({type(exc).__name__}: {exc})") from None
    if "z" in kept:
        pixels = pixels.max(axis=kept.index("z"))
        kept.remove("z")
    if "c" not in kept:
        pixels, kept = pixels[np.newaxis], ["c"] + kept
    if kept[-2:] != ["y", "x"] and sorted(kept) == ["c", "x", "y"]:
        pixels = np.transpose(pixels, [kept.index("c"), kept.index("y"), kept.index("x")])
    elif kept != ["c", "y", "x"]:
        raise BadInputError(f"{path}: axes {axes}: expected channel, y and x (and optionally t and z)")
    return pixels


# ----------------------------------------------------------------------------- writing
def write_hcs_plates(table: ImageTable, out: Path, version: NgffVersion = "0.5", levels: int = 2,
                     read_pixels=None, progress=None) -> list[Path]:
    """Write the fields of ``table`` as one OME-Zarr HCS plate per ``Metadata_Plate`` under ``out``
    (``PLATE.ome.zarr``), with ome-zarr-py's writer: NGFF ``version`` 0.4 (Zarr v2) or 0.5 (Zarr v3),
    ``levels`` pyramid levels (each half the size of the one before), channels named by
    ``table.channels``. Treatments are not written into the plates: a plate map holds them
    (:func:`cellmorph.data.platemap.write_plate_map`). Each plate is written under a temporary name, then renamed.
    """
    ome_zarr, zarr = _ome_zarr()
    from cellmorph.data.images import read_planes
    from cellmorph.runinfo import atomic_dir

    fmt = ome_zarr.format.FormatV04() if version == "0.4" else ome_zarr.format.FormatV05()
    read_pixels = read_pixels or (lambda row: read_planes(table, row))
    written = []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for plate, fields in table.frame.groupby("Metadata_Plate", sort=True):
        target = out / f"{plate}.ome.zarr"
        with atomic_dir(target) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt.zarr_format)
            wells = fields.assign(_row=fields["Metadata_Well"].str[0], _col=fields["Metadata_Well"].str[1:].astype(int))
            rows = sorted(wells["_row"].unique())
            columns = [str(c) for c in sorted(wells["_col"].unique())]
            well_paths = sorted({f"{r}/{c}" for r, c in zip(wells["_row"], wells["_col"])},
                                key=lambda p: (p.split("/")[0], int(p.split("/")[1])))
            field_count = int(wells.groupby("Metadata_Well").size().max())
            ome_zarr.writer.write_plate_metadata(root, rows, columns, well_paths, fmt=fmt, name=str(plate),
                                                 field_count=field_count)
            for (row, column), well in wells.groupby(["_row", "_col"], sort=True):
                well_group = root.require_group(row).require_group(str(column))
                well = well.sort_values("Metadata_Site")
                ome_zarr.writer.write_well_metadata(well_group, [str(k) for k in range(len(well))], fmt=fmt)
                for k, (_, field) in enumerate(well.iterrows()):
                    pixels = read_pixels(field)
                    ome_zarr.writer.write_image(
                        pixels, well_group.require_group(str(k)), scale_factors=[2 ** i for i in range(1, levels)],
                        axes="cyx", fmt=fmt,
                        storage_options={"chunks": (1,) + tuple(min(s, 1024) for s in pixels.shape[1:])},
                        omero={"channels": _omero_channels(table.channels, pixels)},
                    )
                    if progress is not None:
                        progress()
        written.append(target)
    return written


_COLOURS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF")


def _omero_channels(names, pixels: np.ndarray) -> list[dict]:
    """The ``omero`` channel records a viewer (napari, OMERO, vizarr) needs: a label, a colour and a
    display window over the pixel type's range."""
    info = np.iinfo(pixels.dtype) if pixels.dtype.kind in "ui" else None
    records = []
    for k, name in enumerate(names):
        low, high = float(pixels[k].min()), float(pixels[k].max())
        records.append({"label": str(name), "active": True, "color": _COLOURS[k % len(_COLOURS)],
                        "window": {"min": float(info.min) if info else low, "max": float(info.max) if info else high,
                                   "start": low, "end": high}})
    return records
