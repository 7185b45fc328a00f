"""Apply a model bundle to a screen: calls, calibrated confidence and conformal prediction sets.

::

    from cellmorph.predict import PredictConfig, predict
    summary = predict("MODEL", "CACHE", "PRED", PredictConfig(alpha=0.1))

The screen is a prepared cache, or raw images (an ImageTable, labels optional) that are
prepared with the bundle's recipe first. Per tile, well and treatment: ``prob_<class>`` (median
aggregation, as in the paper), the call (``Predicted_MoA``), its ``Raw_Confidence`` (the call's
median probability) and ``Confidence`` (that probability temperature-scaled on the bundle's
out-of-fold scores of the level), and a conformal prediction set at level 1 − ``alpha`` from
the same scores (:mod:`cellmorph.calibration`): every MoA that fits at that level. An empty
set says no known MoA fits, which is what a compound with a new mechanism should produce.
Where the screen carries known MoAs, accuracy and the empirical coverage are reported too.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellmorph.calibration import SET_SEPARATOR, TemperatureScaling, conformal_sets, temperature_helps
from cellmorph.config.predict import PredictConfig
from cellmorph.config.prepare import PREPARE_OPTIONS, PrepareConfig
from cellmorph.errors import CellmorphError, option
from cellmorph.novelty import DEFAULT_NOVELTY_POOL
from cellmorph.schema import CONTROL_COLUMN, CORRECT_COLUMN, PREDICTED_COLUMN, TRUE_COLUMN, prob_column

if TYPE_CHECKING:
    from cellmorph.data.table import ImageTable

CONFIDENCE_COLUMN = "Confidence"
RAW_CONFIDENCE_COLUMN = "Raw_Confidence"
SET_COLUMN = "Prediction_Set"
SET_SIZE_COLUMN = "Set_Size"
EMPTY_SET_COLUMN = "Empty_Set"
MC_PREFIX = "mc_prob_"
MC_ENTROPY_COLUMN = "MC_Entropy"
IN_TRAINING_COLUMN = "Metadata_InTraining"  # the compound was among the final model's training compounds
CACHE_FOLDER = "cache"  # where predict prepares images given as a layout, inside its output folder


def add_sets(frame: pd.DataFrame, members: np.ndarray, classes: list[str]) -> None:
    """The set columns of ``frame`` from boolean (rows, classes) membership."""
    names = np.array(classes, dtype=object)
    frame[SET_COLUMN] = [SET_SEPARATOR.join(names[m]) for m in members]
    frame[SET_SIZE_COLUMN] = members.sum(axis=1)
    frame[EMPTY_SET_COLUMN] = frame[SET_SIZE_COLUMN] == 0


def add_confidence(frame: pd.DataFrame, classes: list[str], calibration: pd.DataFrame | None) -> pd.DataFrame:
    """``Raw_Confidence``, the call's median probability, and ``Confidence``, that probability
    after temperature scaling fitted on the level's out-of-fold scores (renormalised only, T = 1, where
    scaling did not lower the log-loss of held-out compounds; the raw one without scores)."""
    frame = frame.copy()
    probs = frame[[prob_column(c) for c in classes]].to_numpy(float)
    frame[RAW_CONFIDENCE_COLUMN] = probs.max(axis=1)
    # A fitted temperature only where it lowered the log-loss of compounds held out from its fit
    # (temperature_helps); else T = 1, which only renormalises the median probabilities.
    scaling = None
    if calibration is not None:
        scaling = (TemperatureScaling.from_scores(calibration, classes) if temperature_helps(calibration, classes)
                   else TemperatureScaling(1.0))
    frame[CONFIDENCE_COLUMN] = scaling.transform(probs).max(axis=1) if scaling else frame[RAW_CONFIDENCE_COLUMN]
    return frame


def predict(model: Path, data: "Path | ImageTable", out: Path, config: PredictConfig | None = None,
            progress: bool = True, log=print) -> dict:
    """Score every treated tile of ``data`` with the bundle ``model``; write tables into ``out``.

    ``data`` is a prepared tile cache, or an :class:`~cellmorph.data.table.ImageTable` of raw
    images (labels optional), which is first prepared into ``out/cache`` with the bundle's own
    recipe, normalised against each new plate's DMSO. On bad input nothing is left behind.
    """
    from cellmorph.errors import disk_full_as_error
    from cellmorph.runinfo import created_root, output_lock, require_not_input, require_output_dir

    config = config or PredictConfig()
    out = Path(out)
    require_not_input(out, model=model, data=data if isinstance(data, (str, Path)) else None)
    created = created_root(out)
    require_output_dir(out, "prediction folder")
    with output_lock(out, "predict"):
        try:
            with disk_full_as_error():
                return _predict(Path(model), data, out, config, progress, log)
        except CellmorphError:
            if created is not None and created.exists():
                shutil.rmtree(created)
            raise


def _predict(model: Path, data, out: Path, config: PredictConfig, progress: bool, log) -> dict:
    from cellmorph.bundle import load_bundle
    from cellmorph.cache import TileCache
    from cellmorph.runinfo import atomic_path, run_info, write_csv, write_json

    bundle = load_bundle(model)
    _require_recipe(bundle)
    if not bundle.calibration:
        raise CellmorphError(f"{model}: the bundle holds no calibration scores; train it with {option('calibration')} loco")
    if config.mc_dropout and not all(m.config.get("drop_rate") for m in bundle.members):
        raise CellmorphError(f"{model}: {option('mc_dropout')} needs a model trained with dropout (train with {option('drop_rate')} 0.2)")
    if config.reuse_freed_memory:
        # Before prepare too: its fields and resized tiles are tens of MB apiece, which glibc would
        # otherwise map and zero afresh for every field (0.9 s of a 240-field plate's 17-19 s end
        # to end, at the same peak memory, benchmarks/RESULTS.md).
        from cellmorph.runtime import keep_freed_memory

        keep_freed_memory()
    source = data
    if not isinstance(data, (str, Path)):
        from cellmorph.preprocess import prepare

        data = out / CACHE_FOLDER
        source = in_model_channel_order(bundle, source, log)
        prepare(source, data, images_recipe(bundle, source, config), progress=progress, log=log,
                threads=config.threads)
    cache = TileCache(data)
    levels, sets = _levels_and_sets(bundle, cache, config, progress)
    classes = bundle.classes
    notes = [] if bundle.calibration_compound_disjoint else [
        f"note: {model}'s calibration scores come from a {bundle.calibration_cv} CV, whose held-out wells or "
        "batches are of compounds the scoring models were trained on: the sets and Confidence are calibrated for "
        "new wells of known compounds, not for new compounds (train with --calibration loco for those)"]
    tiles, wells, treatments = levels["tiles"], levels["wells"], levels["treatments"]
    summary = _summary(treatments, wells, tiles, classes, sets["treatments"], config.alpha)
    summary["calibration_compound_disjoint"] = bundle.calibration_compound_disjoint
    summary["novelty"] = _novelty_summary(treatments)
    seen = summary.get("training_compounds", {}).get("n_labelled_treatments", 0)
    if seen:
        notes.append(f"note: {seen} of {summary['n_labelled_treatments']} labelled treatments are of compounds the "
                     f"model was trained on ({IN_TRAINING_COLUMN}); their accuracy and coverage are optimistic, so "
                     "summary.json also scores new and training compounds apart")
    compounds = levels["compounds"]
    summary["compounds"] = _compound_summary(compounds, classes)
    for name, frame in (("tiles", tiles), ("wells", wells), ("treatments", treatments), ("compounds", compounds)):
        with atomic_path(out / f"{name}.parquet") as tmp:
            _metadata_first(frame).to_parquet(tmp, index=False)
    write_csv(out / "treatments.csv", _metadata_first(treatments))
    write_csv(out / "compounds.csv", _metadata_first(compounds))
    described = str(Path(source).resolve()) if isinstance(source, (str, Path)) else (source.origin or source.source)
    record = {"model": str(model.resolve()), "data": described, "cache": str(Path(data).resolve()),
              "config": config.model_dump(), "provenance": run_info()}
    if config.h5ad:
        from cellmorph.h5ad import write_h5ad

        for name, frame in (("wells", wells), ("treatments", treatments)):
            write_h5ad(_metadata_first(frame), out / f"{name}.h5ad", record, [prob_column(c) for c in classes])
    write_json(out / "summary.json", summary | record)
    for note in notes:  # after success, so a failure ends in its one error line alone
        log(note)
    return summary


def score_cache(bundle, cache, config: PredictConfig | None = None, progress: bool = False) -> dict[str, pd.DataFrame]:
    """Every treated tile of the prepared ``cache`` scored by ``bundle`` (a loaded
    :class:`~cellmorph.bundle.Bundle`), in memory: ``{"tiles", "wells", "treatments", "compounds"}`` → a ``Metadata_*``
    frame with ``prob_<class>``, the call, ``Confidence`` and, where the bundle holds calibration scores of
    that level, the conformal set at ``config.alpha`` (``Prediction_Set``, ``Set_Size``, ``Empty_Set``); and
    ``"compounds"``, each compound called from its treatments together (no sets: none are calibrated per compound).
    What ``cellmorph predict`` writes, without the files."""
    return _levels_and_sets(bundle, cache, config or PredictConfig(), progress)[0]


def _levels_and_sets(bundle, cache, config: PredictConfig, progress: bool):
    """:func:`score_cache`'s levels, and each calibrated level's (rows, classes) set membership."""
    _check_recipe(bundle, cache)
    classes = bundle.classes
    index = cache.index
    rows = np.flatnonzero(~index[CONTROL_COLUMN].astype(bool).to_numpy() | ("DMSO" in classes))
    if len(rows) == 0:
        raise CellmorphError(f"{cache.root}: no treated tiles to predict")
    levels = {level: _flag_training_compounds(_known_labels_only(frame, classes), bundle.training_compounds)
              for level, frame in _score_levels(bundle, cache, rows, config, progress).items()}
    sets = {}
    for level, frame in levels.items():
        if level in bundle.calibration:  # each level calibrated by out-of-fold scores of its own kind
            sets[level] = conformal_sets(bundle.calibration[level],
                                         frame[[prob_column(c) for c in classes]].to_numpy(float), classes, config.alpha,
                                         config.sets)
            add_sets(frame, sets[level], classes)
    return levels, sets


def _known_labels_only(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Labels only where the screen has them: no Metadata_MoA column when no row has a known MoA,
    else ``Correct`` is empty (NA) for the rows without one."""
    if TRUE_COLUMN not in frame.columns:
        return frame
    known = frame[TRUE_COLUMN].astype(str).isin(classes)
    if not known.any():
        return frame.drop(columns=[TRUE_COLUMN, CORRECT_COLUMN], errors="ignore")
    if CORRECT_COLUMN in frame.columns:
        frame[CORRECT_COLUMN] = frame[CORRECT_COLUMN].astype("boolean").where(known, pd.NA)
    return frame


