"""One synthetic BBBC021 field (:func:`render_field`), in stages: the cells (:mod:`.cells`), their nuclei and
cytoskeleton (:mod:`.paint`), the channels composed, and the microscope's optics and camera noise; with the
plate nuisance (:func:`_plate_params`) and the noise textures the fields share (:func:`_texture_bank`)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from cellmorph.data.synthetic.cells import _INTERPHASE, _CellLook, _Cells, _draw_cells, _territories
from cellmorph.data.synthetic.common import camera_counts, seeded_rng
from cellmorph.data.synthetic.paint import _draw_condensed, _Layer, _paint_cell
from cellmorph.data.synthetic.presets import _K_PLATE, _K_TEXTURE, _K_WEEK

# Signal scale (ADU per unit of drawn intensity) and background per channel.
_ADU_SCALE = np.array([2300.0, 1500.0, 2100.0])
_BACKGROUND = np.array([330.0, 560.0, 420.0])
_CAMERA_OFFSET = 100.0
_READ_NOISE = 6.0
_ADU_PER_ELECTRON = 0.9


def _plate_params(seed: int, week: int, plate_number: int) -> dict:
    wr = seeded_rng(seed, _K_WEEK, week)
    week_gain = wr.lognormal(0.0, 0.22, 3)
    week_bg = wr.lognormal(0.0, 0.15, 3)
    pr = seeded_rng(seed, _K_PLATE, plate_number)
    return {
        "gain": (week_gain * pr.lognormal(0.0, 0.12, 3)).tolist(),
        "background": (_BACKGROUND * week_bg * pr.lognormal(0.0, 0.12, 3)).tolist(),
        "offset": float(_CAMERA_OFFSET + pr.normal(0.0, 3.0)),
        "density": float(pr.lognormal(0.0, 0.12)),
        # vignetting: optical centre, strength per channel, linear tilt
        "illum_centre": pr.normal(0.5, 0.07, 2).tolist(),
        "illum_strength": pr.uniform(0.12, 0.32, 3).tolist(),
        "illum_tilt": pr.normal(0.0, 0.05, 2).tolist(),
    }


@lru_cache(maxsize=4)
def _texture_bank(seed: int, height: int, width: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Two band-limited noise textures (fine, medium), larger than a field; fields use shifted views."""
    rng = seeded_rng(seed, _K_TEXTURE, height, width, int(round(scale * 1000)))
    shape = (height + height // 2 + 8, width + width // 2 + 8)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.9 * scale + 0.35)
    med = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.6 * scale)
    fine /= fine.std()
    med /= med.std()
    return fine, med


def render_field(
    knobs: dict,
    arrest_kind: str,
    strength: float,
    plate: dict,
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: float,
    textures: tuple[np.ndarray, np.ndarray],
    n_cells_factor: float = 1.0,
    channel_gain=(1.0, 1.0, 1.0),
    return_truth: bool = False,
):
    """Draw one field: returns a (3, H, W) uint16 array (DAPI, Tubulin, Actin).

    ``knobs`` is the compound phenotype at full effect, scaled here by
    ``strength`` (0 = DMSO). ``plate`` holds the plate's nuisance parameters
    (see :func:`_plate_params`). With ``return_truth`` also returns a dict
    with the cell label map (``labels``, 0 = background), the per-cell
    ``state`` (0 interphase, 1 mitosis, 2 mitotic arrest, 3 apoptotic) and
    ``n_cells`` (for tests and inspection).

    In stages, each drawing from ``rng`` in turn (the order of the draws is the field): the texture
    windows, the cells (:func:`_draw_cells`), their territories (:func:`_territories`), what each cell
    puts in the three channels (:func:`_paint_cell`), the channels composed (:func:`_compose_channels`),
    and the microscope's optics and camera (:func:`_camera`).
    """
    H, W = height, width
    K = {k: float(v) * strength for k, v in knobs.items()}
    tex_fine, tex_med = textures
    oy, ox = int(rng.integers(0, tex_fine.shape[0] - H + 1)), int(rng.integers(0, tex_fine.shape[1] - W + 1))
    t_fine = tex_fine[oy : oy + H, ox : ox + W]
    oy2, ox2 = int(rng.integers(0, tex_med.shape[0] - H + 1)), int(rng.integers(0, tex_med.shape[1] - W + 1))
    t_med = tex_med[oy2 : oy2 + H, ox2 : ox2 + W]
    cells = _draw_cells(K, plate, rng, H, W, scale, n_cells_factor)
    L, D = _territories(cells, rng, H, W)
    look = _CellLook.of(cells)
    dapi = np.zeros((H, W), np.float32)
    nucm = np.zeros((H, W), np.float32)
    layers = _Layer(), _Layer(), _Layer()  # DAPI, tubulin and actin marks, rendered into the channels below
    for i in range(cells.n):
        if cells.state[i] == _INTERPHASE:
            _paint_cell(i, cells, look, dapi, nucm, layers, t_fine, t_med, rng)
        else:
            _draw_condensed(cells.state[i], arrest_kind, cells.cx[i], cells.cy[i], cells.Rp[i],
                            cells.dna[i] / 2.0 * look.nuc_unit, cells.sc, rng, i, layers[0], layers[1])
    channels = _compose_channels(cells, look, L, D, dapi, nucm, layers, t_fine, t_med, rng)
    out = _camera(channels, plate, rng, H, W, scale, channel_gain)
    if return_truth:
        return out, {"labels": L, "state": cells.state, "n_cells": cells.n}
    return out


