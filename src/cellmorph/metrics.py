"""Median aggregation tile → well → treatment, and scoring.

Aggregation follows Kensert et al. 2019: per-tile softmax → median over the tiles
of a well → median over the wells of a treatment (compound, concentration); the
argmax of the treatment's median probabilities is its call.

Everything here works on plain pandas frames so it can be reused on its own,
e.g. to score the paper's stored per-treatment softmax outputs::

    from cellmorph.metrics import score_treatments
    score_treatments(frame)   # frame: Metadata_MoA + prob_<class> columns → accuracy
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.schema import (
    CACHE_ROW_COLUMN,
    COMPOUND_KEYS,
    CORRECT_COLUMN,
    FOLD_COLUMN,
    PREDICTED_COLUMN,
    PROB_PREFIX,
    TILE_COLUMNS,
    TREATMENT_KEYS,
    TRUE_COLUMN,
    WELL_KEYS,
)

ACCURACY_KEYS = ("treatment_accuracy", "well_accuracy", "tile_accuracy")


def prob_columns(frame: pd.DataFrame, prefix: str = PROB_PREFIX) -> list[str]:
    cols = [c for c in frame.columns if str(c).startswith(prefix)]
    if not cols:
        raise CellmorphError(f"no probability columns (named {prefix}<class>) in the table")
    return cols


# How tile probabilities become a well's, and wells' a treatment's: the median (the paper), the mean, or
# logmean, the mean of the log-probabilities renormalised (a geometric mean). For a head whose logits are
# linear in the tile's features (the linear probe's logistic and centroid heads) logmean is exactly the
# head applied to the mean feature profile of the well or treatment: the call of profile-based MoA
# classification, which on real cells beat the median of per-cell calls (benchmarks/RESULTS.md).
AGGREGATIONS = ("median", "mean", "logmean")
LOG_FLOOR = 1e-12  # probabilities below it count as it in logmean: one zero would veto a class outright


def group_rows(frame: pd.DataFrame, keys: list[str], columns: list[str], how: str = "median", *,
               first: tuple[str, ...] | list[str] = (), joined: dict[str, str] | None = None,
               counts: dict[str, str | None] | None = None, dropna: bool = True) -> pd.DataFrame:
    """One row per group of ``keys`` (sorted): ``columns`` aggregated by ``how`` (``median`` or ``mean``), and
    before them the group's metadata: the first value of each column of ``first``, ``joined`` (name → column:
    its distinct values, sorted, joined by ``|``) and ``counts`` (name → column: its sum, or None: the group's
    size). The one grouping behind every level of aggregation: tiles → wells → treatments of probabilities
    (:func:`aggregate`), of embeddings (``cellmorph.embed``) and of profiles (``cellmorph.profiles``)."""
    grouped = frame.groupby(keys, sort=True, dropna=dropna)
    meta = {col: grouped[col].first() for col in first}
    for name, col in (joined or {}).items():
        meta[name] = grouped[col].agg(lambda s: "|".join(str(v) for v in sorted(set(s))))
    for name, col in (counts or {}).items():
        meta[name] = grouped[col].sum() if col is not None else grouped.size()
    values = grouped[columns].agg(how)
    return pd.concat([pd.DataFrame(meta, index=values.index), values], axis=1).reset_index()


def _aggregate(frame: pd.DataFrame, keys: list[str], prefix: str, extra_counts: dict[str, str],
               how: str = "median") -> pd.DataFrame:
    probs = prob_columns(frame, prefix)
    frame = frame.drop(columns=[c for c in TILE_COLUMNS if c in frame.columns and c not in keys])
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise CellmorphError(f"cannot aggregate: missing column(s) {', '.join(missing)}")
    if how not in AGGREGATIONS:
        raise CellmorphError(f"aggregate {how!r}: expected {', '.join(AGGREGATIONS)}")
    if how == "logmean":
        frame = frame.copy()
        frame[probs] = np.log(np.clip(frame[probs].to_numpy(dtype=float), LOG_FLOOR, None))
    # Metadata_* columns constant within every group are kept; the folds of a group are listed.
    metadata = [c for c in frame.columns if c not in keys and c not in probs and str(c).startswith("Metadata_")]
    grouped = frame.groupby(keys, sort=True, dropna=False)
    constant = [c for c in metadata if c != FOLD_COLUMN and grouped[c].nunique(dropna=False).max() <= 1]
    joined = {FOLD_COLUMN: FOLD_COLUMN} if FOLD_COLUMN in metadata else {}
    counts = {name: (col if col in frame.columns else None) for name, col in extra_counts.items()}
    out = group_rows(frame, keys, probs, "mean" if how == "logmean" else how, first=constant, joined=joined,
                     counts=counts, dropna=False)
    # the columns in the frame's order: keys, metadata (the folds in their place), counts, probabilities
    out = out[keys + [c for c in metadata if c in constant or c in joined] + list(counts) + probs]
    if how == "logmean":  # back to probabilities that sum to one: a softmax of the mean log-probabilities
        from scipy.special import softmax

        out[probs] = softmax(out[probs].to_numpy(), axis=1)
    return out


def aggregate_wells(tiles: pd.DataFrame, prefix: str = PROB_PREFIX, how: str = "median") -> pd.DataFrame:
    """Median (or mean, or logmean) per-tile probability of each (plate, well); constant ``Metadata_*`` columns
    are kept."""
    frame = tiles.copy()
    frame["_one"] = 1
    wells = _aggregate(frame, WELL_KEYS, prefix, {"n_tiles": "_one"}, how)
    return add_calls(wells, prefix)


def aggregate_treatments(wells: pd.DataFrame, prefix: str = PROB_PREFIX, how: str = "median") -> pd.DataFrame:
    """Median (or mean) of the well profiles of each (compound, concentration)."""
    frame = wells.drop(columns=[c for c in (PREDICTED_COLUMN, CORRECT_COLUMN) if c in wells.columns]).copy()
    frame["_one"] = 1
    if "n_tiles" not in frame.columns:
        frame["n_tiles"] = 1
    treatments = _aggregate(frame, TREATMENT_KEYS, prefix, {"n_wells": "_one", "n_tiles": "n_tiles"}, how)
    treatments = treatments.drop(columns=[c for c in WELL_KEYS if c in treatments.columns])
    return add_calls(treatments, prefix)


def aggregate_compounds(treatments: pd.DataFrame, prefix: str = PROB_PREFIX) -> pd.DataFrame:
    """One row per compound, its call made from all its treatments together: logmean of their probabilities,
    each treatment alike (for the linear probe, its head on the mean of the treatments' profiles), with
    ``n_treatments`` (and ``n_wells``/``n_tiles`` where the treatments count them).

    A level above the treatment, beside it: it assumes a compound acts by one MoA at every concentration (as
    BBBC021's annotations do), and a concentration without the phenotype dilutes the others' evidence. A compound
    whose treatments carry different labels gets none (``Metadata_MoA`` and ``Correct`` NA). On the
    real 12-MoA development set, LOCO, 16 of 20 compounds were called right from their treatments together where
    0.739 of the treatments were right alone (probe; fine-tune 15 of 20 against 0.630; benchmarks/RESULTS.md).
    """
    frame = treatments.drop(columns=[c for c in (PREDICTED_COLUMN, CORRECT_COLUMN) if c in treatments.columns]).copy()
    frame["_one"] = 1
    counts = {"n_treatments": "_one"} | {name: name for name in ("n_wells", "n_tiles") if name in frame.columns}
    compounds = _aggregate(frame, COMPOUND_KEYS, prefix, counts, "logmean")
    compounds = compounds.drop(columns=[c for c in TREATMENT_KEYS if c in compounds.columns and c not in COMPOUND_KEYS])
    if TRUE_COLUMN in frame.columns and TRUE_COLUMN not in compounds.columns:
        # Some compound's treatments carry different labels (BBBC014's doses: translocation or not): those compounds
        # have no compound-level truth (NA), the others keep theirs.
        single = frame.groupby(COMPOUND_KEYS, sort=True)[TRUE_COLUMN].agg(
            lambda s: s.iloc[0] if s.nunique(dropna=False) == 1 else None)
        compounds.insert(len(COMPOUND_KEYS), TRUE_COLUMN, single.loc[compounds[COMPOUND_KEYS[0]]].to_numpy())
    out = add_calls(compounds, prefix)
    if TRUE_COLUMN in out.columns:
        out[CORRECT_COLUMN] = out[CORRECT_COLUMN].astype("boolean").where(out[TRUE_COLUMN].notna(), pd.NA)
    return out


def predicted_classes(frame: pd.DataFrame, prefix: str = PROB_PREFIX) -> np.ndarray:
    """argmax over the ``prob_<class>`` columns (ties go to the first column)."""
    cols = prob_columns(frame, prefix)
    names = np.array([c[len(prefix) :] for c in cols], dtype=object)
    return names[np.argmax(frame[cols].to_numpy(dtype=float), axis=1)]


def add_calls(frame: pd.DataFrame, prefix: str = PROB_PREFIX, true_column: str = TRUE_COLUMN) -> pd.DataFrame:
    out = frame.copy()
    out[PREDICTED_COLUMN] = predicted_classes(out, prefix)
    if true_column in out.columns:
        out[CORRECT_COLUMN] = out[PREDICTED_COLUMN].astype(str) == out[true_column].astype(str)
    return out


def accuracy(frame: pd.DataFrame, true_column: str = TRUE_COLUMN, prefix: str = PROB_PREFIX) -> float:
    if len(frame) == 0:
        return float("nan")
    if true_column not in frame.columns:
        raise CellmorphError(f"no true-label column {true_column!r} in the table")
    return float(np.mean(predicted_classes(frame, prefix) == frame[true_column].astype(str).to_numpy()))


def score_treatments(
    frame: pd.DataFrame,
    true_column: str = TRUE_COLUMN,
    prefix: str = PROB_PREFIX,
    exclude: tuple[str, ...] = (),
) -> float:
    """Treatment accuracy of a per-treatment table: argmax of ``prob_<class>`` vs ``true_column``.

    ``exclude`` drops rows whose true class is listed (e.g. ``("DMSO",)``).
    """
    if exclude:
        frame = frame[~frame[true_column].astype(str).isin(exclude)]
    return accuracy(frame, true_column, prefix)


def aggregate(tiles: pd.DataFrame, prefix: str = PROB_PREFIX,
              how: str = "median") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tiles (with calls), wells, treatments: ``how`` (:data:`AGGREGATIONS`) at both steps."""
    wells = aggregate_wells(tiles, prefix, how)
    return add_calls(tiles, prefix), wells, aggregate_treatments(wells, prefix, how)


LEVEL_KEYS = {"tiles": [CACHE_ROW_COLUMN], "wells": WELL_KEYS, "treatments": TREATMENT_KEYS}


def mean_of_levels(members: list[dict[str, pd.DataFrame]], names: list[str], prefix: str = PROB_PREFIX,
                   ) -> dict[str, pd.DataFrame]:
    """Each level (tiles, wells, treatments) of an ensemble: its members' ``prob_<class>`` averaged row by row
    (rows matched by the level's keys) and the calls made again. Members must score the same rows with the
    same classes; ``names`` name them in the error otherwise."""
    merged = {}
    for level, keys in LEVEL_KEYS.items():
        frames = [m[level] for m in members]
        probs = prob_columns(frames[0], prefix)
        order = [f.sort_values(keys, kind="stable").reset_index(drop=True) for f in frames]
        for name, frame in zip(names[1:], order[1:]):
            if prob_columns(frame, prefix) != probs:
                raise CellmorphError(f"{name}: its classes differ from {names[0]}'s; an ensemble's members share them")
            if len(frame) != len(order[0]) or not frame[keys].astype(str).equals(order[0][keys].astype(str)):
                raise CellmorphError(f"{name}: scores other {level} than {names[0]}; an ensemble's members share "
                                     "their tiles")
        mean = order[0].drop(columns=[c for c in (PREDICTED_COLUMN, CORRECT_COLUMN) if c in order[0].columns])
        mean[probs] = np.mean([f[probs].to_numpy(dtype=float) for f in order], axis=0)
        merged[level] = add_calls(mean, prefix)
    return merged


# --------------------------------------------------------------------------- metrics
def compute_metrics(
    tiles: pd.DataFrame,
    wells: pd.DataFrame,
    treatments: pd.DataFrame,
    classes: list[str],
    n_folds: int,
    prefix: str = PROB_PREFIX,
) -> dict:
    metrics = {
        "treatment_accuracy": accuracy(treatments, prefix=prefix),
        "well_accuracy": accuracy(wells, prefix=prefix),
        "tile_accuracy": accuracy(tiles, prefix=prefix),
        "n_treatments": int(len(treatments)),
        "n_wells": int(len(wells)),
        "n_tiles": int(len(tiles)),
        "n_folds": int(n_folds),
        "n_classes": len(classes),
        "classes": list(classes),
    }
    per_class = {}
    calls = predicted_classes(treatments, prefix) if len(treatments) else np.array([])
    truth = treatments[TRUE_COLUMN].astype(str).to_numpy() if len(treatments) else np.array([])
    for cls in classes:
        sel = truth == cls
        if sel.any():
            per_class[cls] = {"n_treatments": int(sel.sum()), "accuracy": float(np.mean(calls[sel] == cls))}
    metrics["per_class_treatment_accuracy"] = per_class
    return metrics


def confusion(frame: pd.DataFrame, classes: list[str], prefix: str = PROB_PREFIX) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, in ``classes`` order."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(frame[TRUE_COLUMN].astype(str), predicted_classes(frame, prefix), labels=list(classes))


def classification_text(frame: pd.DataFrame, classes: list[str], prefix: str = PROB_PREFIX) -> str:
    from sklearn.metrics import classification_report

    return classification_report(
        frame[TRUE_COLUMN].astype(str),
        predicted_classes(frame, prefix),
        labels=list(classes),
        zero_division=0,
        digits=3,
    )


# Resampling of treatments for the accuracy's 95% interval: seeded, so a run's figures repeat.
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


def bootstrap_interval(frame: pd.DataFrame, correct: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the accuracy when the treatments are resampled with replacement."""
    keys = _treatment_keys(frame)
    codes, uniques = pd.factorize(keys)
    right = np.bincount(codes, weights=correct.astype(float), minlength=len(uniques))
    total = np.bincount(codes, minlength=len(uniques)).astype(float)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(uniques), size=(draws, len(uniques)))
    accuracy = right[drawn].sum(axis=1) / total[drawn].sum(axis=1)
    low, high = np.percentile(accuracy, [2.5, 97.5])
    return float(low), float(high)


def _treatment_keys(frame: pd.DataFrame) -> pd.Series:
    compound = frame.get("Metadata_Compound", pd.Series(range(len(frame)), index=frame.index)).astype(str)
    dose = frame.get("Metadata_Concentration", pd.Series("", index=frame.index)).astype(str)
    return (compound + "@" + dose).reset_index(drop=True)
