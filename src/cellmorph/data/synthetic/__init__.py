"""Synthetic screens that the loaders read like the real data sets.

* :func:`generate_bbbc021` (and :func:`generate_ome_zarr_screen`, the same screen as OME-Zarr plates): Cell
  Painting-like fields of MCF-7 cells in the BBBC021 layout, with the structure of its MoA subset. Modules:
  :mod:`.presets` (presets, MoAs and their phenotypes, the compound catalogue, the plate map), :mod:`.render`
  (one field, in stages), :mod:`.cells` (the cells of a field), :mod:`.paint` (what each cell puts in the
  channels) and :mod:`.bbbc021` (the jobs, the workers and the files; its docstring tells the whole story).
* :func:`generate_bbbc014`: an NF-κB translocation plate in the BBBC014 layout (:mod:`.bbbc014`).
* :mod:`.common`: what both share (seeded generators, the Hill curve, camera noise, writing channels).

Both are deterministic: a seed gives the same bytes (BBBC021: whatever the number of workers).
"""

from cellmorph.data.synthetic.bbbc014 import generate_bbbc014, nuclear_cytoplasmic_ratio, render_well
from cellmorph.data.synthetic.bbbc021 import generate_bbbc021, generate_ome_zarr_screen, render_job
from cellmorph.data.synthetic.common import phenotype_strength
from cellmorph.data.synthetic.presets import (
    CHANNEL_CODES,
    CONCENTRATION_LADDER,
    MOA_CODES,
    MOA_NAMES,
    MOA_PHENOTYPES,
    PRESETS,
    TABLE1,
    TABLE1_SITES,
    WELL_COLS,
    WELL_ROWS,
    SyntheticCompound,
    SyntheticPreset,
    build_plate_map,
    compound_catalogue,
    get_preset,
    moa_table,
)
from cellmorph.data.synthetic.render import render_field

# Private helpers that tests/ and benchmarks/ reach through this package, as they did through the old module (the
# redundant aliases mark them re-exported).
from cellmorph.data.synthetic.bbbc021 import _jobs as _jobs, _run_chunk as _run_chunk
from cellmorph.data.synthetic.presets import _file_uuid as _file_uuid
from cellmorph.data.synthetic.render import _plate_params as _plate_params, _texture_bank as _texture_bank

__all__ = [
    "CHANNEL_CODES",
    "CONCENTRATION_LADDER",
    "MOA_CODES",
    "MOA_NAMES",
    "MOA_PHENOTYPES",
    "PRESETS",
    "TABLE1",
    "TABLE1_SITES",
    "WELL_COLS",
    "WELL_ROWS",
    "SyntheticCompound",
    "SyntheticPreset",
    "build_plate_map",
    "compound_catalogue",
    "generate_bbbc014",
    "generate_bbbc021",
    "generate_ome_zarr_screen",
    "get_preset",
    "moa_table",
    "nuclear_cytoplasmic_ratio",
    "phenotype_strength",
    "render_field",
    "render_job",
    "render_well",
]
