"""Features computed once per run and shared by its folds, kept in the run directory for resume.

* Linear probe: frozen-backbone embeddings of every tile any fold uses.
* Frozen-feature cache: the frozen stages' output for ``epochs`` augmented copies of every
  tile some fold trains on (deleted when the run finishes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellmorph.augment import Augmenter
from cellmorph.cv.rundir import (CONTROL_EMBEDDINGS, CONTROL_EMBEDDINGS_MARKER, EMBEDDINGS, EMBEDDINGS_MARKER,
                                 FROZEN_FEATURES, FROZEN_FEATURES_MARKER, RunDir, digest)
from cellmorph.errors import CellmorphError
from cellmorph.schema import CONTROL_COLUMN

# The novelty score sees the MoAs from the controls' mean profile (cellmorph.novelty.ControlOrigin): a mean, which
# a few hundred tiles estimate closely, and a bound on what a screen with thousands of DMSO tiles spends embedding.
MAX_CONTROL_TILES = 512


@dataclass
class ProbeFeatures:
    """Embeddings (n, d) of cache ``rows``; ``take(rows)`` gathers them in any order."""

    array: np.ndarray
    rows: np.ndarray

    def __post_init__(self) -> None:
        self.position = {int(r): i for i, r in enumerate(self.rows)}

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[[self.position[int(r)] for r in rows]]


# Fields that act only on the heads fitted to the embeddings, or on which tiles the folds use (the
# key records the rows themselves): runs differing only in these embed alike, so a run directory
# seeded with another such run's embeddings reuses them (benchmarks/real_crops.py sweeps the probe's
# C that way).
HEAD_ONLY_FIELDS = ("probe_c", "probe_head", "class_weighting", "max_tiles_per_fold", "aggregate", "cv", "strict",
                    "skip_untrainable_folds", "include_controls_as_class")


def embedding_fingerprint(plan) -> str:
    """What the probe's embeddings depend on: the config less :data:`HEAD_ONLY_FIELDS`, the data, the
    classes' tiles (through the rows), the network's input and its weights."""
    from cellmorph.cv.config import RUNTIME_FIELDS
    from cellmorph.cv.rundir import compute_fields

    fields = {k: v for k, v in compute_fields(plan.config, RUNTIME_FIELDS).items() if k not in HEAD_ONLY_FIELDS}
    return digest(fields, plan.data_fingerprint, plan.input.record(), plan.init.sha256)


def probe_embeddings(plan, rundir: RunDir, bar, compute: bool = True) -> ProbeFeatures:
    """Frozen-backbone embeddings of every tile any fold trains or tests on, computed once
    (``compute=False``: only read; a fold task on a worker finds them made before it started)."""
    rows = np.unique(np.concatenate([np.concatenate([f.train, f.test]) for f in plan.folds]))
    key = embeddings_key(plan, rows)
    saved = rundir.read_marked_array(EMBEDDINGS, EMBEDDINGS_MARKER, key)
    if saved is not None:
        return ProbeFeatures(saved, rows)
    if not compute:
        raise CellmorphError(f"{rundir.path(EMBEDDINGS)}: the run's shared embeddings are missing or belong to "
                             "another run")
    extractor, spec = probe_extractor(plan)
    feats = embed_probe_rows(plan, rows, extractor, spec, bar)
    rundir.write_marked_array(EMBEDDINGS, EMBEDDINGS_MARKER,
                              key | {"dim": int(feats.shape[1])},
                              lambda tmp: np.save(tmp, feats))
    return ProbeFeatures(feats, rows)


def embeddings_key(plan, rows: np.ndarray) -> dict:
    """What the embeddings of ``rows`` under ``plan`` are stored under (their marker)."""
    key = {"fingerprint": embedding_fingerprint(plan), "rows": int(len(rows)), "rows_digest": digest(rows),
           "features": plan.config.features.record()}
    if plan.config.tta != "none":  # (runs without tta keep the key their embeddings were stored under)
        key["tta"] = plan.config.tta
    return key


def probe_extractor(plan):
    """(the probe's frozen :class:`~cellmorph.models.features.FeatureExtractor`, its input at the run's size)."""
    from cellmorph.models.embedding import feature_extractor

    cfg = plan.config
    weights = Path(cfg.weights) if cfg.weights else None
    # A network that is not pretrained (init xavier) embeds with random filters: drawn from the run's
    # seed, so that the embeddings are the same whichever process (a Dask worker, a Slurm task) makes them,
    # and so that the final model's bundle saves the filters its calibration CV embedded with.
    torch.manual_seed(int(np.random.SeedSequence([int(cfg.seed), 0xE3]).generate_state(1)[0]))
    extractor, spec = feature_extractor(cfg.model, cfg.init, weights, cfg.allow_network, cfg.features)
    return extractor, spec.with_size(plan.input.size)


def embed_probe_rows(plan, rows: np.ndarray, extractor, spec, bar) -> np.ndarray:
    """The embeddings of cache ``rows`` with ``extractor`` as the run's config says (batch, device, TTA)."""
    from cellmorph.models.embedding import embed_with

    cfg = plan.config
    views = "" if cfg.tta == "none" else f", each the mean of its {cfg.tta} views"
    bar.line(f"embedding {len(rows)} tiles once with {cfg.model} ({cfg.features.describe()} features{views})")
    return embed_with(extractor, spec, plan.cache, rows, cfg.eval_batch_size, str(plan.device), bar, cfg.tta,
                      cfg.model)


