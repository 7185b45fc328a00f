"""Folders of TIFFs named by a microscope (``--layout pattern``): a file-name pattern says where the
plate, well, field, channel and plane are, a plate map says what was in each well.

A pattern is the path of a file below ``--root``, with fields in braces::

    {plate}/{well}_s{site}_w{channel}.tif                                 # ImageXpress (preset "imagexpress")
    {plate}/{any}r{row:02d}c{col:02d}f{field:02d}p{plane:02d}-ch{channel}sk{any}.tiff   # Opera/Operetta ("opera")

Fields: ``plate``, ``well`` (``B03``) or ``row`` + ``col`` (a letter or a number: row 2 is B),
``site`` or ``field``, ``channel``, ``plane`` (several planes of a field become their maximum-intensity
projection), and ``any`` (any text, also across folders). ``:02d`` asks for exactly two digits, ``:d`` for
digits. Files below the root that look like images but match no pattern are listed, never silently
dropped; a field missing one of its channels is an error naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from cellmorph.data.platemap import annotate_fields, canonical_well, well_name
from cellmorph.data.table import CONTROL_COMPOUND, ImageTable, channel_column
from cellmorph.errors import BadInputError, CellmorphError

PRESETS: dict[str, str] = {
    "imagexpress": "{plate}/{well}_s{site:d}_w{channel:d}.tif",
    "opera": "{plate}/{any}r{row:02d}c{col:02d}f{field:02d}p{plane:02d}-ch{channel:d}sk{any}.tiff",
}
FIELDS = ("plate", "well", "row", "col", "site", "field", "channel", "plane", "any")
IMAGE_SUFFIXES = (".tif", ".tiff")
# The planes of one channel of a field, when there are several (joined by the OS path separator): read
# and max-projected by cellmorph.data.images.
PLANES_PREFIX = "Planes_"
_FIELD = re.compile(r"\{(\w+)(?::(0?\d*)d)?\}")


def pattern_regex(pattern: str) -> re.Pattern:
    """The regular expression of ``pattern`` (a preset name or a pattern; see the module docstring)."""
    text = PRESETS.get(pattern, pattern)
    parts, position, seen = [], 0, set()
    for match in _FIELD.finditer(text):
        name, width = match.group(1), match.group(2)
        if name not in FIELDS:
            raise CellmorphError(f"--pattern {text!r}: unknown field {{{name}}}; fields are {', '.join(FIELDS)}")
        parts.append(re.escape(text[position:match.start()]))
        position = match.end()
        if name == "any":
            parts.append(".*?")
            continue
        if name in seen:
            raise CellmorphError(f"--pattern {text!r}: field {{{name}}} appears twice")
        seen.add(name)
        if width is not None:  # {x:d} digits, {x:02d} exactly two
            body = rf"\d{{{int(width)}}}" if width else r"\d+"
        elif name == "row":
            body = r"[A-Za-z]{1,2}|\d+"
        else:
            body = r"[^/]+?"
        parts.append(f"(?P<{name}>{body})")
    parts.append(re.escape(text[position:]))
    if "channel" not in seen:
        raise CellmorphError(f"--pattern {text!r}: needs a {{channel}} field")
    if "well" not in seen and not {"row", "col"} <= seen:
        raise CellmorphError(f"--pattern {text!r}: needs {{well}}, or {{row}} and {{col}}")
    return re.compile("^" + "".join(parts) + "$")


def _row_letter(text: str) -> str:
    """A plate row as a letter: ``B`` stays, ``2`` (Opera counts rows from 1) becomes ``B``."""
    if text.isdigit():
        number = int(text)
        if not 1 <= number <= 26 * 27:
            raise ValueError(f"row {text}")
        return (chr(ord("A") + (number - 1) // 26 - 1) if number > 26 else "") + chr(ord("A") + (number - 1) % 26)
    return text.upper()


def match_files(root: Path, pattern: str) -> tuple[pd.DataFrame, list[str]]:
    """(one row per matched file: plate, well, site, channel, plane, path; the image files that matched nothing)."""
    regex = pattern_regex(pattern)
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"{root}: no such folder of images")
    rows, unmatched = [], []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            match = regex.match(relative)
            if match is None:
                if name.lower().endswith(IMAGE_SUFFIXES):
                    unmatched.append(relative)
                continue
            found = match.groupdict()
            try:
                well = canonical_well(found["well"]) if found.get("well") else \
                    well_name(_row_letter(found["row"]), int(found["col"]))
            except ValueError:
                well = None
            if well is None:
                raise BadInputError(f"{path}: no well name in {found.get('well') or (found.get('row'), found.get('col'))}")
            site = found.get("site") or found.get("field") or "1"
            if not site.isdigit():
                raise BadInputError(f"{path}: its site (field) {site!r} is not a number; use {{site:d}} in the pattern")
            rows.append({"Metadata_Plate": found.get("plate") or root.name, "Metadata_Well": well,
                         "Metadata_Site": int(site),
                         "channel": str(found["channel"]), "plane": found.get("plane") or "1", "path": str(path.resolve())})
    return pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "channel", "plane",
                                       "path"]), sorted(unmatched)


def _channel_names(tokens: list[str], channels: str | None, root: Path) -> dict[str, str]:
    """Channel token (``1``, ``w2``'s ``2``) → name: ``--channels 1=DAPI,2=Tubulin`` or names in token order."""
    ordered = sorted(tokens, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
    if not channels:
        return {t: f"ch{t}" for t in ordered}
    items = [c.strip() for c in channels.split(",") if c.strip()]
    if all("=" in item for item in items):
        mapping = dict(item.split("=", 1) for item in items)
        unknown = sorted(set(mapping) - set(tokens))
        if unknown:
            raise BadInputError(f"{root}: --channels names channel(s) {', '.join(unknown)}, but the files hold "
                                f"{', '.join(ordered)}")
        return {t.strip(): n.strip() for t, n in mapping.items()}
    if any("=" in item for item in items):
        raise CellmorphError("--channels: give every channel as TOKEN=NAME, or only names (in channel order)")
    if len(items) != len(ordered):
        raise BadInputError(f"{root}: --channels gives {len(items)} name(s) for the files' {len(ordered)} channel(s) "
                            f"{', '.join(ordered)}; name them TOKEN=NAME to use some")
    return dict(zip(ordered, items))


def load_pattern(root: Path, pattern: str, plate_map: Path | None = None, moa: Path | None = None,
                 channels: str | None = None, require_labels: bool = True,
                 control_compound: str = CONTROL_COMPOUND, log=None) -> ImageTable:
    """The :class:`ImageTable` of the TIFFs below ``root`` whose paths match ``pattern`` (a preset name or a
    pattern), treatments from ``plate_map``. ``channels`` names the channel tokens (``1=DAPI,2=Actin``,
    or names in token order; unnamed tokens are not read)."""
    files, unmatched = match_files(root, pattern)
    note = None
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        note = f"note: {root}: {len(unmatched)} image file(s) match no pattern and are not read: {shown}"
        if log is not None:
            log(note)
    if files.empty:
        raise BadInputError(f"{root}: no file matches --pattern {PRESETS.get(pattern, pattern)!r}"
                            + (f" ({len(unmatched)} image files do not, e.g. {unmatched[0]})" if unmatched else ""))
    names = _channel_names(sorted(files["channel"].unique()), channels, Path(root))
    files = files[files["channel"].isin(names)].assign(channel=lambda f: f["channel"].map(names))
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    repeated = files.duplicated(keys + ["channel", "plane"], keep=False)
    if repeated.any():
        twins = files[repeated].sort_values("path")["path"].tolist()[:2]
        raise BadInputError(f"{twins[0]}: the pattern gives it the same plate, well, field, channel and plane as {twins[1]}")
    fields = []
    wanted = list(dict.fromkeys(names.values()))
    for key, group in files.groupby(keys, sort=True):
        record = dict(zip(keys, key))
        for name in wanted:
            planes = group[group["channel"] == name].sort_values("plane")["path"].tolist()
            if not planes:
                raise BadInputError(f"{root}: plate {key[0]} well {key[1]} field {key[2]} has no file of channel "
                                    f"{name} (it has {', '.join(sorted(group['channel'].unique()))})")
            record[channel_column(name)] = planes[0]
            record[PLANES_PREFIX + name] = os.pathsep.join(planes) if len(planes) > 1 else ""
        record["Metadata_ImageID"] = record[channel_column(wanted[0])]
        fields.append(record)
    frame = annotate_fields(pd.DataFrame(fields), plate_map, moa, str(root), require_labels, control_compound)
    notes = {"pattern": PRESETS.get(pattern, pattern)} | ({"unmatched_files": note} if note else {})
    return ImageTable(frame.reset_index(drop=True), tuple(wanted), source="pattern", control_compound=control_compound,
                      origin=str(root), notes=notes)
