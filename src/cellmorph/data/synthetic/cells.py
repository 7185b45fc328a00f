"""The cells of a synthetic BBBC021 field: how many, in which state, their size and shape, where they sit
(colonies), the territory each claims, and the per-cell strengths of the phenotype's features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Geometry of an untreated MCF-7 cell, in pixels of the real 20x images.
_CELL_R = 23.0
_NUC_R = 10.5
_DENSITY = 1.8e-4  # cells per full-resolution pixel^2 (about 230 per 1280x1024 field)

_INTERPHASE, _MITOSIS, _ARREST, _APOPTOTIC = 0, 1, 2, 3


def _ellipse_d(cy, cx, y0, y1, x0, x1, a, b, theta, harm):
    """Normalised distance (1 on the outline) of an irregular ellipse on a patch."""
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = math.cos(theta), math.sin(theta)
    u = (xx * c + yy * s) / a
    v = (yy * c - xx * s) / b
    rho = np.sqrt(u * u + v * v)
    if harm is not None and len(harm):
        z = (u + 1j * v) / (rho + 1e-6)
        zk = z * z
        rb = np.ones_like(rho)
        for coef in harm:
            rb += (coef * zk).real.astype(np.float32)
            zk = zk * z
        rho = rho / np.maximum(rb, 0.35)
    return rho, yy, xx


def _bbox(cy, cx, ext, H, W):
    y0 = max(int(cy - ext), 0)
    y1 = min(int(cy + ext) + 2, H)
    x0 = max(int(cx - ext), 0)
    x1 = min(int(cx + ext) + 2, W)
    return y0, y1, x0, x1


def _harmonics(rng, amp: float, kmin: int, kmax: int) -> np.ndarray:
    k = np.arange(kmin, kmax + 1)
    mag = amp * np.abs(rng.normal(0.0, 1.0, len(k))) / k**0.7
    return (mag * np.exp(1j * rng.uniform(0, 2 * np.pi, len(k)))).astype(np.complex64)


def _place_cells(rng, n, radii, H, W, clustering, margin):
    """Colony-like placement: most cells attach to an existing cell, the rest seed new colonies."""
    p_attach = float(np.clip(0.62 + 0.33 * clustering, 0.25, 0.97))
    tight = float(np.clip(0.82 - 0.12 * clustering, 0.64, 1.0))
    xs = np.empty(n)
    ys = np.empty(n)
    rs = np.empty(n)
    m = 0
    for i in range(n):
        r = radii[i]
        for _ in range(25):
            if m and rng.random() < p_attach:
                j = int(rng.integers(m))
                ang = rng.uniform(0, 2 * np.pi)
                dist = (r + rs[j]) * tight * rng.uniform(0.9, 1.12)
                x, y = xs[j] + dist * math.cos(ang), ys[j] + dist * math.sin(ang)
                if not (-margin <= x <= W + margin and -margin <= y <= H + margin):
                    continue
            else:
                x, y = rng.uniform(-margin, W + margin), rng.uniform(-margin, H + margin)
            if m:
                d2 = (xs[:m] - x) ** 2 + (ys[:m] - y) ** 2
                if np.any(d2 < ((r + rs[:m]) * 0.6) ** 2):
                    continue
            xs[m], ys[m], rs[m] = x, y, r
            m += 1
            break
    return xs[:m], ys[:m], m


@dataclass
class _Cells:
    """The cells of one field: per-cell states and geometry (full-resolution units, and ``cx``, ``cy``, ``Rp``,
    ``Rnp`` in pixels), and the phenotype knobs (``knob(name)``: the knob at full effect × strength × each cell's
    responsiveness)."""

    K: dict
    sc: float
    n: int
    resp: np.ndarray
    state: np.ndarray
    poly: np.ndarray
    binuc: np.ndarray
    dna: np.ndarray
    R: np.ndarray
    asp: np.ndarray
    theta: np.ndarray
    h: np.ndarray
    prio: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    Rp: np.ndarray
    Rnp: np.ndarray

    def knob(self, name: str) -> np.ndarray:
        return self.K.get(name, 0.0) * self.resp


def _draw_cells(K: dict, plate: dict, rng: np.random.Generator, H: int, W: int, sc: float,
                n_cells_factor: float) -> _Cells:
    """How many cells, in which states (interphase, mitosis, arrest, apoptosis; polyploid or binucleate), with
    how much DNA, what size and shape, and where (placed by :func:`_place_cells`)."""
    area_full = (H / sc) * (W / sc)
    n_exp = _DENSITY * area_full * math.exp(0.9 * K.get("density", 0.0)) * n_cells_factor * plate["density"]
    n_exp *= rng.lognormal(0.0, 0.27)
    n = max(int(rng.poisson(max(n_exp, 1.0))), 1)

    resp = rng.lognormal(0.0, 0.35, n)  # per-cell responsiveness

    def k(name):
        return K.get(name, 0.0) * resp

    u = rng.random((n, 4))
    p_apop = np.clip(0.012 + 0.22 * k("apoptosis"), 0, 0.5)
    p_arrest = np.clip(0.55 * k("mitotic_arrest"), 0, 0.8)
    p_mit = 0.035 * (1 - np.clip(k("s_arrest"), 0, 0.8))
    state = np.full(n, _INTERPHASE)
    state[u[:, 0] < p_apop + p_arrest + p_mit] = _MITOSIS
    state[u[:, 0] < p_apop + p_arrest] = _ARREST
    state[u[:, 0] < p_apop] = _APOPTOTIC
    inter = state == _INTERPHASE
    poly = inter & (u[:, 1] < np.clip(0.6 * k("polyploidy"), 0, 0.85))
    binuc = inter & ~poly & (u[:, 2] < np.clip(0.02 + 0.3 * k("binucleate"), 0, 0.6))

    # DNA content: G1 / S / G2, S-phase arrest, polyploidy
    phase = u[:, 3]
    dna = np.where(phase < 0.58, 2.0, np.where(phase < 0.85, 2.0 + 2.0 * rng.random(n), 4.0))
    dna = dna * rng.lognormal(0, 0.05, n)
    sarr = rng.random(n) < np.clip(k("s_arrest"), 0, 0.95)
    dna = np.where(sarr, rng.uniform(2.0, 2.7, n), dna)
    dna = np.where(poly, rng.uniform(5.0, 8.0, n), dna)
    dna = np.where(binuc, 4.0 * rng.lognormal(0, 0.05, n), dna)
    dna = np.where(state != _INTERPHASE, 4.0 * rng.lognormal(0, 0.05, n), dna)

    # geometry (full-resolution px, scaled below)
    rounding = np.clip(k("rounding"), 0, 0.9)
    R = _CELL_R * np.exp(0.17 * rng.standard_normal(n) + 0.45 * k("cell_size")) * (1 - 0.18 * rounding)
    R = R * np.where(poly, 1.35, 1.0) * np.where(binuc, 1.2, 1.0)
    asp = 1.0 + np.abs(rng.normal(0.32, 0.2, n)) + 1.3 * np.clip(k("elongation"), 0, 3)
    asp = 1.0 + (asp - 1.0) * (1 - rounding)
    theta = rng.uniform(0, np.pi, n)
    Rn = _NUC_R * (dna / 2.0) ** 0.3 * np.exp(0.07 * rng.standard_normal(n) + 0.35 * k("nuc_size"))
    Rn = np.where(poly, _NUC_R * 1.05 * np.exp(0.35 * k("nuc_size")), Rn)
    R = np.maximum(R * np.exp(0.5 * np.minimum(k("cytoplasm"), 0)), Rn * np.where(poly, 2.1, 1.3))
    h = (1.0 + 0.9 * rounding) * (_CELL_R / R) ** 0.5  # thicker when small/rounded
    prio = np.ones(n)
    small = state != _INTERPHASE
    R = np.where(small, _CELL_R * np.where(state == _APOPTOTIC, 0.45, 0.62) * rng.lognormal(0, 0.08, n), R)
    asp = np.where(small, 1.0 + np.abs(rng.normal(0, 0.06, n)), asp)
    h = np.where(small, 2.3, h)
    prio = np.where(small, 0.72, prio)

    xs, ys, n = _place_cells(rng, n, R * np.sqrt(asp) * 0.85, H / sc, W / sc, K.get("clustering", 0.0), _CELL_R)
    sel = slice(0, n)  # placement may fit fewer cells than drawn
    return _Cells(K, sc, n, resp[sel], state[sel], poly[sel], binuc[sel], dna[sel], R[sel], asp[sel], theta[sel],
                  h[sel], prio[sel], xs * sc, ys * sc, R[sel] * sc, Rn[sel] * sc)


def _territories(cells: _Cells, rng: np.random.Generator, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """(label map, 0 = background; each pixel's normalised distance from its cell's centre): a priority-weighted
    Voronoi of irregular ellipses, the cells' outlines drawn as harmonics of their radius."""
    irr = 0.08 + 0.14 * np.clip(cells.knob("irregularity"), 0, 3) + 0.05 * cells.resp
    arb = np.clip(cells.knob("arbor"), 0, 3)
    best = np.full((H, W), np.inf, np.float32)
    L = np.zeros((H, W), np.int32)
    D = np.ones((H, W), np.float32)
    for i in range(cells.n):
        if cells.state[i] == _INTERPHASE:
            harm = _harmonics(rng, irr[i], 2, 6)
            if arb[i] > 0.02:
                harm = np.concatenate([harm, _harmonics(rng, 0.22 * arb[i], 7, 11)])
        else:
            harm = _harmonics(rng, 0.03, 2, 4)
        a = cells.Rp[i] * math.sqrt(cells.asp[i])
        b = cells.Rp[i] / math.sqrt(cells.asp[i])
        ext = a * (1.0 + float(np.abs(harm).sum())) + 2
        y0, y1, x0, x1 = _bbox(cells.cy[i], cells.cx[i], ext, H, W)
        if y0 >= y1 or x0 >= x1:
            continue
        d, _, _ = _ellipse_d(cells.cy[i], cells.cx[i], y0, y1, x0, x1, a, b, cells.theta[i], harm)
        dp = d * np.float32(cells.prio[i])
        reg = best[y0:y1, x0:x1]
        upd = (d < 1.0) & (dp < reg)
        reg[upd] = dp[upd]
        L[y0:y1, x0:x1][upd] = i + 1
        D[y0:y1, x0:x1][upd] = d[upd]
    return L, D


