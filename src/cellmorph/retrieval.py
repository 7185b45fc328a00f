"""Mean average precision (mAP) of profiles, computed by copairs itself: replicate and MoA retrieval.

Two questions a profile should answer (Kalinin et al., "A versatile information retrieval framework
for evaluating profile strength and similarity", 2025; the copairs examples):

* **Replicate retrieval** ("phenotypic activity"): does a treatment's well find its replicate wells
  before the DMSO wells? Each treated well ranks the other wells of its treatment (same compound and
  concentration, another well: the positives) among the DMSO wells (the negatives) by similarity;
  its average precision (AP) is averaged over the treatment's wells. DMSO wells are never positives
  of each other (copairs' reference-index idiom), and other treatments are left out of the ranking.
* **MoA retrieval** ("phenotypic consistency"): does a treatment profile find the treatments of
  other compounds of its MoA before those of other MoAs? Positives share the MoA and differ in
  compound (another dose of the same compound is neither positive nor negative, as in NSC);
  negatives are the treatments of other MoAs; DMSO is left out. mAP is averaged per MoA.

Each mAP gets copairs' permutation p-value (its null of ``null_size`` random rankings of the same
numbers of positives and pairs, from ``seed``), Benjamini-Hochberg corrected over the treatments
(or MoAs) by copairs' own ``mean_average_precision``; the **fraction retrieved** is the share of the
scored treatments (MoAs) whose corrected p is below ``threshold`` (0.05). A treatment with one well,
or an MoA with one compound, has no positive pair and is not scored (listed in the summary).

copairs is an optional dependency (``pip install 'cellmorph[copairs]'``): without it
:func:`require_copairs` raises :class:`CopairsMissing`, one line that says so. The null
distributions go to a temporary folder per call (copairs otherwise caches them in ``~/.copairs``,
keyed so that a later call could reuse draws made under another seed order), so the same profiles
always give the same p-values. Used by ``cellmorph profile-eval``, ``embed`` and ``cv`` (on the
held-out probabilities) and shown by the HTML report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.table import CONTROL_COMPOUND
from cellmorph.errors import BadInputError, CellmorphError
from cellmorph.metrics import group_rows
from cellmorph.schema import TREATMENT_KEYS, TRUE_COLUMN, UNLABELLED, WELL_KEYS

NULL_SIZE = 10_000  # permutations of the null: p-values down to 1/10001
SEED = 0
THRESHOLD = 0.05
REPLICATES_FILE = "map_replicates.csv"
MOA_FILE = "map_moa.csv"
INSTALL = "pip install 'cellmorph[copairs]'"
PARTS = ("replicates", "moa")
CORRECTION = "Benjamini-Hochberg over the treatments (MoAs) scored, copairs.map.mean_average_precision"

# Integer codes for copairs' pair rules: names from the user's tables never enter its SQL, and a
# missing concentration (NaN) is a value of its own instead of a null copairs refuses.
_TREATMENT, _REFERENCE, _WELL = "Metadata_TreatmentIndex", "Metadata_ReferenceIndex", "Metadata_WellIndex"
_MOA, _COMPOUND = "Metadata_MoAIndex", "Metadata_CompoundIndex"
_RESULT_COLUMNS = ["mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value",
                   "below_p", "below_corrected_p"]


class CopairsMissing(CellmorphError):
    """copairs (the optional ``copairs`` extra) is not installed."""


def require_copairs():
    """``copairs.map``, or :class:`CopairsMissing` with the line that says how to install it."""
    try:
        import copairs.map as copairs_map
    except ImportError:
        raise CopairsMissing(f"mean average precision (mAP) needs copairs: {INSTALL}") from None
    return copairs_map


def copairs_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("copairs")
    except PackageNotFoundError:
        return None


@dataclass
class Retrieval:
    """Per-treatment and per-MoA mAP tables (None where that part was not scored) and the summary."""

    replicates: pd.DataFrame | None = None
    moa: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the two retrievals
def replicate_pairs() -> dict:
    """copairs' pair rules of replicate retrieval on a frame with :func:`replicate_meta`'s columns."""
    return {"pos_sameby": [_TREATMENT, _REFERENCE], "pos_diffby": [_WELL], "neg_sameby": [],
            "neg_diffby": [_TREATMENT, _REFERENCE]}


def replicate_meta(wells: pd.DataFrame, control: str = CONTROL_COMPOUND) -> pd.DataFrame:
    """Integer codes for the pair rules: treatment, reference (a DMSO well's own row, -1 for a treated
    well: DMSO wells are never positives of each other) and well."""
    is_control = (wells["Metadata_Compound"].astype(str) == control).to_numpy()
    meta = pd.DataFrame(index=range(len(wells)))
    meta[_TREATMENT] = _codes(wells, TREATMENT_KEYS)
    meta[_REFERENCE] = np.where(is_control, np.arange(len(wells)), -1)
    meta[_WELL] = _codes(wells, WELL_KEYS) if set(WELL_KEYS) <= set(wells.columns) else np.arange(len(wells))
    return meta


def moa_pairs() -> dict:
    """copairs' pair rules of MoA retrieval: same MoA and another compound; negatives another MoA."""
    return {"pos_sameby": [_MOA], "pos_diffby": [_COMPOUND], "neg_sameby": [], "neg_diffby": [_MOA]}


