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


SET_TYPES = ("marginal", "mondrian")


def conformal_sets(calibration: pd.DataFrame, probs: np.ndarray, classes: list[str], alpha: float,
                   sets: str = "marginal") -> np.ndarray:
    """Boolean (n, classes) membership of each row's prediction set at level 1 − ``alpha``.

    ``calibration`` holds out-of-fold ``prob_<class>`` and the true ``Metadata_MoA`` of
    treatments the scoring models never saw. ``sets="marginal"``: one threshold for all classes (coverage
    1 − α over treatments like the calibration ones); ``"mondrian"``: class-conditional (crepes' Mondrian
    classifier with the true class as the category, as its ``class_cond``): each class is kept by the
    calibration treatments *of that class*, so coverage holds per MoA, and a class with fewer than
    (1 − α)/α calibration treatments is always in the set (nothing can exclude it at that level).
    """
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    if sets not in SET_TYPES:
        raise CellmorphError(f"sets {sets!r}: expected {' or '.join(SET_TYPES)}")
    cal_probs, truth, _ = labelled_scores(calibration, classes)
    cal_alphas = hinge(cal_probs, np.arange(len(classes)), truth)
    alphas = hinge(np.asarray(probs, float))
    if sets == "marginal":
        conformal = ConformalClassifier().fit(cal_alphas)
        return conformal.predict_set(alphas, confidence=1.0 - alpha, smoothing=False).astype(bool)
    conformal = ConformalClassifier().fit(cal_alphas, bins=truth)
    members = np.ones(alphas.shape, bool)
    for c in range(len(classes)):
        if np.any(truth == c):  # a class without calibration treatments cannot be excluded: kept
            members[:, c] = conformal.predict_set(alphas, bins=np.full(len(alphas), c), confidence=1.0 - alpha,
                                                  smoothing=False)[:, c].astype(bool)
    return members


def held_out_coverage(scores: pd.DataFrame, classes: list[str], alpha: float,
                      group: str = COMPOUND, sets: str = "marginal") -> dict:
    """Coverage of the sets of each compound's treatments, calibrated on the other compounds' scores.

    ``scores`` are out-of-fold treatment probabilities (a CV's ``treatments.csv``). Each compound
    is treated as new in turn, as ``predict`` treats a compound the model never saw.
    """
    labelled = scores[scores[TRUE_COLUMN].astype(str).isin(classes)].reset_index(drop=True)
    columns = [prob_column(c) for c in classes]
    covered, sizes, groups = [], [], []
    for name, held in labelled.groupby(group, sort=True):
        rest = labelled.drop(index=held.index)
        members = conformal_sets(rest, held[columns].to_numpy(float), classes, alpha, sets)
        truth = held[TRUE_COLUMN].astype(str).map(classes.index).to_numpy()
        covered.extend(members[np.arange(len(truth)), truth])
        sizes.extend(members.sum(axis=1))
        groups.extend([name] * len(truth))
    covered_array = np.asarray(covered, dtype=float)
    return {"alpha": alpha, "coverage": float(covered_array.mean()), "mean_set_size": float(np.mean(sizes)),
            "n_treatments": len(covered), "n_compounds": len(set(groups)),
            # compounds resampled: a compound's treatments share their calibration, so they are not
            # independent draws; on a few dozen treatments this interval is wide, and honest about it
            "coverage_ci95": list(group_bootstrap(np.asarray(groups), lambda rows: covered_array[rows].mean()))}


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


def group_bootstrap(groups: np.ndarray, statistic, draws: int = 2000, seed: int = 0,
                    standard: bool = False) -> tuple[float, float]:
    """95% interval of ``statistic(rows)`` when whole groups (compounds) are resampled: the percentile interval,
    or with ``standard`` the statistic on all rows ± 1.96 bootstrap standard errors (clipped at 0). The standard
    one is for a statistic that resampling biases, such as a binned calibration error: a resample repeats
    compounds, so its few distinct treatments spread thinner over the bins and its ECE comes out higher; on the
    development set every resample's ECE exceeded the full set's, and the percentile interval left it out."""
    names, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(len(names))]
    rng = np.random.default_rng(seed)
    values = [statistic(np.concatenate([members[k] for k in rng.integers(0, len(names), len(names))]))
              for _ in range(draws)]
    if standard:
        point, spread = statistic(np.arange(len(codes))), 1.96 * float(np.std(values, ddof=1))
        return max(float(point) - spread, 0.0), float(point) + spread
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _log_loss(probs: np.ndarray, truth: np.ndarray) -> float:
    normalised = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.log(np.clip(normalised[np.arange(len(truth)), truth], 1e-12, None)).mean())


