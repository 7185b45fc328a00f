"""The experimental structure of the synthetic BBBC021 screens: presets, the MoAs and their phenotypes, the
compound catalogue (concentrations, dose-response, phenotype of each compound) and the plate map."""

from __future__ import annotations

import hashlib
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellmorph.data.bbbc021 import CHANNELS, IMAGE_COLUMNS, MOA_COLUMNS
from cellmorph.data.synthetic.common import lookup_preset, phenotype_strength, seeded_rng
from cellmorph.data.table import CONTROL_COMPOUND
from cellmorph.errors import CellmorphError

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
    return lookup_preset(PRESETS, preset, "synthetic")


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


# spawn-key tags for the SeedSequence tree; every BBBC021 draw (here, in render and in bbbc021) hangs off one
_K_COMPOUND, _K_LAYOUT, _K_WEEK, _K_PLATE, _K_WELL, _K_IMAGE, _K_TEXTURE = 11, 12, 13, 14, 15, 16, 17


def compound_catalogue(preset: str | SyntheticPreset, seed: int = 0) -> list[SyntheticCompound]:
    """The compounds of a preset with their concentrations, dose-response and phenotype.

    A compound's parameters depend on the seed only, not on the preset.
    """
    spec = get_preset(preset)
    out: list[SyntheticCompound] = []
    n_ladder = len(CONCENTRATION_LADDER)
    for mi, moa in enumerate(MOA_NAMES):
        for j, (n_conc, n_img) in enumerate(TABLE1[moa]):
            rng = seeded_rng(seed, _K_COMPOUND, mi, j)
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
    rng = seeded_rng(seed, _K_LAYOUT, zlib.crc32(spec.name.encode()))
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
