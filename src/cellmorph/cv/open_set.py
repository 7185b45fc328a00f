"""Open-set evaluation of a leave-one-MoA-out run (``cv --cv lomo``): how novel an unseen MoA looks.

Each fold's held-out MoA is unseen by its probe. Its treatments are scored by the fold's centroid head
(:func:`cellmorph.novelty.centroid_distance` of their mean standardised profiles, seen from the average training
cell and from the cache's negative controls where it has them), and compared with new compounds
of the *known* MoAs: the fold's training compounds, each scored by a head fitted without it
(:func:`cellmorph.cv.probe.held_out_novelty`), which are also what sets the fold's ``Novel`` threshold at ``alpha``,
as ``predict`` sets it. Written to ``RUN/open_set.json``:

* ``auroc``: unseen-MoA treatments against the known compounds' treatments, pooled over the folds (and per MoA);
* ``flagged_at_alpha``: the fraction of unseen-MoA treatments above their fold's threshold;
* ``false_alarm_rate``: the fraction of known compounds' treatments above the threshold set without them (each
  compound left out of its fold's calibration in turn): what ``alpha`` promises;
* ``pool``: how a treatment was scored, as ``predict`` scores it by default (:data:`cellmorph.novelty.
  DEFAULT_NOVELTY_POOL`): ``compound``, each treatment by its compound's score (:func:`cellmorph.novelty.
  per_treatment`), with ``treatments_alone`` the same figures for each treatment scored by its own profile;
* ``compounds``: the same with each compound scored once from its treatments together
  (:func:`cellmorph.novelty.level_profiles`), calibrated on the known compounds' such scores.

A network (``mode`` finetune or linear) cannot score held-out compounds of its own training MoAs without training
a network per compound inside every fold (hours on a CPU). Its lomo run therefore takes those from a finished LOCO
run of the same recipe on the same cache (``open_set_reference``): each compound's treatments there were scored by a
network that never saw the compound, as a bundle's calibration CV scores them (:func:`network_open_set`). The
score is a network's own, 1 − the call's probability (what a bundle without a probe member flags by), the unseen
treatments' taken over the fold's known MoAs. What this assumes: a network trained on every MoA but the compound
scores a new compound of a known MoA as one trained without a whole MoA would.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellmorph.novelty import DEFAULT_NOVELTY_POOL

OPEN_SET_FILE = "open_set.json"
ROC_FILE = "open_set_roc.png"
DEFAULT_NOVELTY_ALPHA = 0.1


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney); NaN without both kinds."""
    from scipy.stats import rankdata

    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fold_novelty(x_train: np.ndarray, y_train: np.ndarray, index_train: pd.DataFrame, x_test: np.ndarray,
                 index_test: pd.DataFrame, alpha: float, controls: np.ndarray | None = None,
                 pool: str = DEFAULT_NOVELTY_POOL) -> dict:
    """One fold: the unseen treatments' scores, the known compounds' held-out scores, the threshold, and the
    known treatments' scores against a threshold set without their own compound (the false alarms). ``controls``:
    embeddings of negative-control tiles, the score's second origin (none: the average training cell alone).
    ``pool`` ``compound``: each treatment scored by its compound (:func:`cellmorph.novelty.per_treatment`), with
    each treatment scored alone under ``treatments_alone``; ``treatment``: alone. ``compounds``: one score each."""
    from cellmorph.cv.probe import CentroidHead, centroid_novelty, held_out_novelty

    head = CentroidHead.fit(x_train, y_train, index_train, controls=controls)
    held_out = held_out_novelty(x_train, y_train, index_train, controls)
    # each compound scored from its treatments together, and each treatment from its own profile
    levels = {level: _scored(centroid_novelty(head, x_test, index_test, level), held_out.get(level), alpha)
              for level in ("compounds", "treatments")}
    return _pooled(levels.pop("treatments"), levels["compounds"], alpha, pool) | levels


def _scored(unseen: pd.DataFrame, known: pd.DataFrame | None, alpha: float) -> dict:
    """A level's unseen and known scores with the threshold and false alarms that the known ones set."""
    if known is None or known.empty:  # every training MoA has a single compound: no known compound can be new
        return {"unseen": unseen, "known": unseen.iloc[:0], "threshold": float("inf"),
                "false_alarms": np.zeros(0, bool)}
    return {"unseen": unseen, "known": known} | calibrate_on_known(known, alpha)


