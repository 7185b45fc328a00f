"""Frozen-network embeddings of cached tiles: the loop behind ``cellmorph embed`` and the linear probe.

A feature extractor (:class:`~cellmorph.models.features.FeatureExtractor` over a timm backbone) turns each
tile into a profile (a pooled stage, or the head); :func:`embed_tiles` runs it over a cache in batches,
channels-last, optionally averaged over the tile's dihedral views (test-time augmentation).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cellmorph.augment import tta_views
from cellmorph.cache import TileCache
from cellmorph.config.features import DEFAULT_FEATURES, FeatureSpec
from cellmorph.data.layouts import layout_input_size
from cellmorph.datasets import InputPipeline, iterate_batches
from cellmorph.models.factory import create_model
from cellmorph.models.features import FeatureExtractor
from cellmorph.models.build import input_size_errors
from cellmorph.progress import Progress


def feature_extractor(model_name: str, init: str = "imagenet", weights: Path | None = None, allow_network: bool = False,
                      features: FeatureSpec | None = None):
    """(:class:`FeatureExtractor` of ``features`` (default: mean-pooled stage 3), the backbone's
    :class:`~cellmorph.models.InputSpec`) for ``model_name``."""
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
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows)
    model, spec = feature_extractor(model_name, init, weights, allow_network, features)
    spec = spec.with_size(image_size or layout_input_size(cache.manifest.get("source")))
    return embed_with(model, spec, cache, rows, batch_size, device, progress, tta, model_name)


def embed_with(model: FeatureExtractor, spec, cache: TileCache, rows: np.ndarray, batch_size: int = 64,
               device: str = "cpu", progress: bool | Progress = True, tta: str = "none",
               model_name: str = "") -> np.ndarray:
    """:func:`embed_tiles` with a feature extractor already built (``spec``: its input, at the size to embed at):
    the probe's final model embeds with the extractor whose weights its bundle then saves."""
    rows = np.asarray(rows)
    model_name = model_name or "network"
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
