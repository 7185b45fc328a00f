"""What each cell of a synthetic BBBC021 field puts in the channels: nuclei with chromatin, nucleoli, foci
and micronuclei (DAPI), microtubules, centrosomes and bundles (tubulin), stress fibres, puncta and cortex
(actin), and condensed mitotic or apoptotic DNA with its spindle. Marks are collected per channel in a
:class:`_Layer` and splatted in one go."""

from __future__ import annotations

import math

import numpy as np

from cellmorph.data.synthetic.cells import _APOPTOTIC, _CELL_R, _MITOSIS, _CellLook, _Cells, _ellipse_d, _harmonics


def _splat(field_: np.ndarray, ys: np.ndarray, xs: np.ndarray, ws: np.ndarray) -> None:
    """Add point weights to a field with bilinear interpolation (points within half a pixel of it)."""
    H, W = field_.shape
    if len(ys) == 0:
        return
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    fy = (ys - y0).astype(np.float32)
    fx = (xs - x0).astype(np.float32)
    ws = ws.astype(np.float32)
    # accumulate on a 1-px padded canvas, so no corner needs a bounds check
    Wp = W + 2
    base = (y0 + 1) * Wp + (x0 + 1)
    idx = np.concatenate([base, base + 1, base + Wp, base + Wp + 1])
    wts = np.concatenate([ws * (1 - fy) * (1 - fx), ws * (1 - fy) * fx, ws * fy * (1 - fx), ws * fy * fx])
    acc = np.bincount(idx, weights=wts, minlength=(H + 2) * Wp).reshape(H + 2, Wp)
    field_ += acc[1 : H + 1, 1 : W + 1].astype(np.float32)


def _splat_nearest(field_: np.ndarray, flat_idx: np.ndarray, ws: np.ndarray) -> None:
    if len(flat_idx):
        field_ += np.bincount(flat_idx, weights=ws, minlength=field_.size).reshape(field_.shape).astype(np.float32)


def _arc_points(ox, oy, ang, kap, t0, length, step):
    """Points every ``step`` px along circular arcs; returns x, y and the filament of each point."""
    nmax = int(np.ceil(length.max() / step)) + 1
    t = t0.astype(np.float32)[:, None] + np.float32(step) * np.arange(nmax, dtype=np.float32)[None, :]
    valid = t <= (t0 + length).astype(np.float32)[:, None]
    # |curvature| >= 1e-4 rad/px keeps the closed form exact enough for straight lines
    kap = np.where(np.abs(kap) < 1e-4, np.where(kap < 0, -1e-4, 1e-4), kap)
    inv = (1.0 / kap).astype(np.float32)[:, None]
    a = ang.astype(np.float32)[:, None] + kap.astype(np.float32)[:, None] * t
    x = (np.sin(a) - np.sin(ang).astype(np.float32)[:, None]) * inv + ox.astype(np.float32)[:, None]
    y = (np.cos(ang).astype(np.float32)[:, None] - np.cos(a)) * inv + oy.astype(np.float32)[:, None]
    rows = np.broadcast_to(np.arange(len(ox), dtype=np.int32)[:, None], valid.shape)
    return x[valid], y[valid], rows[valid]


