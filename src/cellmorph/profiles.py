"""Profile matching: NSC / NSCB nearest-neighbour MoA evaluation of per-well feature tables.

Small functional steps in pycytominer's style, on ``Metadata_*`` tables:

1. :func:`attach_bbbc021_metadata` — label CellProfiler well profiles with compound,
   concentration, MoA and batch from the BBBC021 metadata (the paper's MoA subset).
2. :func:`standardize_to_controls` — per plate, z-score each feature against that
   plate's DMSO wells (pycytominer's ``normalize(method="standardize")`` with DMSO as
   the samples to fit on).
3. :func:`aggregate_treatments` — a treatment's profile is the mean (or median) of its wells.
4. :func:`match_nearest` — 1-NN by correlation or cosine, where the neighbour may not be
   the same compound (NSC) or the same compound or batch (NSCB).

Ljosa et al. (J Biomol Screen 2013) report about 82% NSC accuracy for DMSO-standardised
well means with correlation 1-NN on these 103 treatments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cellmorph.data.bbbc021 import read_image_csv, read_moa_csv, select_moa_subset
from cellmorph.data.table import CONTROL_COMPOUND, batch_of_plate
from cellmorph.errors import BadInputError
from cellmorph.schema import TREATMENT_KEYS, WELL_KEYS


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric columns that are not metadata (``Metadata_*``/``Image_Metadata_*``)."""
    return [
        c
        for c in frame.columns
        if not c.startswith(("Metadata_", "Image_Metadata_")) and pd.api.types.is_numeric_dtype(frame[c])
    ]


def read_profiles(path: Path) -> pd.DataFrame:
    from cellmorph.runinfo import require_file

    path = require_file(path, "a profiles CSV or parquet file", BadInputError)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read profiles ({exc})") from None


