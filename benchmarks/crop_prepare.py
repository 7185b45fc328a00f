"""How `prepare` maps a crop's 16-bit stains to the network's 8-bit input: the crop probe, leave-one-compound-out.

    python benchmarks/crop_prepare.py [--out runs/crop-prepare] [--threads 2] [--variants fixed-2-10,...]

The crop table's preparation defaults (each stain's Anscombe transform z-scored against the DMSO cells of its
batch, then clipped to a fixed z range, -2 to 10, mapped to 0–255) were chosen on crops-week4, DMSO against one
MoA (RESULTS.md, issue 19). Each variant here prepares the 12-MoA development set another way (``prepare
--layout crops`` with the variant's options, one cache each under OUT) and scores it with the contract's probe
(``cv --cv loco --mode linear-probe``, crop defaults). ``fixed-2-10`` is the contract. Prints treatment, well, cell
and class-balanced cell accuracy per variant (``real_crops.score``) and a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_crops import BASE, DEV_SET, FIGURES_HEADER, figures, prepared_cache, score  # noqa: E402

from cellmorph.cv import run_cv  # noqa: E402

# name → (prepare options on top of the crop layout's, what it is)
VARIANTS: dict[str, tuple[dict, str]] = {
    "fixed-2-10": ({"normalize": "batch"}, "the contract: batch DMSO z-score, clipped to -2…10"),
    "fixed-2-5": ({"normalize": "batch", "fixed_range": (-2.0, 5.0)}, "clipped to -2…5 (more contrast)"),
    "fixed-3-20": ({"normalize": "batch", "fixed_range": (-3.0, 20.0)}, "clipped to -3…20 (less clipping)"),
    "fixed-1-10": ({"normalize": "batch", "fixed_range": (-1.0, 10.0)}, "clipped to -1…10 (darker background)"),
    "image": ({"normalize": "batch", "scaling": "image"}, "each crop's min–max over its stains (the paper's per-field map; for a crop, 'tile' is the same)"),
}


def probe_run(dev_set: Path, out: Path, variant: str, threads: int | None) -> tuple[Path, float]:
    """(run directory, wall seconds of prepare and the probe) for the variant."""
    options, _ = VARIANTS[variant]
    started = time.perf_counter()
    cache = prepared_cache(dev_set, out / "caches" / variant, **options)
    run = out / "runs" / variant
    run_cv(cache, run, BASE | {"mode": "linear-probe", "num_threads": threads},
           resume=(run / "config.yaml").is_file(), progress=False)
    return run, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/crop-prepare"))
    parser.add_argument("--dev-set", type=Path, default=DEV_SET)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if not (args.dev_set / "index.csv").is_file():
        raise SystemExit(f"{args.dev_set}: no index.csv (the development set lives in ../shared; see its README)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}")
    rows = []
    for variant in variants:
        run, wall = probe_run(args.dev_set, args.out, variant, args.threads)
        rows.append({"variant": variant, "what": VARIANTS[variant][1], **score(run), "wall": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| variant | prepare | {FIGURES_HEADER} | wall |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['variant']}` | {r['what']} | {figures(r)} | {r['wall']:.0f} s |")


if __name__ == "__main__":
    main()
