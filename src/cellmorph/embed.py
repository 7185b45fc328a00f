"""Frozen-backbone embeddings: per tile, aggregated to wells as a pycytominer-style profile.

The backbone's features (a :class:`~cellmorph.models.features.FeatureSpec`: its pooled head,
or pooled intermediate stages) are computed once per tile under ``torch.inference_mode``.
Wells are the median of their tiles (as ``pycytominer.aggregate`` does by default), with
``Metadata_*`` columns first, so ``cellmorph profile-eval`` and pycytominer can score them
directly. ``embed.json`` records the feature spec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.cache import TileCache
from cellmorph.config.embed import EmbedConfig  # noqa: F401
from cellmorph.config.features import DEFAULT_FEATURES, FeatureSpec
from cellmorph.metrics import group_rows
from cellmorph.data.layouts import layout_embedding
from cellmorph.models.embedding import embed_tiles, feature_extractor  # noqa: F401  (their home was here)
from cellmorph.runinfo import atomic_path, require_output_dir, run_info, write_json
from cellmorph.schema import WELL_KEYS, WELL_METADATA


def tiles_to_wells(index: pd.DataFrame, features: np.ndarray, how: str = "median") -> pd.DataFrame:
    """Aggregate tile features to wells: ``Metadata_*`` then ``emb_<i>`` columns."""
    names = [f"emb_{i}" for i in range(features.shape[1])]
    frame = pd.concat([index[WELL_KEYS + WELL_METADATA].reset_index(drop=True), pd.DataFrame(features, columns=names)], axis=1)
    return group_rows(frame, WELL_KEYS, names, how, first=WELL_METADATA, counts={"Metadata_NTiles": None})


def embed(data: Path, out: Path, config: EmbedConfig | None = None, progress: bool = True, log=print) -> dict:
    """Embed every tile of cache ``data``; write ``tiles.parquet``, ``wells.parquet`` (each well the
    median or mean of its tiles) and, where the cache has DMSO wells, ``wells_normalized.parquet``
    (:func:`cellmorph.profiles.normalize_profiles`) into ``out``; ``embed.json`` records the config.
    Where copairs is installed, the mAP of the (normalised) well profiles too (:func:`_retrieval`)."""
    from cellmorph.runtime import torch_threads

    config = config or EmbedConfig()
    out = require_output_dir(Path(out), "embedding folder")
    cache = TileCache(data)
    # Unset fields take the layout's defaults (cellmorph.data.layouts says why), recorded in embed.json.
    layout = layout_embedding(cache.manifest.get("source"))
    if config.tta is None:
        config = config.model_copy(update={"tta": layout.get("tta", "none")})
    if config.features is None:
        spec = FeatureSpec.parse(layout["features"]) if "features" in layout else DEFAULT_FEATURES
        config = config.model_copy(update={"features": spec})
    if config.standardize is None:
        config = config.model_copy(update={"standardize": layout.get("standardize", "plate")})
    with torch_threads(config.threads):
        feats = embed_tiles(cache, config.model, None, config.init, Path(config.weights) if config.weights else None,
                            config.image_size, config.batch_size, config.device, config.allow_network, progress,
                            config.features, config.tta)
    meta = [c for c in cache.index.columns if c.startswith("Metadata_")]
    names = [f"emb_{i}" for i in range(feats.shape[1])]
    tiles = pd.concat([cache.index[meta].reset_index(drop=True), pd.DataFrame(feats, columns=names)], axis=1)
    wells = tiles_to_wells(cache.index, feats, config.aggregate)
    with atomic_path(out / "tiles.parquet") as tmp:
        tiles.to_parquet(tmp, index=False)
    with atomic_path(out / "wells.parquet") as tmp:
        wells.to_parquet(tmp, index=False)
    normalized = _normalized_wells(wells, names, config, log)
    if normalized is not None:
        with atomic_path(out / "wells_normalized.parquet") as tmp:
            normalized.to_parquet(tmp, index=False)
    summary = {
        "model": config.model,
        "init": config.init,
        "n_tiles": int(len(tiles)),
        "n_wells": int(len(wells)),
        "dim": int(feats.shape[1]),
        "features": config.features.record(),
        "tta": config.tta,
        "normalized": normalized is not None,
        "data": str(data),
    }
    mean_ap = _retrieval(normalized if normalized is not None else wells, names, normalized is not None, config, out,
                         log)
    record = {"config": config.model_dump(mode="json"), "map": mean_ap, "provenance": run_info()}
    if config.h5ad:
        _write_h5ad(out, wells, normalized, names, config, summary | record)
    write_json(out / "embed.json", summary | record)
    return summary


def _write_h5ad(out: Path, wells: pd.DataFrame, normalized: pd.DataFrame | None, names: list[str],
                config: EmbedConfig, record: dict) -> None:
    """``wells.h5ad`` (and ``wells_normalized.h5ad``) and ``treatments.h5ad``: the treatment profiles, the
    ``aggregate`` of the (normalised) wells, as `profile-eval` and the mAP build them."""
    from cellmorph.h5ad import write_h5ad
    from cellmorph.retrieval import treatment_profiles

    write_h5ad(wells, out / "wells.h5ad", record, names)
    if normalized is not None:
        write_h5ad(normalized, out / "wells_normalized.h5ad", record, names)
    source = normalized if normalized is not None else wells
    finite = source[names].notna().all(axis=1)
    write_h5ad(treatment_profiles(source[finite], names, config.aggregate), out / "treatments.h5ad", record, names)


def _retrieval(wells: pd.DataFrame, names: list[str], normalized: bool, config: EmbedConfig, out: Path,
               log) -> dict:
    """copairs mAP of the well profiles (:mod:`cellmorph.retrieval`, cosine similarity): replicate retrieval
    against the DMSO wells and MoA retrieval of the treatment profiles (the ``aggregate`` of their wells);
    ``map_replicates.csv``/``map_moa.csv`` in ``out``. An add-on: without copairs, or where the wells cannot
    support a part, a note says so and the summary records why."""
    from cellmorph.retrieval import (
        Retrieval,
        retrieval_or_note,
        summary_line,
        write_retrieval,
    )

    what = "normalised well profiles" if normalized else "well profiles (not normalised)"
    found = retrieval_or_note(wells, None, names, distance="cosine", aggregate=config.aggregate, log=log,
                              sources={"replicates": what, "moa": f"treatment profiles ({config.aggregate} of the {what})"})
    write_retrieval(out, found or Retrieval())
    if found is None:
        return {"skipped": "copairs is not installed"}
    if summary_line(found.summary):
        log(summary_line(found.summary))
    return found.summary


def _normalized_wells(wells: pd.DataFrame, names: list[str], config: EmbedConfig, log) -> pd.DataFrame | None:
    """The well profiles normalised against their DMSO wells, or None (asked for none, or no DMSO)."""
    from cellmorph.profiles import normalize_profiles

    if config.standardize == "none" and config.whiten == "none":
        return None
    if not (wells["Metadata_Compound"] == "DMSO").any():
        log("note: the cache holds no DMSO wells (prepare with --controls), so no wells_normalized.parquet")
        return None
    return normalize_profiles(wells, names, config.standardize, config.whiten, config.strength, log=log)
