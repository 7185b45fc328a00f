"""Profile matching: NSC / NSCB nearest-neighbour MoA evaluation of per-well feature tables.

Small functional steps in pycytominer's style, on ``Metadata_*`` tables:

1. :func:`attach_bbbc021_metadata` — label CellProfiler well profiles with compound,
   concentration, MoA and batch from the BBBC021 metadata (the paper's MoA subset).
2. :func:`normalize_profiles` — z-score each feature against the DMSO wells of its plate,
   its batch or all plates (pycytominer's ``normalize(method="standardize")`` with DMSO as
   the samples to fit on; a plate without DMSO falls back to its batch, then to all plates),
   then optionally whiten on DMSO: ZCA ``spherize`` (with a ridge), ``tvn`` (PCA whitening,
   typical variation normalisation) or ``coral`` (each batch's DMSO covariance aligned to all
   DMSO wells', as DeepProfiler's BBBC021 evaluation does). :func:`standardize_to_controls`
   is the plain per-group z-score.
3. :func:`aggregate_treatments` — a treatment's profile is the mean (or median) of its wells.
4. :func:`match_nearest` — 1-NN by correlation or cosine, where the neighbour may not be
   the same compound (NSC) or the same compound or batch (NSCB). NSCB is scored, as is
   common (Ljosa et al. 2013; DeepProfiler), only on treatments whose MoA has a compound in
   another batch: MoAs that live in a single batch are dropped (92 of 103 treatments).

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
from cellmorph.errors import BadInputError, option
from cellmorph.metrics import group_rows
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


def check_finite_features(frame: pd.DataFrame, features: list[str], source) -> None:
    """Refuse missing or infinite feature values, naming the first one (its CSV row counts the header).

    Dropping or imputing them silently would change the answer without a word (one NaN removes
    its feature from every treatment's profile); which repair fits is the user's call: drop the
    feature, drop the well, or impute before scoring.
    """
    values = frame[features].to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        columns = int(bad.any(axis=0).sum())
        raise BadInputError(
            f"{source}: row {row + 2}: column {features[col]} is {values[row, col]} ({int(bad.sum())} missing or "
            f"infinite value(s) in {columns} feature(s)); drop or impute them before profile-eval")


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


Standardize = Literal["plate", "batch", "all", "none"]
Whiten = Literal["none", "spherize", "tvn", "coral"]
_GROUP_COLUMN = {"plate": "Metadata_Plate", "batch": "Metadata_Batch"}


def normalize_profiles(
    frame: pd.DataFrame,
    features: list[str],
    standardize: Standardize = "plate",
    whiten: Whiten = "none",
    strength: float | None = None,
    control_compound: str = CONTROL_COMPOUND,
    log=None,
) -> pd.DataFrame:
    """DMSO-based normalisation of per-well profiles: a z-score per plate, batch or over all plates,
    then optionally a whitening fitted on DMSO wells only.

    * ``standardize``: pycytominer's ``normalize(method="standardize")`` fitted on each group's
      DMSO wells. A plate without DMSO falls back to its batch's DMSO, and a batch without
      DMSO to all plates'; each fallback is reported through ``log``.
    * ``whiten``: ``spherize`` (ZCA whitening on the DMSO wells, ridge ``strength``, default 10,
      added to the covariance's eigenvalues; pycytominer's ``Spherize`` refuses these DMSO sets,
      whose rank a per-plate z-score lowers by one per plate); ``tvn`` (PCA whitening of the DMSO wells
      keeping ``strength`` components, default 100); ``coral`` (per batch, DMSO covariance
      mapped onto that of all DMSO wells, each with ridge ``strength``, default 10). With
      fewer DMSO wells than features (BBBC021: 294 against 513), whitening is underdetermined:
      the ridge or the component count decides how much it can distort.
    Features with zero DMSO variance in a group become NaN there and are dropped later.
    """
    out = frame.copy()
    if standardize != "none":
        out = _standardize(out, features, standardize, control_compound, log or (lambda _: None))
    if whiten == "none":
        return out.copy()
    usable = [f for f in features if np.isfinite(out[f].to_numpy(dtype=float)).all()]
    controls = (out["Metadata_Compound"] == control_compound).to_numpy()
    x = out[usable].to_numpy(dtype=np.float64)
    if whiten == "spherize":
        out[usable] = _zca(x, controls, 10.0 if strength is None else strength)
    elif whiten == "tvn":
        from sklearn.decomposition import PCA

        k = int(min(100 if strength is None else strength, controls.sum() - 1, len(usable)))
        pca = PCA(n_components=k, whiten=True, random_state=0).fit(x[controls])
        whitened = pca.transform(x)
        out = out.drop(columns=[f for f in features if f in out.columns])
        out = pd.concat([out.reset_index(drop=True), pd.DataFrame(whitened, columns=[f"tvn_{i}" for i in range(k)])],
                        axis=1)
    elif whiten == "coral":
        out[usable] = _coral(x, controls, out["Metadata_Batch"].to_numpy(), 10.0 if strength is None else strength)
    else:
        raise BadInputError(f"whiten {whiten!r}: expected none, spherize, tvn or coral")
    return out.copy()  # one block again after the column-wise assignments


def _standardize(frame: pd.DataFrame, features: list[str], level: str, control_compound: str, log) -> pd.DataFrame:
    from pycytominer import normalize

    is_control = frame["Metadata_Compound"] == control_compound
    if not is_control.any():
        raise BadInputError(f"no {control_compound} wells to standardise against")
    samples = f"Metadata_Compound == '{control_compound}'"

    def fit_on(group: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
        # pycytominer fits on the rows its `samples` query selects: the reference's DMSO wells,
        # stacked on top of the group so that they are fitted on and then dropped again.
        # Only the features and the compound go in: pandas' query (which selects `samples`) costs a Series per
        # column of the frame it is given, and a wide metadata table made each plate's call 0.1 s.
        used = [*features, "Metadata_Compound"]
        controls = reference.loc[reference["Metadata_Compound"] == control_compound, used]
        stacked = pd.concat([controls.assign(_reference=True), group[used].assign(_reference=False)],
                            ignore_index=True)
        query = samples + " and _reference == True"
        done = normalize(stacked, features=features, meta_features=["Metadata_Compound", "_reference"],
                         samples=query, method="standardize")
        done = done[~done["_reference"].to_numpy(bool)]
        zero = controls[features].std(ddof=0) == 0
        done.loc[:, zero[zero].index] = np.nan  # no DMSO variation there: no information
        normalised = pd.DataFrame(done[features].to_numpy(), index=group.index, columns=features)
        return pd.concat([group.drop(columns=features), normalised], axis=1)  # the caller restores the order

    if level == "all":
        return fit_on(frame, frame)[frame.columns]
    parts = []
    for key, group in frame.groupby(_GROUP_COLUMN[level], sort=False):
        reference = group
        if not (group["Metadata_Compound"] == control_compound).any():
            batch = frame[frame["Metadata_Batch"] == group["Metadata_Batch"].iloc[0]]
            has_batch = level == "plate" and (batch["Metadata_Compound"] == control_compound).any()
            reference = batch if has_batch else frame
            log(f"note: {level} {key} has no {control_compound} wells; standardised against those of "
                f"{'its batch ' + str(group['Metadata_Batch'].iloc[0]) if has_batch else 'all plates'}")
        parts.append(fit_on(group, reference))
    return pd.concat(parts).loc[frame.index, frame.columns]


def _root_and_inverse(cov: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(C + ridge·I)^½ and (C + ridge·I)^-½ of a covariance matrix C."""
    values, vectors = np.linalg.eigh(cov + ridge * np.eye(len(cov)))
    values = np.clip(values, 1e-12, None)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def _zca(x: np.ndarray, controls: np.ndarray, ridge: float) -> np.ndarray:
    """ZCA whitening fitted on the DMSO rows: centred on their mean, rotated back after scaling."""
    _, inverse_root = _root_and_inverse(np.cov(x[controls], rowvar=False), ridge)
    return (x - x[controls].mean(axis=0)) @ inverse_root


def _coral(x: np.ndarray, controls: np.ndarray, batches: np.ndarray, ridge: float) -> np.ndarray:
    """CORAL (Sun et al. 2016) per batch: whiten by the batch's DMSO covariance, recolour by all DMSO
    wells' covariance, keep the batch's DMSO mean at all DMSO wells' mean."""
    target_mean = x[controls].mean(axis=0)
    target_root, _ = _root_and_inverse(np.cov(x[controls], rowvar=False), ridge)
    out = np.empty_like(x)
    for batch in np.unique(batches):
        rows, reference = batches == batch, (batches == batch) & controls
        if reference.sum() < 2:
            raise BadInputError(f"whiten coral: batch {batch} has fewer than 2 DMSO wells to fit its covariance")
        _, inverse_root = _root_and_inverse(np.cov(x[reference], rowvar=False), ridge)
        out[rows] = (x[rows] - x[reference].mean(axis=0)) @ inverse_root @ target_root + target_mean
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
    profiles = group_rows(treated, TREATMENT_KEYS, usable, how, first=["Metadata_MoA"],
                          joined={"Metadata_Batches": "Metadata_Batch"}, counts={"Metadata_NWells": None})
    return profiles, usable


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
    out["Metadata_Scored"] = out["Metadata_Match"].notna()
    if exclude == "compound+batch":
        # the common NSCB convention: an MoA found in a single batch cannot be matched across
        # batches, so its treatments are not scored (BBBC021: 2 MoAs, 11 of 103 treatments)
        moa_batches = {moa: set().union(*(batches[i] for i in np.flatnonzero(treatments["Metadata_MoA"].to_numpy() == moa)))
                       for moa in set(treatments["Metadata_MoA"])}
        out["Metadata_Scored"] &= out["Metadata_MoA"].map(lambda moa: len(moa_batches[moa]) > 1).to_numpy()
    return out


def matching_accuracy(matches: pd.DataFrame) -> tuple[float, int]:
    scored = matches[matches["Metadata_Scored"]] if "Metadata_Scored" in matches else matches[matches["Metadata_Match"].notna()]
    return float(scored["correct"].mean()) if len(scored) else float("nan"), int(len(scored))


def evaluate_profiles(
    frame: pd.DataFrame,
    features: list[str] | None = None,
    standardize: Standardize = "plate",
    aggregate: Literal["mean", "median"] = "mean",
    metric: Literal["correlation", "cosine"] = "correlation",
    whiten: Whiten = "none",
    strength: float | None = None,
    log=None,
) -> dict:
    """The whole harness on a labelled per-well table; returns metrics and both match tables."""
    features = features or feature_columns(frame)
    if not features:
        raise BadInputError("profiles table has no numeric feature columns")
    frame = normalize_profiles(frame, features, standardize, whiten, strength, log=log)
    features = [c for c in frame.columns if c.startswith("tvn_")] if whiten == "tvn" else features
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
        "whiten": whiten,
        "whiten_strength": strength,
        "aggregate": aggregate,
        "metric": metric,
        "nscb_convention": "treatments of MoAs found in a single batch are not scored",
    }
    return {"metrics": metrics, "nsc": nsc, "nscb": nscb, "treatments": treatments, "wells": frame, "features": usable}