def _pooled(alone: dict, compounds: dict, alpha: float, pool: str) -> dict:
    """The treatment level as ``pool`` scores it: under ``compound`` each treatment (unseen and known) takes its
    compound's score and the threshold is set on those; the treatments' own scores are kept as
    ``treatments_alone``."""
    from cellmorph.novelty import NOVELTY_COLUMN, per_treatment

    if pool != "compound":
        return alone | {"pool": pool}
    unseen, known = (alone[side].assign(**{NOVELTY_COLUMN: per_treatment(alone[side], compounds[side])})
                     for side in ("unseen", "known"))
    return _scored(unseen, known if len(known) else None, alpha) | {"pool": pool, "treatments_alone": alone}


def calibrate_on_known(known: pd.DataFrame, alpha: float) -> dict:
    """The Novel threshold that the ``known`` treatments' scores set at ``alpha``, and which of them it would flag
    were each compound left out of the calibration in turn (the false alarms a new compound of a known MoA meets)."""
    from cellmorph.novelty import NOVELTY_COLUMN, novelty_threshold

    scores = known[NOVELTY_COLUMN].to_numpy()
    compounds = known["Metadata_Compound"].astype(str).to_numpy()
    false_alarms = np.array([s > novelty_threshold(scores[compounds != c], alpha) for s, c in zip(scores, compounds)],
                            bool)
    return {"threshold": novelty_threshold(scores, alpha), "false_alarms": false_alarms}


def open_set_evaluation(plan, features, alpha: float = DEFAULT_NOVELTY_ALPHA,
                        controls: np.ndarray | None = None, pool: str = DEFAULT_NOVELTY_POOL) -> dict:
    """The ``open_set.json`` record of a finished lomo probe run (``features``: its embeddings; ``controls``: those
    of its negative-control tiles, or None)."""
    from cellmorph.novelty import CENTROID_DISTANCE, CONTROL_CENTROID_DISTANCE

    index = plan.cache.index
    results = []
    for fold in plan.folds:
        train = fold.train[plan.targets[fold.train] >= 0]
        results.append((fold.name, fold_novelty(features.take(train), plan.targets[train], index.iloc[train],
                                                features.take(fold.test), index.iloc[fold.test], alpha, controls,
                                                pool)))
    return summarise_open_set(results, alpha, CENTROID_DISTANCE if controls is None else CONTROL_CENTROID_DISTANCE)


def network_open_set(fold_treatments: dict[str, pd.DataFrame], reference: pd.DataFrame,
                     alpha: float = DEFAULT_NOVELTY_ALPHA, pool: str = DEFAULT_NOVELTY_POOL) -> dict:
    """The ``open_set.json`` record of a finished lomo run of a network.

    ``fold_treatments``: each fold's held-out MoA → its treatments as the fold's network called them (``prob_*``
    columns); ``reference``: the treatments of a LOCO run of the same recipe, each called by a network trained
    without its compound. In the fold of MoA m, the unseen treatments' score is 1 − their largest probability among
    the known MoAs (renormalised without m, which no training tile had); the known ones are the reference's
    treatments of every other MoA, which also set the fold's threshold, as a bundle's calibration treatments do.
    A compound's score is that of its call from its treatments together (:func:`cellmorph.metrics.aggregate_compounds`),
    and ``pool`` says whether a treatment takes it (as :func:`fold_novelty`).
    """
    from cellmorph.metrics import aggregate_compounds
    from cellmorph.novelty import NOVELTY_COLUMN, ONE_MINUS_PROBABILITY, one_minus_max_probability
    from cellmorph.schema import PROB_PREFIX, TRUE_COLUMN

    def score(frame: pd.DataFrame, leave_out: str | None = None) -> np.ndarray:
        columns = [c for c in frame.columns if c.startswith(PROB_PREFIX) and c != f"{PROB_PREFIX}{leave_out}"]
        probabilities = frame[columns].to_numpy(float)
        return one_minus_max_probability(probabilities / np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12))

    def scored(moa: str, unseen: pd.DataFrame, known: pd.DataFrame) -> dict:
        return _scored(unseen.assign(**{NOVELTY_COLUMN: score(unseen, moa)}),
                       known.assign(**{NOVELTY_COLUMN: score(known)}), alpha)

    results = []
    for moa, unseen in fold_treatments.items():
        unseen = unseen.reset_index(drop=True)
        known = reference[reference[TRUE_COLUMN].astype(str) != moa].reset_index(drop=True)
        treatments = scored(moa, unseen, known)
        compounds = scored(moa, aggregate_compounds(unseen), aggregate_compounds(known))
        results.append((moa, _pooled(treatments, compounds, alpha, pool) | {"compounds": compounds}))
    return summarise_open_set(results, alpha, ONE_MINUS_PROBABILITY)


