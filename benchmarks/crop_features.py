"""Feature stages × 8-bit scaling × embedding TTA on the real crops-week4 cells (issue 19).

    python benchmarks/crop_features.py [--size 128] [--threads 2] [--tta none,dihedral]
                                       [--scalings image,fixed] [--specs stage3,stage4,...]

The only real labelled cells here: 1,120 BBBC021 MCF-7 crops of 6 Week4 plates, DMSO and
cycloheximide at 5, 15 and 50 µM. Two tasks, each a standardised logistic regression on frozen
ImageNet Lite0 features (each stage or the head, mean-pooled):

* 4 classes (DMSO and the three doses), leave-one-well-out (14 wells): per crop, and per well
  (the median of its crops' probabilities, as cellmorph aggregates);
* 2 classes (DMSO against cycloheximide), **leave one plate out** (6 plates): a new plate's
  cells, as a new screen's are; per crop accuracy and log-loss.

Each crop table is prepared with the per-crop min-max map (``--scaling image``, the paper's
per-field map applied to a crop) and with the fixed clip of the DMSO z-score (``--scaling
fixed``, the crops default). ``--tta dihedral`` embeds each crop as the mean of its 8
rotations/mirrors (``embed_tiles(tta=...)``, the crops default of ``embed`` and the linear probe).
Deterministic on a fixed thread count. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPECS = ["head", "stage1", "stage2", "stage3", "stage4", "stage3+stage4", "stage2+stage3+stage4"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=Path, default=HERE.parent.parent / "shared" / "data" / "bbbc021" / "crops-week4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tta", default="none", help="comma-separated: none, dihedral")
    parser.add_argument("--scalings", default="image,fixed")
    parser.add_argument("--specs", default=",".join(SPECS))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cellmorph.cache import TileCache
    from cellmorph.data.crops import load_crop_table
    from cellmorph.embed import embed_tiles
    from cellmorph.models.features import FeatureSpec
    from cellmorph.preprocess import PrepareConfig, prepare
    from cellmorph.runtime import torch_threads

    def held_out_probabilities(x, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=0))
        probs = cross_val_predict(model, x, labels, groups=groups, cv=LeaveOneGroupOut(), method="predict_proba")
        return np.array(sorted(set(labels))), probs

    rows = []
    print("| scaling | features | tta | dim | 4-class crop | 4-class well | DMSO/CHX new plate: crop | log-loss | embed s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for scaling in args.scalings.split(","):
            cache_dir = Path(tmp) / scaling
            prepare(load_crop_table(args.crops / "index.csv"), cache_dir, PrepareConfig(tile_grid=(1, 1), scaling=scaling),
                    progress=False, log=lambda *_: None, threads=args.threads)
            cache = TileCache(cache_dir)
            index = cache.index
            labels = (index["Metadata_Compound"].astype(str) + "@" + index["Metadata_Concentration"].astype(str)).to_numpy()
            wells = (index["Metadata_Plate"].astype(str) + "/" + index["Metadata_Well"].astype(str)).to_numpy()
            plates = index["Metadata_Plate"].astype(str).to_numpy()
            treated = np.where(index["Metadata_Compound"].astype(str) == "DMSO", "DMSO", "cycloheximide")
            for name in args.specs.split(","):
                for tta in args.tta.split(","):
                    t = time.perf_counter()
                    with torch_threads(args.threads):
                        x = embed_tiles(cache, "tf_efficientnet_lite0", image_size=args.size, progress=False,
                                        features=FeatureSpec.parse(name), tta=tta)
                    seconds = time.perf_counter() - t
                    classes, probs = held_out_probabilities(x, labels, wells)
                    crop_acc = float((classes[probs.argmax(1)] == labels).mean())
                    frame = pd.DataFrame(probs, columns=classes).assign(well=wells, label=labels)
                    per_well = frame.groupby("well").agg({**{c: "median" for c in classes}, "label": "first"})
                    well_acc = float((classes[per_well[classes].to_numpy().argmax(1)] == per_well["label"]).mean())
                    binary, bprobs = held_out_probabilities(x, treated, plates)
                    plate_acc = float((binary[bprobs.argmax(1)] == treated).mean())
                    plate_loss = float(log_loss(treated, bprobs, labels=binary))
                    row = {"scaling": scaling, "features": name, "tta": tta, "dim": int(x.shape[1]),
                           "crop_accuracy": crop_acc, "well_accuracy": well_acc, "n_crops": int(len(labels)),
                           "n_wells": int(len(per_well)), "new_plate_accuracy": plate_acc,
                           "new_plate_log_loss": plate_loss, "embed_seconds": round(seconds, 1)}
                    rows.append(row)
                    print(f"| {scaling} | {name} | {tta} | {row['dim']} | {crop_acc:.3f} | {well_acc:.3f} | "
                          f"{plate_acc:.3f} | {plate_loss:.3f} | {row['embed_seconds']} |", flush=True)
    print(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
