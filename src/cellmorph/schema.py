"""Column names shared by every table cellmorph reads or writes, defined once.

Follows pycytominer's convention: metadata columns start with ``Metadata_``;
per-class probabilities are ``prob_<class>``.
"""

from __future__ import annotations

PROB_PREFIX = "prob_"
TRUE_COLUMN = "Metadata_MoA"  # the label: an MoA, or "DMSO" for controls
UNLABELLED = ""  # the Metadata_MoA of a compound of unknown MoA (what `predict` is for)
PREDICTED_COLUMN = "Predicted_MoA"
CORRECT_COLUMN = "Correct"
CONTROL_COLUMN = "Metadata_IsControl"
FOLD_COLUMN = "Metadata_Fold"
CACHE_ROW_COLUMN = "Metadata_CacheRow"  # a tile's row in its cache's index

# In a fold's per-epoch history: the held-out tile accuracy of the epochs that were scored.
HELDOUT_ACCURACY = "heldout_tile_accuracy"

WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
TREATMENT_KEYS = ["Metadata_Compound", "Metadata_Concentration"]
COMPOUND_KEYS = ["Metadata_Compound"]  # a compound: its treatments (concentrations) together
# Metadata a well carries into its profile (constant within a well).
WELL_METADATA = [
    "Metadata_Compound",
    "Metadata_Concentration",
    "Metadata_MoA",
    "Metadata_Batch",
    "Metadata_IsControl",
]

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
    CACHE_ROW_COLUMN,
)


def prob_column(cls: str) -> str:
    return PROB_PREFIX + str(cls)
