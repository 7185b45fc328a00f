"""Cross-validation splits over a tile index.

``loco``          leave one compound out: each fold tests one compound (all its
                  concentrations) and trains on every other compound.
``group-kfold:K`` K folds over compounds (compounds of each MoA dealt across folds).
``nscb``          the test fold is one compound; training additionally drops every
                  tile of that compound's batches (``Metadata_Batch``), as in
                  "not same compound or batch".
``well[:K]``      K folds over (plate, well) — for crop tables where leaving a
                  compound out is impossible (e.g. DMSO + one compound). Default K=5.
``batch``         leave one ``Metadata_Batch`` out (``cell-line`` is its alias: BBBC014
                  stores the cell line there).

Controls (DMSO) are left out unless ``include_controls_as_class``; then their wells
are dealt across folds (for ``nscb`` only to folds whose held-out batches contain
the well's batch, so no training tile ever shares a batch with a test tile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.schema import CONTROL_COLUMN, TRUE_COLUMN

DEFAULT_WELL_FOLDS = 5
CV_CHOICES = "loco | group-kfold:K | nscb | well[:K] | batch | cell-line"

_CV_PATTERN = re.compile(r"^(loco|nscb|batch|cell-line|group-kfold:(\d+)|well(?::(\d+))?)$")
# Leave one Metadata_Batch out; BBBC014 stores the cell line there ("cell-line" is its alias).
BATCH_SCHEMES = ("batch", "cell-line")


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
    return index[~index[CONTROL_COLUMN].astype(bool)]


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
    controls = frame[CONTROL_COLUMN].astype(bool).to_numpy()
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


def subsample_rows(rows: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` rows, proportionally per class (at least one each), seeded."""
    if limit is None or len(rows) <= limit:
        return rows
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(limit * counts / counts.sum()).astype(int))
    while quota.sum() > limit:
        quota[np.argmax(quota)] -= 1
    remainder = limit - quota.sum()
    order = np.argsort(-(limit * counts / counts.sum() - quota), kind="stable")
    for i in order[:remainder]:
        quota[i] += 1
    chosen = []
    for cls, q in zip(classes, quota):
        pool = rows[labels == cls]
        chosen.append(pool[rng.permutation(len(pool))[: min(q, len(pool))]])
    return np.sort(np.concatenate(chosen))
