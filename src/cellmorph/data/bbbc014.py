"""BBBC014 (NF-κB translocation, MCF-7 and A549, TNFα dose series): layout, labels, real-download import.

The real set (Broad Bioimage Benchmark Collection, BBBC014v1; Ilya Ravkin,
Vitra Bioscience CellCard reader, 10x) is one 96-well plate with one field per
well and two 8-bit 1360×1024 images per field, DAPI and FITC (NF-κB). Rows A–D
hold MCF-7, rows E–H A549; the 12 columns are a TNFα dilution series, highest
in column 1, lowest in column 12, so each cell line has 12 concentrations × 4
replicate wells. As published the images are ``BBBC014_v1_images/Channel
{1,2}-{NN}-{ROW}-{COL}-00.Bmp`` (``NN`` = 01…96, row-major) and the doses are
one ``10^<exp>`` (g/mL) line per well, in the same order, in
``BBBC014_v1_platemap_all.txt``.

Kensert et al. (2019) label a well "translocation" when it holds one of the 4
highest concentrations of its cell line and "no translocation" when it holds
one of the 4 lowest; the middle 4 are unlabelled and left out, which leaves 64
of the 96 wells (16 positive + 16 negative per cell line). The evaluation is
leave-one-cell-line-out, so the cell line is also ``Metadata_Batch``.

cellmorph layout (what :func:`load_bbbc014` reads)
---------------------------------------------------
``<root>/BBBC014_v1_image.csv``, one row per well (field):

==================== ========= =====================================================
column               required  meaning
==================== ========= =====================================================
``Plate``            yes       plate name (one plate in the real set)
``Well``             yes       e.g. ``A01``
``CellLine``         yes       ``MCF-7`` or ``A549`` (any names work; one CV fold each)
``Concentration``    yes       TNFα concentration, numeric (ng/mL here; 0 allowed)
``FileName_DAPI``    yes       DAPI image, relative to ``<root>`` (or absolute)
``FileName_FITC``    yes       FITC (NF-κB) image, relative to ``<root>`` (or absolute)
``Compound``         no        default ``TNFa``
``ImageNumber``      no        1…96 in plate order
``Row``/``Column``   no        derived from ``Well`` when absent
``Unit``             no        concentration unit, informational
==================== ========= =====================================================

Images are single-channel 8-bit TIFFs. Labels come from the concentrations
(ranked per cell line), never from the column number, so the CSV may list the
wells in any order.

* :func:`cellmorph.data.synthetic.generate_bbbc014` writes a synthetic
  plate in this layout, with the real file names except for the extension (``.tif``).
* :func:`import_bbbc014` turns the real download (``BBBC014_v1_images/*.Bmp`` +
  ``BBBC014_v1_platemap_all.txt``) into this layout: it converts the BMPs to
  TIFF and writes the CSV.
* :func:`bbbc014_prepare_config` is the paper's preprocessing recipe.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellmorph.config.prepare import PrepareConfig
from cellmorph.data.images import write_tiff
from cellmorph.data.table import ImageTable, channel_column, read_table_csv
from cellmorph.errors import BadInputError, CellmorphError
from cellmorph.runinfo import write_csv

__all__ = [
    "CHANNELS",
    "IMAGE_CSV",
    "POSITIVE",
    "NEGATIVE",
    "CELL_LINES",
    "load_bbbc014",
    "label_wells",
    "read_image_csv",
    "image_file_name",
    "import_bbbc014",
    "bbbc014_prepare_config",
]

IMAGE_CSV = "BBBC014_v1_image.csv"
CHANNELS: tuple[str, ...] = ("DAPI", "FITC")
REQUIRED_COLUMNS: tuple[str, ...] = ("Plate", "Well", "CellLine", "Concentration", "FileName_DAPI", "FileName_FITC")
CSV_COLUMNS: tuple[str, ...] = (
    "ImageNumber", "Plate", "Well", "Row", "Column", "CellLine", "Compound", "Concentration", "Unit",
    "FileName_DAPI", "FileName_FITC",
)
COMPOUND = "TNFa"
POSITIVE = "translocation"
NEGATIVE = "no translocation"
UNLABELLED = "unlabelled"
N_EXTREME = 4  # the paper: 4 highest concentrations positive, 4 lowest negative

ROWS = "ABCDEFGH"
N_COLUMNS = 12
# Rows A–D are MCF-7 and E–H A549 on the real plate (and on the synthetic one).
CELL_LINES: tuple[str, ...] = ("MCF-7", "A549")
ROW_CELL_LINE = {r: ("MCF-7" if r in "ABCD" else "A549") for r in ROWS}

# Real download (see module docstring).
REAL_IMAGE_DIR = "BBBC014_v1_images"
REAL_PLATEMAP = "BBBC014_v1_platemap_all.txt"
REAL_PLATE = "BBBC014"
TIFF_DIR = "BBBC014_v1_tiff"
_REAL_NAME = re.compile(
    r"^Channel ?(?P<channel>[12])-(?P<index>\d{2})-(?P<row>[A-H])-(?P<column>\d{2})-00\.bmp$", re.IGNORECASE
)


def image_file_name(channel_number: int, row: str, column: int, ext: str) -> str:
    """The published name of one well's image, e.g. ``Channel 2-01-A-01-00.Bmp``."""
    index = ROWS.index(row) * N_COLUMNS + column
    return f"Channel {channel_number}-{index:02d}-{row}-{column:02d}-00.{ext}"


