"""Synthetic Cell Painting-like plates in the exact BBBC021 layout.

The real BBBC021 images (MCF-7 cells; DAPI / β-tubulin / F-actin; 16-bit
1280×1024 TIFFs) are not always at hand, so this module draws a stand-in that
:func:`cellmorph.data.bbbc021.load_bbbc021` reads like the real thing:

* ``BBBC021_v1_image.csv`` with the official columns, ``BBBC021_v1_moa.csv``,
  and ``WeekN/WeekN_<plate>/<WELL>_s<SITE>_w{1,2,4}<UUID>.tif`` files;
* the experimental structure of Kensert et al. (2019), Table 1: 12 MoAs, 38
  compounds, 103 treatments, 1,208 annotated images (presets ``full`` and
  ``mini``), replicate wells on different plates, DMSO wells on every plate;
* fields of cells, not blobs of brightness: every cell has a textured nucleus
  with nucleoli, a cytoplasm whose thickness falls off towards the membrane, a
  tubulin network of filaments radiating from a centrosome and an actin cortex
  with stress fibres. Cells grow in colonies and share borders.

Each MoA is a set of *morphological* changes (shape, size, texture, spatial
arrangement; see :data:`MOA_PHENOTYPES`) whose strength follows a dose-response
curve ``emax / (1 + (EC50 / conc) ** hill)`` with a compound-specific EC50. The
annotated concentrations all sit at or above the EC50: BBBC021's MoA labels were
given only to compound-concentrations "clearly having" a mechanism, and the seed
paper's stored predictions call the lowest annotated concentration of 30 of its
31 multi-concentration compounds correctly, as often as the rest (median top
probability 0.93 vs 0.97). The phenotype still grows with the dose, from at least
half-maximal at the lowest concentration towards ``emax``. Compounds of one MoA share its
phenotype but each mixes the features a little differently and has one small
off-target effect, which keeps leave-one-compound-out meaningful.

Nuisance variation hides the class in simple intensity statistics: per-week
and per-plate staining gain and background per channel, a vignetting field
per plate, per-image exposure and focus jitter, cell-count variation per well
and per image, camera offset, shot noise and read noise. Values sit in the low
thousands of the 16-bit range, as in real widefield data.

Everything is deterministic: the plate map comes from the seed and preset, and
each field draws from its own ``SeedSequence(seed, spawn_key=(plate, row, col,
site))``, so the bytes do not depend on the order of rendering or on
``workers``. Compound phenotypes depend only on the seed, so ``tiny``, ``mini``
and ``full`` made with one seed agree on what e.g. ``syn-MTS-1`` does.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellmorph.data.bbbc021 import CHANNELS, IMAGE_COLUMNS, IMAGE_CSV, MOA_COLUMNS, MOA_CSV
from cellmorph.data.images import write_tiff
from cellmorph.data.table import CONTROL_COMPOUND
from cellmorph.errors import CellmorphError
from cellmorph.progress import Progress
from cellmorph.runinfo import require_output_dir, write_csv

__all__ = [
    "MOA_NAMES",
    "MOA_CODES",
    "MOA_PHENOTYPES",
    "PRESETS",
    "TABLE1",
    "CONCENTRATION_LADDER",
    "SyntheticCompound",
    "SyntheticPreset",
    "build_plate_map",
    "compound_catalogue",
    "generate_bbbc021",
    "get_preset",
    "phenotype_strength",
    "render_field",
]

# ---------------------------------------------------------------------------
# Experimental structure
# ---------------------------------------------------------------------------

MOA_NAMES: tuple[str, ...] = (
    "Actin disruptors",
    "Aurora kinase inhibitors",
    "Cholesterol-lowering",
    "DNA damage",
    "DNA replication",
    "Eg5 inhibitors",
    "Epithelial",
    "Kinase inhibitors",
    "Microtubule destabilizers",
    "Microtubule stabilizers",
    "Protein degradation",
    "Protein synthesis",
)

# Compound names are ``syn-<CODE>-<n>``: never to be confused with real ones.
MOA_CODES: dict[str, str] = {
    "Actin disruptors": "ACT",
    "Aurora kinase inhibitors": "AUR",
    "Cholesterol-lowering": "CHL",
    "DNA damage": "DDA",
    "DNA replication": "DRP",
    "Eg5 inhibitors": "EG5",
    "Epithelial": "EPI",
    "Kinase inhibitors": "KIN",
    "Microtubule destabilizers": "MTD",
    "Microtubule stabilizers": "MTS",
    "Protein degradation": "PDG",
    "Protein synthesis": "PSY",
}

# Kensert et al. (2019), Table 1: per MoA, each compound's
# (number of concentrations, number of images over all its concentrations),
# with 4 sites per well: 12 images = 3 replicate wells, 8 images = 2.
TABLE1: dict[str, tuple[tuple[int, int], ...]] = {
    "Actin disruptors": ((2, 24), (1, 12), (2, 24)),
    "Aurora kinase inhibitors": ((6, 72), (3, 36), (3, 36)),
    "Cholesterol-lowering": ((3, 36), (3, 36)),
    "DNA damage": ((1, 12), (1, 12), (3, 36), (4, 48)),
    "DNA replication": ((3, 36), (2, 24), (1, 12), (2, 24)),
    "Eg5 inhibitors": ((7, 84), (5, 60)),
    "Epithelial": ((3, 36), (3, 36), (2, 16)),
    "Kinase inhibitors": ((2, 16), (2, 16), (1, 8)),
    "Microtubule destabilizers": ((1, 12), (4, 48), (2, 24), (7, 84)),
    "Microtubule stabilizers": ((3, 36), (3, 36), (3, 36)),
    "Protein degradation": ((2, 24), (2, 24), (1, 12), (2, 24)),
    "Protein synthesis": ((2, 24), (3, 36), (3, 36)),
}
TABLE1_SITES = 4

# Half-log µM ladder; each compound uses a contiguous run of it.
CONCENTRATION_LADDER: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

WELL_ROWS = "BCDEFG"
WELL_COLS = tuple(range(2, 12))
N_WELL_POSITIONS = len(WELL_ROWS) * len(WELL_COLS)

# File-name channel codes as in BBBC021 (w1 DAPI, w2 tubulin, w4 actin).
CHANNEL_CODES: dict[str, str] = {"DAPI": "w1", "Tubulin": "w2", "Actin": "w4"}


@dataclass(frozen=True)
class SyntheticPreset:
    """Size and structure of one synthetic data set.

    ``scale`` is pixels per pixel of the real 20x images: 0.5 draws the same
    cells as if the image were binned 2×2, so a ``256×320`` field at 0.5 shows
    the cells of a 512×640 crop of a real field.
    """

    name: str
    height: int
    width: int
    scale: float
    sites: int
    n_weeks: int
    plates_per_week: int
    dmso_wells: int
    compounds_per_moa: int | None = None  # None: all Table 1 compounds
    max_concentrations: int | None = None  # None: all; else the top ones
    max_replicates: int | None = None  # None: as Table 1 (3, or 2)
    description: str = ""

    @property
    def n_plates(self) -> int:
        return self.n_weeks * self.plates_per_week


PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset(
        "tiny", 192, 240, 0.5, sites=1, n_weeks=2, plates_per_week=2, dmso_wells=3,
        compounds_per_moa=2, max_concentrations=2, max_replicates=2,
        description="tests and demo: 12 MoAs x 2 compounds x top 1-2 concentrations, 4 plates, 192x240",
    ),
    "mini": SyntheticPreset(
        "mini", 256, 320, 0.5, sites=1, n_weeks=10, plates_per_week=3, dmso_wells=4,
        description="Table 1 structure (38 compounds, 103 treatments), 1 site per well, 256x320 (2x binned)",
    ),
    "full": SyntheticPreset(
        "full", 1024, 1280, 1.0, sites=4, n_weeks=10, plates_per_week=3, dmso_wells=6,
        description="Table 1 at BBBC021 size: 1,208 annotated images of 1280x1024 px, 4 sites, 30 plates",
    ),
}


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    if isinstance(preset, SyntheticPreset):
        return preset
    if preset not in PRESETS:
        raise CellmorphError(f"unknown synthetic preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------
# Phenotypes
# ---------------------------------------------------------------------------

# Morphological knobs; 0 is DMSO. Signed ones are log-scale changes.
KNOBS: tuple[str, ...] = (
    "cell_size",  # ± log cell radius
    "nuc_size",  # ± log nucleus radius
    "cytoplasm",  # − less cytoplasm around the nucleus
    "elongation",  # spread, elongated cells
    "rounding",  # rounded, thicker cells
    "irregularity",  # irregular outline with protrusions
    "arbor",  # many thin protrusions (arborised cells)
    "nuc_irregularity",  # irregular nuclear outline
    "density",  # ± log cell count
    "clustering",  # ± tight colonies / scattered cells
    "mitotic_arrest",  # fraction of mitotically arrested cells (see arrest kind)
    "polyploidy",  # large multilobed polyploid nuclei
    "binucleate",  # failed cytokinesis
    "micronuclei",  # micronuclei around the nucleus
    "nuc_foci",  # bright chromatin foci
    "chromatin",  # ± coarser / brighter chromatin
    "s_arrest",  # S-phase arrest: uniform, smaller DNA content
    "tub_bundles",  # thick, bright, curved microtubule bundles
    "tub_diffuse",  # loss of microtubule filaments, diffuse tubulin
    "actin_puncta",  # actin aggregates
    "cortical",  # ± cortical actin
    "stress_fibres",  # ± stress fibres
    "aggresome",  # perinuclear aggregate, indented nucleus
    "granularity",  # granular cytoplasm
    "apoptosis",  # apoptotic cells
)

# Prototype phenotype of each MoA at full effect, and the kind of mitotic
# arrest it causes. Biologically inspired, see the module docstring.
MOA_PHENOTYPES: dict[str, dict[str, float]] = {
    "Actin disruptors": {
        "actin_puncta": 1.0, "cortical": -0.8, "stress_fibres": -0.9, "cell_size": -0.3,
        "arbor": 0.9, "binucleate": 0.5, "rounding": 0.15,
    },
    "Aurora kinase inhibitors": {
        "polyploidy": 1.0, "cell_size": 0.45, "nuc_size": 0.15, "binucleate": 0.25,
        "micronuclei": 0.3, "density": -0.4, "mitotic_arrest": 0.1,
    },
    "Cholesterol-lowering": {
        "granularity": 1.0, "rounding": 0.35, "cell_size": -0.12, "chromatin": 0.25, "density": -0.1,
        "irregularity": 0.3,
    },
    "DNA damage": {
        "nuc_size": 0.4, "nuc_irregularity": 1.0, "micronuclei": 0.9, "nuc_foci": 1.0,
        "cell_size": 0.35, "density": -0.35, "apoptosis": 0.2,
    },
    "DNA replication": {
        "nuc_size": -0.3, "density": -0.6, "s_arrest": 1.0, "chromatin": 0.45, "cell_size": 0.1,
    },
    "Eg5 inhibitors": {"mitotic_arrest": 1.0, "density": -0.1},
    "Epithelial": {"clustering": 1.0, "cortical": 1.0, "cell_size": -0.2, "rounding": 0.3, "stress_fibres": -0.3},
    "Kinase inhibitors": {
        "elongation": 1.0, "cell_size": 0.25, "irregularity": 0.7, "clustering": -0.8, "stress_fibres": 0.8,
    },
    "Microtubule destabilizers": {
        "tub_diffuse": 1.0, "rounding": 0.55, "mitotic_arrest": 0.7, "cell_size": -0.2, "micronuclei": 0.2,
    },
    "Microtubule stabilizers": {
        "tub_bundles": 1.0, "cell_size": 0.3, "mitotic_arrest": 0.45, "micronuclei": 0.5,
    },
    "Protein degradation": {
        "aggresome": 1.0, "rounding": 0.25, "cell_size": -0.1, "granularity": 0.3, "apoptosis": 0.15,
    },
    "Protein synthesis": {
        "cytoplasm": -0.9, "cell_size": -0.3, "density": -0.5, "nuc_size": -0.1, "chromatin": 0.2,
        "apoptosis": 0.1,
    },
}

ARREST_KIND: dict[str, str] = {
    "Eg5 inhibitors": "monoaster",
    "Microtubule destabilizers": "scattered",
    "Microtubule stabilizers": "multipolar",
    "Aurora kinase inhibitors": "scattered",
}
_ARREST_KINDS = ("monoaster", "scattered", "multipolar")
_OFF_TARGET = ("cell_size", "nuc_size", "density", "rounding", "granularity", "chromatin", "irregularity", "apoptosis")


def phenotype_strength(conc, ec50: float, hill: float, emax: float = 1.0):
    """Dose-response: ``emax / (1 + (ec50 / conc) ** hill)``; 0 at conc 0."""
    conc = np.asarray(conc, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        out = emax / (1.0 + (ec50 / np.maximum(conc, 1e-300)) ** hill)
    out = np.where(conc > 0, out, 0.0)
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class SyntheticCompound:
    name: str
    moa: str
    concentrations: tuple[float, ...]
    replicates: int
    ec50: float
    hill: float
    emax: float
    knobs: dict = field(hash=False, compare=False)
    arrest_kind: str = "scattered"

    def strength(self, conc: float) -> float:
        return phenotype_strength(conc, self.ec50, self.hill, self.emax)


# spawn-key tags for the SeedSequence tree
_K_COMPOUND, _K_LAYOUT, _K_WEEK, _K_PLATE, _K_WELL, _K_IMAGE, _K_TEXTURE = 11, 12, 13, 14, 15, 16, 17


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def compound_catalogue(preset: str | SyntheticPreset, seed: int = 0) -> list[SyntheticCompound]:
    """The compounds of a preset with their concentrations, dose-response and phenotype.

    A compound's parameters depend on the seed only, not on the preset.
    """
    spec = get_preset(preset)
    out: list[SyntheticCompound] = []
    n_ladder = len(CONCENTRATION_LADDER)
    for mi, moa in enumerate(MOA_NAMES):
        for j, (n_conc, n_img) in enumerate(TABLE1[moa]):
            rng = _rng(seed, _K_COMPOUND, mi, j)
            # contiguous run of the ladder whose top is at least 0.3 µM
            lo = max(0, 6 - n_conc)
            start = int(rng.integers(lo, n_ladder - n_conc + 1))
            concs = CONCENTRATION_LADDER[start : start + n_conc]
            hill = float(rng.uniform(1.0, 2.0))
            if n_conc == 1:
                ec50 = concs[0] * 10 ** -rng.uniform(0.3, 0.9)
            else:
                # the lowest annotated concentration is at 1-4x the EC50: a clear, not a faint, phenotype
                ec50 = concs[0] * 10 ** -rng.uniform(0.0, 0.6)
            emax = float(rng.uniform(0.8, 1.0))
            proto = MOA_PHENOTYPES[moa]
            knobs = {k: float(v * rng.lognormal(0.0, 0.3)) for k, v in proto.items()}
            # one small off-target effect per compound
            off = _OFF_TARGET[int(rng.integers(len(_OFF_TARGET)))]
            sign = 1.0 if off in ("apoptosis", "granularity", "irregularity", "rounding") else rng.choice([-1.0, 1.0])
            knobs[off] = knobs.get(off, 0.0) + float(sign * rng.uniform(0.08, 0.22))
            if not (spec.compounds_per_moa is None or j < spec.compounds_per_moa):
                continue
            reps = n_img // (n_conc * TABLE1_SITES)
            if spec.max_replicates is not None:
                reps = min(reps, spec.max_replicates)
            if spec.max_concentrations is not None:
                concs = concs[-spec.max_concentrations :]
            out.append(
                SyntheticCompound(
                    name=f"syn-{MOA_CODES[moa]}-{j + 1}",
                    moa=moa,
                    concentrations=tuple(float(c) for c in concs),
                    replicates=int(reps),
                    ec50=float(ec50),
                    hill=hill,
                    emax=emax,
                    knobs=knobs,
                    arrest_kind=ARREST_KIND.get(moa, "scattered"),
                )
            )
    return out


# ---------------------------------------------------------------------------
# Plate map
# ---------------------------------------------------------------------------


def _file_uuid(seed: int, plate: str, well: str, site: int, channel: str) -> str:
    digest = hashlib.sha256(f"cellmorph-synthetic|{seed}|{plate}|{well}|{site}|{channel}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4)).upper()


def build_plate_map(preset: str | SyntheticPreset = "tiny", seed: int = 0) -> pd.DataFrame:
    """The image table of a preset without rendering anything.

    Returns the official ``BBBC021_v1_image.csv`` columns plus helper columns
    (lower case): ``moa``, ``week``, ``plate``, ``plate_number``, ``row``,
    ``col``, ``site``, ``strength`` (phenotype strength of the treatment).
    """
    spec = get_preset(preset)
    compounds = compound_catalogue(spec, seed)
    P = spec.plates_per_week
    for c in compounds:
        if c.replicates > P:
            raise CellmorphError(f"preset {spec.name}: {c.replicates} replicates but {P} plates per week")
    # One generator for the whole layout: the draws below must keep their order for a seed to give the same screen.
    rng = _rng(seed, _K_LAYOUT, zlib.crc32(spec.name.encode()))
    week_of = _assign_weeks(compounds, spec.n_weeks, rng)
    # plate numbers: 5 digits, increasing
    plate_numbers = 20000 + int(rng.integers(0, 5000)) + np.cumsum(rng.integers(1, 60, spec.n_plates))
    rows = []
    for w in range(spec.n_weeks):
        rows += _week_rows(spec, w, _week_treatments(compounds, week_of, w), plate_numbers, rng)
    frame = pd.DataFrame(rows).sort_values(["plate_index", "row", "col", "site"], kind="stable")
    frame["ImageNumber"] = frame.groupby("TableNumber").cumcount() + 1
    _add_file_columns(frame, seed)
    extra = ["moa", "week", "plate", "plate_number", "plate_index", "row", "col", "site", "strength"]
    return frame[list(IMAGE_COLUMNS) + extra].reset_index(drop=True)


def _assign_weeks(compounds: list[SyntheticCompound], n_weeks: int, rng: np.random.Generator) -> dict[int, int]:
    """The week of each compound (by index), balancing wells: the compounds with the most wells first, each
    to one of the least-loaded weeks; ties, in order and in week, are broken at random."""
    order = rng.permutation(len(compounds))
    load = np.zeros(n_weeks)
    week_of: dict[int, int] = {}
    for ci in sorted(order, key=lambda i: -len(compounds[i].concentrations) * compounds[i].replicates):
        cands = np.flatnonzero(load == load.min())
        w = int(cands[rng.integers(len(cands))])
        week_of[int(ci)] = w
        load[w] += len(compounds[ci].concentrations) * compounds[ci].replicates
    return week_of


def _week_treatments(compounds: list[SyntheticCompound], week_of: dict[int, int],
                     w: int) -> list[tuple[SyntheticCompound, float]]:
    """``(compound, concentration)`` of week ``w``, in compound order."""
    return [
        (compounds[ci], conc)
        for ci in sorted(k for k, v in week_of.items() if v == w)
        for conc in compounds[ci].concentrations
    ]


def _week_rows(spec: SyntheticPreset, w: int, treatments: list[tuple[SyntheticCompound, float]],
               plate_numbers: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """One row per image of week ``w``'s plates; the week's well layout and replicate plates are drawn here."""
    P = spec.plates_per_week
    week = f"Week{w + 1}"
    n_wells = len(treatments) + spec.dmso_wells
    if n_wells > N_WELL_POSITIONS:
        raise CellmorphError(f"preset {spec.name}: {n_wells} wells do not fit a plate in {week}")
    # one layout per week, shared by its replicate plates (as on real plates)
    positions = rng.choice(N_WELL_POSITIONS, size=n_wells, replace=False)
    rep_plates = [
        np.sort(rng.choice(P, size=comp.replicates, replace=False)) for comp, _ in treatments
    ]
    rows = []
    for p in range(P):
        pnum = int(plate_numbers[w * P + p])
        plate = f"{week}_{pnum}"
        for slot in range(n_wells):
            if slot < len(treatments) and p not in rep_plates[slot]:
                continue
            name, moa, conc, strength = _slot_contents(treatments, slot)
            r, cidx = divmod(int(positions[slot]), len(WELL_COLS))
            well = f"{WELL_ROWS[r]}{WELL_COLS[cidx]:02d}"
            for site in range(1, spec.sites + 1):
                rows.append(
                    {
                        "TableNumber": w + 1,
                        "plate_index": w * P + p,
                        "Image_Metadata_Plate_DAPI": plate,
                        "Image_Metadata_Well_DAPI": well,
                        "Replicate": p + 1,
                        "Image_Metadata_Compound": name,
                        "Image_Metadata_Concentration": float(conc),
                        "moa": moa,
                        "week": week,
                        "plate": plate,
                        "plate_number": pnum,
                        "row": r,
                        "col": cidx,
                        "site": site,
                        "strength": float(strength),
                    }
                )
    return rows


def _slot_contents(treatments: list[tuple[SyntheticCompound, float]], slot: int) -> tuple[str, str, float, float]:
    """``(compound, moa, concentration, strength)`` in layout slot ``slot``: a treatment, or DMSO past them."""
    if slot < len(treatments):
        comp, conc = treatments[slot]
        return comp.name, comp.moa, conc, comp.strength(conc)
    return CONTROL_COMPOUND, CONTROL_COMPOUND, 0.0, 0.0


def _add_file_columns(frame: pd.DataFrame, seed: int) -> None:
    """Each channel's folder and file name, in BBBC021's naming (``<well>_s<site>_<code><uuid>.tif``)."""
    for ch in CHANNELS:
        frame[f"Image_PathName_{ch}"] = frame["week"] + "/" + frame["plate"]
        frame[f"Image_FileName_{ch}"] = [
            f"{well}_s{site}_{CHANNEL_CODES[ch]}{_file_uuid(seed, plate, well, site, ch)}.tif"
            for plate, well, site in zip(frame["plate"], frame["Image_Metadata_Well_DAPI"], frame["site"])
        ]


def moa_table(preset: str | SyntheticPreset = "tiny", seed: int = 0) -> pd.DataFrame:
    """``BBBC021_v1_moa.csv``: one row per treatment plus ``DMSO,0.0,DMSO``."""
    rows = [
        {"compound": c.name, "concentration": conc, "moa": c.moa}
        for c in compound_catalogue(preset, seed)
        for conc in c.concentrations
    ]
    rows.append({"compound": CONTROL_COMPOUND, "concentration": 0.0, "moa": CONTROL_COMPOUND})
    return pd.DataFrame(rows, columns=list(MOA_COLUMNS))


# ---------------------------------------------------------------------------
# Nuisance parameters
# ---------------------------------------------------------------------------

# Signal scale (ADU per unit of drawn intensity) and background per channel.
_ADU_SCALE = np.array([2300.0, 1500.0, 2100.0])
_BACKGROUND = np.array([330.0, 560.0, 420.0])
_CAMERA_OFFSET = 100.0
_READ_NOISE = 6.0
_ADU_PER_ELECTRON = 0.9


def _plate_params(seed: int, week: int, plate_number: int) -> dict:
    wr = _rng(seed, _K_WEEK, week)
    week_gain = wr.lognormal(0.0, 0.22, 3)
    week_bg = wr.lognormal(0.0, 0.15, 3)
    pr = _rng(seed, _K_PLATE, plate_number)
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


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

# Geometry of an untreated MCF-7 cell, in pixels of the real 20x images.
_CELL_R = 23.0
_NUC_R = 10.5
_DENSITY = 1.8e-4  # cells per full-resolution pixel^2 (about 230 per 1280x1024 field)

_INTERPHASE, _MITOSIS, _ARREST, _APOPTOTIC = 0, 1, 2, 3


@lru_cache(maxsize=4)
def _texture_bank(seed: int, height: int, width: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Two band-limited noise textures (fine, medium), larger than a field; fields use shifted views."""
    rng = _rng(seed, _K_TEXTURE, height, width, int(round(scale * 1000)))
    shape = (height + height // 2 + 8, width + width // 2 + 8)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.9 * scale + 0.35)
    med = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.6 * scale)
    fine /= fine.std()
    med /= med.std()
    return fine, med


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


