"""Frozen-backbone embeddings: per tile, aggregated to wells as a pycytominer-style profile.

The backbone's features (a :class:`~cellmorph.models.features.FeatureSpec`: its pooled head,
or pooled intermediate stages) are computed once per tile under ``torch.inference_mode``.
Wells are the median of their tiles (as ``pycytominer.aggregate`` does by default), with
``Metadata_*`` columns first, so ``cellmorph profile-eval`` and pycytominer can score them
directly. ``embed.json`` records the feature spec.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cellmorph.cache import TileCache
from cellmorph.config.embed import EmbedConfig  # noqa: F401
from cellmorph.config.features import DEFAULT_FEATURES, FeatureSpec
from cellmorph.data.layouts import layout_embedding
from cellmorph.datasets import InputPipeline, iterate_batches
from cellmorph.models.features import FeatureExtractor
from cellmorph.runinfo import atomic_path, require_output_dir, run_info, write_json
from cellmorph.schema import WELL_KEYS, WELL_METADATA

if TYPE_CHECKING:
    from cellmorph.progress import Progress


def feature_extractor(model_name: str, init: str = "imagenet", weights: Path | None = None, allow_network: bool = False,
                      features: FeatureSpec | None = None):
    """(:class:`FeatureExtractor` of ``features`` (default: mean-pooled stage 3), the backbone's
    :class:`~cellmorph.models.InputSpec`) for ``model_name``."""
    from cellmorph.models import create_model

    model = create_model(model_name, num_classes=1, init=init, weights=weights, allow_network=allow_network)
    model.reset_classifier(0)  # timm: forward() now returns pooled features
    extractor = FeatureExtractor(model, features or DEFAULT_FEATURES, model_name)
    return extractor.eval(), model.cellmorph_input


def embed_tiles(
    cache: TileCache,
    model_name: str = "tf_efficientnet_lite0",
    rows: np.ndarray | None = None,
    init: str = "imagenet",
    weights: Path | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    allow_network: bool = False,
    progress: bool | Progress = True,
    features: FeatureSpec | None = None,
    tta: str = "none",
) -> np.ndarray:
    """float32 (n, d) embeddings (``features``, default mean-pooled stage 3) of the tiles at ``rows`` (all
    by default). ``image_size`` None: the layout's input size for crops (128 px), else the model's.
    ``tta="dihedral"``: each tile's embedding is the mean over its 8 dihedral views (4 rotations
    for non-square inputs), which makes it invariant to the orientation of the cells.
    ``progress``: on or off, or the caller's open :class:`Progress` to report into (a bar, or a
    line every 30 s in a batch log)."""
    from cellmorph.augment import tta_views
    from cellmorph.models import input_size_errors
    from cellmorph.progress import Progress

    from cellmorph.data.layouts import layout_input_size

    rows = np.arange(len(cache)) if rows is None else np.asarray(rows)
    model, spec = feature_extractor(model_name, init, weights, allow_network, features)
    spec = spec.with_size(image_size or layout_input_size(cache.manifest.get("source")))
    dev = torch.device(device)
    pipeline = InputPipeline.from_spec(spec).to(dev).eval()
    # NHWC is oneDNN's fast layout on CPU (≈1.8× for EfficientNet-Lite0 here) and cuDNN's on GPU.
    model.to(dev).to(memory_format=torch.channels_last)
    out: np.ndarray | None = None
    scope = nullcontext(progress) if isinstance(progress, Progress) else Progress(progress)
    with scope as bar, torch.inference_mode():
        task = bar.task(f"embedding tiles ({model_name})", len(rows), every=30.0)
        for tiles, positions in iterate_batches(cache, rows, batch_size, pin_memory=dev.type == "cuda"):
            x = pipeline(tiles)
            # The first batch doubles as the input-size check (an extra probe pass cost ~8 % here).
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"), \
                    input_size_errors(spec, model_name) if out is None else nullcontext():
                views = tta_views(x, tta)
                feats = sum(model(v.contiguous(memory_format=torch.channels_last)).float() for v in views)
                feats = (feats / len(views)).cpu().numpy()
            if out is None:
                out = np.empty((len(rows), feats.shape[1]), dtype=np.float32)
            out[positions.numpy()] = feats
            task.advance(len(positions))
    return out


def tiles_to_wells(index: pd.DataFrame, features: np.ndarray, how: str = "median") -> pd.DataFrame:
    """Aggregate tile features to wells: ``Metadata_*`` then ``emb_<i>`` columns."""
    names = [f"emb_{i}" for i in range(features.shape[1])]
    frame = pd.concat([index[WELL_KEYS + WELL_METADATA].reset_index(drop=True), pd.DataFrame(features, columns=names)], axis=1)
    grouped = frame.groupby(WELL_KEYS, sort=True)
    meta = grouped[WELL_METADATA].first()
    meta["Metadata_NTiles"] = grouped.size()
    return meta.join(grouped[names].agg(how)).reset_index()


def embed(data: Path, out: Path, config: EmbedConfig | None = None, progress: bool = True, log=print) -> dict:
    """Embed every tile of cache ``data``; write ``tiles.parquet``, ``wells.parquet`` (each well the
    median or mean of its tiles) and, where the cache has DMSO wells, ``wells_normalized.parquet``
    (:func:`cellmorph.profiles.normalize_profiles`) into ``out``; ``embed.json`` records the config."""
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
    write_json(out / "embed.json", summary | {"config": config.model_dump(mode="json"), "provenance": run_info()})
    return summary


def _normalized_wells(wells: pd.DataFrame, names: list[str], config: EmbedConfig, log) -> pd.DataFrame | None:
    """The well profiles normalised against their DMSO wells, or None (asked for none, or no DMSO)."""
    from cellmorph.profiles import normalize_profiles

    if config.standardize == "none" and config.whiten == "none":
        return None
    if not (wells["Metadata_Compound"] == "DMSO").any():
        log("note: the cache holds no DMSO wells (prepare with --controls), so no wells_normalized.parquet")
        return None
    return normalize_profiles(wells, names, config.standardize, config.whiten, config.strength, log=log)