def profile_eval(
    profiles: Path,
    out: Path,
    metadata_dir: Path | None = None,
    standardize: Standardize = "plate",
    aggregate: Literal["mean", "median"] = "mean",
    metric: Literal["correlation", "cosine"] = "correlation",
    whiten: Whiten = "none",
    strength: float | None = None,
    log=None,
    mean_ap: bool | None = None,
) -> dict:
    """Score a per-well table and write ``metrics.json``, the match tables and NSC/NSCB confusion PNGs.

    ``profiles`` is either a CellProfiler-style CSV keyed by ``Image_Metadata_Plate`` /
    ``Image_Metadata_Well`` (labelled from the BBBC021 ``metadata_dir``), or a table
    that already carries ``Metadata_Compound``/``Metadata_Concentration``/``Metadata_MoA``
    (e.g. ``wells.parquet`` from ``cellmorph embed``).

    ``mean_ap``: copairs mAP of the normalised profiles too (:mod:`cellmorph.retrieval`: replicate
    retrieval of the wells against DMSO wells, MoA retrieval of the treatment profiles), written to
    ``map_replicates.csv``/``map_moa.csv`` and ``metrics.json["map"]``. None: where copairs is installed
    (a note otherwise); True without copairs: one error line saying how to install it.
    """
    from cellmorph.figures import plot_confusion
    from cellmorph.retrieval import require_copairs
    from cellmorph.runinfo import atomic_path, require_output_dir, run_info, write_json

    if mean_ap:
        require_copairs()  # before any work: the one line that says how to install it
    out = require_output_dir(Path(out))
    frame = read_profiles(profiles)
    check_finite_features(frame, feature_columns(frame), profiles)
    if "Metadata_MoA" not in frame.columns:
        if metadata_dir is None:
            raise BadInputError(f"{profiles}: no Metadata_MoA column; pass {option('metadata')} DIR (BBBC021 metadata folder)")
        frame = attach_bbbc021_metadata(frame, metadata_dir)
    elif "Metadata_Batch" not in frame.columns:
        frame = frame.assign(Metadata_Batch=frame["Metadata_Plate"].astype(str).map(batch_of_plate))
    result = evaluate_profiles(frame, standardize=standardize, aggregate=aggregate, metric=metric, whiten=whiten,
                               strength=strength, log=log)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("nsc", "nscb"):
        matches = result[name]
        with atomic_path(out / f"{name}_matches.csv") as tmp:
            matches.to_csv(tmp, index=False)
        scored = matches[matches["Metadata_Scored"]]
        classes = sorted(set(matches["Metadata_MoA"].astype(str)))
        # classes × classes counts, also where no treatment could be scored (NSCB of a single batch)
        row_of = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(matrix, (scored["Metadata_MoA"].astype(str).map(row_of).to_numpy(dtype=np.int64),
                           scored["Metadata_Match"].astype(str).map(row_of).to_numpy(dtype=np.int64)), 1)
        plot_confusion(matrix, classes, out / f"{name}_confusion_matrix.png",
                       title=f"{name.upper()} 1-NN ({metric}), accuracy {result['metrics'][name + '_accuracy']:.3f}")
    metrics = result["metrics"] | {"profiles": str(profiles)}
    found = _retrieval(result, out, metric, mean_ap, log)
    if found is not None:
        metrics["map"] = found
    write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"provenance": run_info()})
    return metrics


def _retrieval(result: dict, out: Path, metric: str, mean_ap: bool | None, log) -> dict | None:
    """copairs mAP of the normalised wells and treatment profiles into ``out``; its summary, why there is
    none, or None (not asked for). A folder scored again keeps no earlier run's mAP files."""
    from cellmorph.retrieval import (
        CopairsMissing,
        Retrieval,
        retrieval,
        summary_line,
        write_retrieval,
    )

    if mean_ap is False:
        write_retrieval(out, Retrieval())
        return None
    try:
        found = retrieval(result["wells"], result["treatments"], result["features"], distance=metric,
                          sources=_sources(result["metrics"]), log=log)
    except CopairsMissing as error:
        if mean_ap:
            raise
        if log is not None:
            log(f"note: no mAP: {error}")
        write_retrieval(out, Retrieval())
        return {"skipped": str(error)}
    write_retrieval(out, found)
    if log is not None and summary_line(found.summary):
        log(summary_line(found.summary))
    return found.summary


def _sources(metrics: dict) -> dict:
    how = f"standardize {metrics['standardize']}, whiten {metrics['whiten']}"
    return {"replicates": f"well profiles ({how})", "moa": f"treatment profiles ({metrics['aggregate']} of the wells)"}