def _compound_summary(compounds: pd.DataFrame, classes: list[str]) -> dict:
    """How many compounds were called, and where their MoA is known, how many right (new compounds apart); where
    the bundle scores a compound's novelty, which compounds it flagged."""
    from cellmorph.novelty import NOVEL_COLUMN

    record = {"n_compounds": int(len(compounds))}
    if NOVEL_COLUMN in compounds.columns:
        novel = compounds[NOVEL_COLUMN].to_numpy(bool)
        record["novelty"] = dict(compounds.attrs.get("novelty", {})) | {
            "n_novel_compounds": int(novel.sum()),
            "novel_compounds": [str(c) for c in compounds.loc[novel, "Metadata_Compound"]]}
    if TRUE_COLUMN not in compounds.columns:
        return record
    known = compounds[TRUE_COLUMN].astype(str).isin(classes).to_numpy()
    right = (compounds[PREDICTED_COLUMN].astype(str) == compounds[TRUE_COLUMN].astype(str)).to_numpy()
    groups = {"labelled": known}
    if IN_TRAINING_COLUMN in compounds.columns:
        groups["new"] = known & ~compounds[IN_TRAINING_COLUMN].to_numpy(bool)
    for name, rows in groups.items():
        record[f"n_{name}"] = int(rows.sum())
        if rows.any():
            record[f"accuracy_{name}"] = float(right[rows].mean())
    return record