class _Layer:
    """Filaments and points of one channel, splatted in one go.

    ``cell`` (0-based) keeps a point only where that cell's territory is;
    ``cell=-1`` draws it anywhere. ``spread`` (px) replaces each point by 4
    jittered copies, which thickens filaments and makes blobs lumpy.
    """

    def __init__(self) -> None:
        self.fil: list[tuple] = []  # (ox, oy, ang, kap, t0, len, w, cell, spread)
        self.pts: list[tuple] = []  # (x, y, w, cell, spread)

    def filaments(self, ox, oy, ang, kap, t0, length, w, cell, spread=0.0) -> None:
        n = len(ang)
        if n:
            vals = (ox, oy, ang, kap, t0, length, w)
            cols = tuple(np.asarray(np.broadcast_to(v, (n,)), dtype=np.float64) for v in vals)
            self.fil.append(cols + (np.full(n, cell, dtype=np.int64), np.full(n, spread)))

    def points(self, x, y, w, cell, spread=0.0) -> None:
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        n = len(x)
        if n:
            b = np.broadcast_to
            self.pts.append((x, b(np.asarray(y, dtype=np.float64), (n,)), b(np.asarray(w, dtype=np.float64), (n,)),
                             np.full(n, cell, dtype=np.int64), np.full(n, spread)))

    def render(self, out: np.ndarray, labels: np.ndarray, step: float, rng: np.random.Generator) -> None:
        """Splat everything into ``out``: filaments to the nearest pixel, points bilinearly."""
        H, W = out.shape
        flat_labels = labels.ravel()

        def jitter(x, y, w, c, sp):
            k = 4
            n = k * len(x)
            sp = np.repeat(sp, k)
            return (np.repeat(x, k) + rng.standard_normal(n) * sp, np.repeat(y, k) + rng.standard_normal(n) * sp,
                    np.repeat(w / k, k), np.repeat(c, k))

        def kept(x, y, c):
            iy = np.rint(y).astype(np.int64)
            ix = np.rint(x).astype(np.int64)
            inb = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            flat = np.where(inb, iy * W + ix, 0)
            return inb & ((c < 0) | (flat_labels[flat] == c + 1)), flat

        if self.fil:
            ox, oy, ang, kap, t0, length, w, cell, spread = (np.concatenate(c) for c in zip(*self.fil))
            for grp in (spread == 0, spread > 0):
                if not grp.any():
                    continue
                x, y, r = _arc_points(ox[grp], oy[grp], ang[grp], kap[grp], t0[grp], length[grp], step)
                ww, cc = (w[grp] * step)[r], cell[grp][r]
                if grp is not None and spread[grp][0] > 0:
                    x, y, ww, cc = jitter(x, y, ww, cc, spread[grp][r])
                keep, flat = kept(x, y, cc)
                _splat_nearest(out, flat[keep], ww[keep])
        if self.pts:
            x, y, w, c, sp = (np.concatenate(v) for v in zip(*self.pts))
            j = sp > 0
            if j.any():
                jx, jy, jw, jc = jitter(x[j], y[j], w[j], c[j], sp[j])
                x, y, w, c = (np.concatenate([a[~j], b]) for a, b in ((x, jx), (y, jy), (w, jw), (c, jc)))
            keep, _ = kept(x, y, c)
            _splat(out, y[keep], x[keep], w[keep])


def _paint_cell(i: int, cells: _Cells, look: _CellLook, dapi, nucm, layers, t_fine, t_med, rng) -> None:
    """An interphase cell's marks: its nucleus or nuclei with foci and micronuclei (DAPI), its microtubules and
    centrosome (tubulin), its stress fibres and puncta (actin), an aggresome and granules (both)."""
    ncx, ncy, csx, csy, cang = _paint_nuclei(i, cells, look, dapi, nucm, layers[0], t_fine, t_med, rng)
    _paint_cytoskeleton(i, cells, look, layers, ncx, ncy, csx, csy, cang, rng)


