"""Profile normalisation on the real CellProfiler well means of BBBC021 (issue 19).

    python benchmarks/profiles.py [--shared ../shared/data/bbbc021]

Ljosa et al. 2013's per-well mean profiles (632 wells × 514 features; 596 wells of the paper's
MoA subset and their plates' DMSO), labelled from the official metadata, scored by NSC and NSCB
1-NN matching (correlation, treatment = mean of its wells) after each normalisation. NSC scores
all 103 treatments; NSCB the 92 whose MoA is found in more than one batch (the common
convention). Deterministic: no seed is involved. Prints a Markdown table and one JSON line.

``--probe`` adds a second table: the same wells classified as the linear probe classifies tiles,
a logistic regression (features standardised on the training wells, C as given) trained
leave-one-compound-out on the 12 MoAs, each treatment called from the median (and the mean) of
its wells' probabilities. It asks whether the per-plate DMSO z-score that helps NSC also helps
a trained classifier.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIONS = [  # (standardize, whiten, strength, what it is)
    ("plate", "none", None, "z-score to each plate's DMSO (pycytominer standardize)"),
    ("batch", "none", None, "z-score to each batch's DMSO"),
    ("all", "none", None, "z-score to all DMSO wells"),
    ("none", "none", None, "raw means"),
    ("plate", "spherize", 1.0, "plate z-score, then ZCA on DMSO, ridge 1"),
    ("plate", "spherize", 10.0, "plate z-score, then ZCA on DMSO, ridge 10"),
    ("plate", "spherize", 100.0, "plate z-score, then ZCA on DMSO, ridge 100"),
    ("plate", "tvn", 50, "plate z-score, then TVN (PCA whitening on DMSO), 50 components"),
    ("plate", "tvn", 100, "plate z-score, then TVN, 100 components"),
    ("plate", "coral", 10.0, "plate z-score, then CORAL per batch onto all DMSO, ridge 10"),
    ("batch", "coral", 10.0, "batch z-score, then CORAL per batch, ridge 10"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data" / "bbbc021")
    parser.add_argument("--probe", action="store_true", help="also the LOCO logistic-regression table")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from cellmorph.profiles import attach_bbbc021_metadata, evaluate_profiles, read_profiles

    wells = attach_bbbc021_metadata(read_profiles(args.shared / "profiles" / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"),
                                    args.shared / "metadata")
    rows = []
    print("| standardize | whiten | strength | NSC (103) | NSCB (92) | features | what | s |")
    print("|---|---|---|---|---|---|---|---|")
    for standardize, whiten, strength, what in OPTIONS:
        t = time.perf_counter()
        metrics = evaluate_profiles(wells, standardize=standardize, whiten=whiten, strength=strength)["metrics"]
        row = {"standardize": standardize, "whiten": whiten, "strength": strength, "nsc": metrics["nsc_accuracy"],
               "nscb": metrics["nscb_accuracy"], "n_nsc": metrics["n_scored_nsc"], "n_nscb": metrics["n_scored_nscb"],
               "n_features": metrics["n_features"], "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(f"| {standardize} | {whiten} | {'' if strength is None else strength} | {row['nsc']:.3f} | "
              f"{row['nscb']:.3f} | {row['n_features']} | {what} | {row['seconds']} |", flush=True)
    print(json.dumps(rows))
    if args.probe:
        rows += probe_table(wells)
    return rows


PROBE_OPTIONS = [("none", "none"), ("all", "none"), ("batch", "none"), ("plate", "none"), ("plate", "coral"),
                 ("plate", "tvn")]


def probe_table(wells) -> list[dict]:
    """LOCO logistic regression on the well profiles after each normalisation (see the docstring)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cellmorph.profiles import feature_columns, normalize_profiles

    features = feature_columns(wells)
    rows = []
    print("\n| standardize | whiten | C | treatment (median) | treatment (mean) | well | s |")
    print("|---|---|---|---|---|---|---|")
    for standardize, whiten in PROBE_OPTIONS:
        frame = normalize_profiles(wells, features, standardize=standardize, whiten=whiten)
        treated = frame[frame["Metadata_Compound"] != "DMSO"].reset_index(drop=True)
        usable = [c for c in treated.columns if c in features or c.startswith("tvn_")]
        usable = [c for c in usable if np.isfinite(treated[c].to_numpy(float)).all()]
        x, y = treated[usable].to_numpy(float), treated["Metadata_MoA"].to_numpy()
        compounds = treated["Metadata_Compound"].to_numpy()
        for c_value in (0.1, 1.0, 10.0):
            t = time.perf_counter()
            calls = {"median": [], "mean": []}
            well_right = []
            for compound in np.unique(compounds):
                test = compounds == compound
                scaler = StandardScaler().fit(x[~test])
                head = LogisticRegression(C=c_value, max_iter=3000).fit(scaler.transform(x[~test]), y[~test])
                probs = head.predict_proba(scaler.transform(x[test]))
                well_right += list(head.classes_[probs.argmax(1)] == y[test])
                concentration = treated.loc[test, "Metadata_Concentration"].to_numpy()
                for dose in np.unique(concentration):
                    members = probs[concentration == dose]
                    truth = y[test][concentration == dose][0]
                    calls["median"].append(head.classes_[np.median(members, 0).argmax()] == truth)
                    calls["mean"].append(head.classes_[members.mean(0).argmax()] == truth)
            row = {"standardize": standardize, "whiten": whiten, "C": c_value,
                   "treatment_median": float(np.mean(calls["median"])), "treatment_mean": float(np.mean(calls["mean"])),
                   "n_treatments": len(calls["median"]), "well": float(np.mean(well_right)),
                   "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"| {standardize} | {whiten} | {c_value} | {row['treatment_median']:.3f} | "
                  f"{row['treatment_mean']:.3f} | {row['well']:.3f} | {row['seconds']} |", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
