"""Scoring stored treatment-level predictions (e.g. the paper's own softmax outputs).

Kensert et al. published one sheet per network with a row per treatment:
``Compounds, MoA, Concentrations`` (compound and MoA written only on a compound's
first row) and one probability column per class under an abbreviation
(``Act, Aur, Ch, Eg5, Epi, KI, MD, MS, PD, PS, DR, DD``). Truth comes from the MoA
table, not the sheet, and the score is computed by the same
:func:`cellmorph.metrics.score_treatments` as ``cellmorph cv`` uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cellmorph.errors import BadInputError
from cellmorph.metrics import score_treatments
from cellmorph.schema import prob_column

COMPOUND_COLUMNS = ("Compounds", "Compound", "compound", "Metadata_Compound")
CONCENTRATION_COLUMNS = ("Concentrations", "Concentration", "concentration", "Metadata_Concentration")
LABEL_COLUMNS = ("MoA", "moa", "Metadata_MoA")


def _first(frame: pd.DataFrame, names, what: str, source: str) -> str:
    for name in names:
        if name in frame.columns:
            return name
    raise BadInputError(f"{source}: no {what} column (tried {', '.join(names)})")


def class_for_abbreviation(abbreviation: str, classes: list[str]) -> str:
    """The class an abbreviation stands for: a prefix of its name or its word initials."""
    if abbreviation in classes:
        return abbreviation
    key = abbreviation.lower()
    matches = [
        c
        for c in classes
        if c.lower().startswith(key) or "".join(w[0] for w in re.split(r"[\s\-/]+", c) if w).lower() == key
    ]
    if len(matches) != 1:
        raise BadInputError(
            f"class column {abbreviation!r} matches {len(matches)} MoA names ({', '.join(matches) or 'none'})"
        )
    return matches[0]


def normalise_sheet(sheet: pd.DataFrame, moa: pd.DataFrame, source: str) -> pd.DataFrame:
    """One sheet → ``Metadata_Compound, Metadata_Concentration, Metadata_MoA, prob_<MoA>...``."""
    compound_col = _first(sheet, COMPOUND_COLUMNS, "compound", source)
    conc_col = _first(sheet, CONCENTRATION_COLUMNS, "concentration", source)
    label_col = next((c for c in LABEL_COLUMNS if c in sheet.columns), None)
    meta_cols = {compound_col, conc_col, label_col, "model", "Model"}
    prob_cols = [c for c in sheet.columns if c not in meta_cols and pd.api.types.is_numeric_dtype(sheet[c])]
    classes = sorted(set(moa["moa"].astype(str)) - {"DMSO"})
    frame = pd.DataFrame(
        {
            # A compound's name is written on its first row only.
            "Metadata_Compound": sheet[compound_col].ffill().astype(str),
            "Metadata_Concentration": pd.to_numeric(sheet[conc_col], errors="coerce"),
        }
    )
    if frame["Metadata_Concentration"].isna().any():
        row = int(frame["Metadata_Concentration"].isna().to_numpy().nonzero()[0][0])
        raise BadInputError(f"{source}: row {row + 2}: concentration is not a number")
    for col in prob_cols:
        frame[prob_column(class_for_abbreviation(str(col), classes))] = sheet[col].to_numpy(dtype=float)
    truth = moa.assign(
        Metadata_Compound=moa["compound"].astype(str),
        _conc=pd.to_numeric(moa["concentration"]).round(6),
    )[["Metadata_Compound", "_conc", "moa"]]
    merged = frame.assign(_conc=frame["Metadata_Concentration"].round(6)).merge(
        truth, on=["Metadata_Compound", "_conc"], how="left"
    )
    if merged["moa"].isna().any():
        row = merged[merged["moa"].isna()].iloc[0]
        raise BadInputError(
            f"{source}: treatment {row['Metadata_Compound']} @ {row['Metadata_Concentration']} is absent from the MoA table"
        )
    return merged.rename(columns={"moa": "Metadata_MoA"}).drop(columns=["_conc"])


def read_stored_predictions(path: Path, moa_csv: Path) -> dict[str, pd.DataFrame]:
    """Model name → normalised treatment table, from an ``.xlsx`` (a sheet per model) or a CSV."""
    from cellmorph.data.crops import read_moa_table

    path = Path(path)
    moa = read_moa_table(moa_csv)
    if not path.is_file():
        raise BadInputError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            sheets = pd.read_excel(path, sheet_name=None)
        else:
            table = pd.read_csv(path)
            model_col = "model" if "model" in table.columns else "Model" if "Model" in table.columns else None
            sheets = dict(tuple(table.groupby(model_col))) if model_col else {path.stem: table}
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read predictions ({exc})") from None
    return {str(name): normalise_sheet(sheet, moa, f"{path}[{name}]") for name, sheet in sheets.items()}


def score_stored_predictions(path: Path, moa_csv: Path) -> dict[str, float]:
    """Model name → treatment accuracy (argmax of the stored probabilities)."""
    return {name: score_treatments(frame) for name, frame in read_stored_predictions(path, moa_csv).items()}