def _paint_nuclei(i: int, cells: _Cells, look: _CellLook, dapi, nucm, dapi_l, t_fine, t_med, rng):
    """The nucleus (or polyploid lobes, or two nuclei), foci and micronuclei; returns the nucleus centre, the
    centrosome beside it and the centrosome's direction."""
    ccx, ccy, Rp, Rnp, sc = cells.cx[i], cells.cy[i], cells.Rp[i], cells.Rnp[i], cells.sc
    nuc_unit = look.nuc_unit
    # nucleus placement inside the cell
    off = rng.uniform(0, 0.35) * max(Rp - Rnp, 0.0)
    oang = rng.uniform(0, 2 * np.pi)
    ncx, ncy = ccx + off * math.cos(oang), ccy + off * math.sin(oang)
    nasp = 1.0 + abs(rng.normal(0.22, 0.12))
    nth = cells.theta[i] + rng.normal(0, 0.35)
    # centrosome: next to the nucleus, towards the cell centre when offset
    cang = oang + np.pi + rng.normal(0, 0.5) if off > 0.5 else rng.uniform(0, 2 * np.pi)
    csx = ncx + 0.85 * Rnp * math.cos(cang)
    csy = ncy + 0.85 * Rnp * math.sin(cang)
    dent = None
    if look.aggr[i] > 0.05:
        dent = (math.cos(cang), math.sin(cang), min(0.55, 0.45 * look.aggr[i]))
    lobes = []
    if cells.poly[i]:
        nl = int(rng.integers(2, 5))
        base = rng.uniform(0, 2 * np.pi)
        for li in range(nl):
            la = base + 2 * np.pi * li / nl + rng.normal(0, 0.3)
            dist = Rnp * rng.uniform(0.45, 0.75)
            lobes.append((ncx + dist * math.cos(la), ncy + dist * math.sin(la),
                          Rnp * rng.uniform(0.75, 1.0), 1.0 + abs(rng.normal(0.25, 0.15)),
                          rng.uniform(0, np.pi)))
        groups = [lobes]
    elif cells.binuc[i]:
        ux, uy = math.cos(cells.theta[i]), math.sin(cells.theta[i])
        sep = Rnp * rng.uniform(0.9, 1.15)
        groups = [[(ccx + s * sep * ux, ccy + s * sep * uy, Rnp * 0.82, nasp, nth)] for s in (-1, 1)]
    else:
        groups = [[(ncx, ncy, Rnp, nasp, nth)]]
    total = cells.dna[i] / 2.0 * nuc_unit
    for grp in groups:
        _draw_nucleus(dapi, nucm, grp, total / len(groups), look.nirr[i], look.chrom[i], t_fine, t_med, rng, dent, sc)
    # foci and micronuclei
    nf = rng.poisson(6.0 * look.foci[i])
    if nf:
        r = Rnp * 0.7 * np.sqrt(rng.random(nf))
        a_ = rng.uniform(0, 2 * np.pi, nf)
        dapi_l.points(ncx + r * np.cos(a_), ncy + r * np.sin(a_), 0.10 * nuc_unit / 12, -1, 0.5 * sc)
    nm = rng.poisson(0.03 + 1.2 * look.micro[i])
    if nm:
        r = Rnp * rng.uniform(1.15, 1.7, nm)
        a_ = rng.uniform(0, 2 * np.pi, nm)
        mx, my = ncx + r * np.cos(a_), ncy + r * np.sin(a_)
        dapi_l.points(mx, my, 0.06 * nuc_unit * rng.uniform(0.5, 1.5, nm), -1, 1.0 * sc)
    return ncx, ncy, csx, csy, cang


