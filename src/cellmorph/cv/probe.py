"""The linear probe: a head per fold on frozen-backbone embeddings, of one of two kinds.

* ``logistic``: a logistic regression on the training cells. Its regularisation C is chosen inside
  each fold (``probe_c: nested``, the default): an inner group-kfold over the fold's training
  compounds scores every C of :data:`PROBE_C_GRID`, so no held-out compound has a say in its own
  prediction. scikit-learn's C = 1 fitted the ~1,300 training cells of the real development set far
  too closely (benchmarks/RESULTS.md).
* ``centroid`` (:class:`CentroidHead`): each MoA is the mean profile of its training compounds, each
  compound the mean of its treatments, each treatment the mean of its standardised cells, and a cell's
  logit for a MoA is its profile's dot product with that MoA's unit centroid. Aggregated with
  ``logmean``, a treatment's call is the MoA whose centroid is nearest in cosine to the treatment's
  mean profile: profile-based MoA classification as the profiling field does it (nearest neighbours of
  mean profiles, Ljosa et al. 2013), with every compound weighed alike so that a plate's positive
  control (taxol: over half of the development set's cells) does not become its MoA. Its temperature
  only scales the probabilities, never moves a call, and is chosen like a nested C.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from cellmorph.cv.features import ProbeFeatures
from cellmorph.cv.splits import Fold, make_folds, subsample_rows
from cellmorph.errors import CellmorphError
from cellmorph.models.heads import LinearProbeHead, fit_probe_head
from cellmorph.novelty import ControlOrigin
from cellmorph.schema import CONTROL_COLUMN, TREATMENT_KEYS

# Spaced by about √10: the measured treatment accuracy changes little within such a step.
PROBE_C_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
INNER_FOLDS = 4


def treatment_balanced_log_loss(probs: np.ndarray, targets: np.ndarray, treatments: np.ndarray) -> float:
    """Mean over treatments of their tiles' mean log-loss: a plate's positive control (taxol holds
    over half of the development set's cells) weighs as much as any other treatment."""
    picked = np.clip(probs[np.arange(len(targets)), targets], 1e-15, 1.0)
    return float(pd.Series(-np.log(picked)).groupby(treatments).mean().mean())


def choose_probe_c(x: np.ndarray, y: np.ndarray, index: pd.DataFrame, class_weighting: bool, seed: int,
                   grid=PROBE_C_GRID, inner_folds: int = INNER_FOLDS) -> tuple[float, dict]:
    """The C of ``grid`` with the lowest treatment-balanced log-loss on compounds held out by an inner
    group-kfold over the compounds of ``index`` (the training rows' metadata, one row per row of
    ``x``), and a record of the choice. A MoA's only compound stays in every inner training set,
    unscored; an inner fold whose test MoA has no other compound is skipped."""
    frame, folds = _inner_folds(index, seed, inner_folds)
    if not folds:
        return float(grid[0]), {"C": float(grid[0]), "reason": "too few compounds for an inner split", "scores": {}}

    def probabilities(fold: Fold, c: float) -> tuple[np.ndarray, np.ndarray]:
        head, scaler = fit_probe_head(x[fold.train], y[fold.train], class_weighting, seed, c)
        return head.classes_, head.predict_proba(scaler.transform(x[fold.test]))

    scores = _inner_losses(folds, y, treatment_ids(frame), grid, probabilities)
    best = min(scores, key=lambda c: (scores[c], -c))  # ties: the weaker regularisation
    return best, {"C": best, "inner_folds": len(folds), "scores": {str(c): round(v, 4) for c, v in scores.items()}}


def treatment_ids(index: pd.DataFrame) -> np.ndarray:
    """One string per row naming its treatment (compound and concentration)."""
    return index[TREATMENT_KEYS].astype(str).agg("|".join, axis=1).to_numpy()


def _inner_losses(folds: list[Fold], y: np.ndarray, treatments: np.ndarray, grid,
                  probabilities) -> dict[float, float]:
    """Each value of ``grid``: the treatment-balanced log-loss of ``probabilities(fold, value)`` (the classes
    it scores, and their probabilities for ``fold.test``) on every inner fold, weighted by the fold's
    treatments. The inner selection of both heads: C for the logistic, the temperature for the centroid."""
    scores = {}
    for value in grid:
        losses, weights = [], []
        for fold in folds:
            classes, scored = probabilities(fold, value)
            probs = np.zeros((len(fold.test), int(y.max()) + 1))
            probs[:, classes] = scored
            losses.append(treatment_balanced_log_loss(probs, y[fold.test], treatments[fold.test]))
            weights.append(len(set(treatments[fold.test])))
        scores[float(value)] = float(np.average(losses, weights=weights))
    return scores


# Temperatures of the centroid head's logits (a standardised profile's dot product with a unit centroid,
# a few units apart between MoAs), spaced by about √10 as the C grid.
CENTROID_TEMPERATURE_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class CentroidHead:
    """Nearest-centroid head: ``classes_`` (class indices with training cells), their unit-length
    centroids in the standardised feature space, the standardisation and the logits' temperature; and, where
    it was fitted with control tiles, the MoAs seen from the controls (for the novelty score only)."""

    classes_: np.ndarray
    centroids: np.ndarray
    mean_: np.ndarray
    scale_: np.ndarray
    temperature: float = 1.0
    control: ControlOrigin | None = None

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, index: pd.DataFrame, temperature: float = 1.0,
            controls: np.ndarray | None = None) -> "CentroidHead":
        """Centroids of the training rows ``x`` (labels ``y``, metadata ``index`` row for row): treatment →
        compound → class means of the cells standardised by the training rows' mean and spread. ``controls``:
        embeddings of negative-control tiles (not a class), whose mean profile is the :class:`ControlOrigin`."""
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)  # a constant feature carries nothing: leave it at 0
        z = (x - mean) / scale
        frame = index.reset_index(drop=True)
        treatment = treatment_ids(frame)
        profiles = pd.DataFrame(z).groupby(treatment, sort=True).mean()
        owner = pd.DataFrame({"compound": frame["Metadata_Compound"].astype(str).to_numpy(), "y": y},
                             index=treatment).groupby(level=0, sort=True).first().loc[profiles.index]
        compounds = profiles.groupby(owner["compound"].to_numpy(), sort=True).mean()
        compound_class = owner.groupby("compound", sort=True)["y"].first().loc[compounds.index]
        centroids = compounds.groupby(compound_class.to_numpy(), sort=True).mean()
        vectors = centroids.to_numpy()
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        control = None if controls is None or len(controls) == 0 else \
            ControlOrigin.fit((np.asarray(controls, float) - mean) / scale, vectors)
        return cls(centroids.index.to_numpy(dtype=np.int64), vectors / np.where(norms > 0, norms, 1.0),
                   mean, scale, float(temperature), control)

    def with_temperature(self, temperature: float) -> "CentroidHead":
        return replace(self, temperature=float(temperature))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, classes_) dot products of the standardised rows with the unit centroids: linear in the
        profile, so their mean over a treatment's cells is the logit of its mean profile."""
        return ((x - self.mean_) / self.scale_) @ self.centroids.T

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        return softmax(self.logits(x) / self.temperature, axis=1)


