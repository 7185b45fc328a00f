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

A compound that is the only one of its MoA cannot be held out by a compound scheme and still be
learnt: by default it stays in training in every fold, is never scored, and is listed in the
skipped entries with the reason (``strict`` refuses such data instead, as releases before did).

Controls (DMSO) are left out unless ``include_controls_as_class``; then their wells
are dealt across folds (for ``nscb`` only to folds whose held-out batches contain
the well's batch, so no training tile ever shares a batch with a test tile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellmorph.config.scheme import BATCH_SCHEMES, CV_CHOICES, DEFAULT_WELL_FOLDS, CVScheme, parse_cv  # noqa: F401
from cellmorph.errors import CellmorphError, option
from cellmorph.schema import CONTROL_COLUMN, TRUE_COLUMN, WELL_KEYS


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
    plate, well = WELL_KEYS
    return frame[plate].astype(str) + "/" + frame[well].astype(str)


@dataclass
class _Tiles:
    """The columns of a tile index that splitting reads, as arrays (position = row number)."""

    controls: np.ndarray
    use: np.ndarray  # tiles that take part: treated ones, and controls when they are a class
    labels: np.ndarray
    compounds: np.ndarray
    batches: np.ndarray
    wells: np.ndarray

    @classmethod
    def of(cls, index: pd.DataFrame, include_controls_as_class: bool) -> "_Tiles":
        frame = index.reset_index(drop=True)
        controls = frame[CONTROL_COLUMN].astype(bool).to_numpy()
        return cls(
            controls=controls,
            use=np.ones(len(frame), bool) if include_controls_as_class else ~controls,
            labels=frame[TRUE_COLUMN].astype(str).to_numpy(),
            compounds=frame["Metadata_Compound"].astype(str).to_numpy(),
            batches=frame["Metadata_Batch"].astype(str).to_numpy(),
            wells=_well_key(frame).to_numpy(),
        )

    @property
    def treated(self) -> np.ndarray:
        return self.use & ~self.controls


@dataclass
class _TestSet:
    rows: np.ndarray
    name: str
    compounds: list[str]
    batches: list[str]  # batches held out with it (nscb, batch schemes): no training tile shares them


def make_folds(
    index: pd.DataFrame,
    cv: str | CVScheme,
    include_controls_as_class: bool = False,
    seed: int = 0,
    skip_untrainable: bool = False,
    strict: bool = False,
) -> tuple[list[Fold], list[dict]]:
    """Folds over ``index`` (positions are row numbers of ``index``) plus what was not scored.

    Raises :class:`CellmorphError` for an empty fold, fewer than two classes, or a
    fold whose test class has no training tiles (unless ``skip_untrainable``, in
    which case such folds are returned in the second list with the reason). Compound schemes
    keep a MoA's only compound in training and list it as unscored (``"fold": None``), unless
    ``strict``.
    """
    scheme = parse_cv(cv) if isinstance(cv, str) else cv
    tiles = _Tiles.of(index, include_controls_as_class)
    rng = np.random.default_rng(seed)
    classes = sorted(set(tiles.labels[tiles.use]))
    if len(classes) < 2:
        hint = "" if include_controls_as_class else " (set include_controls_as_class to add DMSO as a class)"
        raise CellmorphError(f"cross-validation needs at least 2 classes; the data has {classes}{hint}")
    if scheme.open_set:
        if len(classes) < 3:
            raise CellmorphError(f"cv {scheme}: leaving one MoA out needs at least 3 MoAs (2 left to train on)")
        tests = _moa_test_sets(tiles)
    elif scheme.name in BATCH_SCHEMES:
        tests = _batch_test_sets(tiles)
    elif scheme.name == "well":
        tests = _well_test_sets(tiles, scheme, rng)
    else:
        sole = {} if strict else sole_compounds(tiles.labels[tiles.treated], tiles.compounds[tiles.treated])
        tests = _compound_test_sets(tiles, scheme, rng, exclude=set(sole))
        if include_controls_as_class:
            _deal_control_wells(tiles, tests, scheme, rng)
        folds, skipped = _folds(tiles, tests, scheme, skip_untrainable)
        return folds, [unscored_entry(c, m) for c, m in sorted(sole.items())] + skipped
    return _folds(tiles, tests, scheme, skip_untrainable)


def sole_compounds(labels: np.ndarray, compounds: np.ndarray) -> dict[str, str]:
    """compound → MoA for each MoA that has a single compound (among the rows given)."""
    by_moa: dict[str, set] = {}
    for moa, compound in set(zip(labels.tolist(), compounds.tolist())):
        by_moa.setdefault(moa, set()).add(compound)
    return {next(iter(c)): moa for moa, c in by_moa.items() if len(c) == 1}


def unscored_entry(compound: str, moa: str) -> dict:
    """The skipped-list entry of a MoA's only compound: trained on in every fold, never scored."""
    return {"fold": None, "name": compound, "compounds": [compound],
            "reason": f"not scored: {compound!r} is the only compound of MoA {moa!r}, so holding it out would leave "
                      "that MoA nothing to learn from; it stays in training in every fold (--strict refuses instead)"}


def _moa_test_sets(tiles: _Tiles) -> list[_TestSet]:
    """lomo: every treated tile of one MoA per fold (its compounds leave training with it)."""
    tests = []
    for moa in sorted(set(tiles.labels[tiles.treated])):
        mask = tiles.treated & (tiles.labels == moa)
        tests.append(_TestSet(np.flatnonzero(mask), str(moa), sorted(set(tiles.compounds[mask])), []))
    return tests


def _batch_test_sets(tiles: _Tiles) -> list[_TestSet]:
    tests = []
    for b in sorted(set(tiles.batches[tiles.use])):
        mask = tiles.use & (tiles.batches == b)
        tests.append(_TestSet(np.flatnonzero(mask), str(b), sorted(set(tiles.compounds[mask])), [str(b)]))
    return tests


def _well_test_sets(tiles: _Tiles, scheme: CVScheme, rng: np.random.Generator) -> list[_TestSet]:
    groups: dict[str, set] = {}
    for key, cls in zip(tiles.wells[tiles.use], tiles.labels[tiles.use]):
        groups.setdefault(cls, set()).add(key)
    n_wells = len(set(tiles.wells[tiles.use]))
    if scheme.k > n_wells:
        raise CellmorphError(f"cv {scheme}: {scheme.k} folds but only {n_wells} wells; fold(s) would be empty")
    assign = _deal({c: list(v) for c, v in groups.items()}, scheme.k, rng)
    fold_of = np.array([assign.get(w, -1) for w in tiles.wells])
    fold_of[~tiles.use] = -1
    return [_TestSet(np.flatnonzero(fold_of == k), f"wells-{k}", sorted(set(tiles.compounds[fold_of == k])), [])
            for k in range(scheme.k)]


def _compound_test_sets(tiles: _Tiles, scheme: CVScheme, rng: np.random.Generator,
                        exclude: set[str] = frozenset()) -> list[_TestSet]:
    treated = tiles.treated
    compound_list = sorted(set(tiles.compounds[treated]) - set(exclude))
    if not compound_list and exclude:
        raise CellmorphError(
            f"cv {scheme}: every treated compound is the only one of its MoA ({', '.join(sorted(exclude)[:5])}), so "
            f"none can be held out and still be learnt; hold out wells instead ({option('cv')} well:K), or give "
            f"{option('strict')} "
            "to fold them anyway")
    if not compound_list:
        raise CellmorphError("no treated (non-control) tiles to cross-validate")
    if scheme.name in ("loco", "nscb"):
        groups_of = [[c] for c in compound_list]
    else:  # group-kfold
        if scheme.k > len(compound_list):
            raise CellmorphError(
                f"cv {scheme}: {scheme.k} folds but only {len(compound_list)} compounds; fold(s) would be empty"
            )
        by_moa: dict[str, list] = {}
        for c in compound_list:
            by_moa.setdefault(tiles.labels[treated & (tiles.compounds == c)][0], []).append(c)
        assign = _deal(by_moa, scheme.k, rng)
        groups_of = [sorted(c for c in compound_list if assign[c] == k) for k in range(scheme.k)]
    tests = []
    for k, group in enumerate(groups_of):
        mask = treated & np.isin(tiles.compounds, group)
        held_batches = sorted(set(tiles.batches[mask])) if scheme.name == "nscb" else []
        tests.append(_TestSet(np.flatnonzero(mask), group[0] if len(group) == 1 else f"group-{k}", list(group),
                              held_batches))
    return tests


def _deal_control_wells(tiles: _Tiles, tests: list[_TestSet], scheme: CVScheme, rng: np.random.Generator) -> None:
    """DMSO as a class: deal control wells over the compound folds (nscb: only to folds holding their batch out)."""
    controls = tiles.controls
    ctrl_wells = sorted(set(tiles.wells[controls]))
    if scheme.name == "nscb":
        batch_of_well = {w: b for w, b in zip(tiles.wells[controls], tiles.batches[controls])}
        counters: dict[str, int] = {}
        assign = {}
        for pos in rng.permutation(len(ctrl_wells)):
            well = ctrl_wells[pos]
            eligible = [k for k, t in enumerate(tests) if batch_of_well[well] in t.batches]
            if not eligible:
                continue  # a batch with no treated compound: its controls only train
            b = batch_of_well[well]
            assign[well] = eligible[counters.get(b, 0) % len(eligible)]
            counters[b] = counters.get(b, 0) + 1
    else:
        shuffled = np.array(ctrl_wells)[rng.permutation(len(ctrl_wells))]
        assign = {w: i % len(tests) for i, w in enumerate(shuffled)}
    for k, test in enumerate(tests):
        extra = np.flatnonzero(controls & np.isin(tiles.wells, [w for w, f in assign.items() if f == k]))
        test.rows = np.sort(np.concatenate([test.rows, extra]))


def _folds(tiles: _Tiles, tests: list[_TestSet], scheme: CVScheme, skip_untrainable: bool):
    """Each test set with its training rows: everything else that is used, minus held-out compounds and batches."""
    folds: list[Fold] = []
    skipped: list[dict] = []
    for k, test in enumerate(tests):
        if len(test.rows) == 0:
            raise CellmorphError(f"cv {scheme}: fold {k} ({test.name}) has no test tiles")
        train_mask = tiles.use.copy()
        train_mask[test.rows] = False
        if test.batches:
            train_mask &= ~np.isin(tiles.batches, test.batches)
        if scheme.name != "well" and scheme.name not in BATCH_SCHEMES:
            # No test compound may appear in training (controls are held out by well instead;
            # a batch scheme holds out a whole batch, e.g. a cell line treated with the same compound).
            train_mask &= ~np.isin(tiles.compounds, test.compounds)
        train = np.flatnonzero(train_mask)
        if len(train) == 0:
            raise CellmorphError(f"cv {scheme}: fold {k} ({test.name}) leaves no tiles to train on")
        missing = sorted(set(tiles.labels[test.rows]) - set(tiles.labels[train]))
        if missing and not scheme.open_set:  # lomo holds its MoA out of training on purpose
            reason = _untrainable_reason(scheme, k, test, missing[0])
            if skip_untrainable:
                skipped.append({"fold": k, "name": test.name, "reason": reason})
                continue
            raise CellmorphError(reason)
        folds.append(Fold(k, test.name, train, test.rows, test.compounds, test.batches))
    return folds, skipped


def _untrainable_reason(scheme: CVScheme, k: int, test: _TestSet, moa: str) -> str:
    what = ("no other well" if scheme.name == "well" else "no other batch" if scheme.name in BATCH_SCHEMES
            else "no other compound")
    where = f" outside batch(es) {', '.join(test.batches)}" if test.batches else ""
    reason = (f"cv {scheme}: fold {k} (test {', '.join(test.compounds) or test.name}): MoA {moa!r} has "
              f"{what} in training{where}")
    if scheme.name == "loco":
        reason += "; leave-one-compound-out needs at least 2 compounds per MoA"
    return reason


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