def _paint_cytoskeleton(i: int, cells: _Cells, look: _CellLook, layers, ncx, ncy, csx, csy, cang, rng) -> None:
    """Microtubules (from the centrosome and the nuclear envelope; stabilised bundles), the centrosome and an
    aggresome (tubulin), stress fibres along the long axis and puncta (actin), and granules in both."""
    _, tub_l, act_l = layers
    ccx, ccy, Rp, Rnp, sc, cid = cells.cx[i], cells.cy[i], cells.Rp[i], cells.Rnp[i], cells.sc, i
    R, bund, aggr = cells.R[i], look.bund[i], look.aggr[i]
    # microtubules: curved filaments from the centrosome and the nuclear envelope, growing outwards
    nfil = int(rng.poisson(110 * (R / _CELL_R) * (1 - 0.4 * min(bund, 1))))
    from_cs = rng.random(nfil) < 0.35
    oa = rng.uniform(0, 2 * np.pi, nfil)
    orad = Rnp * rng.uniform(0.5, 1.05, nfil)
    fox = np.where(from_cs, csx, ncx + orad * np.cos(oa))
    foy = np.where(from_cs, csy, ncy + orad * np.sin(oa))
    ang = np.where(from_cs, rng.uniform(0, 2 * np.pi, nfil), oa + rng.normal(0, 0.6, nfil))
    kap = rng.normal(0, 0.03 / sc, nfil)
    ln = 2.2 * Rp * rng.uniform(0.3, 1.0, nfil)
    tub_l.filaments(fox, foy, ang, kap, rng.uniform(0.0, 3.0, nfil) * sc, ln,
                    0.28 * look.fil_weight[i] * rng.uniform(0.4, 1.6, nfil), cid)
    if bund > 0.05:
        # stabilised bundles: long, thick, wavy, anywhere in the cytoplasm
        nb = int(rng.poisson(3 + 8 * min(bund, 1.5)))
        br = Rp * 0.7 * np.sqrt(rng.random(nb))
        ba = rng.uniform(0, 2 * np.pi, nb)
        ln = 2.4 * Rp * rng.uniform(0.5, 1.0, nb)
        kap = rng.normal(0, 0.05 / sc, nb) * (0.5 + min(bund, 1.5))
        tub_l.filaments(ccx + br * np.cos(ba), ccy + br * np.sin(ba), rng.uniform(0, 2 * np.pi, nb),
                        kap, -0.5 * ln, ln, 0.6 * bund * rng.uniform(0.6, 1.4, nb), cid, 0.9 * sc)
    tub_l.points(csx, csy, 0.9 * sc * sc * (1 - 0.7 * look.diff[i]), -1)  # centrosome
    if aggr > 0.05:  # aggresome: compact perinuclear blob at the centrosome
        nag = 10
        rr = (1.2 + 2.2 * min(aggr, 1.5)) * sc * rng.standard_normal((nag, 2)) * 0.6
        ax_ = csx + 2.0 * sc * math.cos(cang) + rr[:, 0]
        ay_ = csy + 2.0 * sc * math.sin(cang) + rr[:, 1]
        tub_l.points(ax_, ay_, 2.2 * aggr * sc * sc, -1, 0.8 * sc)
        act_l.points(ax_, ay_, 0.6 * aggr * sc * sc, -1, 0.8 * sc)
    # actin: stress fibres along the long axis, puncta
    sfib = look.sfib[i]
    nsf = int(rng.poisson(3.0 * sfib))
    if nsf:
        a = Rp * math.sqrt(cells.asp[i])
        b = Rp / math.sqrt(cells.asp[i])
        th = cells.theta[i] + rng.normal(0, 0.12, nsf)
        offp = rng.uniform(-0.75, 0.75, nsf) * b
        dx, dy = np.cos(th), np.sin(th)
        sx = ccx - a * dx - offp * dy
        sy = ccy - a * dy + offp * dx
        act_l.filaments(sx, sy, th, 0.0, 0.0, 2 * a, 0.12 * sfib * rng.uniform(0.5, 1.5, nsf), cid)
    npn = int(rng.poisson(22 * look.punc[i] * (R / _CELL_R) ** 2))
    if npn:
        r = Rp * np.sqrt(rng.random(npn)) * 0.95
        a_ = rng.uniform(0, 2 * np.pi, npn)
        act_l.points(ccx + r * np.cos(a_), ccy + r * np.sin(a_), 1.6 * sc * sc * rng.uniform(0.4, 1.6, npn), cid,
                     0.7 * sc)
    ngr = int(rng.poisson(45 * look.gran[i] * (R / _CELL_R) ** 2))
    if ngr:
        r = Rp * np.sqrt(rng.random(ngr)) * 0.95
        a_ = rng.uniform(0, 2 * np.pi, ngr)
        gx, gy = ccx + r * np.cos(a_), ccy + r * np.sin(a_)
        tub_l.points(gx, gy, 0.55 * sc * sc, cid)
        act_l.points(gx, gy, 0.35 * sc * sc, cid)