def _flag_training_compounds(frame: pd.DataFrame, compounds: list[str] | None) -> pd.DataFrame:
    """``Metadata_InTraining``: whether the row's compound was one the final model was trained on
    (its calls and sets say little about new compounds). Left out when the bundle records none."""
    if compounds is not None and "Metadata_Compound" in frame.columns:
        frame[IN_TRAINING_COLUMN] = frame["Metadata_Compound"].astype(str).isin(set(compounds))
    return frame


def in_model_channel_order(bundle, table: "ImageTable", log=None) -> "ImageTable":
    """``table`` read with its channels in the order of the model's training tiles, when it names the
    same channels in another order (fields stored DAPI, Tubulin, Actin for a model trained on crops
    stored DNA, actin, tubulin); said in one note. Anything else is left for :func:`images_recipe`
    to refuse by name."""
    wanted = [c for c in bundle.recipe.get("channels") or [] if not str(c).startswith("zero")]
    if wanted and set(wanted) < set(table.channels):  # a plate imaged in more channels than the model reads
        if log is not None:
            log(f"note: {table.origin or table.source}: of channels {', '.join(table.channels)}, reading "
                f"{', '.join(wanted)}, the model's (matched by name)")
        return table.with_channels(wanted)
    if list(table.channels) == wanted or not table.names_same_channels(wanted):
        return table
    if log is not None:
        log(f"note: {table.origin or table.source}: channels {', '.join(table.channels)} read as "
            f"{', '.join(wanted)}, the model's order (matched by name)")
    return table.in_channel_order(wanted)


