"""Cross-validation splits, median aggregation (tile → well → treatment) and scoring.

Everything here works on plain pandas frames so it can be reused on its own,
e.g. to score the paper's stored per-treatment softmax outputs::

    from cellmorph.evaluate import score_treatments
    score_treatments(frame)   # frame: Metadata_MoA + prob_<class> columns → accuracy

Splits
------
``loco``          leave one compound out: each fold tests one compound (all its
                  concentrations) and trains on every other compound.
``group-kfold:K`` K folds over compounds (compounds of each MoA dealt across folds).
``nscb``          the test fold is one compound; training additionally drops every
                  tile of that compound's batches (``Metadata_Batch``), as in
                  "not same compound or batch".
``well[:K]``      K folds over (plate, well) — for crop tables where leaving a
                  compound out is impossible (e.g. DMSO + one compound). Default K=5.

Controls (DMSO) are left out unless ``include_controls_as_class``; then their wells
are dealt across folds (for ``nscb`` only to folds whose held-out batches contain
the well's batch, so no training tile ever shares a batch with a test tile).

Aggregation follows Kensert et al. 2019: per-tile softmax → median over the tiles
of a well → median over the wells of a treatment (compound, concentration); the
argmax of the treatment's median probabilities is its call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError

PROB_PREFIX = "prob_"
TRUE_COLUMN = "Metadata_MoA"
WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
TREATMENT_KEYS = ["Metadata_Compound", "Metadata_Concentration"]
DEFAULT_WELL_FOLDS = 5

_CV_PATTERN = re.compile(r"^(loco|nscb|batch|cell-line|group-kfold:(\d+)|well(?::(\d+))?)$")
# Leave one Metadata_Batch out; BBBC014 stores the cell line there ("cell-line" is its alias).
BATCH_SCHEMES = ("batch", "cell-line")


# --------------------------------------------------------------------------- CV spec
@dataclass(frozen=True)
class CVScheme:
    name: str  # loco | group-kfold | nscb | well
    k: int | None = None

    def __str__(self) -> str:
        return self.name if self.k is None or self.name == "loco" else f"{self.name}:{self.k}"


def parse_cv(spec: str) -> CVScheme:
    """``loco`` | ``group-kfold:K`` | ``nscb`` | ``well`` | ``well:K`` → :class:`CVScheme`."""
    text = str(spec).strip().lower()
    match = _CV_PATTERN.match(text)
    if not match:
        raise CellmorphError(f"cv {spec!r}: expected loco, nscb, group-kfold:K, well[:K], batch or cell-line")
    if text.startswith("group-kfold"):
        k = int(match.group(2))
        if k < 2:
            raise CellmorphError(f"cv {spec!r}: K must be at least 2")
        return CVScheme("group-kfold", k)
    if text.startswith("well"):
        k = int(match.group(3)) if match.group(3) else DEFAULT_WELL_FOLDS
        if k < 2:
            raise CellmorphError(f"cv {spec!r}: K must be at least 2")
        return CVScheme("well", k)
    return CVScheme(text)


# --------------------------------------------------------------------------- folds
@dataclass
class Fold:
    """One CV fold: positions (rows of the tile index) to train on and to test."""

    index: int
    name: str
    train: np.ndarray
    test: np.ndarray
    test_compounds: list[str] = field(default_factory=list)
    excluded_batches: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "fold": self.index,
            "name": self.name,
            "n_train": int(len(self.train)),
            "n_test": int(len(self.test)),
            "test_compounds": list(self.test_compounds),
            "excluded_batches": list(self.excluded_batches),
        }


def class_names(index: pd.DataFrame, include_controls_as_class: bool = False) -> list[str]:
    """Sorted class labels (``Metadata_MoA``) of the tiles that take part in CV."""
    return sorted(map(str, usable_tiles(index, include_controls_as_class)[TRUE_COLUMN].unique()))


def usable_tiles(index: pd.DataFrame, include_controls_as_class: bool = False) -> pd.DataFrame:
    if include_controls_as_class:
        return index
    return index[~index["Metadata_IsControl"].astype(bool)]


def _deal(keys_by_class: dict[str, list], n_folds: int, rng: np.random.Generator) -> dict:
    """Shuffle the keys of each class (seeded) and deal them round-robin over folds,
    continuing across classes so every fold gets a mix."""
    assignment, slot = {}, 0
    for cls in sorted(keys_by_class):
        keys = sorted(keys_by_class[cls])
        for pos in rng.permutation(len(keys)):
            assignment[keys[pos]] = slot % n_folds
            slot += 1
    return assignment


def _well_key(frame: pd.DataFrame) -> pd.Series:
    return frame["Metadata_Plate"].astype(str) + "/" + frame["Metadata_Well"].astype(str)


def make_folds(
    index: pd.DataFrame,
    cv: str | CVScheme,
    include_controls_as_class: bool = False,
    seed: int = 0,
    skip_untrainable: bool = False,
) -> tuple[list[Fold], list[dict]]:
    """Folds over ``index`` (positions are row numbers of ``index``) plus folds skipped.

    Raises :class:`CellmorphError` for an empty fold, fewer than two classes, or a
    fold whose test class has no training tiles (unless ``skip_untrainable``, in
    which case such folds are returned in the second list with the reason).
    """
    scheme = parse_cv(cv) if isinstance(cv, str) else cv
    frame = index.reset_index(drop=True)
    controls = frame["Metadata_IsControl"].astype(bool).to_numpy()
    use = np.ones(len(frame), bool) if include_controls_as_class else ~controls
    labels = frame[TRUE_COLUMN].astype(str).to_numpy()
    compounds = frame["Metadata_Compound"].astype(str).to_numpy()
    batches = frame["Metadata_Batch"].astype(str).to_numpy()
    wells = _well_key(frame).to_numpy()
    rng = np.random.default_rng(seed)

    classes = sorted(set(labels[use]))
    if len(classes) < 2:
        hint = "" if include_controls_as_class else " (set include_controls_as_class to add DMSO as a class)"
        raise CellmorphError(f"cross-validation needs at least 2 classes; the data has {classes}{hint}")

    treated = use & ~controls
    test_sets: list[np.ndarray] = []
    names: list[str] = []
    held_compounds: list[list[str]] = []
    held_batches: list[list[str]] = []

    if scheme.name in BATCH_SCHEMES:
        for b in sorted(set(batches[use])):
            mask = use & (batches == b)
            test_sets.append(np.flatnonzero(mask))
            names.append(str(b))
            held_compounds.append(sorted(set(compounds[mask])))
            held_batches.append([str(b)])
    elif scheme.name == "well":
        groups = {}
        for key, cls in zip(wells[use], labels[use]):
            groups.setdefault(cls, set()).add(key)
        n_wells = len(set(wells[use]))
        if scheme.k > n_wells:
            raise CellmorphError(f"cv {scheme}: {scheme.k} folds but only {n_wells} wells; fold(s) would be empty")
        assign = _deal({c: list(v) for c, v in groups.items()}, scheme.k, rng)
        fold_of = np.array([assign.get(w, -1) for w in wells])
        fold_of[~use] = -1
        for k in range(scheme.k):
            test_sets.append(np.flatnonzero(fold_of == k))
            names.append(f"wells-{k}")
            held_compounds.append(sorted(set(compounds[fold_of == k])))
            held_batches.append([])
    else:
        compound_list = sorted(set(compounds[treated]))
        if not compound_list:
            raise CellmorphError("no treated (non-control) tiles to cross-validate")
        if scheme.name in ("loco", "nscb"):
            groups_of = [[c] for c in compound_list]
        else:  # group-kfold
            if scheme.k > len(compound_list):
                raise CellmorphError(
                    f"cv {scheme}: {scheme.k} folds but only {len(compound_list)} compounds; fold(s) would be empty"
                )
            moa_of = {c: labels[treated & (compounds == c)][0] for c in compound_list}
            by_moa: dict[str, list] = {}
            for c in compound_list:
                by_moa.setdefault(moa_of[c], []).append(c)
            assign = _deal(by_moa, scheme.k, rng)
            groups_of = [sorted(c for c in compound_list if assign[c] == k) for k in range(scheme.k)]
        for k, group in enumerate(groups_of):
            mask = treated & np.isin(compounds, group)
            test_sets.append(np.flatnonzero(mask))
            names.append(group[0] if len(group) == 1 else f"group-{k}")
            held_compounds.append(list(group))
            held_batches.append(sorted(set(batches[mask])) if scheme.name == "nscb" else [])
        if include_controls_as_class:
            ctrl_wells = sorted(set(wells[controls]))
            if scheme.name == "nscb":
                # Deal each control well to a fold that already holds its batch out.
                batch_of_well = {w: b for w, b in zip(wells[controls], batches[controls])}
                counters: dict[str, int] = {}
                assign_ctrl = {}
                for pos in rng.permutation(len(ctrl_wells)):
                    well = ctrl_wells[pos]
                    eligible = [k for k, bs in enumerate(held_batches) if batch_of_well[well] in bs]
                    if not eligible:
                        continue  # a batch with no treated compound: its controls only train
                    b = batch_of_well[well]
                    assign_ctrl[well] = eligible[counters.get(b, 0) % len(eligible)]
                    counters[b] = counters.get(b, 0) + 1
            else:
                assign_ctrl = {w: i % len(groups_of) for i, w in enumerate(np.array(ctrl_wells)[rng.permutation(len(ctrl_wells))])}
            for k in range(len(test_sets)):
                extra = np.flatnonzero(controls & np.isin(wells, [w for w, f in assign_ctrl.items() if f == k]))
                test_sets[k] = np.sort(np.concatenate([test_sets[k], extra]))

    folds: list[Fold] = []
    skipped: list[dict] = []
    for k, test in enumerate(test_sets):
        if len(test) == 0:
            raise CellmorphError(f"cv {scheme}: fold {k} ({names[k]}) has no test tiles")
        train_mask = use.copy()
        train_mask[test] = False
        if held_batches[k]:
            train_mask &= ~np.isin(batches, held_batches[k])
        if scheme.name != "well" and scheme.name not in BATCH_SCHEMES:
            # No test compound may appear in training (controls are held out by well instead;
            # a batch scheme holds out a whole batch, e.g. a cell line treated with the same compound).
            train_mask &= ~np.isin(compounds, held_compounds[k])
        train = np.flatnonzero(train_mask)
        if len(train) == 0:
            raise CellmorphError(f"cv {scheme}: fold {k} ({names[k]}) leaves no tiles to train on")
        trained = set(labels[train])
        missing = sorted(set(labels[test]) - trained)
        if missing:
            what = "no other well" if scheme.name == "well" else "no other batch" if scheme.name in BATCH_SCHEMES else "no other compound"
            where = f" outside batch(es) {', '.join(held_batches[k])}" if held_batches[k] else ""
            reason = (
                f"cv {scheme}: fold {k} (test {', '.join(held_compounds[k]) or names[k]}): MoA {missing[0]!r} has "
                f"{what} in training{where}"
            )
            if scheme.name == "loco":
                reason += "; leave-one-compound-out needs at least 2 compounds per MoA"
            if skip_untrainable:
                skipped.append({"fold": k, "name": names[k], "reason": reason})
                continue
            raise CellmorphError(reason)
        folds.append(Fold(k, names[k], train, test, held_compounds[k], held_batches[k]))
    return folds, skipped


# --------------------------------------------------------------------------- aggregation
def prob_columns(frame: pd.DataFrame, prefix: str = PROB_PREFIX) -> list[str]:
    cols = [c for c in frame.columns if str(c).startswith(prefix)]
    if not cols:
        raise CellmorphError(f"no probability columns (named {prefix}<class>) in the table")
    return cols


# Per-tile/per-image columns that say nothing about a well or treatment.
TILE_COLUMNS = (
    "Metadata_ImageID",
    "Metadata_Site",
    "Metadata_Cell",
    "Metadata_Tile",
    "Metadata_TileRow",
    "Metadata_TileCol",
    "Metadata_SourcePath",
    "Metadata_SourceImage_DAPI",
    "Metadata_PlateOffset",
    "Metadata_CacheRow",
)


def _aggregate(frame: pd.DataFrame, keys: list[str], prefix: str, extra_counts: dict[str, str]) -> pd.DataFrame:
    probs = prob_columns(frame, prefix)
    frame = frame.drop(columns=[c for c in TILE_COLUMNS if c in frame.columns and c not in keys])
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise CellmorphError(f"cannot aggregate: missing column(s) {', '.join(missing)}")
    grouped = frame.groupby(keys, sort=True, dropna=False)
    out = grouped[probs].median()
    meta = {}
    for col in frame.columns:
        if col in keys or col in probs or not str(col).startswith("Metadata_"):
            continue
        if col == "Metadata_Fold":
            meta[col] = grouped[col].agg(lambda s: "|".join(str(v) for v in sorted(set(s))))
        elif grouped[col].nunique(dropna=False).max() <= 1:
            meta[col] = grouped[col].first()
    for name, col in extra_counts.items():
        meta[name] = grouped[col].sum() if col in frame.columns else grouped.size()
    return pd.concat([pd.DataFrame(meta), out], axis=1).reset_index()


def aggregate_wells(tiles: pd.DataFrame, prefix: str = PROB_PREFIX) -> pd.DataFrame:
    """Median per-tile probability of each (plate, well); constant ``Metadata_*`` columns are kept."""
    frame = tiles.copy()
    frame["_one"] = 1
    wells = _aggregate(frame, WELL_KEYS, prefix, {"n_tiles": "_one"})
    return add_calls(wells, prefix)


def aggregate_treatments(wells: pd.DataFrame, prefix: str = PROB_PREFIX) -> pd.DataFrame:
    """Median of the well medians of each (compound, concentration)."""
    frame = wells.drop(columns=[c for c in ("Predicted_MoA", "Correct") if c in wells.columns]).copy()
    frame["_one"] = 1
    if "n_tiles" not in frame.columns:
        frame["n_tiles"] = 1
    treatments = _aggregate(frame, TREATMENT_KEYS, prefix, {"n_wells": "_one", "n_tiles": "n_tiles"})
    treatments = treatments.drop(columns=[c for c in ("Metadata_Plate", "Metadata_Well") if c in treatments.columns])
    return add_calls(treatments, prefix)


def predicted_classes(frame: pd.DataFrame, prefix: str = PROB_PREFIX) -> np.ndarray:
    """argmax over the ``prob_<class>`` columns (ties go to the first column)."""
    cols = prob_columns(frame, prefix)
    names = np.array([c[len(prefix) :] for c in cols], dtype=object)
    return names[np.argmax(frame[cols].to_numpy(dtype=float), axis=1)]


def add_calls(frame: pd.DataFrame, prefix: str = PROB_PREFIX, true_column: str = TRUE_COLUMN) -> pd.DataFrame:
    out = frame.copy()
    out["Predicted_MoA"] = predicted_classes(out, prefix)
    if true_column in out.columns:
        out["Correct"] = out["Predicted_MoA"].astype(str) == out[true_column].astype(str)
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


def aggregate(tiles: pd.DataFrame, prefix: str = PROB_PREFIX) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tiles (with calls), wells, treatments."""
    wells = aggregate_wells(tiles, prefix)
    return add_calls(tiles, prefix), wells, aggregate_treatments(wells, prefix)


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