def _scaling_lowers_log_loss(probs: np.ndarray, scaled: np.ndarray, truth: np.ndarray) -> bool:
    """The rule for using a temperature: the held-out scaled probabilities lose less than the raw ones."""
    return _log_loss(scaled, truth) < _log_loss(probs, truth)


def held_out_temperatures(probs: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each group's probabilities scaled by the temperature fitted on the other groups', and the temperatures."""
    scaled = np.empty_like(probs, dtype=float)
    temperatures = []
    for name in np.unique(groups):
        held = groups == name
        scaling = TemperatureScaling.fit(probs[~held], truth[~held])
        temperatures.append(scaling.temperature)
        scaled[held] = scaling.transform(probs[held])
    return scaled, temperatures


def temperature_helps(scores: pd.DataFrame, classes: list[str], group: str = COMPOUND) -> bool:
    """Whether temperature scaling lowers the log-loss of compounds held out from its fit (each scaled
    by a temperature fitted on the other compounds'). On real cells it once raised the held-out ECE
    from 0.12 to 0.24 (issue 29), so a fitted T is used only where this says it helps."""
    probs, truth, rows = labelled_scores(scores, classes)
    if group not in rows.columns or rows[group].nunique() < 2 or len(truth) < MIN_SCORES:
        return False
    scaled, _ = held_out_temperatures(probs, truth, rows[group].astype(str).to_numpy())
    return _scaling_lowers_log_loss(probs, scaled, truth)


def held_out_calibration_error(scores: pd.DataFrame, classes: list[str], group: str = COMPOUND,
                               bins: int = 10) -> dict:
    """ECE and log-loss of the call's confidence without and with temperature scaling, each compound's
    temperature fitted on the other compounds' scores (as ``predict`` scales a compound the model never
    saw), with 95% intervals over compounds resampled."""
    probs, truth, rows = labelled_scores(scores, classes)
    groups = rows[group].astype(str).to_numpy()
    correct = probs.argmax(axis=1) == truth
    scaled_probs, temperatures = held_out_temperatures(probs, truth, groups)
    scaled = scaled_probs.max(axis=1)
    renormalised = (probs / probs.sum(axis=1, keepdims=True)).max(axis=1)
    raw = probs.max(axis=1)
    loss_raw, loss_scaled = _log_loss(probs, truth), _log_loss(scaled_probs, truth)
    return {"ece_raw": expected_calibration_error(raw, correct, bins),
            "ece_raw_ci95": list(group_bootstrap(groups, lambda r: expected_calibration_error(raw[r], correct[r], bins),
                                                 standard=True)),
            # what the renormalisation alone does (T = 1), so the temperature's own share shows
            "ece_renormalised": expected_calibration_error(renormalised, correct, bins),
            "ece_temperature_scaled": expected_calibration_error(scaled, correct, bins),
            "ece_temperature_scaled_ci95": list(group_bootstrap(
                groups, lambda r: expected_calibration_error(scaled[r], correct[r], bins), standard=True)),
            "log_loss_renormalised": loss_raw, "log_loss_temperature_scaled": loss_scaled,
            # predict uses a fitted temperature only where it lowered the held-out log-loss
            "temperature_used": _scaling_lowers_log_loss(probs, scaled_probs, truth),
            "median_temperature": float(np.median(temperatures)), "accuracy": float(correct.mean()),
            "mean_raw_confidence": float(raw.mean()),
            "mean_scaled_confidence": float(scaled.mean()), "n": int(len(rows)),
            "n_compounds": int(len(set(groups))), "bins": bins}
