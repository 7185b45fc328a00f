"""BBBC014 (NF-κB translocation, MCF-7 and A549, TNFα dose series): layout, labels, synthetic stand-in.

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

* :func:`generate_bbbc014` writes a synthetic plate in this layout, with the
  real file names except for the extension (``.tif``).
* :func:`import_bbbc014` turns the real download (``BBBC014_v1_images/*.Bmp`` +
  ``BBBC014_v1_platemap_all.txt``) into this layout: it converts the BMPs to
  TIFF and writes the CSV.
* :func:`bbbc014_prepare_config` is the paper's preprocessing recipe.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import expit

from cellmorph.data.table import ImageTable, channel_column
from cellmorph.errors import BadInputError, CellmorphError
from cellmorph.data.images import write_tiff
from cellmorph.runinfo import write_csv

if TYPE_CHECKING:  # preprocess imports torch; keep `synth` and loading light
    from cellmorph.preprocess import PrepareConfig

__all__ = [
    "CHANNELS",
    "IMAGE_CSV",
    "POSITIVE",
    "NEGATIVE",
    "CELL_LINES",
    "CONCENTRATIONS",
    "PRESETS",
    "load_bbbc014",
    "label_wells",
    "read_image_csv",
    "plate_map",
    "generate_bbbc014",
    "render_well",
    "import_bbbc014",
    "bbbc014_prepare_config",
    "nuclear_cytoplasmic_ratio",
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
# Synthetic TNFα series in ng/mL, column 1 → 12: half-log dilutions from
# 100 ng/mL (= the real plate's top dose, 10^-7 g/mL) and an untreated column 12.
CONCENTRATIONS: tuple[float, ...] = tuple(round(100.0 * 10 ** (-0.5 * k), 6) for k in range(11)) + (0.0,)

# Real download (see module docstring).
REAL_IMAGE_DIR = "BBBC014_v1_images"
REAL_PLATEMAP = "BBBC014_v1_platemap_all.txt"
REAL_PLATE = "BBBC014"
TIFF_DIR = "BBBC014_v1_tiff"
_REAL_NAME = re.compile(
    r"^Channel ?(?P<channel>[12])-(?P<index>\d{2})-(?P<row>[A-H])-(?P<column>\d{2})-00\.bmp$", re.IGNORECASE
)


def _file_name(channel_number: int, row: str, column: int, ext: str) -> str:
    index = ROWS.index(row) * N_COLUMNS + column
    return f"Channel {channel_number}-{index:02d}-{row}-{column:02d}-00.{ext}"


# =========================================================================== loading
def read_image_csv(root: Path) -> pd.DataFrame:
    """``<root>/BBBC014_v1_image.csv`` checked for required columns and blank cells."""
    path = Path(root) / IMAGE_CSV
    if not path.is_file():
        raise BadInputError(f"{path}: file not found (a BBBC014 root holds {IMAGE_CSV}; see `import_bbbc014`)")
    try:
        frame = pd.read_csv(path, dtype={"Plate": str, "Well": str, "CellLine": str})
    except Exception as exc:  # pandas raises many parser error types
        raise BadInputError(f"{path}: cannot parse CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise BadInputError(f"{path}: no rows")
    for col in REQUIRED_COLUMNS:
        blank = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            # +2: one for the header line, one because CSV rows count from 1.
            raise BadInputError(f"{path}: row {row + 2}: blank or NaN value in column {col}")
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
    )


def bbbc014_prepare_config(**overrides) -> PrepareConfig:
    """The paper's BBBC014 preprocessing as a :class:`PrepareConfig`.

    No DMSO exists, so no normalisation (``normalize="none"``: Anscombe, then an
    8-bit min-max per tile, as the authors' code does); 4×4 tiles per 1360×1024 field, each resized to
    256×256 (the authors resize the field to 1024×1024 and cut 16 crops of 256);
    DAPI and FITC plus an all-zero third channel for the ImageNet networks.
    ``overrides`` replace any field (e.g. ``tile_size=64`` for a quick test).
    """
    from cellmorph.preprocess import PrepareConfig

    settings = dict(
        normalize="none", scaling="tile", tile_grid=(4, 4), tile_size=256, pad_channels=3, include_controls=True
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


# =========================================================================== synthetic
@dataclass(frozen=True)
class CellLineModel:
    """Morphology and NF-κB response of one synthetic cell line (lengths in px at scale 1)."""

    name: str
    nucleus_radius: float  # mean semi-axis of the nucleus
    nucleus_radius_sd: float  # lognormal sigma of the nucleus size
    nucleus_aspect: tuple[float, float]  # range of major/minor axis ratio
    cyto_factor: tuple[float, float]  # range of cytoplasm mean radius / nucleus radius
    cyto_aspect: tuple[float, float]  # range of cytoplasm major/minor ratio
    cyto_irregularity: float  # amplitude of boundary harmonics
    nucleus_offset: float  # nucleus displacement inside the cell, as a fraction of the cell radius
    density: float  # cells per 10^4 px² at scale 1, before per-well variation
    clustering: float  # fraction of cells grown in colonies
    colony_size: float  # mean cells per colony
    ec50: float  # ng/mL TNFα for half-maximal translocation
    hill: float
    ratio_rest: float  # nuclear / cytoplasmic NF-κB concentration, unstimulated
    ratio_active: float  # … fully stimulated
    dapi_level: float
    fitc_level: float  # mean cytoplasmic FITC of an unstimulated cell


CELL_LINE_MODELS: dict[str, CellLineModel] = {
    # Clustered epithelial colonies, round compact cells, smaller nuclei.
    "MCF-7": CellLineModel(
        "MCF-7", nucleus_radius=7.5, nucleus_radius_sd=0.14, nucleus_aspect=(1.0, 1.3), cyto_factor=(1.55, 1.95),
        cyto_aspect=(1.0, 1.35), cyto_irregularity=0.07, nucleus_offset=0.08, density=3.4, clustering=0.85,
        colony_size=14.0, ec50=0.6, hill=1.3, ratio_rest=0.5, ratio_active=2.4, dapi_level=150.0, fitc_level=62.0,
    ),
    # Larger, flatter, spread and elongated cells, mostly scattered.
    "A549": CellLineModel(
        "A549", nucleus_radius=9.5, nucleus_radius_sd=0.15, nucleus_aspect=(1.15, 1.6), cyto_factor=(2.2, 3.0),
        cyto_aspect=(1.4, 2.6), cyto_irregularity=0.16, nucleus_offset=0.22, density=1.9, clustering=0.25,
        colony_size=5.0, ec50=1.5, hill=1.1, ratio_rest=0.55, ratio_active=2.9, dapi_level=120.0, fitc_level=48.0,
    ),
}


@dataclass(frozen=True)
class Bbbc014Preset:
    name: str
    height: int
    width: int
    scale: float  # pixel scale relative to the real 10x images


PRESETS: dict[str, Bbbc014Preset] = {
    "tiny": Bbbc014Preset("tiny", 256, 340, 0.5),
    "full": Bbbc014Preset("full", 1024, 1360, 1.0),
}


def _preset(preset: str, size: tuple[int, int] | None) -> Bbbc014Preset:
    if preset not in PRESETS:
        raise CellmorphError(f"unknown BBBC014 preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if size is None:
        return spec
    h, w = (int(v) for v in size)
    if h < 64 or w < 64:
        raise CellmorphError(f"BBBC014 size {h}×{w} is too small; use at least 64×64")
    scale = float(np.clip(min(h / 1024, w / 1360) ** 0.5, 0.4, 1.0))
    return Bbbc014Preset(f"{preset}@{h}x{w}", h, w, scale)


def plate_map(root_dir: str = REAL_IMAGE_DIR, ext: str = "tif", plate: str = "BBBC014-synthetic") -> pd.DataFrame:
    """The 96-well synthetic plate as ``BBBC014_v1_image.csv`` rows (see the module docstring)."""
    rows = []
    for r in ROWS:
        for c in range(1, N_COLUMNS + 1):
            rows.append(
                {
                    "ImageNumber": ROWS.index(r) * N_COLUMNS + c,
                    "Plate": plate,
                    "Well": f"{r}{c:02d}",
                    "Row": r,
                    "Column": c,
                    "CellLine": ROW_CELL_LINE[r],
                    "Compound": COMPOUND,
                    "Concentration": CONCENTRATIONS[c - 1],
                    "Unit": "ng/mL",
                    # Channel 2 = DAPI, Channel 1 = FITC; see import_bbbc014 about the real set.
                    "FileName_DAPI": f"{root_dir}/{_file_name(2, r, c, ext)}",
                    "FileName_FITC": f"{root_dir}/{_file_name(1, r, c, ext)}",
                }
            )
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


_K_PLATE, _K_WELL = 1, 2


def _plate_params(seed: int) -> dict:
    """Plate-wide nuisance shared by all wells: vignetting shape and camera constants."""
    rng = _rng(seed, _K_PLATE)
    return {
        "vignette_center": rng.uniform(-0.12, 0.12, size=2),
        "vignette": rng.uniform(0.18, 0.32, size=2),  # DAPI, FITC fall-off at the corners
        "gradient": rng.uniform(-0.08, 0.08, size=2),
        "offset": rng.uniform(5.0, 9.0, size=2),
        "gain": rng.uniform(0.45, 0.75),  # DN per photo-electron
        "read_noise": rng.uniform(0.9, 1.5),
    }


def dose_response(conc, ec50, hill: float):
    """Fraction of maximal translocation, ``1 / (1 + (ec50/conc)^hill)``; 0 at conc 0."""
    conc = np.asarray(conc, dtype=float)
    logit = hill * (np.log(np.maximum(conc, 1e-300)) - np.log(np.asarray(ec50, dtype=float)))
    return np.where(conc > 0, expit(logit), 0.0)


def _place_cells(rng, n: int, line: CellLineModel, scale: float, H: int, W: int) -> np.ndarray:
    """Cell centres (y, x): colonies for a ``clustering`` fraction, the rest scattered, with a hard core."""
    r_cell = line.nucleus_radius * scale * float(np.mean(line.cyto_factor))
    n_col = int(round(n * line.clustering))
    n_colonies = max(1, int(round(n_col / line.colony_size))) if n_col else 0
    centres = rng.uniform([0, 0], [H, W], size=(n_colonies, 2))
    spread = r_cell * np.sqrt(line.colony_size) * 0.55
    pts = []
    if n_colonies:
        which = rng.integers(0, n_colonies, size=3 * n_col)
        pts.append(centres[which] + rng.normal(0, spread, size=(3 * n_col, 2)))
    pts.append(rng.uniform([0, 0], [H, W], size=(3 * (n - n_col) + 3, 2)))
    # Interleave candidates so colonies and scattered cells both get their share.
    cand = np.concatenate(pts)
    is_col = np.concatenate([np.ones(3 * n_col, bool), np.zeros(len(cand) - 3 * n_col, bool)])
    order = rng.permutation(len(cand))
    cand, is_col = cand[order], is_col[order]
    inside = (cand[:, 0] > -r_cell) & (cand[:, 0] < H + r_cell) & (cand[:, 1] > -r_cell) & (cand[:, 1] < W + r_cell)
    cand, is_col = cand[inside], is_col[inside]
    min_d = 1.35 * r_cell
    cell = max(min_d, 1.0)
    grid: dict[tuple[int, int], list[int]] = {}
    kept: list[np.ndarray] = []
    want = {True: n_col, False: n - n_col}
    got = {True: 0, False: 0}
    for p, col in zip(cand, is_col):
        if got[bool(col)] >= want[bool(col)]:
            continue
        gy, gx = int(p[0] // cell), int(p[1] // cell)
        ok = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for j in grid.get((gy + dy, gx + dx), ()):
                    if (kept[j][0] - p[0]) ** 2 + (kept[j][1] - p[1]) ** 2 < min_d * min_d:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gy, gx), []).append(len(kept))
            kept.append(p)
            got[bool(col)] += 1
    return np.array(kept).reshape(-1, 2)


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise, drawn at reduced resolution for speed."""
    step = max(1, int(sigma // 2))
    small = (shape[0] // step + 2, shape[1] // step + 2)
    z = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / step, mode="wrap")
    if step > 1:
        z = ndimage.zoom(z, step, order=1)
    z = z[: shape[0], : shape[1]]
    return ((z - z.mean()) / (z.std() + 1e-6)).astype(np.float32, copy=False)


def _stamp(best, lab, i, cy, cx, a, b, theta, harm, phase, limit, reach) -> None:
    """Claim for shape ``i`` the pixels where its normalised distance is < ``limit`` and < ``best``.

    The shape is an ellipse (semi-axes a, b, angle theta) whose radius is
    modulated by harmonics 2, 3, … with amplitudes ``harm`` and phases ``phase``.
    """
    H, W = best.shape
    ext = int(math.ceil(max(a, b) * reach + 2))
    y0, y1 = max(int(cy) - ext, 0), min(int(cy) + ext + 1, H)
    x0, x1 = max(int(cx) - ext, 0), min(int(cx) + ext + 1, W)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    ct, st = math.cos(theta), math.sin(theta)
    u = (xx * ct + yy * st) / a
    v = (yy * ct - xx * st) / b
    ang = np.arctan2(v, u)
    rad = 1.0
    for k, (h, ph) in enumerate(zip(harm, phase)):
        rad = rad + h * np.cos((k + 2) * ang + ph)
    d = np.sqrt(u * u + v * v) / np.maximum(rad, 0.5)
    view_b, view_l = best[y0:y1, x0:x1], lab[y0:y1, x0:x1]
    win = (d < limit) & (d < view_b)
    view_b[win] = d[win]
    view_l[win] = i


def render_well(
    seed: int,
    row: str,
    column: int,
    concentration: float,
    cell_line: str,
    height: int = 256,
    width: int = 340,
    scale: float = 0.5,
    plate: dict | None = None,
) -> np.ndarray:
    """The (2, H, W) uint8 DAPI and FITC images of one synthetic well (deterministic per seed and well)."""
    line = CELL_LINE_MODELS[cell_line]
    plate = plate or _plate_params(seed)
    rng = _rng(seed, _K_WELL, ROWS.index(row), column)
    H, W = height, width
    # ---- per-well nuisance
    density = line.density * float(rng.lognormal(0.0, 0.25))
    gains = rng.lognormal(0.0, [0.12, 0.15])  # staining/exposure jitter for DAPI, FITC
    well_ec50 = line.ec50 * float(rng.lognormal(0.0, 0.15))
    blur = 0.8 * scale * float(rng.uniform(0.9, 1.4))  # optics + slight focus jitter

    n = int(rng.poisson(density * H * W / (1e4 * scale * scale)))
    centres = _place_cells(rng, max(n, 1), line, scale, H, W)
    if len(centres) == 0:
        centres = np.array([[H / 2, W / 2]])
    n = len(centres)

    # ---- per-cell parameters
    rn = line.nucleus_radius * scale * rng.lognormal(0.0, line.nucleus_radius_sd, n)
    asp_n = rng.uniform(*line.nucleus_aspect, n)
    theta = rng.uniform(0, np.pi, n)
    factor = rng.uniform(*line.cyto_factor, n)
    asp_c = rng.uniform(*line.cyto_aspect, n)
    theta_c = theta + rng.normal(0, 0.35, n)
    mitotic = rng.random(n) < 0.03
    rn = np.where(mitotic, rn * 0.7, rn)
    factor = np.where(mitotic, 1.35, factor)
    asp_c = np.where(mitotic, 1.05, asp_c)
    asp_n = np.where(mitotic, 1.1, asp_n)
    rc = rn * factor
    a_c, b_c = rc * np.sqrt(asp_c), rc / np.sqrt(asp_c)
    a_n, b_n = rn * np.sqrt(asp_n), rn / np.sqrt(asp_n)
    off_ang = rng.uniform(0, 2 * np.pi, n)
    off = line.nucleus_offset * rc * rng.uniform(0.2, 1.0, n) * ~mitotic
    ny = centres[:, 0] + off * np.sin(off_ang)
    nx = centres[:, 1] + off * np.cos(off_ang)
    harm_c = rng.normal(0, line.cyto_irregularity, (n, 4)) / np.arange(2, 6)
    phase_c = rng.uniform(0, 2 * np.pi, (n, 4))
    harm_n = rng.normal(0, 0.04, (n, 2))
    phase_n = rng.uniform(0, 2 * np.pi, (n, 2))

    # NF-κB: total per cell conserved; the dose moves it between compartments.
    cell_ec50 = well_ec50 * rng.lognormal(0.0, 0.55, n)
    response = dose_response(concentration, cell_ec50, line.hill)
    response = np.clip(response + rng.normal(0, 0.04, n), 0.0, 1.0)
    ratio = np.exp(np.log(line.ratio_rest) + (np.log(line.ratio_active) - np.log(line.ratio_rest)) * response)
    ratio = np.where(mitotic, 1.0, ratio)
    total = rng.lognormal(0.0, 0.3, n)
    area_n = np.pi * a_n * b_n
    area_c = np.pi * a_c * b_c - area_n
    # Cytoplasm concentration c such that c·area_c + ratio·c·area_n = total·(area_c + rest·area_n):
    # an unstimulated cell shows fitc_level in its cytoplasm; stimulation only redistributes.
    c_cyt = line.fitc_level * total * (area_c + line.ratio_rest * area_n) / (area_c + ratio * area_n)
    c_nuc = ratio * c_cyt
    dapi_amp = line.dapi_level * rng.lognormal(0.0, 0.18, n) * np.where(mitotic, 1.9, 1.0)

    # ---- rasterise: winner-takes-pixel by normalised distance (cells share borders)
    best_c = np.full((H, W), np.inf, np.float32)
    lab_c = np.full((H, W), -1, np.int32)
    best_n = np.full((H, W), np.inf, np.float32)
    lab_n = np.full((H, W), -1, np.int32)
    P = {k: np.asarray(v, dtype=float).tolist() for k, v in dict(
        cy=centres[:, 0], cx=centres[:, 1], a_c=a_c, b_c=b_c, t_c=theta_c, ny=ny, nx=nx, a_n=a_n, b_n=b_n, t_n=theta,
    ).items()}
    hc, pc = harm_c.tolist(), phase_c.tolist()
    hn, pn = harm_n.tolist(), phase_n.tolist()
    for i in range(n):
        _stamp(best_c, lab_c, i, P["cy"][i], P["cx"][i], P["a_c"][i], P["b_c"][i], P["t_c"][i],
               hc[i], pc[i], 1.0, 1.45)
        _stamp(best_n, lab_n, i, P["ny"][i], P["nx"][i], P["a_n"][i], P["b_n"][i], P["t_n"][i],
               hn[i], pn[i], 1.15, 1.25)

    # ---- compose the two channels (float32 throughout: this is the hot path)
    f32 = np.float32
    tex_fine = _smooth_noise(rng, (H, W), 1.2 * scale + 0.6)
    tex_coarse = _smooth_noise(rng, (H, W), 4.0 * scale + 1.0)
    in_cell = lab_c >= 0
    in_nuc = lab_n >= 0
    dn = np.where(in_nuc, best_n, f32(2.0))
    # soft nuclear weight: 1 inside, smooth fall-off at the rim
    w_nuc = np.clip((f32(1.1) - dn) * f32(5.0), f32(0.0), f32(1.0))
    w_nuc = w_nuc * w_nuc * (f32(3.0) - f32(2.0) * w_nuc)
    nid = np.where(in_nuc, lab_n, 0)
    cid = np.where(in_cell, lab_c, 0)
    dome = np.sqrt(np.clip(f32(1.0) - f32(0.55) * dn * dn, f32(0.0), f32(1.0)))
    dapi = w_nuc * dapi_amp.astype(f32)[nid] * dome * (f32(1.0) + f32(0.22) * tex_fine + f32(0.08) * tex_coarse)
    # cytoplasm: thicker (brighter) near the nucleus, thin at the membrane, granular
    dc = np.where(in_cell, best_c, f32(1.0))
    thick = np.clip(f32(1.0) - dc, f32(0.0), f32(1.0)) ** f32(0.6) * f32(1.35) + f32(0.15) * in_cell
    c_cyt32, c_nuc32 = c_cyt.astype(f32), c_nuc.astype(f32)
    cyt = c_cyt32[cid] * thick * in_cell * (f32(1.0) + f32(0.25) * tex_fine + f32(0.12) * tex_coarse)
    nuc = c_nuc32[nid] * (f32(1.0) + f32(0.12) * tex_fine) * dome
    # A nucleus overlapping a neighbour's cytoplasm (colonies) is surrounded by its own cytoplasm level.
    under = np.where(lab_c == lab_n, cyt, c_cyt32[nid] * f32(0.6))
    fitc = np.where(in_nuc, (f32(1.0) - w_nuc) * under + w_nuc * nuc, cyt)

    # a few bright debris specks in FITC, as on the real plate
    n_debris = int(rng.poisson(H * W / 3e5))
    if n_debris:
        ys, xs = rng.integers(0, H, n_debris), rng.integers(0, W, n_debris)
        fitc[ys, xs] += (rng.uniform(400, 1500, n_debris) * scale * scale).astype(f32)

    # ---- optics, illumination, background, camera
    yy = (np.arange(H, dtype=f32)[:, None] / f32(H) - f32(0.5)) - f32(plate["vignette_center"][0])
    xx = (np.arange(W, dtype=f32)[None, :] / f32(W) - f32(0.5)) - f32(plate["vignette_center"][1])
    r2 = (yy * yy + xx * xx) * f32(2.0)
    gain, read = float(plate["gain"]), float(plate["read_noise"])
    images = []
    for k, sig in enumerate((dapi, fitc)):
        sig = ndimage.gaussian_filter(sig, blur)
        illum = (f32(1.0) - f32(plate["vignette"][k]) * r2) * (f32(1.0) + f32(plate["gradient"][k]) * (xx + yy))
        bg = f32(3.0 + 2.0 * k) + (f32(1.5) * tex_coarse if k else f32(0.0))
        expected = np.maximum((sig * f32(gains[k]) + bg) * illum, f32(0.0))
        # shot noise (Gaussian approximation of Poisson at `gain` DN per electron) + read noise
        sd = np.sqrt(expected * f32(gain) + f32(read * read))
        img = expected + sd * rng.standard_normal((H, W), dtype=f32) + f32(plate["offset"][k])
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.stack(images)


def generate_bbbc014(
    out: Path,
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
    size: tuple[int, int] | None = None,
) -> dict:
    """Write a synthetic BBBC014 plate (96 wells, DAPI + FITC, 8-bit TIFF) under ``out``.

    Deterministic for a seed (each well draws from its own seed sequence).
    Every file is written under a temporary name and renamed; the CSV comes
    last, so a folder with ``BBBC014_v1_image.csv`` holds every image it lists.
    ``size`` = (H, W) overrides the preset's field size (the cell scale follows).
    """
    spec = _preset(preset, size)
    t0 = time.perf_counter()
    out = Path(out)
    (out / REAL_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    wells = plate_map()
    plate = _plate_params(seed)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn(f"synthetic BBBC014 [{spec.name}]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("wells"), TimeElapsedColumn(),
        )
        bar.start()
        task = bar.add_task("render", total=len(wells))
    try:
        for rec in wells.itertuples(index=False):
            img = render_well(
                seed, rec.Row, int(rec.Column), float(rec.Concentration), rec.CellLine,
                spec.height, spec.width, spec.scale, plate,
            )
            write_tiff(out / rec.FileName_DAPI, img[0])
            write_tiff(out / rec.FileName_FITC, img[1])
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    write_csv(out / IMAGE_CSV, wells)
    labels = label_wells(wells)
    return {
        "dataset": "bbbc014",
        "preset": spec.name,
        "seed": int(seed),
        "out": str(out),
        "n_wells": int(len(wells)),
        "n_labelled": int((labels != UNLABELLED).sum()),
        "n_positive": int((labels == POSITIVE).sum()),
        "n_negative": int((labels == NEGATIVE).sum()),
        "cell_lines": list(CELL_LINES),
        "image_shape": [spec.height, spec.width],
        "seconds": round(time.perf_counter() - t0, 3),
    }


# =========================================================================== measurement
def nuclear_cytoplasmic_ratio(dapi: np.ndarray, fitc: np.ndarray, ring: int = 3) -> float:
    """Mean FITC in DAPI-Otsu nuclei over mean FITC in a ``ring``-px band around them (background-subtracted).

    The classical translocation read-out; used to check the synthetic data.
    """
    from skimage.filters import threshold_otsu

    d = ndimage.gaussian_filter(dapi.astype(np.float32), 1.0)
    nuclei = d > threshold_otsu(d)
    nuclei = ndimage.binary_erosion(nuclei, iterations=1)
    band = ndimage.binary_dilation(nuclei, iterations=ring + 1) & ~ndimage.binary_dilation(nuclei, iterations=1)
    f = fitc.astype(np.float32)
    bg = float(np.percentile(f, 5))
    return float((f[nuclei].mean() - bg) / max(f[band].mean() - bg, 1e-3))


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
            f"{root}: missing image {_file_name(c, r, col, 'Bmp')} (and {len(missing) - 1} more) of {REAL_IMAGE_DIR}"
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
