"""Novelty: how unlike every known MoA a well or treatment is, and a flag with a controlled false-alarm rate.

``Novelty_Score`` is, for a bundle holding the crop probe (its centroid head), the cosine distance of the well's or
treatment's mean standardised profile to the nearest known MoA's centroid: on the real development set, leave one
MoA out, it separated treatments of an unseen MoA from new compounds of known MoAs better than the five other scores
measured (AUROC 0.70, 37.5 % flagged at 10 % false alarms, against 0.65 and 16 % for one minus the call's
probability; benchmarks/RESULTS.md, 'Novelty scores'). A bundle without such a probe scores one minus the call's
probability.

``Novel`` compares the score with a conformal threshold from scores of compounds of *known* MoAs that the scoring
model never saw (:func:`novelty_threshold`): if a new compound of a known MoA is exchangeable with those compounds,
it is flagged with probability at most ``alpha``. That is all the flag promises: it says nothing of how often an
unseen MoA is flagged (measured, not promised), and a screen unlike the training screens (another cell line, other
staining) breaks the exchangeability.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellmorph.schema import TREATMENT_KEYS, WELL_KEYS

NOVELTY_COLUMN = "Novelty_Score"
NOVEL_COLUMN = "Novel"
CENTROID_DISTANCE = "centroid distance"
ONE_MINUS_PROBABILITY = "1 - max probability"
LEVEL_KEYS = {"wells": WELL_KEYS, "treatments": TREATMENT_KEYS}


def centroid_distance(profiles: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """1 − the largest cosine between each (standardised, mean) profile and the unit ``centroids``."""
    norms = np.linalg.norm(profiles, axis=1)
    cosines = (profiles @ np.asarray(centroids, float).T) / np.where(norms > 0, norms, 1.0)[:, None]
    return 1.0 - cosines.max(axis=1)


def one_minus_max_probability(probabilities: np.ndarray) -> np.ndarray:
    """1 − the call's probability, per row of class ``probabilities``: the score of a model without a probe."""
    return 1.0 - np.asarray(probabilities, float).max(axis=1)


def level_profiles(index: pd.DataFrame, z: np.ndarray, level: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(the level's keys, one row per well or treatment, sorted; their mean profiles) of tile profiles ``z``."""
    keys = LEVEL_KEYS[level]
    frame = index[keys].reset_index(drop=True)
    grouped = pd.DataFrame(z).groupby([frame[k] for k in keys], sort=True, dropna=False)
    means = grouped.mean()
    return means.index.to_frame(index=False), means.to_numpy()


def novelty_threshold(calibration_scores: np.ndarray, alpha: float) -> float:
    """The conformal threshold: the ⌈(n + 1)(1 − α)⌉-th smallest of the ``n`` calibration scores (inf when n is too
    small to promise ``alpha``), so that a score exchangeable with them exceeds it with probability ≤ α."""
    scores = np.sort(np.asarray(calibration_scores, float))
    rank = int(np.ceil((len(scores) + 1) * (1.0 - alpha)))
    return float("inf") if rank > len(scores) else float(scores[rank - 1])


def add_novelty(frame: pd.DataFrame, scores: np.ndarray, threshold: float) -> None:
    """``Novelty_Score`` and ``Novel`` (the score above ``threshold``) on ``frame``, row for row."""
    frame[NOVELTY_COLUMN] = np.asarray(scores, float)
    frame[NOVEL_COLUMN] = frame[NOVELTY_COLUMN] > threshold
