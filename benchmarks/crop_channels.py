"""Which crop channel feeds which of an ImageNet network's RGB inputs: the crop probe, leave-one-compound-out.

    python benchmarks/crop_channels.py [--out runs/crop-channels] [--threads 2] [--variants 012,021,...]

An ImageNet network takes three inputs it learnt as red, green and blue; a crop's three stains (DNA first, then
the two cytoskeleton stains, see ../shared/README.md) go to them in the crop's own order. Nothing in the biology
fixes that assignment, so it is a default to measure. Each variant is a derived crop table written under OUT
(never inside the project): the development set's crops with their channels reordered (``012`` is the crops as
they are, the contract; ``201`` puts channel 2 on red, channel 0 on green, channel 1 on blue), or one channel
repeated on all three inputs (``grey0``, ``grey1``, ``grey2``). Each is prepared as the CLI contract prepares
(``prepare --layout crops --normalize batch``; its per-channel scaling commutes with the reordering) and scored
with the contract's probe (``cv --cv loco --mode linear-probe``, crop defaults). Two combinations follow:

- ``perchannel``: each channel embedded on its own, the three grey embeddings side by side as one profile (the
  recipe of Pawlowski et al. 2016 for ImageNet features of cell images), heads only on the ``012`` run's cache;
- ``orders``: the six orders' held-out probabilities averaged, level by level, as ``cv --ensemble-…`` does.

Prints treatment, well, cell and class-balanced cell accuracy per variant (``real_crops.score``) and a Markdown
table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_crops import BASE, DEV_SET, FIGURES_HEADER, figures, prepared_cache, score  # noqa: E402

from cellmorph.cv import run_cv  # noqa: E402
from cellmorph.cv.rundir import EMBEDDINGS, EMBEDDINGS_MARKER  # noqa: E402

ORDERS = ["".join(p) for p in itertools.permutations("012")]
GREYS = ["grey0", "grey1", "grey2"]
PROBE = BASE | {"mode": "linear-probe"}


def channel_order(variant: str) -> list[int]:
    """The crop channels, in the order the variant feeds them to the network's three inputs."""
    if variant.startswith("grey"):
        return [int(variant[len("grey"):])] * 3
    return [int(c) for c in variant]


def derived_table(dev_set: Path, out: Path, variant: str) -> Path:
    """``out/tables/<variant>/index.csv``: the development set's crops with their channels as the variant
    orders them (written once, to a temporary name and then renamed)."""
    folder = out / "tables" / variant
    index = folder / "index.csv"
    if index.is_file():
        return index
    tmp = out / "tables" / f".{variant}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "crops").mkdir(parents=True)
    order = channel_order(variant)
    table = pd.read_csv(dev_set / "index.csv")
    for name in table["FileName"].astype(str):
        crop = np.load(dev_set / name, allow_pickle=False)
        np.save(tmp / "crops" / Path(name).name, np.ascontiguousarray(crop[..., order]))
    table["FileName"] = ["crops/" + Path(n).name for n in table["FileName"].astype(str)]
    table.to_csv(tmp / "index.csv", index=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return index


def probe_run(dev_set: Path, out: Path, variant: str, threads: int | None) -> tuple[Path, float]:
    """(run directory, wall seconds) of the contract's probe on the variant's table."""
    cache = prepared_cache(derived_table(dev_set, out, variant).parent, out / "caches" / variant)
    run = out / "runs" / variant
    started = time.perf_counter()
    run_cv(cache, run, PROBE | {"num_threads": threads}, resume=(run / "config.yaml").is_file(), progress=False)
    return run, time.perf_counter() - started


def perchannel_run(out: Path, base: Path, greys: list[Path], threads: int | None) -> Path:
    """The probe's heads on the three grey embeddings side by side, run on the base variant's cache (the rows are
    the same cells in the same order in every derived cache: checked through the embeddings' row digests)."""
    keys = [json.loads((g / EMBEDDINGS_MARKER).read_text()) for g in greys]
    base_key = json.loads((base / EMBEDDINGS_MARKER).read_text())
    if {k["rows_digest"] for k in keys} != {base_key["rows_digest"]}:
        raise SystemExit("the grey runs embedded other rows than the base run")
    array = np.concatenate([np.load(g / EMBEDDINGS) for g in greys], axis=1)
    run = out / "runs" / "perchannel"
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        np.save(run / EMBEDDINGS, array)
        (run / EMBEDDINGS_MARKER).write_text(json.dumps(base_key | {"dim": int(array.shape[1])}))
    run_cv(out / "caches" / base.name, run, PROBE | {"num_threads": threads}, resume=(run / "metrics.json").is_file(),
           progress=False)
    if np.load(run / EMBEDDINGS, mmap_mode="r").shape[1] != array.shape[1]:
        raise SystemExit(f"{run}: embedded again instead of using the grey embeddings")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/crop-channels"))
    parser.add_argument("--dev-set", type=Path, default=DEV_SET)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(ORDERS + GREYS),
                        help="comma-separated, of the six orders (012 … 210) and grey0, grey1, grey2; with all "
                        "three greys the perchannel combination runs, with all six orders the orders ensemble")
    args = parser.parse_args()
    if not (args.dev_set / "index.csv").is_file():
        raise SystemExit(f"{args.dev_set}: no index.csv (the development set lives in ../shared; see its README)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ORDERS + GREYS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}")
    rows = []
    runs: dict[str, Path] = {}
    for variant in variants:
        run, wall = probe_run(args.dev_set, args.out, variant, args.threads)
        runs[variant] = run
        rows.append({"variant": variant, "order": channel_order(variant), **score(run), "wall": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if all(g in runs for g in GREYS) and "012" in runs:
        run = perchannel_run(args.out, runs["012"], [runs[g] for g in GREYS], args.threads)
        rows.append({"variant": "perchannel", "order": "grey0, grey1, grey2 side by side", **score(run), "wall": 0.0})
        print(json.dumps(rows[-1]), flush=True)
    if all(o in runs for o in ORDERS):
        rows.append({"variant": "orders", "order": "mean of the six", **score([runs[o] for o in ORDERS]),
                     "wall": 0.0})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| variant | network inputs (R, G, B) | {FIGURES_HEADER} | wall |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['wall']:.0f} s" if r["wall"] else "heads only"
        print(f"| `{r['variant']}` | {r['order']} | {figures(r)} | {wall} |")


if __name__ == "__main__":
    main()
