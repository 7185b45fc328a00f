"""Calibration from out-of-fold scores: conformal prediction sets and a calibrated confidence.

Every function here takes *calibration scores*: ``prob_<class>`` and the true ``Metadata_MoA`` of
treatments (or wells, or tiles) scored by models that never saw their compound, i.e. the
out-of-fold predictions of a leave-one-compound-out (or group-k-fold) cross-validation.

* :func:`conformal_sets`: split-conformal prediction sets (crepes, hinge non-conformity, no
  smoothing): each set holds the true MoA with probability ≥ 1 − α for a treatment exchangeable
  with the calibration ones.
* :class:`TemperatureScaling`: one temperature T, fitted by maximum likelihood on the calibration
  scores (Guo et al., ICML 2017); ``p_k ∝ p_k^(1/T)``. The argmax, hence the call, is unchanged;
  the probability of the call becomes a calibrated confidence. The median aggregation of the paper
  leaves probabilities that do not sum to one; the scaling renormalises them.
* :func:`expected_calibration_error`, and the ``held_out_*`` measures, which treat each compound
  as new in turn: calibrate on the other compounds' scores, score this one.

A set is written as its class names joined by :data:`SET_SEPARATOR`, so no class name may hold it
(:func:`class_name_problem`, checked when a model is trained and when a bundle is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.schema import TRUE_COLUMN, prob_column

COMPOUND = "Metadata_Compound"
MIN_SCORES = 10  # calibration rows needed to fit a temperature
SET_SEPARATOR = "|"  # between the class names of a prediction set (Prediction_Set)


def class_name_problem(name: str) -> str | None:
    """What makes ``name`` unusable as a class name: empty, or holding :data:`SET_SEPARATOR`, which
    would make its prediction sets unreadable ("a|b" reads as two classes, and Set_Size disagrees)."""
    if not name.strip():
        return f"a class name is empty ({name!r})"
    if SET_SEPARATOR in name:
        return f"class {name!r} contains {SET_SEPARATOR!r}, which separates the classes of a prediction set"
    return None


def class_names_problem(classes: list[str]) -> str | None:
    """What makes ``classes`` unusable as a model's classes (None when nothing does): fewer than
    two, a repeated name, or one that :func:`class_name_problem` refuses."""
    if len(classes) < 2:
        return f"a classifier needs at least 2 classes, got {list(classes)}"
    problem = next(filter(None, map(class_name_problem, classes)), None)
    if problem:
        return problem
    repeated = sorted({name for name in classes if list(classes).count(name) > 1})
    return f"class {repeated[0]!r} is listed more than once" if repeated else None


def labelled_scores(scores: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(probabilities, true class index, rows) of the calibration rows whose label is a class."""
    rows = scores[scores[TRUE_COLUMN].astype(str).isin(classes)].reset_index(drop=True)
    if len(rows) == 0:
        raise CellmorphError("the model bundle's calibration scores hold no treatment of a known class")
    probs = rows[[prob_column(c) for c in classes]].to_numpy(dtype=float)
    return probs, rows[TRUE_COLUMN].astype(str).map(classes.index).to_numpy(), rows


def conformal_sets(calibration: pd.DataFrame, probs: np.ndarray, classes: list[str], alpha: float) -> np.ndarray:
    """Boolean (n, classes) membership of each row's prediction set at level 1 − ``alpha``.

    ``calibration`` holds out-of-fold ``prob_<class>`` and the true ``Metadata_MoA`` of
    treatments the scoring models never saw.
    """
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    cal_probs, truth, _ = labelled_scores(calibration, classes)
    cal_alphas = hinge(cal_probs, np.arange(len(classes)), truth)
    conformal = ConformalClassifier().fit(cal_alphas)
    return conformal.predict_set(hinge(probs), confidence=1.0 - alpha, smoothing=False).astype(bool)


def held_out_coverage(scores: pd.DataFrame, classes: list[str], alpha: float,
                      group: str = COMPOUND) -> dict:
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


@dataclass(frozen=True)
class TemperatureScaling:
    """``p_k ∝ p_k^(1/T)``, T fitted by minimising the negative log-likelihood of the true classes."""

    temperature: float = 1.0

    @classmethod
    def fit(cls, probs: np.ndarray, truth: np.ndarray) -> "TemperatureScaling":
        """T by maximum likelihood; T = 1 (no scaling) when the scores cannot support a fit: fewer
        than :data:`MIN_SCORES` rows or a single class, where the likelihood keeps rising as T → 0
        and every confidence would become ~1."""
        from scipy.optimize import minimize_scalar

        truth = np.asarray(truth)
        if len(truth) < MIN_SCORES or len(np.unique(truth)) < 2:
            return cls(1.0)

        logs = np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, None))

        def nll(log_t: float) -> float:
            scaled = _softmax(logs / np.exp(log_t))
            return float(-np.log(scaled[np.arange(len(truth)), truth] + 1e-12).mean())

        # T between e^-3 and e^3 (0.05–20) spans anything from sharpening to flattening.
        return cls(float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)))

    @classmethod
    def from_scores(cls, scores: pd.DataFrame, classes: list[str]) -> "TemperatureScaling":
        probs, truth, _ = labelled_scores(scores, classes)
        return cls.fit(probs, truth)

    def transform(self, probs: np.ndarray) -> np.ndarray:
        return _softmax(np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, None)) / self.temperature)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Σ_b (n_b / n)·|accuracy_b − mean confidence_b| over ``bins`` equal-width confidence bins."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1]), 0, bins - 1)
    return float(sum(abs(confidence[which == b].mean() - correct[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))


def held_out_calibration_error(scores: pd.DataFrame, classes: list[str], group: str = COMPOUND,
                               bins: int = 10) -> dict:
    """ECE of the call's confidence without and with temperature scaling, each compound's temperature
    fitted on the other compounds' scores (as ``predict`` scales a compound the model never saw)."""
    probs, truth, rows = labelled_scores(scores, classes)
    correct = probs.argmax(axis=1) == truth
    scaled = np.empty(len(rows))
    temperatures = []
    for _, held in rows.groupby(group, sort=True):
        rest = np.setdiff1d(np.arange(len(rows)), held.index)
        scaling = TemperatureScaling.fit(probs[rest], truth[rest])
        temperatures.append(scaling.temperature)
        scaled[held.index] = scaling.transform(probs[held.index]).max(axis=1)
    renormalised = (probs / probs.sum(axis=1, keepdims=True)).max(axis=1)
    return {"ece_raw": expected_calibration_error(probs.max(axis=1), correct, bins),
            # what the renormalisation alone does (T = 1), so the temperature's own share shows
            "ece_renormalised": expected_calibration_error(renormalised, correct, bins),
            "ece_temperature_scaled": expected_calibration_error(scaled, correct, bins),
            "median_temperature": float(np.median(temperatures)), "accuracy": float(correct.mean()),
            "mean_raw_confidence": float(probs.max(axis=1).mean()),
            "mean_scaled_confidence": float(scaled.mean()), "n": int(len(rows)), "bins": bins}
