"""Features a run computes once: which control tiles the novelty score's second origin is embedded from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from cellmorph.cv.features import MAX_CONTROL_TILES, control_rows


def _plan(n_treated: int, n_controls: int, seed: int = 0, dmso_is_a_class: bool = False):
    control = np.r_[np.zeros(n_treated, bool), np.ones(n_controls, bool)]
    targets = np.where(control, 0 if dmso_is_a_class else -1, 1)
    cache = SimpleNamespace(index=pd.DataFrame({"Metadata_IsControl": control}))
    return SimpleNamespace(cache=cache, targets=targets, config=SimpleNamespace(seed=seed))


def test_control_rows_are_the_control_tiles_that_are_no_class_at_most_512_drawn_by_the_seed():
    np.testing.assert_array_equal(control_rows(_plan(5, 3)), [5, 6, 7])
    many = control_rows(_plan(10, 2000))
    assert len(many) == MAX_CONTROL_TILES and np.all(np.diff(many) > 0) and many.min() >= 10
    np.testing.assert_array_equal(many, control_rows(_plan(10, 2000)))  # the same seed draws the same tiles
    assert not np.array_equal(many, control_rows(_plan(10, 2000, seed=1)))
    assert len(control_rows(_plan(5, 3, dmso_is_a_class=True))) == 0  # DMSO a class: a known MoA, not an origin
    assert len(control_rows(_plan(5, 0))) == 0
