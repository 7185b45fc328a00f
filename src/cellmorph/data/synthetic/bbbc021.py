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
arrangement; see :data:`~cellmorph.data.synthetic.presets.MOA_PHENOTYPES`)
whose strength follows a dose-response curve
``emax / (1 + (EC50 / conc) ** hill)`` with a compound-specific EC50. The
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

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.bbbc021 import CHANNELS, IMAGE_COLUMNS, IMAGE_CSV, MOA_CSV
from cellmorph.data.synthetic.common import seeded_rng, write_channels
from cellmorph.data.synthetic.presets import (
    _K_IMAGE,
    _K_WELL,
    SyntheticPreset,
    build_plate_map,
    compound_catalogue,
    get_preset,
    moa_table,
)
from cellmorph.data.synthetic.render import _plate_params, _texture_bank, render_field
from cellmorph.data.table import CONTROL_COMPOUND
from cellmorph.progress import Progress
from cellmorph.runinfo import require_output_dir, write_csv

__all__ = ["generate_bbbc021", "generate_ome_zarr_screen", "render_job"]


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
    well_rng = seeded_rng(seed, _K_WELL, pnum, r, c)
    well_cells = float(well_rng.lognormal(0.0, 0.18))
    well_strength = float(well_rng.lognormal(0.0, 0.08))
    well_gain = well_rng.lognormal(0.0, 0.08, 3)  # staining / dispensing variation per well
    rng = seeded_rng(seed, _K_IMAGE, pnum, r, c, site)
    textures = _texture_bank(seed, job["height"], job["width"], job["scale"])
    strength = min(job["strength"] * well_strength, 1.0)
    return render_field(
        job["knobs"], job["arrest_kind"], strength, job["plate"], rng,
        job["height"], job["width"], job["scale"], textures, n_cells_factor=well_cells, channel_gain=well_gain,
    )


def _run_chunk(out: str, jobs: list[dict]) -> int:
    """Render and write a chunk of jobs under ``out``; returns how many. Module-level, so that the spawned
    workers of :func:`generate_bbbc021` find it by its import path."""
    root = Path(out)
    for job in jobs:
        write_channels(root, job["paths"], render_job(job))
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
    from cellmorph.data.omezarr import write_hcs_plates
    from cellmorph.data.platemap import write_plate_map

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