def summarise_open_set(results: list[tuple[str, dict]], alpha: float, score: str) -> dict:
    """The ``open_set.json`` record of the folds' results (held-out MoA, :func:`fold_novelty`'s dict)."""
    from cellmorph.novelty import NOVELTY_COLUMN

    per_moa, records = [], []
    for moa, result in results:
        unseen = result["unseen"][NOVELTY_COLUMN].to_numpy()
        known = np.asarray(result["known"][NOVELTY_COLUMN], float)
        flagged = unseen > result["threshold"]
        names = result["unseen"]
        per_moa.append({"moa": moa, "n_treatments": int(len(unseen)), "n_known_treatments": int(len(known)),
                        "auroc": auroc(unseen, known), "flagged": float(flagged.mean()),
                        "threshold": result["threshold"],
                        "flagged_treatments": [f"{c} at {float(v):g}" for c, v, f in zip(
                            names["Metadata_Compound"], names["Metadata_Concentration"], flagged) if f]})
        for kind, frame, scores, flags in (("unseen", names, unseen, flagged),
                                           ("known", result["known"], known, result["false_alarms"])):
            for compound, concentration, value, flag in zip(frame["Metadata_Compound"],
                                                            frame["Metadata_Concentration"], scores, flags):
                records.append({"held_out_moa": moa, "kind": kind, "compound": str(compound),
                                "concentration": float(concentration), "score": float(value), "novel": bool(flag)})
    overall = _level_figures(results, None)
    aurocs = [m["auroc"] for m in per_moa if np.isfinite(m["auroc"])]
    others = {key: _level_figures(results, key) for key in ("compounds", "treatments_alone")
              if all(key in r for _, r in results)}
    return {"scheme": "lomo", "score": score, "pool": results[0][1].get("pool", "treatment"), "alpha": alpha,
            "auroc": overall["auroc"],
            "auroc_mean_over_moas": float(np.mean(aurocs)) if aurocs else float("nan"),
            "flagged_at_alpha": overall["flagged_at_alpha"], "false_alarm_rate": overall["false_alarm_rate"],
            "n_unseen_treatments": overall["n_unseen_treatments"], "n_known_treatments": overall["n_known_treatments"],
            "per_moa": per_moa,
            # every scored treatment: its fold's held-out MoA, unseen or known, its score and flag (known: against the
            # threshold set without its own compound)
            "treatments": records} | others


def _level_figures(results: list[tuple[str, dict]], key: str | None) -> dict:
    """AUROC, fraction flagged and false-alarm rate over the folds of one scoring: the folds' own (``key`` None:
    the treatments as the run's pool scores them), or their ``key`` entries: ``compounds``, each compound scored once
    from its treatments together (as ``predict``'s ``compounds.parquet`` scores it), calibrated on the known
    compounds' such scores; ``treatments_alone``, each treatment by its own profile (``novelty_pool: treatment``)."""
    from cellmorph.novelty import NOVELTY_COLUMN

    unit = "compounds" if key == "compounds" else "treatments"
    unseen, known, flagged, alarms, names = [], [], [], [], []
    for moa, result in results:
        level = result if key is None else result[key]
        scores = level["unseen"][NOVELTY_COLUMN].to_numpy()
        unseen.append(scores)
        known.append(np.asarray(level["known"][NOVELTY_COLUMN], float))
        flagged.append(scores > level["threshold"])
        alarms.append(level["false_alarms"])
        if key == "compounds":
            names += [f"{c} ({moa})" for c, f in zip(level["unseen"]["Metadata_Compound"], flagged[-1]) if f]
    unseen_all, known_all = np.concatenate(unseen), np.concatenate(known)
    return {"auroc": auroc(unseen_all, known_all), "flagged_at_alpha": float(np.concatenate(flagged).mean()),
            "false_alarm_rate": float(np.concatenate(alarms).mean()) if len(known_all) else float("nan"),
            f"n_unseen_{unit}": int(len(unseen_all)), f"n_known_{unit}": int(len(known_all))} | (
                {"flagged_compounds": names} if key == "compounds" else {})
