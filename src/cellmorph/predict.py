"""Apply a model bundle to a prepared screen: calls, confidence and conformal prediction sets.

::

    from cellmorph.predict import PredictConfig, predict
    summary = predict("MODEL", "CACHE", "PRED", PredictConfig(alpha=0.1))

Per tile, well and treatment: ``prob_<class>``, the call (``Predicted_MoA``) and its
``Confidence`` (the call's median probability). Per treatment, a conformal prediction set
at level 1 − ``alpha`` from the bundle's out-of-fold calibration scores (crepes, hinge
non-conformity, no smoothing, so sets are deterministic and conservative): every MoA
that fits at that level. An empty set says no known MoA fits, which is what a compound
with a new mechanism should produce. No labels are needed; where the screen carries known
MoAs, accuracy and the empirical coverage of the sets are reported too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from cellmorph.errors import CellmorphError
from cellmorph.schema import CONTROL_COLUMN, PREDICTED_COLUMN, TRUE_COLUMN, prob_column

CONFIDENCE_COLUMN = "Confidence"
SET_COLUMN = "Prediction_Set"
SET_SIZE_COLUMN = "Set_Size"
EMPTY_SET_COLUMN = "Empty_Set"
SET_SEPARATOR = "|"


class PredictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="conformal error level: sets cover the true MoA of "
                         "a treatment like the calibration ones with probability ≥ 1 − alpha")
    batch_size: int = Field(64, ge=1, description="tiles per forward pass")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: see cellmorph.runtime)")


def conformal_sets(calibration: pd.DataFrame, probs: np.ndarray, classes: list[str], alpha: float) -> np.ndarray:
    """Boolean (n, classes) membership of each row's prediction set at level 1 − ``alpha``.

    ``calibration`` holds out-of-fold ``prob_<class>`` and the true ``Metadata_MoA`` of
    treatments the scoring models never saw.
    """
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    labelled = calibration[calibration[TRUE_COLUMN].astype(str).isin(classes)]
    if len(labelled) == 0:
        raise CellmorphError("the model bundle's calibration scores hold no treatment of a known class")
    cal_probs = labelled[[prob_column(c) for c in classes]].to_numpy(dtype=float)
    cal_alphas = hinge(cal_probs, np.array(classes, dtype=object), labelled[TRUE_COLUMN].astype(str).to_numpy())
    conformal = ConformalClassifier().fit(cal_alphas)
    return conformal.predict_set(hinge(probs), confidence=1.0 - alpha, smoothing=False).astype(bool)


def held_out_coverage(scores: pd.DataFrame, classes: list[str], alpha: float,
                      group: str = "Metadata_Compound") -> dict:
    """Coverage of the sets of each compound's treatments, calibrated on the other compounds' scores.

    ``scores`` are out-of-fold treatment probabilities (a CV's ``treatments.csv``). Each compound
    is treated as new in turn, as ``predict`` treats a compound the model never saw.
    """
    labelled = scores[scores[TRUE_COLUMN].astype(str).isin(classes)].reset_index(drop=True)
    columns = [prob_column(c) for c in classes]
    covered, sizes = [], []
    for _, held in labelled.groupby(group, sort=True):
        rest = labelled.drop(index=held.index)
        members = conformal_sets(rest, held[columns].to_numpy(float), classes, alpha)
        truth = held[TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
        covered.extend(members[np.arange(len(truth)), truth])
        sizes.extend(members.sum(axis=1))
    return {"alpha": alpha, "coverage": float(np.mean(covered)), "mean_set_size": float(np.mean(sizes)),
            "n_treatments": len(covered)}


def add_sets(frame: pd.DataFrame, members: np.ndarray, classes: list[str]) -> None:
    """The set columns of ``frame`` from boolean (rows, classes) membership."""
    names = np.array(classes, dtype=object)
    frame[SET_COLUMN] = [SET_SEPARATOR.join(names[m]) for m in members]
    frame[SET_SIZE_COLUMN] = members.sum(axis=1)
    frame[EMPTY_SET_COLUMN] = frame[SET_SIZE_COLUMN] == 0


def add_confidence(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    frame[CONFIDENCE_COLUMN] = frame[[prob_column(c) for c in classes]].max(axis=1)
    return frame


def predict(model: Path, data: Path, out: Path, config: PredictConfig | None = None, progress: bool = True) -> dict:
    """Score every tile of cache ``data`` with the bundle ``model``; write tables into ``out``."""
    import torch

    from cellmorph.bundle import load_bundle
    from cellmorph.cache import TileCache
    from cellmorph.cv.rundir import predictions_frame
    from cellmorph.datasets import InputPipeline
    from cellmorph.metrics import aggregate
    from cellmorph.runinfo import atomic_path, require_output_dir, run_info, write_csv, write_json
    from cellmorph.runtime import torch_threads
    from cellmorph.train import PredictSettings, predict_tiles

    config = config or PredictConfig()
    out = require_output_dir(Path(out), "prediction folder")
    bundle = load_bundle(model)
    if not bundle.calibration:
        raise CellmorphError(f"{model}: the bundle holds no calibration scores; train it with --calibration loco")
    cache = TileCache(data)
    _check_recipe(bundle, cache)
    classes = bundle.classes
    index = cache.index
    rows = np.flatnonzero(~index[CONTROL_COLUMN].astype(bool).to_numpy() | ("DMSO" in classes))
    if len(rows) == 0:
        raise CellmorphError(f"{data}: no treated tiles to predict")
    tta = bundle.manifest["training"]["config"].get("tta", "none")
    with torch_threads(config.threads):
        probs = predict_tiles(bundle.network(), InputPipeline.from_spec(bundle.input), cache, rows,
                              PredictSettings(batch_size=config.batch_size, tta=tta), torch.device("cpu"))
    tiles = predictions_frame(cache, rows, probs, classes, fold=-1).drop(columns=["Metadata_Fold"])
    levels = dict(zip(("tiles", "wells", "treatments"), (add_confidence(f, classes) for f in aggregate(tiles))))
    sets = {}
    for level, frame in levels.items():
        if level in bundle.calibration:  # each level calibrated by out-of-fold scores of its own kind
            sets[level] = conformal_sets(bundle.calibration[level],
                                         frame[[prob_column(c) for c in classes]].to_numpy(float), classes, config.alpha)
            add_sets(frame, sets[level], classes)
    tiles, wells, treatments = levels["tiles"], levels["wells"], levels["treatments"]
    summary = _summary(treatments, wells, tiles, classes, sets["treatments"], config.alpha)
    for name, frame in (("tiles", tiles), ("wells", wells), ("treatments", treatments)):
        with atomic_path(out / f"{name}.parquet") as tmp:
            _metadata_first(frame).to_parquet(tmp, index=False)
    write_csv(out / "treatments.csv", _metadata_first(treatments))
    write_json(out / "summary.json", summary | {"model": str(Path(model).resolve()), "data": str(Path(data).resolve()),
                                                 "config": config.model_dump(), "provenance": run_info()})
    return summary


def _metadata_first(frame: pd.DataFrame) -> pd.DataFrame:
    meta = [c for c in frame.columns if str(c).startswith("Metadata_")]
    return frame[meta + [c for c in frame.columns if c not in meta]]


def _check_recipe(bundle, cache) -> None:
    """The screen must be prepared as the training cache was (channels, normalisation, scaling, tiles)."""
    recipe = bundle.recipe
    if list(cache.channels) != list(recipe["channels"]):
        raise CellmorphError(f"{cache.root}: channels {list(cache.channels)} differ from the model's "
                             f"{list(recipe['channels'])} (number, names and order must match)")
    ours, theirs = cache.manifest.get("config", {}), recipe.get("config", {})
    differ = sorted(k for k in set(ours) | set(theirs) if k != "skip_bad" and ours.get(k) != theirs.get(k))
    if differ:
        raise CellmorphError(f"{cache.root}: prepared with other settings than the model's training cache "
                             f"({', '.join(f'{k}={ours.get(k)!r} vs {theirs.get(k)!r}' for k in differ)})")


def _summary(treatments, wells, tiles, classes, members, alpha) -> dict:
    summary = {"alpha": alpha, "n_treatments": int(len(treatments)), "n_wells": int(len(wells)),
               "n_tiles": int(len(tiles)), "mean_set_size": float(members.sum(axis=1).mean()),
               "n_empty_sets": int((members.sum(axis=1) == 0).sum())}
    known = treatments[TRUE_COLUMN].astype(str).isin(classes) if TRUE_COLUMN in treatments.columns else None
    if known is not None and known.any():
        truth = treatments.loc[known, TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
        summary.update({
            "n_labelled_treatments": int(known.sum()),
            "treatment_accuracy": float((treatments.loc[known, PREDICTED_COLUMN].astype(str)
                                         == treatments.loc[known, TRUE_COLUMN].astype(str)).mean()),
            "coverage": float(members[known.to_numpy()][np.arange(len(truth)), truth].mean()),
        })
    return summary
