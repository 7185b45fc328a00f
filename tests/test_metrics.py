"""Median aggregation tile → well → treatment and scoring, on hand-made frames."""

from __future__ import annotations

import pandas as pd
import pytest

from cellmorph.errors import CellmorphError
import numpy as np

from cellmorph.metrics import (
    aggregate,
    aggregate_compounds,
    aggregate_treatments,
    aggregate_wells,
    confusion,
    score_treatments,
)


def _tiles(rows):
    """rows: (plate, well, compound, conc, moa, p_A) → tile frame with prob_A / prob_B."""
    frame = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "prob_A"]
    )
    frame["prob_B"] = 1.0 - frame["prob_A"]
    frame["Metadata_Tile"] = range(len(frame))
    return frame


def test_median_aggregation_tile_well_treatment_differs_from_mean():
    tiles = _tiles(
        [
            # Well P1/A01: two tiles mildly for B, one tile very strongly for A.
            # Mean of p_A = (0.4 + 0.4 + 1.0)/3 = 0.6 → A; median = 0.4 → B.
            ("P1", "A01", "x", 1.0, "B", 0.4),
            ("P1", "A01", "x", 1.0, "B", 0.4),
            ("P1", "A01", "x", 1.0, "B", 1.0),
            # Well P2/A01 of the same treatment: median 0.3.
            ("P2", "A01", "x", 1.0, "B", 0.3),
            ("P2", "A01", "x", 1.0, "B", 0.2),
            ("P2", "A01", "x", 1.0, "B", 0.9),
            # Well P3/A01: a single strongly-A tile (an outlier well).
            ("P3", "A01", "x", 1.0, "B", 0.95),
            # Another treatment (compound y), called A.
            ("P1", "B01", "y", 2.0, "A", 0.8),
            ("P2", "B01", "y", 2.0, "A", 0.7),
        ]
    )
    wells = aggregate_wells(tiles)
    w = wells.set_index(["Metadata_Plate", "Metadata_Well"])
    assert w.loc[("P1", "A01"), "prob_A"] == pytest.approx(0.4)
    assert w.loc[("P1", "A01"), "Predicted_MoA"] == "B"
    assert tiles.groupby(["Metadata_Plate", "Metadata_Well"])["prob_A"].mean()[("P1", "A01")] > 0.5  # mean says A
    assert w.loc[("P1", "A01"), "n_tiles"] == 3
    treatments = aggregate_treatments(wells).set_index(["Metadata_Compound", "Metadata_Concentration"])
    # Treatment x: median over wells {0.4, 0.3, 0.95} = 0.4 → B (the mean of wells 0.55 → A).
    assert treatments.loc[("x", 1.0), "prob_A"] == pytest.approx(0.4)
    assert treatments.loc[("x", 1.0), "Predicted_MoA"] == "B"
    assert bool(treatments.loc[("x", 1.0), "Correct"])
    assert treatments.loc[("x", 1.0), "n_wells"] == 3 and treatments.loc[("x", 1.0), "n_tiles"] == 7
    assert treatments.loc[("y", 2.0), "Predicted_MoA"] == "A"
    assert "Metadata_Tile" not in treatments.columns and "Metadata_Well" not in treatments.columns
    t_all, w_all, tr_all = aggregate(tiles)
    assert len(t_all) == 9 and len(w_all) == 5 and len(tr_all) == 2
    assert score_treatments(tr_all) == 1.0
    cm = confusion(tr_all, ["A", "B"])
    assert cm.tolist() == [[1, 0], [0, 1]]
    # The mean at both steps (an option): well P1/A01 is 0.6 (A); treatment x the mean of its wells.
    _, w_mean, tr_mean = aggregate(tiles, how="mean")
    w_mean = w_mean.set_index(["Metadata_Plate", "Metadata_Well"])
    assert w_mean.loc[("P1", "A01"), "prob_A"] == pytest.approx(0.6)
    assert w_mean.loc[("P1", "A01"), "Predicted_MoA"] == "A"
    x = tr_mean.set_index(["Metadata_Compound", "Metadata_Concentration"]).loc[("x", 1.0)]
    assert x["prob_A"] == pytest.approx((0.6 + 1.4 / 3 + 0.95) / 3)
    with pytest.raises(CellmorphError, match="aggregate 'max'"):
        aggregate(tiles, how="max")


def test_a_compound_is_called_from_its_treatments_together_by_logmean():
    """Compound x: a low concentration leaning B (0.45 A), two higher ones for A; compound y at one concentration.
    The compound's probabilities are the softmax of its treatments' mean log-probabilities (a geometric mean,
    renormalised), and the low concentration takes the compound's call at the compound level only."""
    tiles = _tiles([("P1", "A01", "x", 0.1, "A", 0.45), ("P1", "A02", "x", 1.0, "A", 0.7),
                    ("P2", "A03", "x", 3.0, "A", 0.9), ("P2", "A04", "x", 3.0, "A", 0.8),
                    ("P1", "B01", "y", 2.0, "B", 0.3)])
    _, _, treatments = aggregate(tiles)
    assert treatments["Correct"].tolist() == [False, True, True, True]  # x at 0.1 µM is called B on its own
    compounds = aggregate_compounds(treatments).set_index("Metadata_Compound")
    logs = np.log([[0.45, 0.55], [0.7, 0.3], [0.85, 0.15]]).mean(axis=0)  # x at 3 µM: median (= mean) of 2 wells
    assert compounds.loc["x", "prob_A"] == pytest.approx(np.exp(logs[0]) / np.exp(logs).sum())
    assert compounds.loc["x", "Predicted_MoA"] == "A" and bool(compounds.loc["x", "Correct"])
    assert compounds.loc["x", ["n_treatments", "n_wells", "n_tiles"]].tolist() == [3, 4, 4]
    assert compounds.loc["y", "prob_B"] == pytest.approx(0.7) and compounds.loc["y", "Metadata_MoA"] == "B"
    assert "Metadata_Concentration" not in compounds.columns and "Metadata_Plate" not in compounds.columns
    # A compound labelled differently at its concentrations (BBBC014's doses) has no compound-level truth
    tiles.loc[0, "Metadata_MoA"] = "B"
    mixed = aggregate_compounds(aggregate(tiles)[2]).set_index("Metadata_Compound")
    assert pd.isna(mixed.loc["x", "Metadata_MoA"]) and pd.isna(mixed.loc["x", "Correct"])
    assert mixed.loc["y", "Metadata_MoA"] == "B" and bool(mixed.loc["y", "Correct"])


def test_score_treatments_on_a_stored_softmax_table():
    frame = pd.DataFrame(
        {
            "Metadata_MoA": ["A", "B", "C", "DMSO"],
            "prob_A": [0.7, 0.6, 0.1, 0.1],
            "prob_B": [0.2, 0.3, 0.1, 0.1],
            "prob_C": [0.1, 0.1, 0.8, 0.1],
            "prob_DMSO": [0.0, 0.0, 0.0, 0.7],
        }
    )
    assert score_treatments(frame) == pytest.approx(0.75)
    assert score_treatments(frame, exclude=("DMSO",)) == pytest.approx(2 / 3)
    with pytest.raises(CellmorphError, match="probability columns"):
        score_treatments(frame[["Metadata_MoA"]])