def _draw_nucleus(dapi, nucm, lobes, total, nirr, chrom, t_fine, t_med, rng, dent, sc):
    """One (possibly multilobed) nucleus: soft mask, projected-thickness profile, chromatin texture, nucleoli.

    ``total`` is the integrated DNA signal; it is spread over the whole
    nucleus, so a nucleus cut by the field border is not brighter.
    """
    H, W = dapi.shape
    ext = max(lb[2] * math.sqrt(lb[3]) for lb in lobes) * 1.5 + 3
    xs = [lb[0] for lb in lobes]
    ys = [lb[1] for lb in lobes]
    ext += 0.5 * max(max(ys) - min(ys), max(xs) - min(xs))
    cy, cx = 0.5 * (min(ys) + max(ys)), 0.5 * (min(xs) + max(xs))
    Y0, Y1, X0, X1 = int(cy - ext), int(cy + ext) + 2, int(cx - ext), int(cx + ext) + 2
    y0, y1, x0, x1 = max(Y0, 0), min(Y1, H), max(X0, 0), min(X1, W)
    if y0 >= y1 or x0 >= x1:
        return
    mask = None
    prof = None
    for lx, ly, rn, nasp, nth in lobes:
        harm = _harmonics(rng, nirr, 2, 7)
        d, yy, xx = _ellipse_d(ly, lx, Y0, Y1, X0, X1, rn * math.sqrt(nasp), rn / math.sqrt(nasp), nth, harm)
        if dent is not None:  # indentation by a perinuclear aggregate
            rr = np.sqrt(yy * yy + xx * xx) + 1e-3
            cosd = (xx * dent[0] + yy * dent[1]) / rr
            d = d * (1.0 + dent[2] * np.clip(cosd, 0, 1) ** 3)
        edge = 1.0 / max(rn * 0.12, 0.6)
        m = np.clip((1.0 - d) * rn * edge * 0.9 + 0.5, 0.0, 1.0)
        p = m * (0.55 + 0.45 * np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0)))
        mask = m if mask is None else np.maximum(mask, m)
        prof = p if prof is None else np.maximum(prof, p)
    norm = float(prof.sum())
    if norm <= 0:
        return
    sub = (slice(y0 - Y0, y1 - Y0), slice(x0 - X0, x1 - X0))
    prof = prof[sub]
    tf = t_fine[y0:y1, x0:x1]
    tm = t_med[y0:y1, x0:x1]
    tex = 1.0 + (0.16 + 0.12 * chrom) * tf + (0.10 + 0.06 * chrom) * tm
    tex = np.maximum(tex, 0.2)
    # nucleoli: darker spots
    rn0 = lobes[0][2]
    for _ in range(int(rng.integers(1, 4)) * len(lobes)):
        lx, ly = lobes[int(rng.integers(len(lobes)))][:2]
        r = rng.uniform(0, 0.5) * rn0
        a_ = rng.uniform(0, 2 * np.pi)
        py, px = ly + r * math.sin(a_) - y0, lx + r * math.cos(a_) - x0
        sg = rng.uniform(0.12, 0.2) * rn0
        yy = np.arange(y1 - y0, dtype=np.float32)[:, None] - np.float32(py)
        xx = np.arange(x1 - x0, dtype=np.float32)[None, :] - np.float32(px)
        tex *= 1.0 - 0.38 * np.exp(-(yy * yy + xx * xx) / np.float32(2 * sg * sg))
    dapi[y0:y1, x0:x1] += prof * tex * np.float32(total * (1 + 0.15 * chrom) / norm)
    nucm[y0:y1, x0:x1] = np.maximum(nucm[y0:y1, x0:x1], mask[sub])