def attach_bbbc021_metadata(profiles: pd.DataFrame, metadata_dir: Path) -> pd.DataFrame:
    """Join per-well profiles (``Image_Metadata_Plate``/``Image_Metadata_Well``) to the MoA subset.

    Wells outside the paper's subset (unannotated compounds, taxol controls) are dropped;
    DMSO wells of the subset's plates are kept as controls.
    """
    for col in ("Image_Metadata_Plate", "Image_Metadata_Well"):
        if col not in profiles.columns:
            raise BadInputError(f"profiles table has no {col} column")
    subset = select_moa_subset(read_image_csv(metadata_dir), read_moa_csv(metadata_dir))
    wells = (
        subset.groupby(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"])
        .agg(
            Metadata_Compound=("Image_Metadata_Compound", "first"),
            Metadata_Concentration=("Image_Metadata_Concentration", "first"),
            Metadata_MoA=("moa", "first"),
        )
        .reset_index()
        .rename(columns={"Image_Metadata_Plate_DAPI": "Metadata_Plate", "Image_Metadata_Well_DAPI": "Metadata_Well"})
    )
    frame = profiles.rename(columns={"Image_Metadata_Plate": "Metadata_Plate", "Image_Metadata_Well": "Metadata_Well"})
    frame = wells.merge(frame, on=WELL_KEYS, how="inner")
    batch = frame["Metadata_Plate"].map(batch_of_plate).rename("Metadata_Batch")
    return pd.concat([frame.iloc[:, :5], batch, frame.iloc[:, 5:]], axis=1)


def standardize_to_controls(
    frame: pd.DataFrame,
    features: list[str],
    by: str | None = "Metadata_Plate",
    control_compound: str = CONTROL_COMPOUND,
) -> pd.DataFrame:
    """Z-score ``features`` against the control wells of each ``by`` group (the whole table if None).

    Features with zero control variance in a group carry no information there and
    become NaN; :func:`aggregate_treatments` drops features that are NaN anywhere.
    """
    out = frame.copy()
    groups = [(None, frame)] if by is None else frame.groupby(by, sort=False)
    for key, group in groups:
        controls = group[group["Metadata_Compound"] == control_compound]
        if controls.empty:
            raise BadInputError(f"{by} {key}: no {control_compound} wells to standardise against")
        mean = controls[features].mean()
        std = controls[features].std(ddof=0).replace(0.0, np.nan)
        out.loc[group.index, features] = ((group[features] - mean) / std).to_numpy()
    return out


def aggregate_treatments(
    frame: pd.DataFrame,
    features: list[str],
    how: Literal["mean", "median"] = "mean",
    control_compound: str = CONTROL_COMPOUND,
) -> tuple[pd.DataFrame, list[str]]:
    """One profile per (compound, concentration), without controls; returns it and the usable features."""
    treated = frame[frame["Metadata_Compound"] != control_compound]
    usable = [f for f in features if np.isfinite(treated[f].to_numpy(dtype=float)).all()]
    if not usable:
        raise BadInputError("no feature is finite across all treated wells")
    grouped = treated.groupby(TREATMENT_KEYS, sort=True)
    profiles = grouped[usable].agg(how)
    meta = grouped.agg(
        Metadata_MoA=("Metadata_MoA", "first"),
        Metadata_Batches=("Metadata_Batch", lambda s: "|".join(sorted(set(s)))),
        Metadata_NWells=("Metadata_MoA", "size"),
    )
    return meta.join(profiles).reset_index(), usable


def similarity(x: np.ndarray, metric: Literal["correlation", "cosine"] = "correlation") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if metric == "correlation":
        x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return x @ x.T


def match_nearest(
    treatments: pd.DataFrame,
    features: list[str],
    metric: Literal["correlation", "cosine"] = "correlation",
    exclude: Literal["compound", "compound+batch"] = "compound",
) -> pd.DataFrame:
    """For each treatment, its most similar treatment that is not the same compound (NSC)
    or shares neither compound nor any batch (NSCB). Treatments with no admissible
    neighbour are reported with ``Metadata_Match`` NaN and are not scored."""
    sim = similarity(treatments[features].to_numpy(), metric)
    compounds = treatments["Metadata_Compound"].to_numpy()
    batches = [set(b.split("|")) for b in treatments["Metadata_Batches"]]
    rows = []
    for i in range(len(treatments)):
        allowed = compounds != compounds[i]
        if exclude == "compound+batch":
            allowed &= np.array([not (batches[i] & other) for other in batches])
        allowed[i] = False
        record = {
            "Metadata_Compound": compounds[i],
            "Metadata_Concentration": treatments["Metadata_Concentration"].iloc[i],
            "Metadata_MoA": treatments["Metadata_MoA"].iloc[i],
        }
        if allowed.any():
            candidates = np.flatnonzero(allowed)
            j = int(candidates[np.argmax(sim[i, candidates])])
            record.update(
                Metadata_MatchCompound=compounds[j],
                Metadata_MatchConcentration=treatments["Metadata_Concentration"].iloc[j],
                Metadata_Match=treatments["Metadata_MoA"].iloc[j],
                similarity=float(sim[i, j]),
            )
        else:
            record.update(Metadata_MatchCompound=None, Metadata_MatchConcentration=np.nan, Metadata_Match=None, similarity=np.nan)
        rows.append(record)
    out = pd.DataFrame(rows)
    out["correct"] = out["Metadata_Match"] == out["Metadata_MoA"]
    return out


def matching_accuracy(matches: pd.DataFrame) -> tuple[float, int]:
    scored = matches[matches["Metadata_Match"].notna()]
    return float(scored["correct"].mean()) if len(scored) else float("nan"), int(len(scored))


def evaluate_profiles(
    frame: pd.DataFrame,
    features: list[str] | None = None,
    standardize: Literal["plate", "all", "none"] = "plate",
    aggregate: Literal["mean", "median"] = "mean",
    metric: Literal["correlation", "cosine"] = "correlation",
) -> dict:
    """The whole harness on a labelled per-well table; returns metrics and both match tables."""
    features = features or feature_columns(frame)
    if not features:
        raise BadInputError("profiles table has no numeric feature columns")
    if standardize != "none":
        frame = standardize_to_controls(frame, features, by="Metadata_Plate" if standardize == "plate" else None)
    treatments, usable = aggregate_treatments(frame, features, aggregate)
    nsc = match_nearest(treatments, usable, metric, "compound")
    nscb = match_nearest(treatments, usable, metric, "compound+batch")
    nsc_acc, n_nsc = matching_accuracy(nsc)
    nscb_acc, n_nscb = matching_accuracy(nscb)
    metrics = {
        "nsc_accuracy": nsc_acc,
        "nscb_accuracy": nscb_acc,
        "n_treatments": int(len(treatments)),
        "n_scored_nsc": n_nsc,
        "n_scored_nscb": n_nscb,
        "n_features": len(usable),
        "n_wells": int(len(frame)),
        "standardize": standardize,
        "aggregate": aggregate,
        "metric": metric,
    }
    return {"metrics": metrics, "nsc": nsc, "nscb": nscb, "treatments": treatments}


def profile_eval(
    profiles: Path,
    out: Path,
    metadata_dir: Path | None = None,
    standardize: Literal["plate", "all", "none"] = "plate",
    aggregate: Literal["mean", "median"] = "mean",
    metric: Literal["correlation", "cosine"] = "correlation",
) -> dict:
    """Score a per-well table and write ``metrics.json``, the match tables and NSC/NSCB confusion PNGs.

    ``profiles`` is either a CellProfiler-style CSV keyed by ``Image_Metadata_Plate`` /
    ``Image_Metadata_Well`` (labelled from the BBBC021 ``metadata_dir``), or a table
    that already carries ``Metadata_Compound``/``Metadata_Concentration``/``Metadata_MoA``
    (e.g. ``wells.parquet`` from ``cellmorph embed``).
    """
    from cellmorph.report import plot_confusion
    from cellmorph.runinfo import atomic_path, require_output_dir, run_info, write_json

    out = require_output_dir(Path(out))
    frame = read_profiles(profiles)
    if "Metadata_MoA" not in frame.columns:
        if metadata_dir is None:
            raise BadInputError(f"{profiles}: no Metadata_MoA column; pass --metadata DIR (BBBC021 metadata folder)")
        frame = attach_bbbc021_metadata(frame, metadata_dir)
    elif "Metadata_Batch" not in frame.columns:
        frame = frame.assign(Metadata_Batch=frame["Metadata_Plate"].astype(str).map(batch_of_plate))
    result = evaluate_profiles(frame, standardize=standardize, aggregate=aggregate, metric=metric)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("nsc", "nscb"):
        matches = result[name]
        with atomic_path(out / f"{name}_matches.csv") as tmp:
            matches.to_csv(tmp, index=False)
        scored = matches[matches["Metadata_Match"].notna()]
        classes = sorted(set(matches["Metadata_MoA"].astype(str)))
        matrix = pd.crosstab(
            pd.Categorical(scored["Metadata_MoA"].astype(str), categories=classes),
            pd.Categorical(scored["Metadata_Match"].astype(str), categories=classes),
            dropna=False,
        ).to_numpy()
        plot_confusion(matrix, classes, out / f"{name}_confusion_matrix.png",
                       title=f"{name.upper()} 1-NN ({metric}), accuracy {result['metrics'][name + '_accuracy']:.3f}")
    metrics = result["metrics"] | {"profiles": str(profiles)}
    write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"provenance": run_info()})
    return metrics
