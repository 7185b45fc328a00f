"""Novelty: how unlike every known MoA a well or treatment is, and a flag with a controlled false-alarm rate.

``Novelty_Score`` is, for a bundle holding the crop probe (its centroid head), a cosine distance of the well's or
treatment's mean standardised profile to the nearest known MoA's centroid, seen from two origins: the screen's
average training cell (the standardisation's centre) and, where the training data had negative controls (DMSO), the
controls' mean profile (:class:`ControlOrigin`); the score is the larger of the two distances. A treatment is novel
when, as a change from the untreated cell or from the average cell, it points towards no known MoA. On the real
development set, leave one MoA out, the two origins fail on different MoAs, and the larger distance separated
unseen-MoA treatments from new compounds of known MoAs best: AUROC 0.75, against 0.70 from the average cell alone
and 0.65 for one minus the call's probability; at the calibrated threshold for 10 % false alarms (measured 9.9 %)
it flagged 20 of the 56 unseen-MoA treatments, as many as the average cell's distance and 5 times as many as the
call's probability (benchmarks/RESULTS.md, 'Novelty scores' and 'Seen from the controls'). A bundle without such a
probe scores one minus the call's probability.

A treatment's score is, by default (``novelty_pool`` ``compound``), its *compound's*: the score of the mean of the
compound's treatments' profiles (:func:`level_profiles`; for a bundle without a probe, one minus the probability of
the compound's call from its treatments together), shared by its concentrations, and calibrated on the known
compounds' scores shared the same way (:func:`per_treatment`). A compound acts by one MoA at every concentration (as
BBBC021 annotates it), and a weak concentration that looks untreated alone inherits its strong ones' evidence. On the
development set, leave one MoA out, the pooled score reached AUROC 0.800 against 0.754 for each treatment alone
(better in 8 of the 12 held-out MoAs), and at α = 0.1 it flagged 31 of the 56 unseen-MoA treatments against 20, at
10.9 % measured false alarms against 9.9 % (benchmarks/RESULTS.md, 'Each treatment scored by its compound'). A
compound tested at one concentration is scored as before; ``novelty_pool: treatment`` scores every treatment alone
(for screens whose compounds act differently at different doses).

``Novel`` compares the score with a conformal threshold from scores of compounds of *known* MoAs that the scoring
model never saw (:func:`novelty_threshold`): if a new compound of a known MoA is exchangeable with those compounds,
it is flagged with probability at most ``alpha``. That is all the flag promises: it says nothing of how often an
unseen MoA is flagged (measured, not promised), and a screen unlike the training screens (another cell line, other
staining) breaks the exchangeability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellmorph.schema import COMPOUND_KEYS, TREATMENT_KEYS, WELL_KEYS

NOVELTY_COLUMN = "Novelty_Score"
NOVEL_COLUMN = "Novel"
CENTROID_DISTANCE = "centroid distance"
CONTROL_CENTROID_DISTANCE = "centroid distance, from the average cell and from the controls"
ONE_MINUS_PROBABILITY = "1 - max probability"
LEVEL_KEYS = {"wells": WELL_KEYS, "treatments": TREATMENT_KEYS, "compounds": COMPOUND_KEYS}
DEFAULT_NOVELTY_POOL = "compound"  # a treatment scored by its compound's score ("treatment": by its own profile alone)


def per_treatment(treatments: pd.DataFrame, compounds: pd.DataFrame) -> np.ndarray:
    """Each row of ``treatments`` given its compound's ``Novelty_Score`` (from ``compounds``, one row per compound):
    the treatment-level score under ``novelty_pool: compound``, for the screen's treatments and for the calibration
    treatments alike. NaN for a treatment whose compound ``compounds`` does not hold."""
    (key,) = COMPOUND_KEYS
    by_compound = compounds.set_index(compounds[key].astype(str))[NOVELTY_COLUMN]
    return by_compound.reindex(treatments[key].astype(str)).to_numpy(float)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class ControlOrigin:
    """The negative controls in a centroid head's standardised space: their mean ``profile`` (d,), and the known
    MoAs' ``centroids`` seen from it (k, d): unit vectors from that profile towards each MoA's mean profile."""

    profile: np.ndarray
    centroids: np.ndarray

    @classmethod
    def fit(cls, control_profiles: np.ndarray, class_means: np.ndarray) -> "ControlOrigin":
        """From the control tiles' standardised profiles and the MoAs' (not unit) mean profiles."""
        profile = np.asarray(control_profiles, float).mean(axis=0)
        return cls(profile, _unit_rows(np.asarray(class_means, float) - profile))

    def state(self) -> dict:
        """The tensors a bundle saves beside the probe's head (float64, as the head)."""
        import torch

        return {"control_profile": torch.from_numpy(np.array(self.profile, np.float64, copy=True)),
                "control_centroids": torch.from_numpy(np.array(self.centroids, np.float64, copy=True))}

    @classmethod
    def from_state(cls, state: dict) -> "ControlOrigin":
        return cls(state["control_profile"].double().numpy(), state["control_centroids"].double().numpy())

    def problem(self, n_centroids: int, dim: int) -> str | None:
        """Why this is not the control origin of a head of ``n_centroids`` centroids on ``dim``-long profiles."""
        if self.profile.shape != (dim,) or self.centroids.shape != (n_centroids, dim):
            return (f"control_profile {self.profile.shape} and control_centroids {self.centroids.shape} do not fit "
                    f"a head of {n_centroids} centroids on {dim}-long profiles")
        if not (np.isfinite(self.profile).all() and np.isfinite(self.centroids).all()):
            return "control_profile or control_centroids holds a value that is not finite"
        return None


def centroid_distance(profiles: np.ndarray, centroids: np.ndarray, control: ControlOrigin | None = None) -> np.ndarray:
    """1 − the largest cosine between each (standardised, mean) profile and the unit ``centroids``; with a
    ``control`` origin, the larger of that and the same distance measured from the controls' profile."""
    profiles = np.asarray(profiles, float)
    distance = 1.0 - (_unit_rows(profiles) @ np.asarray(centroids, float).T).max(axis=1)
    if control is None:
        return distance
    return np.maximum(distance, centroid_distance(profiles - control.profile, control.centroids))


def one_minus_max_probability(probabilities: np.ndarray) -> np.ndarray:
    """1 − the call's probability, per row of class ``probabilities``: the score of a model without a probe."""
    return 1.0 - np.asarray(probabilities, float).max(axis=1)


def level_profiles(index: pd.DataFrame, z: np.ndarray, level: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(the level's keys, one row per well, treatment or compound, sorted; their mean profiles) of tile profiles
    ``z``. A compound's profile is the mean of its treatments' (each concentration alike), as
    :func:`cellmorph.metrics.aggregate_compounds` calls a compound: pooled so, the score of an unseen MoA's compounds
    separated them from new compounds of known MoAs better than their treatments' own scores (benchmarks/RESULTS.md,
    'A compound's treatments together')."""
    if level == "compounds":
        keys, profiles = level_profiles(index, z, "treatments")
        grouped = pd.DataFrame(profiles).groupby([keys[k] for k in COMPOUND_KEYS], sort=True, dropna=False)
        means = grouped.mean()
        return means.index.to_frame(index=False), means.to_numpy()
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
