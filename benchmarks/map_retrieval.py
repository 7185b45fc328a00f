"""copairs mean average precision (mAP) of BBBC021 profiles (issue 32, item 3).

    CELLMORPH_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/map_retrieval.py --out OUT \
        [--shared ../shared/data/bbbc021] [--cache /work/runs/rc/cache] [--probe /work/runs/rc/probe]

Three kinds of profile, each scored by :mod:`cellmorph.retrieval` (copairs' own ``average_precision``
and ``mean_average_precision``; null of 10,000 permutations, seed 0, Benjamini-Hochberg; retrieved:
corrected p < 0.05):

1. the CellProfiler per-well means of Ljosa et al. 2013 (``profile-eval``'s input), after each
   DMSO normalisation of ``benchmarks/profiles.py``, correlation (profile-eval's default), NSC and
   NSCB beside them;
2. frozen-backbone embeddings of the crops-moa-dev cells (``cellmorph embed`` of the tile cache
   ``--cache`` with the crop defaults: Lite0, stage3+stage4 mean-pooled, dihedral TTA, 128 px; wells
   the median of their cells), raw, z-scored to each plate's DMSO (embed's ``wells_normalized.parquet``:
   the wells of plates with a single DMSO well come out NaN and are left out) and to each batch's DMSO,
   cosine. The embedding is written once to ``OUT/embed`` and reused;
3. the held-out probabilities of a LOCO linear-probe run ``--probe`` (what ``cellmorph cv`` now scores
   itself): MoA retrieval of its treatments; its wells hold no DMSO, so no replicate retrieval.

Replicate retrieval: each treated well ranks the other wells of its treatment among the DMSO wells.
MoA retrieval: each treatment ranks the treatments of other compounds of its MoA among those of other
MoAs (DMSO left out). Writes ``OUT/map_retrieval.json`` and each source's ``map_*.csv``; prints
Markdown tables. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
NORMALISATIONS = [("plate", "none"), ("batch", "none"), ("all", "none"), ("none", "none"), ("plate", "spherize"),
                  ("plate", "tvn"), ("plate", "coral")]


def _row(source: str, found, extra: dict | None = None, seconds: float | None = None) -> dict:
    row = {"source": source} | (extra or {})
    for part in ("replicates", "moa"):
        record = found.summary.get(part) or {}
        if "mean_map" in record:
            row |= {f"{part}_map": record["mean_map"], f"{part}_retrieved": record["fraction_retrieved"],
                    f"{part}_n": record["n_scored"], f"{part}_of": record["n_groups"]}
        else:
            row[f"{part}_skipped"] = record.get("skipped")
    return row | ({"seconds": round(seconds, 1)} if seconds is not None else {})


def _cell(row: dict, part: str) -> str:
    if f"{part}_map" not in row:
        return "– | –"
    return (f"{row[f'{part}_map']:.3f} | {row[f'{part}_retrieved']:.3f} "
            f"({round(row[f'{part}_retrieved'] * row[f'{part}_n'])}/{row[f'{part}_n']})")


def cellprofiler(shared: Path, out: Path) -> tuple[list[dict], pd.DataFrame]:
    from cellmorph.profiles import (
        attach_bbbc021_metadata,
        evaluate_profiles,
        read_profiles,
    )
    from cellmorph.retrieval import retrieval, write_retrieval

    wells = attach_bbbc021_metadata(read_profiles(shared / "profiles" / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"),
                                    shared / "metadata")
    rows, per_moa = [], None
    print("\n| standardize | whiten | NSC (103) | NSCB (92) | replicate mAP | replicates retrieved | MoA mAP "
          "| MoAs retrieved | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for standardize, whiten in NORMALISATIONS:
        t = time.perf_counter()
        result = evaluate_profiles(wells, standardize=standardize, whiten=whiten)
        found = retrieval(result["wells"], result["treatments"], result["features"], distance="correlation")
        metrics = result["metrics"]
        row = _row("cellprofiler", found, {"standardize": standardize, "whiten": whiten,
                                           "nsc": metrics["nsc_accuracy"], "nscb": metrics["nscb_accuracy"]},
                   time.perf_counter() - t)
        rows.append(row)
        print(f"| {standardize} | {whiten} | {row['nsc']:.3f} | {row['nscb']:.3f} | {_cell(row, 'replicates')} | "
              f"{_cell(row, 'moa')} | {row['seconds']} |")
        if (standardize, whiten) == ("plate", "none"):  # profile-eval's defaults
            write_retrieval(out / "cellprofiler", found)
            per_moa = found.moa.set_index("Metadata_MoA")["mean_average_precision"].rename("CellProfiler (plate z-score)")
    return rows, per_moa


def embeddings(cache: Path, out: Path) -> tuple[list[dict], pd.Series]:
    from cellmorph.config.embed import EmbedConfig
    from cellmorph.embed import embed
    from cellmorph.profiles import normalize_profiles
    from cellmorph.retrieval import retrieval

    folder = out / "embed"
    if not (folder / "embed.json").is_file():
        t = time.perf_counter()
        embed(cache, folder, EmbedConfig(threads=1), progress=False, log=print)
        print(f"embedded {cache} in {time.perf_counter() - t:.0f} s")
    record = json.loads((folder / "embed.json").read_text())
    features = [f"emb_{i}" for i in range(record["dim"])]
    raw = pd.read_parquet(folder / "wells.parquet")
    variants = {"raw wells": raw,
                "plate DMSO z-score (embed's wells_normalized.parquet)": pd.read_parquet(folder / "wells_normalized.parquet"),
                "batch DMSO z-score": normalize_profiles(raw, features, "batch")}
    rows, per_moa = [], None
    for what, wells in variants.items():
        t = time.perf_counter()
        notes: list[str] = []
        found = retrieval(wells, None, features, distance="cosine", aggregate=record["config"]["aggregate"],
                          log=notes.append)
        rows.append(_row("embedding", found, {"profiles": what, "n_wells": len(wells),
                                              "n_dmso_wells": int((wells["Metadata_Compound"] == "DMSO").sum()),
                                              "n_dropped_wells": found.summary["replicates"].get("n_dropped"),
                                              "features": record["features"]["name"], "tta": record["tta"],
                                              "notes": notes}, time.perf_counter() - t))
        if what == "batch DMSO z-score":
            per_moa = found.moa.set_index("Metadata_MoA")["mean_average_precision"].rename("Lite0 embedding (batch z)")
    return rows, per_moa


def probe(run: Path, out: Path) -> tuple[list[dict], pd.Series]:
    from cellmorph.cv.rundir import RunDir
    from cellmorph.metrics import prob_columns
    from cellmorph.retrieval import retrieval, write_retrieval

    levels = RunDir(run).read_levels()
    wells, treatments = levels["wells"], levels["treatments"]
    t = time.perf_counter()
    found = retrieval(wells, treatments, prob_columns(wells), distance="cosine")
    write_retrieval(out / "probe", found)
    config = RunDir(run).read_config()["config"]
    row = _row("probe", found, {"run": str(run), "cv": config["cv"], "probe_head": config.get("probe_head"),
                                "aggregate": config["aggregate"],
                                "treatment_accuracy": RunDir(run).read_metrics()["treatment_accuracy"]},
               time.perf_counter() - t)
    return [row], found.moa.set_index("Metadata_MoA")["mean_average_precision"].rename("LOCO probe probabilities")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data" / "bbbc021")
    parser.add_argument("--cache", type=Path, default=None, help="tile cache of crops-moa-dev (embeddings)")
    parser.add_argument("--probe", type=Path, default=None, help="a finished LOCO linear-probe run")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from cellmorph.retrieval import NULL_SIZE, SEED, THRESHOLD, copairs_version

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"null_size": NULL_SIZE, "seed": SEED, "threshold": THRESHOLD, "copairs": copairs_version()}
    results["cellprofiler"], cp_moa = cellprofiler(args.shared, args.out)
    columns = [cp_moa]
    rows = []
    if args.cache is not None:
        results["embedding"], emb_moa = embeddings(args.cache, args.out)
        rows += results["embedding"]
        columns.append(emb_moa)
    if args.probe is not None:
        results["probe"], probe_moa = probe(args.probe, args.out)
        rows += results["probe"]
        columns.append(probe_moa)
    if rows:
        print("\n| profiles | replicate mAP | replicates retrieved | MoA mAP | MoAs retrieved | s |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            what = row.get("profiles") or f"held-out probabilities ({row.get('cv')}, {row.get('probe_head')} head)"
            print(f"| {row['source']}: {what} | {_cell(row, 'replicates')} | {_cell(row, 'moa')} | {row['seconds']} |")
    table = pd.concat(columns, axis=1)
    results["moa_map"] = {moa: {k: (None if pd.isna(v) else float(v)) for k, v in values.items()}
                          for moa, values in table.iterrows()}
    print("\n| MoA | " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for moa, values in table.iterrows():
        print(f"| {moa} | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in values) + " |")
    from cellmorph.runinfo import write_json

    write_json(args.out / "map_retrieval.json", results)
    return results


if __name__ == "__main__":
    main()