def _draw_condensed(st, arrest_kind, cx, cy, Rp, total, sc, rng, cid, dapi_l, tub_l):
    """Mitotic, mitotically arrested or apoptotic (rounded) cell: condensed DNA and its spindle."""
    if st == _APOPTOTIC:
        nfr = int(rng.integers(1, 6))
        for _ in range(nfr):
            r = rng.uniform(0, 0.45) * Rp
            a = rng.uniform(0, 2 * np.pi)
            fx, fy = cx + r * math.cos(a), cy + r * math.sin(a)
            k = 12
            rr = rng.standard_normal((k, 2)) * (1.4 * sc + 2.0 * sc / nfr)
            dapi_l.points(fx + rr[:, 0], fy + rr[:, 1], 0.5 * total / nfr / k, -1, 0.9 * sc)
        return
    kind = "bipolar" if st == _MITOSIS else arrest_kind
    th = rng.uniform(0, np.pi)
    ux, uy = math.cos(th), math.sin(th)
    nchr = 46
    w = 0.7 * total / nchr
    if kind == "bipolar":
        if rng.random() < 0.25:  # anaphase: two plates
            for s in (-1, 1):
                t = rng.uniform(-6, 6, nchr // 2) * sc
                o = rng.normal(0, 1.0, nchr // 2) * sc + s * 6.5 * sc
                dapi_l.points(cx + t * -uy + o * ux, cy + t * ux + o * uy, w, -1, 1.0 * sc)
        else:  # metaphase plate
            t = rng.uniform(-7.5, 7.5, nchr) * sc
            o = rng.normal(0, 1.2, nchr) * sc
            dapi_l.points(cx + t * -uy + o * ux, cy + t * ux + o * uy, w, -1, 1.0 * sc)
        poles = [(cx + s * 8.5 * sc * ux, cy + s * 8.5 * sc * uy, s) for s in (-1, 1)]
        for px, py, s in poles:
            nf = 16
            ang = th + (0 if s < 0 else np.pi) + rng.normal(0, 0.55, nf)
            tub_l.filaments(px, py, ang, 0.0, 0.5 * sc, rng.uniform(6, 11, nf) * sc, 0.5, cid)
            tub_l.points(px, py, 1.4 * sc * sc, -1)
    elif kind == "monoaster":
        # chromosomes in a rosette around a single central aster
        a = rng.uniform(0, 2 * np.pi, nchr)
        r = rng.normal(6.0, 1.1, nchr) * sc
        dapi_l.points(cx + r * np.cos(a), cy + r * np.sin(a), w, -1, 1.0 * sc)
        nf = 30
        ang = rng.uniform(0, 2 * np.pi, nf)
        tub_l.filaments(cx, cy, ang, 0.0, 0.3 * sc, rng.uniform(4, 7.5, nf) * sc, 0.5, cid)
        tub_l.points(cx, cy, 1.5 * sc * sc, -1)
    elif kind == "multipolar":
        npol = int(rng.integers(3, 5))
        base = rng.uniform(0, 2 * np.pi)
        for p in range(npol):
            pa = base + 2 * np.pi * p / npol + rng.normal(0, 0.25)
            px, py = cx + 8 * sc * math.cos(pa), cy + 8 * sc * math.sin(pa)
            # chromosomes between the pole and the centre
            m = nchr // npol
            rr = rng.normal(0, 1.6, (m, 2)) * sc
            dapi_l.points(0.55 * px + 0.45 * cx + rr[:, 0], 0.55 * py + 0.45 * cy + rr[:, 1], w, -1, 1.0 * sc)
            nf = 8
            ang = pa + np.pi + rng.normal(0, 0.6, nf)
            tub_l.filaments(px, py, ang, rng.normal(0, 0.05 / sc, nf), 0.3 * sc, rng.uniform(5, 10, nf) * sc,
                            0.9, cid, 0.8 * sc)
            tub_l.points(px, py, 1.6 * sc * sc, -1)
    else:  # "scattered": no spindle, condensed chromosomes scattered in the rounded cell
        r = 7.0 * sc * np.sqrt(rng.random(nchr))
        a = rng.uniform(0, 2 * np.pi, nchr)
        dapi_l.points(cx + r * np.cos(a), cy + r * np.sin(a), w, -1, 1.0 * sc)
