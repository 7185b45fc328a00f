"""The linear probe: a logistic-regression head per fold on frozen-backbone embeddings.

Its regularisation C is chosen inside each fold (``probe_c: nested``, the default): an inner
group-kfold over the fold's training compounds scores every C of :data:`PROBE_C_GRID`, so no
held-out compound has a say in its own prediction. scikit-learn's C = 1 fitted the ~1,300
training cells of the real development set far too closely (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from cellmorph.cv.features import ProbeFeatures
from cellmorph.cv.splits import Fold, make_folds, subsample_rows
from cellmorph.errors import CellmorphError
from cellmorph.schema import CONTROL_COLUMN, TREATMENT_KEYS

# Spaced by about √10: the measured treatment accuracy changes little within such a step.
PROBE_C_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
INNER_FOLDS = 4


def fit_probe_head(x_train: np.ndarray, y_train: np.ndarray, class_weighting: bool, seed: int, c: float = 1.0):
    """(logistic regression, scaler) fitted on the training rows only (standardised inside the fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these (n × 1280) problems are too small to share, and multi-threaded
    # BLAS spin-waits made each fold ~9× slower beside other work (benchmarks/RESULTS.md).
    with threadpool_limits(limits=1):
        scaler = StandardScaler().fit(x_train)
        head = LogisticRegression(
            C=float(c), max_iter=2000, class_weight="balanced" if class_weighting else None, random_state=seed
        ).fit(scaler.transform(x_train), y_train)
    return head, scaler


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
    frame = index.reset_index(drop=True).copy()
    frame[CONTROL_COLUMN] = False  # the rows given are the probe's classes, controls included if asked
    n_compounds = frame["Metadata_Compound"].nunique()
    k = min(inner_folds, n_compounds)
    folds = []
    if k >= 2:
        try:
            folds, _ = make_folds(frame, f"group-kfold:{k}", seed=seed, skip_untrainable=True)
        except CellmorphError:  # e.g. every compound is its MoA's only one: nothing to hold out
            folds = []
    if not folds:
        return float(grid[0]), {"C": float(grid[0]), "reason": "too few compounds for an inner split", "scores": {}}
    treatments = frame[TREATMENT_KEYS].astype(str).agg("|".join, axis=1).to_numpy()
    scores = {}
    for c in grid:
        losses, weights = [], []
        for fold in folds:
            head, scaler = fit_probe_head(x[fold.train], y[fold.train], class_weighting, seed, c)
            probs = np.zeros((len(fold.test), int(y.max()) + 1))
            probs[:, head.classes_] = head.predict_proba(scaler.transform(x[fold.test]))
            losses.append(treatment_balanced_log_loss(probs, y[fold.test], treatments[fold.test]))
            weights.append(len(set(treatments[fold.test])))
        scores[float(c)] = float(np.average(losses, weights=weights))
    best = min(scores, key=lambda c: (scores[c], -c))  # ties: the weaker regularisation
    return best, {"C": best, "inner_folds": len(folds), "scores": {str(c): round(v, 4) for c, v in scores.items()}}


def run_probe_fold(plan, fold: Fold, features: ProbeFeatures):
    """A logistic-regression head on the fold's training embeddings; its held-out probabilities."""
    from cellmorph.cv.run import TrainedFold

    cfg, seeds, targets = plan.config, plan.seeds[fold.index], plan.targets
    train_rows = subsample_rows(fold.train, targets[fold.train], cfg.max_tiles_per_fold, seeds["subsample"])
    x_train, y_train = features.take(train_rows), targets[train_rows]
    choice = {}
    c = cfg.probe_c  # resolved: a number, or nested (the probe's default)
    if c == "nested":
        c, choice = choose_probe_c(x_train, y_train, plan.cache.index.iloc[train_rows], cfg.class_weighting,
                                   seeds["init"])
    head, scaler = fit_probe_head(x_train, y_train, cfg.class_weighting, seeds["init"], c)
    probs = np.zeros((len(fold.test), len(plan.classes)), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(scaler.transform(features.take(fold.test)))
    state = {
        "coef": torch.from_numpy(head.coef_.astype(np.float32)),
        "intercept": torch.from_numpy(head.intercept_.astype(np.float32)),
        "classes_index": torch.from_numpy(head.classes_.astype(np.int64)),
        "scaler_mean": torch.from_numpy(scaler.mean_.astype(np.float32)),
        "scaler_scale": torch.from_numpy(scaler.scale_.astype(np.float32)),
    }
    return TrainedFold(train_rows, probs, [], state, {}, {"probe_c": float(c)} | ({"probe_c_choice": choice}
                                                                                  if choice else {}))