def images_recipe(bundle, table: "ImageTable", config: PredictConfig):
    """The :class:`~cellmorph.preprocess.PrepareConfig` that makes ``table``'s tiles like the
    model's training tiles; the channels must match in number, names and order."""
    from pydantic import ValidationError

    recipe = bundle.recipe
    try:
        prepare = PrepareConfig.model_validate(recipe["config"])
    except ValidationError as exc:  # a bundle from another cellmorph version, or an edited one
        first = exc.errors()[0]
        made_by = bundle.manifest.get("provenance", {}).get("packages", {}).get("cellmorph", "another version")
        raise CellmorphError(f"{bundle.root}: its preprocessing recipe does not fit this cellmorph "
                             f"({'.'.join(map(str, first['loc']))}: {first['msg']}); predict with the cellmorph "
                             f"that trained it ({made_by}) or retrain the model") from None
    given = list(table.channels) + [f"zero{i}" for i in range(len(table.channels), prepare.pad_channels or 0)]
    _check_channels(table.origin or table.source, given, table.channels, recipe)
    update = {"include_controls": "DMSO" in bundle.classes, "skip_bad": config.skip_bad}
    if config.normalize is not None and config.normalize != prepare.normalize:
        if prepare.normalize == "none":
            raise CellmorphError(f"{option('normalize')} {config.normalize}: the model was trained on tiles without DMSO "
                                 f"normalisation; leave {option('normalize')} out")
        update["normalize"] = config.normalize
    return prepare.model_copy(update=update)