@dataclass
class _CellLook:
    """Each cell's phenotype strengths, clipped to their ranges: chromatin, foci, micronuclei, tubulin bundles and
    diffuse tubulin, actin puncta, cortex and stress fibres, aggresomes, granularity, nuclear irregularity."""

    nuc_unit: float  # integrated intensity of a G1 nucleus (px units)
    nirr: np.ndarray
    chrom: np.ndarray
    foci: np.ndarray
    micro: np.ndarray
    bund: np.ndarray
    diff: np.ndarray
    punc: np.ndarray
    cort: np.ndarray
    sfib: np.ndarray
    aggr: np.ndarray
    gran: np.ndarray

    @classmethod
    def of(cls, cells: _Cells) -> "_CellLook":
        k = cells.knob
        return cls((_NUC_R * cells.sc) ** 2 * np.pi,
                   0.03 + 0.12 * np.clip(k("nuc_irregularity"), 0, 3), np.clip(k("chromatin"), -1, 3),
                   np.clip(k("nuc_foci"), 0, 3), np.clip(k("micronuclei"), 0, 3), np.clip(k("tub_bundles"), 0, 3),
                   np.clip(k("tub_diffuse"), 0, 1), np.clip(k("actin_puncta"), 0, 3),
                   np.clip(1.0 + 0.8 * k("cortical"), 0.15, 3.0), np.clip(1.0 + 1.0 * k("stress_fibres"), 0.0, 3.0),
                   np.clip(k("aggresome"), 0, 3), np.clip(k("granularity"), 0, 3))

    @property
    def fil_weight(self) -> np.ndarray:
        return 0.55 * (1 - 0.92 * self.diff)
