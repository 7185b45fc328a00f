"""AnnData (``.h5ad``) copies of cellmorph's tables, for scanpy and the scverse tools.

cellmorph's tables stay Parquet (pycytominer reads them); this module owns the ``.h5ad`` companions:
``obs`` holds the ``Metadata_*`` columns and the per-row results (call, confidence, prediction set,
Novel flag), ``X`` the features (``emb_*``) or the class probabilities (``prob_*``) as float32, and
``uns["cellmorph"]`` the run's provenance (resolved config, package versions, git commit) as JSON text,
since AnnData keeps neither ``None`` nor mixed lists in ``uns``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError

INSTALL_HINT = "pip install 'cellmorph[anndata]'"
FEATURE_PREFIXES = ("emb_", "prob_")


def _anndata():
    try:
        import anndata
    except ImportError:
        raise CellmorphError(f"--h5ad needs the anndata package: {INSTALL_HINT}") from None
    return anndata


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that become ``X``: the embedding (``emb_*``) if any, else the probabilities (``prob_*``)."""
    for prefix in FEATURE_PREFIXES:
        columns = [c for c in frame.columns if c.startswith(prefix)]
        if columns:
            return columns
    # A CellProfiler-style profile: every numeric column that is not metadata.
    return [c for c in frame.columns if not c.startswith("Metadata_") and pd.api.types.is_numeric_dtype(frame[c])]


def _obs_column(values: pd.Series) -> pd.Series:
    """A column h5ad can store: numbers and booleans as they are, anything else as text (categories where
    few values repeat, as scanpy expects of groupings)."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return values
    text = values.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else
                      (";".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else str(v)))
    return text.astype("category") if text.nunique() < max(2, len(text) // 2) else text.astype(str)


def to_anndata(frame: pd.DataFrame, provenance: dict | None = None, features: list[str] | None = None):
    """``frame`` (one row per tile, well or treatment) as an AnnData object; see the module docstring."""
    anndata = _anndata()
    features = features if features is not None else feature_columns(frame)
    if not features:
        raise CellmorphError("no feature or probability columns to put in an AnnData's X")
    obs = pd.DataFrame({c: _obs_column(frame[c]) for c in frame.columns if c not in set(features)})
    keys = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Tile") if c in obs.columns]
    if not keys:
        keys = [c for c in ("Metadata_Compound", "Metadata_Concentration") if c in obs.columns]
    names = obs[keys].astype(str).agg("_".join, axis=1) if keys else pd.Series(np.arange(len(obs)).astype(str))
    if names.duplicated().any():  # e.g. tiles of one site: their row number keeps them apart
        names = names + "_" + pd.Series(np.arange(len(obs)).astype(str), index=names.index)
    obs.index = pd.Index(names.to_numpy(), name="obs_names")
    var = pd.DataFrame(index=pd.Index(features, name="var_names"))
    uns = {"cellmorph": {"provenance_json": json.dumps(provenance or {}, default=str, sort_keys=True)}}
    return anndata.AnnData(X=frame[features].to_numpy(np.float32), obs=obs, var=var, uns=uns)


def write_h5ad(frame: pd.DataFrame, path: Path, provenance: dict | None = None,
               features: list[str] | None = None) -> Path:
    """Write ``frame`` as ``path`` (``.h5ad``), atomically."""
    from cellmorph.runinfo import atomic_path

    adata = to_anndata(frame, provenance, features)
    with atomic_path(Path(path), suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def read_provenance(adata) -> dict:
    """The provenance that :func:`to_anndata` stored in ``adata``."""
    return json.loads(adata.uns["cellmorph"]["provenance_json"])