def _score_levels(bundle, cache, rows: np.ndarray, config: PredictConfig, progress: bool) -> dict[str, pd.DataFrame]:
    """Tiles, wells and treatments with ``prob_<class>``, the call and its confidence (and the MC-dropout
    columns when asked for)."""
    import torch

    from cellmorph.cv.rundir import predictions_frame
    from cellmorph.datasets import InputPipeline
    from cellmorph.metrics import aggregate, aggregate_compounds, mean_of_levels
    from cellmorph.progress import Progress
    from cellmorph.runtime import torch_threads
    from cellmorph.train import PredictSettings, predict_tiles

    classes = bundle.classes
    members = bundle.members
    n_batches = -(-len(rows) // config.batch_size)
    passes = [("deterministic", 0)] + ([("MC dropout", config.mc_dropout)] if config.mc_dropout else [])
    # Each member scores and aggregates its own way (as its calibration CV run did); an ensemble's levels
    # are the mean of its members' (metrics.mean_of_levels), as `cv` averaged them for the calibration scores.
    scored = {samples: [] for _, samples in passes}
    profiles = None  # the standardised tile profiles of the probe whose centroids score novelty
    with torch_threads(config.threads), Progress(progress) as bar:
        for k, member in enumerate(members, start=1):
            network = member.network()
            how = member.config.get("aggregate", "median")
            which = "" if len(members) == 1 else f", member {k} of {len(members)}"
            if member.probe:  # embedded as its CV embedded (mean profile over the views), then its head
                probs, z = _probe_tiles(member, network, cache, rows, config, bar)
                if bundle.novelty_member == k - 1:
                    profiles = z
                frame = predictions_frame(cache, rows, probs, classes, fold=-1).drop(columns=["Metadata_Fold"])
                scored[0].append(dict(zip(("tiles", "wells", "treatments"), aggregate(frame, how=how))))
                continue
            pipeline = InputPipeline.from_spec(member.input)
            settings = PredictSettings(batch_size=config.batch_size, tta=member.scoring_tta)
            for name, samples in passes:
                task = bar.task(f"predict ({name}{which})", n_batches, every=max(1, n_batches // 20))
                torch.manual_seed(config.seed)
                probs = predict_tiles(network, pipeline, cache, rows, replace(settings, mc_dropout=samples),
                                      torch.device("cpu"), on_batch=task.advance)
                frame = predictions_frame(cache, rows, probs, classes, fold=-1).drop(columns=["Metadata_Fold"])
                scored[samples].append(dict(zip(("tiles", "wells", "treatments"), aggregate(frame, how=how))))
    names = [f"member {k}" for k in range(1, len(members) + 1)]
    mean = {samples: (levels[0] if len(levels) == 1 else mean_of_levels(levels, names))
            for samples, levels in scored.items()}
    levels = {level: add_confidence(f, classes, bundle.calibration.get(level)) for level, f in mean[0].items()}
    if config.mc_dropout:
        for level, stochastic in mean[config.mc_dropout].items():
            add_mc_columns(levels[level], stochastic, classes)
    # Each compound called from its treatments together; no sets (none are calibrated per compound)
    levels["compounds"] = add_confidence(aggregate_compounds(levels["treatments"]), classes, None)
    _add_novelty(bundle, cache, rows, profiles, levels, config.novelty_alpha, config.novelty_pool)
    return levels


def _probe_tiles(member, network, cache, rows: np.ndarray, config: PredictConfig, bar):
    """A linear probe's (tile probabilities, standardised tile profiles): the tiles embedded by its frozen backbone
    (the mean profile over its views, as its CV embedded them) and its head applied, in double precision."""
    from cellmorph.models.embedding import embed_with
    from cellmorph.models.heads import LinearProbeHead

    head = LinearProbeHead.from_state(member.head)
    embedded = embed_with(network.extractor, member.input, cache, rows, config.batch_size, "cpu", bar,
                          str(member.config.get("tta", "none")), member.model_name)
    return head.predict_proba(embedded, member.n_classes), (embedded - head.mean) / head.scale


def _add_novelty(bundle, cache, rows: np.ndarray, profiles, levels: dict, alpha: float,
                 pool: str = DEFAULT_NOVELTY_POOL) -> None:
    """``Novelty_Score`` and ``Novel`` per well, treatment and compound (:mod:`cellmorph.novelty`): the centroid
    distance of the bundle's probe where it holds its calibration scores, else one minus the call's probability
    calibrated on the bundle's out-of-fold scores; the threshold flags ``alpha`` of new compounds of known MoAs.
    Under ``pool`` ``compound`` a treatment takes its compound's score, and so do the calibration treatments."""
    from cellmorph.novelty import NOVELTY_COLUMN, add_novelty, novelty_threshold, per_treatment

    scored = {level: _novelty_scores(bundle, cache, rows, profiles, level, levels[level])
              for level in ("wells", "treatments", "compounds")}
    for level, found in scored.items():
        if found is None:
            continue
        scores, calibration, kind = found
        how = {}
        if level == "treatments":
            pooled = pool == "compound" and scored.get("compounds") is not None
            # a bundle saved before compounds were scored holds no compound calibration: each treatment alone
            how = {"pool": "compound" if pooled else "treatment"}
            if pooled:
                compound_scores, compound_calibration, _ = scored["compounds"]
                compounds = levels["compounds"].assign(**{NOVELTY_COLUMN: compound_scores})
                scores = per_treatment(levels["treatments"], compounds)
                calibration = calibration.assign(**{NOVELTY_COLUMN: per_treatment(calibration, compound_calibration)})
        values = calibration[NOVELTY_COLUMN].to_numpy(float)
        threshold = novelty_threshold(values, alpha)
        add_novelty(levels[level], np.asarray(scores, float), threshold)
        levels[level].attrs["novelty"] = {"score": kind, "alpha": alpha, "threshold": threshold,
                                          "n_calibration": int(len(values))} | how


def _novelty_scores(bundle, cache, rows: np.ndarray, profiles, level: str, frame: pd.DataFrame):
    """(the level's scores, row for row of ``frame``; its calibration rows with their ``Novelty_Score``; the score's
    name), or None where the bundle cannot score the level's novelty."""
    from cellmorph.metrics import aggregate_compounds
    from cellmorph.novelty import (CENTROID_DISTANCE, CONTROL_CENTROID_DISTANCE, NOVELTY_COLUMN, ONE_MINUS_PROBABILITY,
                                   centroid_distance, level_profiles, one_minus_max_probability)

    if profiles is not None and bundle.novelty:  # the probe's score, on the levels it holds calibration for
        if level not in bundle.novelty:  # (a bundle written before compounds were scored): one score kind a run
            return None
        centroids = bundle.members[bundle.novelty_member].head["weight"].double().numpy()
        keys, means = level_profiles(cache.index.iloc[rows], profiles, level)
        by_key = keys.assign(**{NOVELTY_COLUMN: centroid_distance(means, centroids, bundle.novelty_control)})
        scores = frame[list(keys.columns)].merge(by_key, on=list(keys.columns), how="left")[NOVELTY_COLUMN]
        kind = CENTROID_DISTANCE if bundle.novelty_control is None else CONTROL_CENTROID_DISTANCE
        return scores.to_numpy(float), bundle.novelty[level], kind
    # A network's own score; a compound's from its call on its treatments together, as its calibration compounds'
    calibration = bundle.calibration.get(level) if level != "compounds" else (
        aggregate_compounds(bundle.calibration["treatments"]) if "treatments" in bundle.calibration else None)
    if calibration is None:
        return None
    probabilities = [prob_column(c) for c in bundle.classes]
    calibration = calibration.assign(**{NOVELTY_COLUMN: one_minus_max_probability(
        calibration[probabilities].to_numpy(float))})
    return one_minus_max_probability(frame[probabilities].to_numpy(float)), calibration, ONE_MINUS_PROBABILITY


def add_mc_columns(frame: pd.DataFrame, stochastic: pd.DataFrame, classes: list[str]) -> None:
    """``mc_prob_<class>`` from ``stochastic`` (the same rows, aggregated from MC-dropout tile means)
    and ``MC_Entropy``, the entropy (nats) of those probabilities renormalised to sum to one."""
    keys = [c for c in frame.columns if str(c).startswith("Metadata_") and c in stochastic.columns]
    if not frame[keys].reset_index(drop=True).equals(stochastic[keys].reset_index(drop=True)):
        raise CellmorphError("internal: MC-dropout rows do not line up with the deterministic ones")
    mean = stochastic[[prob_column(c) for c in classes]].to_numpy(float)
    for i, c in enumerate(classes):
        frame[MC_PREFIX + c] = mean[:, i]
    p = mean / np.clip(mean.sum(axis=1, keepdims=True), 1e-12, None)
    frame[MC_ENTROPY_COLUMN] = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)


def _metadata_first(frame: pd.DataFrame) -> pd.DataFrame:
    meta = [c for c in frame.columns if str(c).startswith("Metadata_")]
    return frame[meta + [c for c in frame.columns if c not in meta]]


# Settings a screen may prepare differently from the training cache: which images are kept,
# and which DMSO fields (the plate's own, or its batch's) give the z-score. A tuple, not a set:
# settings such as tile_grid are lists, which a set membership test cannot hash.
_FREE_SETTINGS = ("skip_bad", "include_controls")
_DMSO_NORMALISATIONS = ("plate", "batch")


def _require_recipe(bundle) -> None:
    """A bundle saved without its training cache's recipe cannot prepare or check a screen."""
    from cellmorph.bundle import MANIFEST

    absent = [key for key in ("channels", "config") if not isinstance(bundle.recipe.get(key), (list, dict))]
    if absent:
        raise CellmorphError(f"{bundle.root / MANIFEST}: preprocessing.{absent[0]}: missing; predict needs "
                             "the training cache's recipe, which `cellmorph train` records")


def _check_channels(where, given: list[str], named, recipe: dict) -> None:
    """The screen's channels (with any zero padding, ``given``) must be the training cache's."""
    if given != list(recipe["channels"]):
        raise CellmorphError(f"{where}: channels {list(named)} differ from the model's "
                             f"{list(recipe['channels'])} (number, names and order must match)")


def _check_recipe(bundle, cache) -> None:
    """The screen must be prepared as the training cache was (channels, normalisation, scaling, tiles)."""
    recipe = bundle.recipe
    _check_channels(cache.root, list(cache.channels), cache.channels, recipe)
    ours, theirs = cache.manifest.get("config", {}), recipe.get("config", {})
    differ = sorted(k for k in set(ours) | set(theirs) if k not in _FREE_SETTINGS and ours.get(k) != theirs.get(k)
                    and not (ours.get(k) in _DMSO_NORMALISATIONS and theirs.get(k) in _DMSO_NORMALISATIONS))
    if differ:
        named = [f"{k}{f' ({PREPARE_OPTIONS[k]})' if k in PREPARE_OPTIONS else ''} {ours.get(k)!r} here, "
                 f"{theirs.get(k)!r} for the model" for k in differ]
        raise CellmorphError(f"{cache.root}: prepared with other settings than the model's training cache: "
                             f"{'; '.join(named)}; prepare the screen with the model's settings, or give its "
                             f"images ({option('layout')}) and predict prepares them so")


def _novelty_summary(treatments: pd.DataFrame) -> dict | None:
    """How the Novel flag was set (score, false-alarm rate, threshold, calibration size) and which treatments it
    flagged; where labels say, how often it flagged labelled treatments of new and of training compounds."""
    from cellmorph.novelty import NOVEL_COLUMN

    if NOVEL_COLUMN not in treatments.columns:
        return None
    novel = treatments[NOVEL_COLUMN].to_numpy(bool)
    flagged = treatments.loc[novel, ["Metadata_Compound", "Metadata_Concentration"]]
    out = dict(treatments.attrs.get("novelty", {})) | {
        "n_novel_treatments": int(novel.sum()),
        "novel_treatments": [f"{c} at {v:g}" for c, v in zip(flagged["Metadata_Compound"],
                                                             flagged["Metadata_Concentration"].astype(float))]}
    if IN_TRAINING_COLUMN in treatments.columns:
        seen = treatments[IN_TRAINING_COLUMN].to_numpy(bool)
        for name, rows in (("new_compounds", ~seen), ("training_compounds", seen)):
            if rows.any():
                out[f"flagged_fraction_{name}"] = float(novel[rows].mean())
    return out


def _summary(treatments, wells, tiles, classes, members, alpha) -> dict:
    summary = {"alpha": alpha, "n_treatments": int(len(treatments)), "n_wells": int(len(wells)),
               "n_tiles": int(len(tiles)), "mean_set_size": float(members.sum(axis=1).mean()),
               "n_empty_sets": int((members.sum(axis=1) == 0).sum())}
    known = treatments[TRUE_COLUMN].astype(str).isin(classes) if TRUE_COLUMN in treatments.columns else None
    if known is None or not known.any():
        return summary
    known = known.to_numpy()
    summary.update(_scores(treatments, members, classes, known))
    if IN_TRAINING_COLUMN in treatments.columns:
        seen = treatments[IN_TRAINING_COLUMN].to_numpy(bool)
        summary["new_compounds"] = _scores(treatments, members, classes, known & ~seen)
        summary["training_compounds"] = _scores(treatments, members, classes, known & seen)
    return summary


def _scores(treatments: pd.DataFrame, members: np.ndarray, classes: list[str], rows: np.ndarray) -> dict:
    """Accuracy and set coverage over the labelled treatments ``rows`` (a boolean mask)."""
    if not rows.any():
        return {"n_labelled_treatments": 0}
    labelled = treatments[rows]
    truth = labelled[TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
    return {
        "n_labelled_treatments": int(rows.sum()),
        "treatment_accuracy": float((labelled[PREDICTED_COLUMN].astype(str) == labelled[TRUE_COLUMN].astype(str)).mean()),
        "coverage": float(members[rows][np.arange(len(truth)), truth].mean()),
    }