def replicate_map(wells: pd.DataFrame, features: list[str], distance: str = "cosine", null_size: int = NULL_SIZE,
                  seed: int = SEED, threshold: float = THRESHOLD, control: str = CONTROL_COMPOUND,
                  source: str = "wells") -> tuple[pd.DataFrame, dict]:
    """Replicate retrieval of per-well profiles against their DMSO wells: one row per scored treatment."""
    for column in TREATMENT_KEYS:
        if column not in wells.columns:
            raise BadInputError(f"{source}: no {column} column: replicate retrieval groups wells by treatment")
    wells, dropped = _finite_rows(wells, features, source)
    is_control = (wells["Metadata_Compound"].astype(str) == control).to_numpy()
    if not is_control.any():
        raise BadInputError(f"{source}: no {control} wells: replicate retrieval ranks each treatment's wells "
                            f"against the {control} wells")
    treated = wells[~is_control]
    sizes = treated.groupby(TREATMENT_KEYS, dropna=False).size()
    if not (sizes >= 2).any():
        raise BadInputError(f"{source}: no treatment has two or more wells: replicate retrieval needs replicates")
    x, used = _features(wells, features, source)
    meta = replicate_meta(wells, control)
    ap = _average_precision(meta, x, replicate_pairs(), distance)
    ap = ap[~is_control]
    scores = _mean_average_precision(ap, [_TREATMENT], null_size, threshold, seed)
    names = pd.DataFrame({_TREATMENT: meta[_TREATMENT].to_numpy()[~is_control]}).reset_index(drop=True)
    keep = TREATMENT_KEYS + ([TRUE_COLUMN] if TRUE_COLUMN in wells.columns else [])
    names = pd.concat([names, treated[keep].reset_index(drop=True)], axis=1)
    names = names.groupby(_TREATMENT, sort=False).agg(**{c: (c, "first") for c in keep},
                                                     n_wells=("Metadata_Compound", "size")).reset_index()
    table = names.merge(scores, on=_TREATMENT, how="inner")
    table = table.sort_values(TREATMENT_KEYS, kind="stable")[keep + ["n_wells"] + _RESULT_COLUMNS]
    unscored = names[~names[_TREATMENT].isin(scores[_TREATMENT])]
    missed = [_treatment_name(c, d) for c, d in unscored[TREATMENT_KEYS].itertuples(index=False, name=None)]
    summary = _summary(table, len(names), sorted(missed), "treatments") | {
        "profiles": source, "positives": "the other wells of the treatment (same compound and concentration)",
        "negatives": f"{control} wells", "n_wells": len(treated), "n_control_wells": int(is_control.sum()),
        "n_features": len(used), "n_dropped": dropped}
    return table.reset_index(drop=True), summary


