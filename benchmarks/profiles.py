"""Profile normalisation on the real CellProfiler well means of BBBC021 (issue 19).

    python benchmarks/profiles.py [--shared ../shared/data/bbbc021]

Ljosa et al. 2013's per-well mean profiles (632 wells × 514 features; 596 wells of the paper's
MoA subset and their plates' DMSO), labelled from the official metadata, scored by NSC and NSCB
1-NN matching (correlation, treatment = mean of its wells) after each normalisation. NSC scores
all 103 treatments; NSCB the 92 whose MoA is found in more than one batch (the common
convention). Deterministic: no seed is involved. Prints a Markdown table and one JSON line.
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
    return rows


if __name__ == "__main__":
    main()