def _lut(values, bg=0.0) -> np.ndarray:
    """A per-cell lookup table indexed by the label map (index 0 = background)."""
    return np.concatenate([[bg], np.asarray(values, dtype=np.float32)]).astype(np.float32)


def _compose_channels(cells: _Cells, look: _CellLook, L, D, dapi, nucm, layers, t_fine, t_med, rng):
    """(DAPI, tubulin, actin) signal before optics: the painted marks rendered over each cell's dome-shaped
    cytoplasm, with a textured diffuse tubulin, and cortical actin on the cells' rims and junctions."""
    dapi_l, tub_l, act_l = layers
    H, W = L.shape
    inside = L > 0
    dome = np.sqrt(np.clip(1.0 - D * D, 0.0, 1.0)) * _lut(cells.h)[L]
    step = 1.0
    dapi_l.render(dapi, L, step, rng)
    nucm = np.minimum(nucm, 1.0)

    cyto_tex = 1.0 + 0.15 * t_med + 0.1 * t_fine + _lut(0.25 * look.gran)[L] * t_fine
    tub_diffuse_level = 0.42 * (1 + 0.8 * look.diff)
    tub = (_lut(tub_diffuse_level)[L] * dome * cyto_tex) * (1.0 - 0.45 * nucm)
    tub_l.render(tub, L, step, rng)

    # cortical actin: outer rim (from the dome) plus junctions between cells
    w_rim = 2.2 * cells.sc
    rim = np.where(inside, np.clip(1.0 - (1.0 - D) * _lut(cells.Rp)[L] / w_rim, 0.0, 1.0), 0.0)
    jx = L[:, 1:] != L[:, :-1]
    jy = L[1:, :] != L[:-1, :]
    junc = np.zeros((H, W), bool)
    junc[:, 1:] |= jx
    junc[:, :-1] |= jx
    junc[1:, :] |= jy
    junc[:-1, :] |= jy
    junc &= inside
    cortex = np.maximum(rim, 0.6 * junc) * _lut(0.55 * look.cort)[L] * np.clip(0.9 + 0.6 * t_med, 0.1, None)
    act = (0.28 * dome * cyto_tex) * (1.0 - 0.3 * nucm) + cortex
    act_l.render(act, L, step, rng)
    return dapi, tub, act


def _camera(channels, plate: dict, rng: np.random.Generator, H: int, W: int, sc: float, channel_gain) -> np.ndarray:
    """The microscope: blur (a field out of focus now and then), the plate's gain, background and uneven
    illumination, each channel's exposure, shot and read noise, offset, 16-bit counts."""
    sigma = 0.85 * sc * rng.lognormal(0.0, 0.18)
    if rng.random() < 0.08:  # slightly out-of-focus field
        sigma *= rng.uniform(1.6, 2.6)
    yy = (np.arange(H, dtype=np.float32)[:, None] / H) - np.float32(plate["illum_centre"][0])
    xx = (np.arange(W, dtype=np.float32)[None, :] / W) - np.float32(plate["illum_centre"][1])
    illum_r2 = (yy * yy + xx * xx) / np.float32(0.5)
    tilt = 1.0 + np.float32(plate["illum_tilt"][0]) * yy + np.float32(plate["illum_tilt"][1]) * xx
    exposure = rng.lognormal(0.0, 0.11, 3) * np.asarray(channel_gain, dtype=float)
    out = np.empty((3, H, W), np.uint16)
    for c, sig in enumerate(channels):
        m = ndimage.gaussian_filter(sig, sigma)
        m *= np.float32(_ADU_SCALE[c] * plate["gain"][c])
        m += np.float32(plate["background"][c])
        m *= illum_r2 * np.float32(-plate["illum_strength"][c] * exposure[c]) + np.float32(exposure[c])
        m *= tilt
        np.maximum(m, 0, out=m)
        out[c] = camera_counts(m, _ADU_PER_ELECTRON, _READ_NOISE, plate["offset"], rng, 65535)
    return out