def moa_map(treatments: pd.DataFrame, features: list[str], distance: str = "cosine", null_size: int = NULL_SIZE,
            seed: int = SEED, threshold: float = THRESHOLD, control: str = CONTROL_COMPOUND,
            source: str = "treatments") -> tuple[pd.DataFrame, dict]:
    """MoA retrieval of treatment profiles (DMSO and unlabelled ones left out): one row per scored MoA."""
    for column in (TRUE_COLUMN, "Metadata_Compound"):
        if column not in treatments.columns:
            raise BadInputError(f"{source}: no {column} column: MoA retrieval needs each treatment's MoA and compound")
    moa = treatments[TRUE_COLUMN]
    labelled = (moa.notna() & (moa.astype(str) != UNLABELLED) & (moa.astype(str) != control)
                & (treatments["Metadata_Compound"].astype(str) != control)).to_numpy()
    frame, dropped = _finite_rows(treatments[labelled], features, source)
    compounds = frame.groupby(TRUE_COLUMN)["Metadata_Compound"].nunique()
    if len(compounds) < 2:
        raise BadInputError(f"{source}: MoA retrieval needs treatments of two or more MoAs "
                            f"(found {len(compounds)})")
    if not (compounds >= 2).any():
        raise BadInputError(f"{source}: no MoA has two or more compounds: MoA retrieval counts only other compounds "
                            "of the same MoA as positives")
    x, used = _features(frame, features, source)
    meta = pd.DataFrame({_MOA: _codes(frame, [TRUE_COLUMN]), _COMPOUND: _codes(frame, ["Metadata_Compound"])})
    ap = _average_precision(meta, x, moa_pairs(), distance)
    scores = _mean_average_precision(ap, [_MOA], null_size, threshold, seed)
    names = pd.DataFrame({_MOA: meta[_MOA], TRUE_COLUMN: frame[TRUE_COLUMN].astype(str),
                          "Metadata_Compound": frame["Metadata_Compound"].astype(str)})
    names = names.groupby(_MOA, sort=False).agg(**{TRUE_COLUMN: (TRUE_COLUMN, "first")},
                                               n_treatments=(TRUE_COLUMN, "size"),
                                               n_compounds=("Metadata_Compound", "nunique")).reset_index()
    table = names.merge(scores, on=_MOA, how="inner").sort_values(TRUE_COLUMN, kind="stable")
    table = table[[TRUE_COLUMN, "n_treatments", "n_compounds"] + _RESULT_COLUMNS]
    missed = sorted(set(names[TRUE_COLUMN]) - set(table[TRUE_COLUMN]))
    summary = _summary(table, len(names), missed, "MoAs") | {
        "profiles": source, "positives": "treatments of other compounds of the same MoA",
        "negatives": "treatments of other MoAs", "n_treatments": len(frame), "n_features": len(used),
        "n_dropped": dropped}
    return table.reset_index(drop=True), summary


def retrieval(wells: pd.DataFrame | None, treatments: pd.DataFrame | None, features: list[str],
              distance: str = "cosine", null_size: int = NULL_SIZE, seed: int = SEED, threshold: float = THRESHOLD,
              control: str = CONTROL_COMPOUND, aggregate: str = "mean", sources: dict | None = None,
              log=None) -> Retrieval:
    """Both retrievals: replicates on ``wells``, MoAs on ``treatments`` (None: the ``aggregate`` of the
    treated wells per compound and concentration). A part the data cannot support (no DMSO wells, no
    replicates, no MoA with two compounds) is skipped with its reason in the summary and a note through
    ``log``; copairs missing raises :class:`CopairsMissing` (see :func:`retrieval_or_note`)."""
    require_copairs()
    log = log or (lambda _: None)
    sources = {"replicates": "wells", "moa": "treatments"} | (sources or {})
    settings = {"distance": distance, "null_size": int(null_size), "seed": int(seed), "threshold": float(threshold),
                "correction": CORRECTION, "copairs": copairs_version()}
    result = Retrieval(summary=dict(settings))
    if treatments is None and wells is not None:
        treatments = treatment_profiles(wells, features, aggregate, control)
    for part, frame, run in (("replicates", wells, replicate_map), ("moa", treatments, moa_map)):
        if frame is None:
            result.summary[part] = {"skipped": f"no {sources[part]}"}
            continue
        try:
            table, summary = run(frame, features, distance, null_size, seed, threshold, control, sources[part])
        except BadInputError as error:
            log(f"note: {'replicate' if part == 'replicates' else 'MoA'} retrieval (mAP) not scored: {error}")
            result.summary[part] = {"skipped": str(error)}
            continue
        if summary["n_dropped"]:
            log(f"note: {'replicate' if part == 'replicates' else 'MoA'} retrieval (mAP): {summary['n_dropped']} "
                f"of the {sources[part]} have no finite feature (e.g. a DMSO z-score on a plate with one DMSO well) "
                "and are left out")
        setattr(result, part, table)
        result.summary[part] = summary
    return result


def retrieval_or_note(*args, log=None, **kwargs) -> Retrieval | None:
    """:func:`retrieval` for a command where mAP is an add-on: without copairs, a note and None."""
    try:
        return retrieval(*args, log=log, **kwargs)
    except CopairsMissing as error:
        if log is not None:
            log(f"note: no mAP: {error}")
        return None


def treatment_profiles(wells: pd.DataFrame, features: list[str], how: str = "mean",
                       control: str = CONTROL_COMPOUND) -> pd.DataFrame:
    """One profile per (compound, concentration) of the treated wells: the ``how`` of its wells."""
    treated = wells[wells["Metadata_Compound"].astype(str) != control]
    first = [TRUE_COLUMN] if TRUE_COLUMN in treated.columns else []
    return group_rows(treated, TREATMENT_KEYS, features, how, first=first, counts={"n_wells": None})


