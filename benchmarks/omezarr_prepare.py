"""`prepare` from OME-Zarr plates against the same screen as TIFFs: wall time, peak memory, identical tiles.

    python benchmarks/omezarr_prepare.py [--preset mini] [--plates 6] [--repeats 3]

The synthetic screen (``--preset``, its first ``--plates`` plates) is written once as BBBC021 TIFFs and
once each as OME-Zarr 0.4 (Zarr v2) and 0.5 (Zarr v3) HCS plates by ome-zarr-py. Each route is then
listed (``load_table``: metadata only) and prepared (one thread) ``--repeats`` times, each in a fresh
process whose peak resident memory is read from the kernel (``ru_maxrss``). The table gives medians and
the ratio to the TIFF route measured in the same run; the last column checks that every route wrote
the same tiles. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import cellmorph
from cellmorph.config.prepare import PrepareConfig
route, screen, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start = time.perf_counter()
if route == "tiff":
    table = cellmorph.load_table("bbbc021", root=screen)
else:
    table = cellmorph.load_table("ome-zarr", root=screen, plate_map=screen / "platemap.csv")
listed = time.perf_counter() - start
cellmorph.prepare(table, out, PrepareConfig(), progress=False, threads=1)
print(json.dumps({"list_s": listed, "total_s": time.perf_counter() - start, "fields": len(table),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def tiles_digest(cache: Path) -> str:
    """The tiles' bytes in (plate, well, site rank, tile) order: equal whatever the route's site numbering."""
    import numpy as np
    import pandas as pd

    index = pd.read_parquet(cache / "index.parquet")
    index["rank"] = index.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Tile"])["Metadata_Site"].rank(method="first")
    digest = hashlib.sha256()
    for plate, rows in index.sort_values(["Metadata_Plate", "Metadata_Well", "rank", "Metadata_Tile"]).groupby(
            "Metadata_Plate", sort=True):
        tiles = np.load(cache / "plates" / f"{plate}.npy", mmap_mode="r")
        for offset in rows["Metadata_PlateOffset"]:
            digest.update(np.ascontiguousarray(tiles[int(offset)]).tobytes())
    return digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--plates", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.data.omezarr import write_hcs_plates
    from cellmorph.data.platemap import write_plate_map
    from cellmorph.data.synthetic import generate_bbbc021

    work = Path(tempfile.mkdtemp(prefix="cellmorph-omezarr-"))
    try:
        generate_bbbc021(work / "tiff", preset=args.preset, seed=0, progress=False)
        table = load_bbbc021(work / "tiff", moa_subset=False)
        keep = sorted(table.frame["Metadata_Plate"].unique())[: args.plates]
        table = table.subset(table.frame["Metadata_Plate"].isin(keep).to_numpy())
        image_csv = work / "tiff" / "BBBC021_v1_image.csv"  # the TIFF route reads only the kept plates too
        import pandas as pd

        rows = pd.read_csv(image_csv)
        rows[rows["Image_Metadata_Plate_DAPI"].astype(str).isin(keep)].to_csv(image_csv, index=False)
        for version in ("0.4", "0.5"):
            write_hcs_plates(table, work / f"zarr{version}", version=version)
            write_plate_map(table, work / f"zarr{version}" / "platemap.csv")
        routes = {"TIFF (BBBC021 layout)": ("tiff", work / "tiff"), "OME-Zarr 0.4 (Zarr v2)": ("zarr", work / "zarr0.4"),
                  "OME-Zarr 0.5 (Zarr v3)": ("zarr", work / "zarr0.5")}
        results = {}
        for name, (route, screen) in routes.items():
            runs = []
            for k in range(args.repeats):
                out = work / f"cache-{route}-{screen.name}-{k}"
                proc = subprocess.run([sys.executable, "-c", CHILD, route, str(screen), str(out)], capture_output=True,
                                      text=True, check=True,
                                      env={**os.environ, "CELLMORPH_THREADS": "1", "OMP_NUM_THREADS": "1"})
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            results[name] = {key: statistics.median(r[key] for r in runs) for key in ("list_s", "total_s", "peak_mib")}
            results[name] |= {"fields": runs[0]["fields"], "tiles": tiles_digest(out)}
            shutil.rmtree(out.parent / f"cache-{route}-{screen.name}-0", ignore_errors=True)
        reference = results["TIFF (BBBC021 layout)"]
        print(f"{args.preset} preset, {args.plates} plates, {reference['fields']} fields; median of {args.repeats} "
              "fresh processes, 1 thread\n")
        print("| route | list (metadata) | prepare, end to end | × TIFF | peak memory | tiles (sha256) |\n"
              "|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['list_s']:.2f} s | {r['total_s']:.1f} s | {r['total_s'] / reference['total_s']:.2f}× "
                  f"| {r['peak_mib']:.0f} MiB | {r['tiles']} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
