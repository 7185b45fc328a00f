"""Cross-validation splits on hand-made tile indexes: no test compound (or batch) ever trains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmorph.cv.splits import make_folds, parse_cv, subsample_rows
from cellmorph.errors import CellmorphError


def _index(spec, controls_per_plate=1, tiles_per_well=2):
    """spec: {compound: (moa, [plates])}; one well per compound and plate, plus DMSO wells."""
    rows = []
    plates = sorted({p for _, ps in spec.values() for p in ps})
    for compound, (moa, cps) in spec.items():
        for plate in cps:
            for t in range(tiles_per_well):
                rows.append((plate, f"W-{compound}", compound, 1.0, moa, False))
    for plate in plates:
        for k in range(controls_per_plate):
            for t in range(tiles_per_well):
                rows.append((plate, f"C{k}", "DMSO", 0.0, "DMSO", True))
    frame = pd.DataFrame(
        rows,
        columns=["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Metadata_IsControl"],
    )
    frame["Metadata_Batch"] = frame["Metadata_Plate"].str.split("_").str[0]
    return frame


SPEC = {
    "a1": ("A", ["Week1_1"]),
    "a2": ("A", ["Week2_1"]),
    "a3": ("A", ["Week3_1", "Week1_2"]),
    "b1": ("B", ["Week1_1"]),
    "b2": ("B", ["Week2_1"]),
    "b3": ("B", ["Week3_1"]),
    "c1": ("C", ["Week2_1"]),
    "c2": ("C", ["Week3_1"]),
}


@pytest.mark.parametrize("cv", ["loco", "group-kfold:3", "nscb"])
@pytest.mark.parametrize("controls", [False, True])
def test_no_test_compound_in_training(cv, controls):
    index = _index(SPEC)
    folds, skipped = make_folds(index, cv, include_controls_as_class=controls, seed=0)
    assert not skipped
    assert len(folds) == (3 if cv.startswith("group") else 8)
    tested = []
    for fold in folds:
        train, test = index.iloc[fold.train], index.iloc[fold.test]
        treated_test = set(test.loc[~test["Metadata_IsControl"], "Metadata_Compound"])
        assert treated_test and not treated_test & set(train["Metadata_Compound"])
        assert not set(fold.train) & set(fold.test)
        assert controls or not (train["Metadata_IsControl"].any() or test["Metadata_IsControl"].any())
        if cv == "nscb":
            assert set(train["Metadata_Batch"]).isdisjoint(test["Metadata_Batch"])
            assert set(fold.excluded_batches) == set(test["Metadata_Batch"])
        tested.extend(fold.test)
    # Every usable tile is tested exactly once (nscb: controls of batches with treated compounds).
    assert len(tested) == len(set(tested))
    usable = index if controls else index[~index["Metadata_IsControl"]]
    assert set(tested) == set(np.flatnonzero(index.index.isin(usable.index)))


def test_nscb_excludes_the_whole_batch():
    index = _index(SPEC)
    folds, _ = make_folds(index, "nscb")
    fold = next(f for f in folds if f.test_compounds == ["a3"])  # a3 spans Week1 and Week3
    assert fold.excluded_batches == ["Week1", "Week3"]
    train = index.iloc[fold.train]
    assert set(train["Metadata_Batch"]) == {"Week2"}
    assert set(train["Metadata_Compound"]) == {"a2", "b2", "c1"}


def test_well_scheme_holds_out_wells_not_compounds():
    index = _index({"x": ("X", ["Week4_1", "Week4_2", "Week4_3"])}, controls_per_plate=2)
    with pytest.raises(CellmorphError, match="at least 2 classes"):
        make_folds(index, "well:3")
    folds, _ = make_folds(index, "well:3", include_controls_as_class=True)
    assert len(folds) == 3
    wells = index["Metadata_Plate"] + "/" + index["Metadata_Well"]
    seen = []
    for fold in folds:
        assert set(wells.iloc[fold.train]).isdisjoint(wells.iloc[fold.test])
        assert set(index.iloc[fold.train]["Metadata_MoA"]) == {"X", "DMSO"}
        seen.extend(fold.test)
    assert sorted(seen) == list(range(len(index)))
    with pytest.raises(CellmorphError, match="only 9 wells"):
        make_folds(index, "well:10", include_controls_as_class=True)


def test_empty_fold_and_missing_class_raise_clear_errors():
    index = _index(SPEC)
    with pytest.raises(CellmorphError, match="4 folds but only|9 folds but only 8 compounds"):
        make_folds(index, "group-kfold:9")
    lonely = dict(SPEC, d1=("D", ["Week1_1"]))
    with pytest.raises(CellmorphError, match=r"d1.*MoA 'D' has no other compound in training"):
        make_folds(_index(lonely), "loco", strict=True)
    folds, skipped = make_folds(_index(lonely), "loco", skip_untrainable=True, strict=True)
    assert [s["name"] for s in skipped] == ["d1"] and len(folds) == 8
    # nscb: C's compounds are in Week2 and Week3; holding out c2 (Week3) leaves c1 — fine;
    # a MoA confined to one batch fails with the batch named.
    confined = dict(SPEC, e1=("E", ["Week2_1"]), e2=("E", ["Week2_1"]))
    with pytest.raises(CellmorphError, match=r"MoA 'E' has no other compound in training outside batch\(es\) Week2"):
        make_folds(_index(confined), "nscb")
    make_folds(_index(confined), "loco")  # fine without the batch rule


@pytest.mark.parametrize("bad", ["kfold", "group-kfold", "group-kfold:1", "well:1", "loco:3"])
def test_bad_cv_specs(bad):
    with pytest.raises(CellmorphError, match="cv"):
        parse_cv(bad)


def test_parse_cv():
    assert str(parse_cv("LOCO")) == "loco"
    assert parse_cv("group-kfold:5").k == 5
    assert str(parse_cv("well")) == "well:5"


def test_subsample_rows_is_proportional_seeded_and_keeps_every_class():
    rows = np.arange(100)
    labels = np.array([0] * 90 + [1] * 10)
    chosen = subsample_rows(rows, labels, 20, seed=1)
    assert len(chosen) == 20 and int((labels[chosen] == 1).sum()) == 2
    np.testing.assert_array_equal(chosen, subsample_rows(rows, labels, 20, seed=1))
    assert not np.array_equal(chosen, subsample_rows(rows, labels, 20, seed=2))
    rare = np.array([0] * 99 + [1])
    assert 99 in subsample_rows(rows, rare, 10, seed=0)  # a class is never subsampled away
    np.testing.assert_array_equal(subsample_rows(rows, labels, None, seed=0), rows)


@pytest.mark.parametrize("cv", ["loco", "group-kfold:3", "nscb"])
def test_a_moas_only_compound_trains_in_every_fold_and_is_never_scored(cv):
    """Not strict (the default): the MoA is still learnt, its compound is listed as unscored, and no
    other compound is dropped with it (skip_untrainable would drop a whole group fold)."""
    index = _index(dict(SPEC, d1=("D", ["Week1_1"]), e1=("E", ["Week2_1"])))
    folds, skipped = make_folds(index, cv)
    unscored = [s for s in skipped if s["fold"] is None]
    assert [s["name"] for s in unscored] == ["d1", "e1"]
    assert "only compound of MoA 'D'" in unscored[0]["reason"] and "--strict" in unscored[0]["reason"]
    tested = set()
    for fold in folds:
        train, test = index.iloc[fold.train], index.iloc[fold.test]
        assert not {"d1", "e1"} & set(test["Metadata_Compound"])
        if cv != "nscb":  # nscb drops the test compound's batches, sole compounds' tiles included
            assert {"d1", "e1"} <= set(train["Metadata_Compound"])
        assert not set(test["Metadata_Compound"]) & set(train["Metadata_Compound"])
        tested |= set(test["Metadata_Compound"])
    assert tested == set(SPEC)  # every other compound is still scored
    assert len(folds) == (3 if cv.startswith("group") else 8)