# --------------------------------------------------------------------------- files and lines
def write_retrieval(out: Path, result: Retrieval) -> None:
    """``map_replicates.csv`` and ``map_moa.csv`` (atomically) for the parts scored; a part not scored
    leaves no file (an earlier run's is removed)."""
    from cellmorph.runinfo import write_csv

    for name, table in ((REPLICATES_FILE, result.replicates), (MOA_FILE, result.moa)):
        path = Path(out) / name
        if table is None:
            path.unlink(missing_ok=True)
        else:
            write_csv(path, table)


def summary_line(summary: dict) -> str | None:
    """One line for the console: each part's mean mAP and fraction retrieved."""
    parts = []
    for part, what in (("replicates", "replicate"), ("moa", "MoA")):
        record = summary.get(part) or {}
        if "mean_map" in record:
            parts.append(f"{what} retrieval mAP {record['mean_map']:.3f}, {record['n_retrieved']}/{record['n_scored']} "
                         f"{record['unit']} retrieved (corrected p < {summary.get('threshold', THRESHOLD):g})")
    return "mAP: " + "; ".join(parts) if parts else None


def headline(summary: dict | None) -> dict:
    """The few numbers a command prints: mean mAP and fraction retrieved of each part scored."""
    out = {}
    for part in PARTS:
        record = (summary or {}).get(part) or {}
        if "mean_map" in record:
            out[f"map_{part}"] = record["mean_map"]
            out[f"map_{part}_fraction_retrieved"] = record["fraction_retrieved"]
    return out


# --------------------------------------------------------------------------- helpers
def _codes(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return frame.groupby(columns, sort=True, dropna=False).ngroup().to_numpy(dtype=np.int64)


def _treatment_name(compound, concentration) -> str:
    try:
        return f"{compound} @ {concentration:g}"
    except (TypeError, ValueError):
        return f"{compound} @ {concentration}"


def _finite_rows(frame: pd.DataFrame, features: list[str], source: str) -> tuple[pd.DataFrame, int]:
    """``frame`` without the profiles that have no finite feature at all (a DMSO z-score of a plate with
    one DMSO well is NaN throughout), and how many were left out."""
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise BadInputError(f"{source}: no feature column {missing[0]}")
    keep = np.isfinite(frame[features].to_numpy(dtype=np.float64)).any(axis=1)
    return frame[keep].reset_index(drop=True), int((~keep).sum())


def _features(frame: pd.DataFrame, features: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """The feature matrix, without features that are not finite in every row (copairs refuses NaN)."""
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise BadInputError(f"{source}: no feature column {missing[0]}")
    x = frame[features].to_numpy(dtype=np.float64)
    finite = np.isfinite(x).all(axis=0)
    if not finite.any():
        raise BadInputError(f"{source}: no feature is finite in every profile")
    return x[:, finite], [f for f, ok in zip(features, finite) if ok]


def _average_precision(meta: pd.DataFrame, x: np.ndarray, pairs: dict, distance: str) -> pd.DataFrame:
    copairs_map = require_copairs()
    from copairs.matching import UnpairedException

    try:
        return copairs_map.average_precision(meta, x, **pairs, distance=distance, progress_bar=False)
    except UnpairedException as error:
        raise BadInputError(f"copairs found no pairs to rank ({error})") from None


def _mean_average_precision(ap: pd.DataFrame, sameby: list[str], null_size: int, threshold: float,
                            seed: int) -> pd.DataFrame:
    copairs_map = require_copairs()
    with tempfile.TemporaryDirectory(prefix="cellmorph-copairs-") as cache:
        scores = copairs_map.mean_average_precision(ap, sameby, null_size=null_size, threshold=threshold, seed=seed,
                                                    progress_bar=False, max_workers=1, cache_dir=cache)
    return scores.drop(columns=["indices"], errors="ignore")


def _summary(table: pd.DataFrame, n_groups: int, missed: list[str], unit: str) -> dict:
    retrieved = int(table["below_corrected_p"].sum())
    n = len(table)
    return {"mean_map": float(table["mean_average_precision"].mean()) if n else float("nan"),
            "fraction_retrieved": retrieved / n if n else float("nan"), "n_retrieved": retrieved, "n_scored": n,
            "n_groups": int(n_groups), "unit": unit, "not_scored": missed}