# =========================================================================== loading
def read_image_csv(root: Path) -> pd.DataFrame:
    """``<root>/BBBC014_v1_image.csv`` checked for required columns and blank cells."""
    path = Path(root) / IMAGE_CSV
    if not path.exists():
        raise BadInputError(f"{path}: file not found (a BBBC014 root holds {IMAGE_CSV}; see `import_bbbc014`)")
    frame = read_table_csv(path, REQUIRED_COLUMNS, dtype={"Plate": str, "Well": str, "CellLine": str})
    conc = pd.to_numeric(frame["Concentration"], errors="coerce")
    bad = conc.isna() | (conc < 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise BadInputError(
            f"{path}: row {row + 2}: Concentration {frame['Concentration'].iloc[row]!r} is not a number ≥ 0"
        )
    frame["Concentration"] = conc.astype(float)
    for col in ("Plate", "Well", "CellLine", "FileName_DAPI", "FileName_FITC"):
        frame[col] = frame[col].astype(str).str.strip()
    frame["Well"] = frame["Well"].str.upper()
    dup = frame.duplicated(["Plate", "Well"])
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise BadInputError(f"{path}: row {row + 2}: well {frame['Plate'].iloc[row]}/{frame['Well'].iloc[row]} is listed twice")
    return frame


def label_wells(frame: pd.DataFrame, n_extreme: int = N_EXTREME, source: str = IMAGE_CSV) -> pd.Series:
    """The paper's label of each row: top ``n_extreme`` concentrations of its cell line
    → :data:`POSITIVE`, bottom ``n_extreme`` → :data:`NEGATIVE`, others :data:`UNLABELLED`.
    """
    labels = pd.Series(UNLABELLED, index=frame.index, dtype=object)
    for line, rows in frame.groupby("CellLine", sort=True):
        levels = np.sort(rows["Concentration"].round(12).unique())
        if len(levels) < 2 * n_extreme:
            raise BadInputError(
                f"{source}: cell line {line!r} has {len(levels)} distinct concentrations; "
                f"labelling needs at least {2 * n_extreme} (the {n_extreme} lowest and {n_extreme} highest)"
            )
        conc = rows["Concentration"].round(12)
        labels[rows.index[conc.isin(levels[-n_extreme:])]] = POSITIVE
        labels[rows.index[conc.isin(levels[:n_extreme])]] = NEGATIVE
    return labels


def load_bbbc014(
    root: Path,
    labelled_only: bool = True,
    check_files: bool = True,
    n_extreme: int = N_EXTREME,
) -> ImageTable:
    """Load a BBBC014-layout folder (see the module docstring) into an :class:`ImageTable`.

    With ``labelled_only`` (the paper) only the 64 labelled wells are kept;
    otherwise all wells, the middle concentrations with ``Metadata_MoA`` =
    ``"unlabelled"``. ``Metadata_Batch`` is the cell line (leave-one-cell-line-out)
    and there are no controls (``Metadata_IsControl`` is all False, so prepare
    with ``normalize="none"``). ``check_files`` raises :class:`BadInputError`
    for the first listed image that does not exist.
    """
    root = Path(root)
    csv_path = root / IMAGE_CSV
    frame = read_image_csv(root)
    frame["_label"] = label_wells(frame, n_extreme, str(csv_path))
    frame["_csv_row"] = np.arange(len(frame)) + 2
    if labelled_only:
        frame = frame[frame["_label"] != UNLABELLED]
    frame = frame.reset_index(drop=True)

    def resolve(name: str) -> str:
        p = Path(name)
        return str(p if p.is_absolute() else root / p)

    paths = {ch: [resolve(n) for n in frame[f"FileName_{ch}"]] for ch in CHANNELS}
    if check_files:
        for i in range(len(frame)):
            for ch in CHANNELS:
                if not Path(paths[ch][i]).is_file():
                    raise BadInputError(
                        f"{paths[ch][i]}: missing {ch} image ({csv_path} row {frame['_csv_row'].iloc[i]}, "
                        f"well {frame['Well'].iloc[i]})"
                    )
    well = frame["Well"]
    row = frame["Row"].astype(str) if "Row" in frame else well.str[0]
    column = (
        pd.to_numeric(frame["Column"], errors="coerce")
        if "Column" in frame
        else pd.to_numeric(well.str[1:], errors="coerce")
    )
    compound = frame["Compound"].fillna(COMPOUND).astype(str) if "Compound" in frame else COMPOUND
    out = pd.DataFrame(
        {
            "Metadata_ImageID": frame["Plate"] + "/" + well,
            "Metadata_Plate": frame["Plate"],
            "Metadata_Well": well,
            "Metadata_Site": 1,
            "Metadata_Compound": compound,
            "Metadata_Concentration": frame["Concentration"].astype(float),
            "Metadata_MoA": frame["_label"].astype(str),
            "Metadata_Batch": frame["CellLine"],
            "Metadata_IsControl": False,
            "Metadata_CellLine": frame["CellLine"],
            "Metadata_Row": row,
            "Metadata_Column": column.fillna(0).astype(int),
            "Metadata_Translocation": (frame["_label"] == POSITIVE).astype(int),
        }
    )
    for ch in CHANNELS:
        out[channel_column(ch)] = paths[ch]
    return ImageTable(
        out,
        CHANNELS,
        source="bbbc014",
        notes={"labels": {"positive": POSITIVE, "negative": NEGATIVE}, "n_extreme": n_extreme},
        origin=str(csv_path),
    )


def bbbc014_prepare_config(**overrides) -> PrepareConfig:
    """The paper's BBBC014 preprocessing as a :class:`PrepareConfig`.

    No DMSO exists, so no normalisation (``normalize="none"``: Anscombe, then an
    8-bit min-max per tile, as the authors' code does); 4×4 tiles per 1360×1024 field, each resized to
    256×256 (the authors resize the field to 1024×1024 and cut 16 crops of 256);
    DAPI and FITC plus an all-zero third channel for the ImageNet networks.
    ``overrides`` replace any field (e.g. ``tile_size=64`` for a quick test).
    """
    settings = dict(
        normalize="none", scaling="tile", tile_grid=(4, 4), tile_size=256, pad_channels=3, include_controls=True
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


# =========================================================================== real data
def _read_bmp(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode not in ("L", "I;16", "I") else im
            arr = np.asarray(im)
    except Exception as exc:
        raise BadInputError(f"{path}: unreadable BMP ({type(exc).__name__}: {exc})") from None
    return arr.astype(np.uint8) if arr.dtype != np.uint8 and arr.max() <= 255 else arr


def _otsu_fraction(img: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    img = ndimage.gaussian_filter(img.astype(np.float32), 1.0)
    return float((img > threshold_otsu(img)).mean())


def import_bbbc014(root: Path, dapi_channel: int | None = None, progress: bool = False) -> dict:
    """Turn the real BBBC014 download under ``root`` into the cellmorph layout.

    Expects ``BBBC014_v1_platemap_all.txt`` and the 192 ``Channel {1,2}-NN-R-CC-00.Bmp``
    images (``BBBC014_v1_images.zip`` unpacked anywhere below ``root``).
    Writes 8-bit TIFF copies to ``root/BBBC014_v1_tiff/`` and ``root/BBBC014_v1_image.csv``
    (concentrations converted from g/mL to ng/mL; rows A–D MCF-7, E–H A549).

    Which channel number is DAPI is not documented with the files (public
    loaders disagree), so by default it is detected: on the 8 lowest-dose
    wells the nuclear stain has the smaller Otsu foreground (nuclei vs whole
    cells). Pass ``dapi_channel`` (1 or 2) to force it.
    """
    root = Path(root)
    pm_path = root / REAL_PLATEMAP
    if not pm_path.is_file():
        raise BadInputError(f"{pm_path}: file not found (download BBBC014_v1_platemap_all.txt from the BBBC)")
    lines = [ln.strip() for ln in pm_path.read_text(encoding="latin-1").splitlines() if ln.strip()]
    if lines and not lines[0].startswith("10^"):
        lines = lines[1:]  # the DESCRIPTION header
    if len(lines) != 96:
        raise BadInputError(f"{pm_path}: expected 96 dose lines after the header, found {len(lines)}")
    doses = []
    for i, text in enumerate(lines):
        m = re.fullmatch(r"10\^\s*(-?\d+(?:\.\d+)?)", text)
        if not m:
            raise BadInputError(f"{pm_path}: dose line {i + 1} {text!r} is not of the form 10^<exponent>")
        doses.append(round(10.0 ** float(m.group(1)) * 1e9, 9))  # g/mL → ng/mL
    files: dict[tuple[int, int], Path] = {}
    for p in sorted(root.rglob("*")):
        m = _REAL_NAME.match(p.name)
        if m and p.is_file():
            index, row, col = int(m.group("index")), m.group("row").upper(), int(m.group("column"))
            if index != ROWS.index(row) * N_COLUMNS + col:
                raise BadInputError(f"{p}: well index {index:02d} disagrees with well {row}{col:02d}")
            files.setdefault((index, int(m.group("channel"))), p)
    missing = [(i, c) for i in range(1, 97) for c in (1, 2) if (i, c) not in files]
    if missing:
        i, c = missing[0]
        r, col = ROWS[(i - 1) // N_COLUMNS], (i - 1) % N_COLUMNS + 1
        raise BadInputError(
            f"{root}: missing image {image_file_name(c, r, col, 'Bmp')} (and {len(missing) - 1} more) of {REAL_IMAGE_DIR}"
        )
    if dapi_channel is None:
        low = np.argsort(doses, kind="stable")[:8] + 1
        votes = [_otsu_fraction(_read_bmp(files[(i, 1)])) - _otsu_fraction(_read_bmp(files[(i, 2)])) for i in low]
        dapi_channel = 1 if float(np.median(votes)) < 0 else 2
    if dapi_channel not in (1, 2):
        raise CellmorphError(f"dapi_channel must be 1 or 2, not {dapi_channel!r}")
    fitc_channel = 3 - dapi_channel
    (root / TIFF_DIR).mkdir(exist_ok=True)
    rows = []
    for i in range(1, 97):
        r, c = ROWS[(i - 1) // N_COLUMNS], (i - 1) % N_COLUMNS + 1
        names = {}
        for ch, num in (("DAPI", dapi_channel), ("FITC", fitc_channel)):
            src = files[(i, num)]
            rel = f"{TIFF_DIR}/{src.stem}.tif"
            if not (root / rel).is_file():
                write_tiff(root / rel, _read_bmp(src))
            names[ch] = rel
        rows.append(
            {
                "ImageNumber": i, "Plate": REAL_PLATE, "Well": f"{r}{c:02d}", "Row": r, "Column": c,
                "CellLine": ROW_CELL_LINE[r], "Compound": COMPOUND, "Concentration": doses[i - 1], "Unit": "ng/mL",
                "FileName_DAPI": names["DAPI"], "FileName_FITC": names["FITC"],
            }
        )
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    write_csv(root / IMAGE_CSV, frame)
    return {"root": str(root), "n_wells": 96, "dapi_channel": int(dapi_channel), "csv": str(root / IMAGE_CSV)}