def choose_centroid_temperature(x: np.ndarray, y: np.ndarray, index: pd.DataFrame, seed: int,
                                grid=CENTROID_TEMPERATURE_GRID,
                                inner_folds: int = INNER_FOLDS) -> tuple[float, dict]:
    """The temperature of ``grid`` with the lowest treatment-balanced log-loss on compounds held out by an
    inner group-kfold over the training compounds (as :func:`choose_probe_c`; the calls never change)."""
    frame, folds = _inner_folds(index, seed, inner_folds)
    if not folds:
        return 1.0, {"temperature": 1.0, "reason": "too few compounds for an inner split", "scores": {}}
    # the centroids do not depend on the temperature: fitted once per inner fold
    heads = {fold.index: CentroidHead.fit(x[fold.train], y[fold.train], frame.iloc[fold.train]) for fold in folds}

    def probabilities(fold: Fold, t: float) -> tuple[np.ndarray, np.ndarray]:
        head = heads[fold.index]
        return head.classes_, head.with_temperature(t).predict_proba(x[fold.test])

    scores = _inner_losses(folds, y, treatment_ids(frame), grid, probabilities)
    best = min(scores, key=lambda t: (scores[t], t))  # ties: the sharper
    return best, {"temperature": best, "inner_folds": len(folds),
                  "scores": {str(t): round(v, 4) for t, v in scores.items()}}


def _inner_folds(index: pd.DataFrame, seed: int, inner_folds: int) -> tuple[pd.DataFrame, list[Fold]]:
    """The training rows' metadata (controls counted as classes, since they were given as rows) and its
    inner group-kfold folds; none where the compounds are too few to hold any out."""
    frame = index.reset_index(drop=True).copy()
    frame[CONTROL_COLUMN] = False
    k = min(inner_folds, frame["Metadata_Compound"].nunique())
    folds: list[Fold] = []
    if k >= 2:
        try:
            folds, _ = make_folds(frame, f"group-kfold:{k}", seed=seed, skip_untrainable=True)
        except CellmorphError:  # e.g. every compound is its MoA's only one: nothing to hold out
            folds = []
    return frame, folds


@dataclass(frozen=True)
class ProbeFit:
    """A probe head fitted on a fold's training rows: the rows used, the head as :class:`LinearProbeHead`
    (what a bundle saves), the fold's state in its checkpoint form, and what the fold chose for itself."""

    train_rows: np.ndarray
    head: LinearProbeHead
    state: dict
    choices: dict


