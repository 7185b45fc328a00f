"""Feature stages × 8-bit scaling on the real crops-week4 cells (issue 19).

    python benchmarks/crop_features.py [--size 128] [--threads 2]

The only real labelled cells here: 1,120 BBBC021 MCF-7 crops of 6 Week4 plates, DMSO and
cycloheximide at 5, 15 and 50 µM. The task is the 4-class one (DMSO and the three doses), since
DMSO against cycloheximide is near-perfect for every choice. Each crop table is prepared with
the per-crop min-max map (``--scaling image``, the paper's per-field map applied to a crop) and
with the fixed clip of the DMSO z-score (``--scaling fixed``, the crops default); frozen ImageNet
Lite0 features of every stage and the head are pooled by their mean; a standardised logistic
regression is scored leave-one-well-out (14 wells), per crop and per well (the median of its
crops' probabilities, as cellmorph aggregates). Deterministic on a fixed thread count. Prints a
Markdown table and one JSON line.
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
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cellmorph.cache import TileCache
    from cellmorph.data.crops import load_crop_table
    from cellmorph.embed import embed_tiles
    from cellmorph.models.features import FeatureSpec
    from cellmorph.preprocess import PrepareConfig, prepare
    from cellmorph.runtime import torch_threads

    rows = []
    print(f"| scaling | features | dim | crop accuracy | well accuracy | s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for scaling in ("image", "fixed"):
            cache_dir = Path(tmp) / scaling
            prepare(load_crop_table(args.crops / "index.csv"), cache_dir, PrepareConfig(tile_grid=(1, 1), scaling=scaling),
                    progress=False, log=lambda *_: None, threads=args.threads)
            cache = TileCache(cache_dir)
            index = cache.index
            labels = (index["Metadata_Compound"].astype(str) + "@" + index["Metadata_Concentration"].astype(str)).to_numpy()
            wells = (index["Metadata_Plate"].astype(str) + "/" + index["Metadata_Well"].astype(str)).to_numpy()
            for name in SPECS:
                t = time.perf_counter()
                with torch_threads(args.threads):
                    x = embed_tiles(cache, "tf_efficientnet_lite0", image_size=args.size, progress=False,
                                    features=FeatureSpec.parse(name))
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=0))
                probs = cross_val_predict(model, x, labels, groups=wells, cv=LeaveOneGroupOut(), method="predict_proba")
                classes = np.array(sorted(set(labels)))
                crop_acc = float((classes[probs.argmax(1)] == labels).mean())
                frame = pd.DataFrame(probs, columns=classes).assign(well=wells, label=labels)
                per_well = frame.groupby("well").agg({**{c: "median" for c in classes}, "label": "first"})
                well_acc = float((classes[per_well[classes].to_numpy().argmax(1)] == per_well["label"]).mean())
                row = {"scaling": scaling, "features": name, "dim": int(x.shape[1]), "crop_accuracy": crop_acc,
                       "well_accuracy": well_acc, "n_crops": int(len(labels)), "n_wells": int(len(per_well)),
                       "seconds": round(time.perf_counter() - t, 1)}
                rows.append(row)
                print(f"| {scaling} | {name} | {row['dim']} | {crop_acc:.3f} | {well_acc:.3f} | {row['seconds']} |",
                      flush=True)
    print(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