def control_rows(plan) -> np.ndarray:
    """The cache rows of negative-control tiles that are no class (at most :data:`MAX_CONTROL_TILES`, drawn with
    the run's seed), sorted."""
    index = plan.cache.index
    rows = np.flatnonzero(index[CONTROL_COLUMN].astype(bool).to_numpy() & (plan.targets < 0))
    if len(rows) > MAX_CONTROL_TILES:
        rng = np.random.default_rng(np.random.SeedSequence([int(plan.config.seed), 0xC0]))
        rows = np.sort(rng.choice(rows, MAX_CONTROL_TILES, replace=False))
    return rows


def control_embeddings(plan, rundir: RunDir | None, bar, extractor_and_spec=None) -> np.ndarray | None:
    """The probe's embeddings of :func:`control_rows` (None where the cache holds no such tile), read from the run
    directory ``rundir`` where it keeps them, else computed (with ``extractor_and_spec``, what
    :func:`probe_extractor` returns, where the caller has it) and kept there."""
    rows = control_rows(plan)
    if len(rows) == 0:
        return None
    key = embeddings_key(plan, rows)
    saved = None if rundir is None else rundir.read_marked_array(CONTROL_EMBEDDINGS, CONTROL_EMBEDDINGS_MARKER, key)
    if saved is not None:
        return saved
    bar.line(f"the controls: {len(rows)} tiles, the novelty score's origin")
    feats = embed_probe_rows(plan, rows, *(extractor_and_spec or probe_extractor(plan)), bar)
    if rundir is not None:
        rundir.write_marked_array(CONTROL_EMBEDDINGS, CONTROL_EMBEDDINGS_MARKER, key | {"dim": int(feats.shape[1])},
                                  lambda tmp: np.save(tmp, feats))
    return feats


def final_probe_embeddings(plan, rows: np.ndarray, bar, calibration: RunDir | None = None):
    """(embeddings of ``rows``, the extractor, its input) for a probe's final model: read from the calibration
    run ``calibration`` where it embedded exactly these rows with this recipe, else computed."""
    extractor, spec = probe_extractor(plan)
    if calibration is not None:
        saved = calibration.read_marked_array(EMBEDDINGS, EMBEDDINGS_MARKER, embeddings_key(plan, rows))
        if saved is not None:
            bar.line(f"embeddings of {len(rows)} tiles: those of the calibration run {calibration.root}")
            return ProbeFeatures(saved, rows), extractor, spec
    return ProbeFeatures(embed_probe_rows(plan, rows, extractor, spec, bar), rows), extractor, spec


def frozen_feature_pool(plan, rundir: RunDir, resume: bool, bar, compute: bool = True):
    """The frozen stages' output for ``epochs`` augmented copies of every tile some fold trains on.

    Kept in the run directory while the run goes on, so ``--resume`` need not recompute it;
    the run deletes it once every fold is done. None when every fold is already finished.
    """
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import build_model, freeze_stages
    from cellmorph.models.frozen import FrozenFeatures, FrozenSplit, compute_frozen_features, example_batch

    if resume and all(rundir.finished_fold(f.index, plan.fold_fingerprints[f.index]) for f in plan.folds):
        return None
    cfg = plan.config
    # Every fold's rows, not only the unfinished folds': a tile's augmentation draws depend
    # on the rows before it, and a resumed run must train on the same copies.
    rows = np.unique(np.concatenate([f.train for f in plan.folds]))
    rows = rows[plan.targets[rows] >= 0]
    model = build_model(cfg, len(plan.classes), plan.cache.tile_shape[0]).module
    freeze_stages(model, cfg.freeze_stages)
    # The copies' augmentation draws: a seed of their own, recorded through the run's seed.
    seed = int(np.random.SeedSequence([int(cfg.seed), 0xF7]).generate_state(1)[0])
    pipeline = InputPipeline.from_spec(plan.input, Augmenter(cfg.augment, seed=seed))
    split = FrozenSplit(model.to(plan.device), example_batch(pipeline, plan.cache, rows, plan.device))
    key = {"fingerprint": plan.fingerprint, "signature": split.signature, "rows": digest(rows), "seed": seed}
    saved = rundir.read_marked_array(FROZEN_FEATURES, FROZEN_FEATURES_MARKER, key, mmap=True)
    if saved is not None:
        return FrozenFeatures(saved, rows, split.signature)
    if not compute:
        raise CellmorphError(f"{rundir.path(FROZEN_FEATURES)}: the run's frozen-feature pool is missing or belongs "
                             "to another run")
    copies = int(cfg.epochs)
    # Batches of the training batch size (a fingerprinted field), not eval_batch_size (a runtime
    # field), because the augmentation draws depend on how tiles are batched.
    task = bar.task("  frozen stages, once", copies * -(-len(rows) // cfg.batch_size), log=False)
    bar.line(f"frozen stages once: {copies} augmented copies × {len(rows)} tiles")

    def fill(tmp):
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(copies, len(rows), *split.feature_shape))
        compute_frozen_features(split, pipeline, plan.cache, rows, array, cfg.batch_size, plan.device,
                                cfg.channels_last, task.advance)
        array.flush()
        del array

    rundir.write_marked_array(FROZEN_FEATURES, FROZEN_FEATURES_MARKER, key, fill)
    return FrozenFeatures(np.load(rundir.path(FROZEN_FEATURES), mmap_mode="r"), rows, split.signature)