def fit_probe(plan, fold: Fold, features: ProbeFeatures) -> ProbeFit:
    """The probe's head (``plan.config.probe_head``) on the embeddings of the fold's training rows, its
    hyperparameter (C or temperature) chosen by an inner split of those rows' compounds."""
    cfg, seeds, targets = plan.config, plan.seeds[fold.index], plan.targets
    train_rows = subsample_rows(fold.train, targets[fold.train], cfg.max_tiles_per_fold, seeds["subsample"])
    x_train, y_train = features.take(train_rows), targets[train_rows]
    index = plan.cache.index.iloc[train_rows]
    if cfg.probe_head == "centroid":
        temperature, choice = choose_centroid_temperature(x_train, y_train, index, seeds["init"])
        centroid = CentroidHead.fit(x_train, y_train, index, temperature)
        state = {
            "centroids": torch.from_numpy(centroid.centroids.astype(np.float32)),
            "classes_index": torch.from_numpy(centroid.classes_.astype(np.int64)),
            "scaler_mean": torch.from_numpy(centroid.mean_.astype(np.float32)),
            "scaler_scale": torch.from_numpy(centroid.scale_.astype(np.float32)),
            "temperature": torch.tensor(centroid.temperature, dtype=torch.float64),
        }
        head = LinearProbeHead(centroid.centroids, np.zeros(len(centroid.classes_)), centroid.mean_, centroid.scale_,
                               centroid.temperature, centroid.classes_)
        return ProbeFit(train_rows, head, state, {"probe_temperature": temperature,
                                                  "probe_temperature_choice": choice})
    choice = {}
    c = cfg.probe_c  # resolved: a number, or nested (the probe's default)
    if c == "nested":
        c, choice = choose_probe_c(x_train, y_train, index, cfg.class_weighting, seeds["init"])
    logistic, scaler = fit_probe_head(x_train, y_train, cfg.class_weighting, seeds["init"], c)
    state = {
        "coef": torch.from_numpy(logistic.coef_.astype(np.float32)),
        "intercept": torch.from_numpy(logistic.intercept_.astype(np.float32)),
        "classes_index": torch.from_numpy(logistic.classes_.astype(np.int64)),
        "scaler_mean": torch.from_numpy(scaler.mean_.astype(np.float32)),
        "scaler_scale": torch.from_numpy(scaler.scale_.astype(np.float32)),
    }
    return ProbeFit(train_rows, LinearProbeHead.from_logistic(logistic, scaler), state,
                    {"probe_c": float(c)} | ({"probe_c_choice": choice} if choice else {}))


def run_probe_fold(plan, fold: Fold, features: ProbeFeatures):
    """The probe's head on the fold's training embeddings; its held-out probabilities."""
    from cellmorph.cv.run import TrainedFold

    fit = fit_probe(plan, fold, features)
    probs = fit.head.predict_proba(features.take(fold.test), len(plan.classes))
    return TrainedFold(fit.train_rows, probs, [], fit.state, {}, fit.choices)


def held_out_novelty(x: np.ndarray, y: np.ndarray, index: pd.DataFrame,
                     controls: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """Novelty scores of the training compounds as new compounds of known MoAs, for the ``Novel`` flag's
    threshold: each compound's wells, treatments and the compound itself scored
    (:func:`cellmorph.novelty.centroid_distance`) by a centroid head fitted without that compound (its
    standardisation too; with the ``controls``' embeddings where given), so no compound informs its own score. A
    compound that is its MoA's only one is left out: without it its MoA is unseen, not known. Per level
    (``wells``, ``treatments``, ``compounds``): the level's keys, ``Metadata_Compound`` and ``Novelty_Score``."""
    frame = index.reset_index(drop=True)
    compounds = frame["Metadata_Compound"].astype(str).to_numpy()
    parts: dict[str, list[pd.DataFrame]] = {"wells": [], "treatments": [], "compounds": []}
    for compound in sorted(set(compounds)):
        out = compounds == compound
        if len(set(y[~out])) < len(set(y)):
            continue
        head = CentroidHead.fit(x[~out], y[~out], frame[~out], controls=controls)
        for level in parts:
            parts[level].append(centroid_novelty(head, x[out], frame[out], level).assign(Metadata_Compound=compound))
    return {level: pd.concat(p, ignore_index=True) for level, p in parts.items() if p}


def centroid_novelty(head: CentroidHead, x: np.ndarray, index: pd.DataFrame, level: str) -> pd.DataFrame:
    """The level's keys (one row per well or treatment of ``index``) and their ``Novelty_Score``: the cosine
    distance of their mean profile, standardised as ``head`` standardises, to its nearest centroid (seen from the
    average training cell and, where the head has them, from the controls)."""
    from cellmorph.novelty import NOVELTY_COLUMN, centroid_distance, level_profiles

    keys, profiles = level_profiles(index, (x - head.mean_) / head.scale_, level)
    return keys.assign(**{NOVELTY_COLUMN: centroid_distance(profiles, head.centroids, head.control)})
