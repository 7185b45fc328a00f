"""A synthetic stand-in for BBBC014 (NF-κB translocation in MCF-7 and A549 under a TNFα series).

:func:`generate_bbbc014` writes a 96-well plate in the cellmorph BBBC014 layout
(see :mod:`cellmorph.data.bbbc014`, which loads it like the real set): rows A–D
MCF-7, E–H A549, one TNFα concentration per column, DAPI and FITC as 8-bit TIFFs.
Each well is rendered from its own seed sequence (:func:`render_well`), so a seed
gives identical files. The dose moves NF-κB from the cytoplasm into the nucleus
(:func:`dose_response`); :func:`nuclear_cytoplasmic_ratio` measures that
translocation and is what the tests check the images against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellmorph.data.bbbc014 import (
    CELL_LINES,
    COMPOUND,
    CSV_COLUMNS,
    IMAGE_CSV,
    N_COLUMNS,
    NEGATIVE,
    POSITIVE,
    REAL_IMAGE_DIR,
    ROW_CELL_LINE,
    ROWS,
    UNLABELLED,
    image_file_name,
    label_wells,
)
from cellmorph.data.synthetic.common import camera_counts, dose_response, lookup_preset, seeded_rng, write_channels
from cellmorph.errors import CellmorphError
from cellmorph.progress import Progress
from cellmorph.runinfo import require_output_dir, write_csv

__all__ = [
    "CONCENTRATIONS",
    "PRESETS",
    "plate_map",
    "render_well",
    "dose_response",
    "generate_bbbc014",
    "nuclear_cytoplasmic_ratio",
]

# TNFα series in ng/mL, column 1 → 12: half-log dilutions from 100 ng/mL
# (= the real plate's top dose, 10^-7 g/mL) and an untreated column 12.
CONCENTRATIONS: tuple[float, ...] = tuple(round(100.0 * 10 ** (-0.5 * k), 6) for k in range(11)) + (0.0,)


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
    spec = lookup_preset(PRESETS, preset, "BBBC014")
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
                    "FileName_DAPI": f"{root_dir}/{image_file_name(2, r, c, ext)}",
                    "FileName_FITC": f"{root_dir}/{image_file_name(1, r, c, ext)}",
                }
            )
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


_K_PLATE, _K_WELL = 1, 2


def _plate_params(seed: int) -> dict:
    """Plate-wide nuisance shared by all wells: vignetting shape and camera constants."""
    rng = seeded_rng(seed, _K_PLATE)
    return {
        "vignette_center": rng.uniform(-0.12, 0.12, size=2),
        "vignette": rng.uniform(0.18, 0.32, size=2),  # DAPI, FITC fall-off at the corners
        "gradient": rng.uniform(-0.08, 0.08, size=2),
        "offset": rng.uniform(5.0, 9.0, size=2),
        "gain": rng.uniform(0.45, 0.75),  # DN per photo-electron
        "read_noise": rng.uniform(0.9, 1.5),
    }


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
    """The (2, H, W) uint8 DAPI and FITC images of one synthetic well (deterministic per seed and well).

    In stages, each drawing from the well's generator in turn: the well's nuisance (density, staining, EC50,
    focus), its cells (:func:`_draw_well_cells`), their territories (:func:`_rasterise_cells`), the two
    channels (:func:`_compose_well`), and the camera (:func:`_well_camera`)."""
    line = CELL_LINE_MODELS[cell_line]
    plate = plate or _plate_params(seed)
    rng = seeded_rng(seed, _K_WELL, ROWS.index(row), column)
    H, W = height, width
    # ---- per-well nuisance
    density = line.density * float(rng.lognormal(0.0, 0.25))
    gains = rng.lognormal(0.0, [0.12, 0.15])  # staining/exposure jitter for DAPI, FITC
    well_ec50 = line.ec50 * float(rng.lognormal(0.0, 0.15))
    blur = 0.8 * scale * float(rng.uniform(0.9, 1.4))  # optics + slight focus jitter
    cells = _draw_well_cells(rng, line, scale, H, W, density, well_ec50, concentration)
    territories = _rasterise_cells(cells, H, W)
    dapi, fitc, tex_coarse = _compose_well(rng, cells, territories, scale, H, W)
    return _well_camera(rng, (dapi, fitc), tex_coarse, plate, gains, blur, H, W)


def _draw_well_cells(rng, line, scale: float, H: int, W: int, density: float, well_ec50: float,
                     concentration: float) -> dict:
    """The well's cells: centres, nucleus and cytoplasm ellipses with irregular outlines, and each cell's
    NF-κB, its total conserved and moved between cytoplasm and nucleus by the dose."""
    n = int(rng.poisson(density * H * W / (1e4 * scale * scale)))
    centres = _place_cells(rng, max(n, 1), line, scale, H, W)
    if len(centres) == 0:
        centres = np.array([[H / 2, W / 2]])
    n = len(centres)

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
    dapi_amp = line.dapi_level * rng.lognormal(0.0, 0.18, n) * np.where(mitotic, 1.9, 1.0)
    return {"n": n, "cy": centres[:, 0], "cx": centres[:, 1], "a_c": a_c, "b_c": b_c, "t_c": theta_c, "ny": ny,
            "nx": nx, "a_n": a_n, "b_n": b_n, "t_n": theta, "harm_c": harm_c, "phase_c": phase_c, "harm_n": harm_n,
            "phase_n": phase_n, "c_cyt": c_cyt, "c_nuc": ratio * c_cyt, "dapi_amp": dapi_amp}


def _rasterise_cells(cells: dict, H: int, W: int) -> tuple[np.ndarray, ...]:
    """(cytoplasm distance, cytoplasm label, nucleus distance, nucleus label): winner-takes-pixel by normalised
    distance, so that cells share borders (label -1: background)."""
    best_c = np.full((H, W), np.inf, np.float32)
    lab_c = np.full((H, W), -1, np.int32)
    best_n = np.full((H, W), np.inf, np.float32)
    lab_n = np.full((H, W), -1, np.int32)
    P = {k: np.asarray(cells[k], dtype=float).tolist()
         for k in ("cy", "cx", "a_c", "b_c", "t_c", "ny", "nx", "a_n", "b_n", "t_n")}
    hc, pc = cells["harm_c"].tolist(), cells["phase_c"].tolist()
    hn, pn = cells["harm_n"].tolist(), cells["phase_n"].tolist()
    for i in range(cells["n"]):
        _stamp(best_c, lab_c, i, P["cy"][i], P["cx"][i], P["a_c"][i], P["b_c"][i], P["t_c"][i],
               hc[i], pc[i], 1.0, 1.45)
        _stamp(best_n, lab_n, i, P["ny"][i], P["nx"][i], P["a_n"][i], P["b_n"][i], P["t_n"][i],
               hn[i], pn[i], 1.15, 1.25)
    return best_c, lab_c, best_n, lab_n


def _compose_well(rng, cells: dict, territories, scale: float, H: int, W: int):
    """(DAPI, FITC, the coarse texture) before optics, float32 throughout (the hot path): textured nuclei, a
    cytoplasm thicker near the nucleus, NF-κB in each compartment, and a few bright debris specks in FITC."""
    best_c, lab_c, best_n, lab_n = territories
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
    dapi = w_nuc * cells["dapi_amp"].astype(f32)[nid] * dome * (f32(1.0) + f32(0.22) * tex_fine
                                                                 + f32(0.08) * tex_coarse)
    # cytoplasm: thicker (brighter) near the nucleus, thin at the membrane, granular
    dc = np.where(in_cell, best_c, f32(1.0))
    thick = np.clip(f32(1.0) - dc, f32(0.0), f32(1.0)) ** f32(0.6) * f32(1.35) + f32(0.15) * in_cell
    c_cyt32, c_nuc32 = cells["c_cyt"].astype(f32), cells["c_nuc"].astype(f32)
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
    return dapi, fitc, tex_coarse


def _well_camera(rng, channels, tex_coarse, plate: dict, gains, blur: float, H: int, W: int) -> np.ndarray:
    """Optics, vignetting and gradient, background, staining gain, shot and read noise, offset: uint8 images."""
    f32 = np.float32
    yy = (np.arange(H, dtype=f32)[:, None] / f32(H) - f32(0.5)) - f32(plate["vignette_center"][0])
    xx = (np.arange(W, dtype=f32)[None, :] / f32(W) - f32(0.5)) - f32(plate["vignette_center"][1])
    r2 = (yy * yy + xx * xx) * f32(2.0)
    gain, read = float(plate["gain"]), float(plate["read_noise"])
    images = []
    for k, sig in enumerate(channels):
        sig = ndimage.gaussian_filter(sig, blur)
        illum = (f32(1.0) - f32(plate["vignette"][k]) * r2) * (f32(1.0) + f32(plate["gradient"][k]) * (xx + yy))
        bg = f32(3.0 + 2.0 * k) + (f32(1.5) * tex_coarse if k else f32(0.0))
        expected = np.maximum((sig * f32(gains[k]) + bg) * illum, f32(0.0))
        images.append(camera_counts(expected, gain, read, plate["offset"][k], rng, 255).astype(np.uint8))
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
    out = require_output_dir(Path(out), "output folder")
    (out / REAL_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    wells = plate_map()
    plate = _plate_params(seed)
    with Progress(progress) as bar:
        task = bar.task(f"synthetic BBBC014 ({spec.name}) wells", len(wells), every=30.0)
        for rec in wells.itertuples(index=False):
            img = render_well(
                seed, rec.Row, int(rec.Column), float(rec.Concentration), rec.CellLine,
                spec.height, spec.width, spec.scale, plate,
            )
            write_channels(out, (rec.FileName_DAPI, rec.FileName_FITC), img)
            task.advance()
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