def _lut(values, bg=0.0) -> np.ndarray:
    """A per-cell lookup table indexed by the label map (index 0 = background)."""
    return np.concatenate([[bg], np.asarray(values, dtype=np.float32)]).astype(np.float32)


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
        sd = m * np.float32(_ADU_PER_ELECTRON)
        sd += np.float32(_READ_NOISE**2)
        np.sqrt(sd, out=sd)
        sd *= rng.standard_normal((H, W), dtype=np.float32)
        m += sd
        m += np.float32(plate["offset"])
        np.rint(m, out=m)
        np.clip(m, 0, 65535, out=m)
        out[c] = m
    return out


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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _jobs(spec: SyntheticPreset, seed: int, plate_map: pd.DataFrame) -> list[dict]:
    catalogue = {c.name: c for c in compound_catalogue(spec, seed)}
    plates: dict[str, dict] = {}
    jobs = []
    for rec in plate_map.itertuples(index=False):
        rec = rec._asdict()
        plate = rec["plate"]
        if plate not in plates:
            plates[plate] = _plate_params(seed, int(rec["TableNumber"]), int(rec["plate_number"]))
        comp = catalogue.get(rec["Image_Metadata_Compound"])
        jobs.append(
            {
                "seed": seed,
                "key": (int(rec["plate_number"]), int(rec["row"]), int(rec["col"]), int(rec["site"])),
                "knobs": dict(comp.knobs) if comp else {},
                "arrest_kind": comp.arrest_kind if comp else "scattered",
                "strength": float(rec["strength"]),
                "plate": plates[plate],
                "paths": [f"{rec[f'Image_PathName_{ch}']}/{rec[f'Image_FileName_{ch}']}" for ch in CHANNELS],
                "height": spec.height,
                "width": spec.width,
                "scale": spec.scale,
            }
        )
    return jobs


