"""Coverage of conformal sets and calibration error of the confidence, held out by compound.

    python benchmarks/calibration.py                      # the paper's own LOCO outputs (shared/)
    python benchmarks/calibration.py RUN/treatments.csv   # out-of-fold scores of a cellmorph cv run

For each set of out-of-fold treatment probabilities, every compound is treated as new in turn:
sets and temperature are calibrated on the other compounds' scores, then applied to its
treatments (:mod:`cellmorph.calibration`). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from cellmorph.calibration import held_out_calibration_error, held_out_coverage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021"
PAPER = SHARED / "reference" / "kensert2019_predictions_bbbc021v1.xlsx"
MOA = SHARED / "metadata" / "BBBC021_v1_moa.csv"
ALPHAS = (0.05, 0.1, 0.2)


def measure(scores: pd.DataFrame) -> dict:
    classes = sorted(c[len("prob_"):] for c in scores.columns if c.startswith("prob_"))
    return {"coverage": [held_out_coverage(scores, classes, a) for a in ALPHAS],
            "calibration_error": held_out_calibration_error(scores, classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="*", type=Path, help="treatments.csv of cv runs (default: the paper's)")
    args = parser.parse_args()
    if args.scores:
        tables = {str(p): pd.read_csv(p) for p in args.scores}
    else:
        from cellmorph.stored import read_stored_predictions

        tables = read_stored_predictions(PAPER, MOA)
    results = {name: measure(frame) for name, frame in tables.items()}
    for name, result in results.items():
        ece = result["calibration_error"]
        cover = "  ".join(f"α={c['alpha']}: {c['coverage']:.3f} (size {c['mean_set_size']:.2f})"
                          for c in result["coverage"])
        print(f"{name}: n={ece['n']} accuracy {ece['accuracy']:.3f}; coverage {cover}; ECE raw "
              f"{ece['ece_raw']:.3f}, renormalised {ece['ece_renormalised']:.3f}, temperature-scaled {ece['ece_temperature_scaled']:.3f} "
              f"(median T {ece['median_temperature']:.2f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
