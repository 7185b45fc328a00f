"""One entry point per input layout: load its table, and its default preprocessing.

``cellmorph inspect`` and ``cellmorph prepare`` are thin skins over
:func:`load_table` and :func:`prepare_config`; Python users call the same two.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from cellmorph.config.prepare import LAYOUTS, PREPARE_OPTIONS, PrepareConfig
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError, option, validated
from cellmorph.runinfo import read_yaml_mapping

# The network input size for a layout's tiles when none is given (None: the model's own, 224/299).
# Single-cell crops are ~68 px: ImageNet filters need cells a few tens of pixels wide, and on
# real BBBC021 crops 128 px beat 224 px for the linear probe (LOCO treatment accuracy 0.689
# against 0.660, issue 19) and makes a LOCO fine-tune practical on a CPU. Fields are large
# and keep the model's size.
LAYOUT_INPUT_SIZE: dict[str, int] = {"crops": 128}


def layout_input_size(source: str | None) -> int | None:
    """The default network input size for tiles of the layout ``source`` (a cache's manifest says it)."""
    return LAYOUT_INPUT_SIZE.get(str(source))


# How `embed` and the linear probe turn a layout's tiles into profiles when a config does not say
# (otherwise mean-pooled stage 3, no TTA). Crops: embeddings averaged over the 8 dihedral views,
# of stages 3 and 4 together. On the real crops-week4 cells (DMSO against cycloheximide, leave one
# plate out) the averaging raised the per-crop accuracy of every feature choice (stage 3: 0.933 ->
# 0.947) and cut its log-loss by 17-45 %; stage3+stage4 with it scored 0.964, the best row, and led
# the 4-class dose task without it (benchmarks/RESULTS.md). On the held-out 12-MoA crops stage 3
# (0.689) and stage 4 (0.660) were close; the concatenation keeps both. 5-7x the embedding time:
# 1,120 crops at 128 px took 48-60 s on 2 cores instead of 8-13 s. Fields keep stage 3 without
# TTA (the 5-minute LOCO target on `full`; nothing real measures fields here).
# `embed`'s DMSO z-score of crop well profiles pools each batch's DMSO wells: 19 of the development crops'
# 46 plates with DMSO hold one DMSO well (sd 0: 132 of 429 well profiles came out NaN), and the others 2-4.
# Batch against plate: replicate mAP 0.617 against 0.190 (43 of 51 treatments retrieved against 1 of 38),
# MoA mAP 0.462 against 0.155 (benchmarks/RESULTS.md, 'Mean average precision (copairs)').
LAYOUT_EMBEDDING: dict[str, dict[str, str]] = {"crops": {"tta": "dihedral", "features": "stage3+stage4",
                                                         "standardize": "batch"}}


def layout_embedding(source: str | None) -> dict[str, str]:
    """The embedding defaults (``tta``, ``features`` as a spec string) of the layout ``source``; {} if none."""
    return dict(LAYOUT_EMBEDDING.get(str(source), {}))


def paper_recipe(layout: str) -> dict:
    """The paper's preprocessing for ``layout`` (``prepare --paper``): per-plate DMSO z-score and the
    8-bit map stretched per field (BBBC021: 2×2 tiles; BBBC014 its own recipe; crops one tile)."""
    layout = _check_layout(layout)
    if layout == "bbbc014":
        from cellmorph.data.bbbc014 import bbbc014_prepare_config

        return bbbc014_prepare_config().model_dump()
    return {"normalize": "plate", "scaling": "image", "tile_grid": (1, 1) if layout == "crops" else (2, 2)}


def _check_layout(layout: str) -> str:
    name = getattr(layout, "value", layout)
    if name not in LAYOUTS:
        raise CellmorphError(f"unknown layout {name!r}; valid layouts: {', '.join(LAYOUTS)}")
    return name


def load_table(
    layout: str,
    root: Path | list[Path] | None = None,
    metadata: Path | None = None,
    index: Path | None = None,
    layout_config: Path | None = None,
    moa: Path | None = None,
    channels: str | None = None,
    moa_subset: bool = True,
    strict_compounds: bool = False,
    require_labels: bool = True,
    plate_map: Path | None = None,
    level: int = 0,
    pattern: str | None = None,
) -> ImageTable:
    """The :class:`ImageTable` of a dataset in ``layout``, from the inputs that layout needs.

    * ``bbbc021``: ``root`` (image folders) and/or ``metadata`` (the folder with the two CSVs;
      default ``root``); ``moa_subset`` and ``strict_compounds`` as in :func:`load_bbbc021`.
    * ``bbbc014``: ``root``.
    * ``crops``: ``index`` (the crop CSV), optional ``moa`` (compound,moa CSV) and
      ``channels`` (comma-separated names; default DAPI,Tubulin,Actin).
    * ``generic``: ``layout_config`` (a YAML :class:`~cellmorph.data.generic.GenericLayout`).
    * ``ome-zarr``: ``root``, one HCS plate or a folder of plates, or a list of them; ``plate_map`` (CSV:
      plate, well → compound, concentration, MoA) unless the wells carry ``Metadata_*`` attributes;
      optional ``moa`` (compound,moa CSV), ``channels`` (names to use, in order) and ``level`` (pyramid level).
    * ``pattern``: ``root`` (a folder of TIFFs), ``pattern`` (a preset, ``imagexpress`` or ``opera``, or a
      file-name pattern, see :mod:`cellmorph.data.patterns`), ``plate_map``, optional ``moa`` and ``channels``
      (``1=DAPI,2=Tubulin,3=Actin``, or names in channel order).

    Without ``require_labels`` (what ``predict`` loads) no image is left out for lacking a
    known MoA: such images get the label :data:`~cellmorph.schema.UNLABELLED`, and BBBC021's
    MoA table and subset selection become optional.
    """
    layout = _check_layout(layout)
    roots = [Path(r) for r in root] if isinstance(root, (list, tuple)) else ([Path(root)] if root is not None else [])
    if pattern is not None and layout != "pattern":
        raise CellmorphError(f"{option('pattern')} names the files of {option('layout')} pattern")
    if layout in ("ome-zarr", "pattern"):
        return _load_plate_mapped(layout, roots, plate_map, moa, channels, level, pattern, require_labels)
    if len(roots) > 1:
        raise CellmorphError(f"{option('root')} is given {len(roots)} times; the {layout} layout reads one folder")
    if plate_map is not None:
        raise CellmorphError(f"{option('plate_map')} describes the wells of OME-Zarr plates or TIFF folders "
                             f"({option('layout')} ome-zarr or pattern)")
    root = roots[0] if roots else None
    if layout == "bbbc021":
        return _load_bbbc021_layout(root, metadata, moa_subset, strict_compounds, require_labels)
    if layout == "bbbc014":
        from cellmorph.data.bbbc014 import load_bbbc014

        if root is None:
            raise CellmorphError(f"{option('layout')} bbbc014 needs {option('root')} DIR")
        return load_bbbc014(root)
    if layout == "crops":
        from cellmorph.data.crops import DEFAULT_CHANNELS, load_crop_table

        if index is None:
            raise CellmorphError(f"{option('layout')} crops needs {option('index')} CSV")
        names = tuple(c.strip() for c in channels.split(",") if c.strip()) if channels else DEFAULT_CHANNELS
        return load_crop_table(index, channels=names, moa_csv=moa, require_labels=require_labels)
    from cellmorph.data.generic import load_generic_yaml

    if layout_config is None:
        raise CellmorphError(f"{option('layout')} generic needs {option('layout_config')} YAML")
    return load_generic_yaml(layout_config, require_labels)


def _load_bbbc021_layout(root, metadata, moa_subset: bool, strict_compounds: bool, require_labels: bool) -> ImageTable:
    from cellmorph.data.bbbc021 import load_bbbc021, load_unlabelled

    if root is None and metadata is None:
        raise CellmorphError(f"{option('layout')} bbbc021 needs {option('root')} DIR (and optionally {option('metadata')} DIR)")
    if not require_labels:
        return load_unlabelled(root or metadata, metadata)
    return load_bbbc021(root or metadata, metadata, moa_subset=moa_subset, strict_compounds=strict_compounds)


def _load_plate_mapped(layout: str, roots: list[Path], plate_map, moa, channels, level: int, pattern,
                       require_labels: bool) -> ImageTable:
    """The layouts whose treatments come from a plate map: OME-Zarr plates and folders of vendor TIFFs."""
    if layout == "ome-zarr":
        from cellmorph.data.omezarr import load_ome_zarr

        if not roots:
            raise CellmorphError(f"{option('layout')} ome-zarr needs {option('root')} PLATE.zarr (or a folder of plates; "
                                 "repeat the option for several)")
        names = [c for c in channels.split(",") if c.strip()] if channels else None
        return load_ome_zarr(roots, plate_map, moa, names, level, require_labels)
    from cellmorph.data.patterns import load_pattern

    if len(roots) != 1 or pattern is None:
        raise CellmorphError(f"{option('layout')} pattern needs one {option('root')} FOLDER and {option('pattern')} "
                             "(imagexpress, opera, or a pattern such as '{plate}/{well}_s{site}_w{channel}.tif')")
    return load_pattern(roots[0], pattern, plate_map, moa, channels, require_labels)


def prepare_config(layout: str, config_file: Path | None = None, paper: bool = False, **given) -> "PrepareConfig":
    """The :class:`PrepareConfig` for ``layout``: its defaults, then ``config_file`` (YAML), then ``given``.

    Layout defaults: BBBC021 and generic layouts use the paper's recipe (2×2 tiles, 8-bit map per
    field), BBBC014 the paper's BBBC014 recipe (:func:`bbbc014_prepare_config`). Crops are one
    tile each, mapped to 8 bits by a fixed clip of the DMSO z-score: stretching each crop on its
    own discards the absolute intensities (DNA content, tubulin level) that separate MoAs. On the
    12-MoA development set (crops-moa-dev) the crop probe called 0.739 of the treatments right with
    the fixed −2…10 map, against 0.587–0.674 with other ranges and 0.652 stretching each crop
    (benchmarks/crop_prepare.py, RESULTS.md). ``paper`` starts from :func:`paper_recipe` instead, whatever the
    layout. ``given`` holds command-line values; a None value means "not given".
    """
    layout = _check_layout(layout)
    if paper or layout != "crops":
        settings = paper_recipe(layout)
    else:
        settings = {"tile_grid": (1, 1), "scaling": "fixed"}
    if config_file is not None:
        settings.update(read_yaml_mapping(config_file))
    given = {k: v for k, v in given.items() if v is not None}
    settings.update(given)
    _name_the_option(PrepareConfig, settings, given)
    return validated(PrepareConfig, settings, str(config_file or "prepare options"))


def _name_the_option(model_cls, settings: dict, given: dict) -> None:
    """A value from the command line that the config refuses is one error line naming the option
    as the user typed it (``--tile-size 0: ...``); values from a config file are left to
    :func:`validated`, which names the file and field."""
    try:
        model_cls(**settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        if name in given and name in PREPARE_OPTIONS:
            value = given[name]
            # as typed: --tiles ROWSxCOLS, --fixed-range LOW,HIGH
            shown = ("x" if name == "tile_grid" else ",").join(f"{v:g}" for v in value) \
                if isinstance(value, (tuple, list)) else str(value)
            message = str(first["msg"]).removeprefix("Value error, ")
            raise CellmorphError(f"{PREPARE_OPTIONS[name]} {shown}: {message}") from None