def render_job(job: dict) -> np.ndarray:
    """Render the three channels of one plate-map job (see :func:`_jobs`)."""
    seed = job["seed"]
    pnum, r, c, site = job["key"]
    well_rng = _rng(seed, _K_WELL, pnum, r, c)
    well_cells = float(well_rng.lognormal(0.0, 0.18))
    well_strength = float(well_rng.lognormal(0.0, 0.08))
    well_gain = well_rng.lognormal(0.0, 0.08, 3)  # staining / dispensing variation per well
    rng = _rng(seed, _K_IMAGE, pnum, r, c, site)
    textures = _texture_bank(seed, job["height"], job["width"], job["scale"])
    strength = min(job["strength"] * well_strength, 1.0)
    return render_field(
        job["knobs"], job["arrest_kind"], strength, job["plate"], rng,
        job["height"], job["width"], job["scale"], textures, n_cells_factor=well_cells, channel_gain=well_gain,
    )


def _run_chunk(out: str, jobs: list[dict]) -> int:
    root = Path(out)
    for job in jobs:
        img = render_job(job)
        for c, rel in enumerate(job["paths"]):
            write_tiff(root / rel, img[c])
    return len(jobs)


def generate_bbbc021(
    out: Path,
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Write a synthetic BBBC021-layout data set under ``out``; returns a summary.

    The two CSVs are written last, so a folder with ``BBBC021_v1_image.csv``
    holds every image it lists. Existing files are overwritten, others left.
    """
    spec = get_preset(preset)
    t0 = time.perf_counter()
    out = require_output_dir(Path(out), "output folder")
    plate_map = build_plate_map(spec, seed)
    jobs = _jobs(spec, seed, plate_map)
    for folder in sorted(plate_map["Image_PathName_DAPI"].unique()):
        (out / folder).mkdir(parents=True, exist_ok=True)

    chunk = 4
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    with Progress(progress) as bar:
        task = bar.task(f"synthetic BBBC021 ({spec.name}) images", len(jobs), every=30.0)
        if workers <= 1:
            for ch in chunks:
                task.advance(_run_chunk(str(out), ch))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_run_chunk, str(out), ch) for ch in chunks]
                for fut in as_completed(futures):
                    task.advance(fut.result())

    write_csv(out / MOA_CSV, moa_table(spec, seed))
    write_csv(out / IMAGE_CSV, plate_map[list(IMAGE_COLUMNS)])
    treated = plate_map[plate_map["Image_Metadata_Compound"] != CONTROL_COMPOUND]
    return {
        "preset": spec.name,
        "seed": int(seed),
        "out": str(out),
        "n_images": int(len(treated)),
        "n_control_images": int(len(plate_map) - len(treated)),
        "n_treatments": int(treated.groupby(["Image_Metadata_Compound", "Image_Metadata_Concentration"]).ngroups),
        "n_compounds": int(treated["Image_Metadata_Compound"].nunique()),
        "n_moas": int(treated["moa"].nunique()),
        "n_plates": int(plate_map["Image_Metadata_Plate_DAPI"].nunique()),
        "image_shape": [spec.height, spec.width],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def generate_ome_zarr_screen(out: Path, preset: str = "tiny", seed: int = 0, version: str = "0.5",
                             progress: bool = True, workers: int = 1) -> dict:
    """The synthetic screen of :func:`generate_bbbc021` as OME-Zarr HCS plates under ``out``
    (``PLATE.ome.zarr``, NGFF ``version`` 0.4 or 0.5, two pyramid levels, channels named DAPI, Tubulin,
    Actin) with ``out/platemap.csv`` holding the treatments and MoAs; the same pixels, field for field.

    The fields are rendered as TIFFs into a temporary folder inside ``out``, copied into the plates one
    field at a time, and the TIFFs removed.
    """
    import shutil

    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.data.omezarr import write_hcs_plates, write_plate_map

    out = require_output_dir(Path(out), "output folder")
    staging = out / ".synthetic-tiff"
    try:
        summary = generate_bbbc021(staging, preset=preset, seed=seed, progress=progress, workers=workers)
        table = load_bbbc021(staging, moa_subset=False)
        with Progress(progress) as bar:
            task = bar.task(f"OME-Zarr {version} plates", len(table), every=30.0)
            plates = write_hcs_plates(table, out, version=version, progress=lambda: task.advance(1))
        write_plate_map(table, out / "platemap.csv")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary | {"out": str(out), "format": "ome-zarr", "ngff_version": version,
                      "plates": [p.name for p in plates], "plate_map": str(out / "platemap.csv")}
