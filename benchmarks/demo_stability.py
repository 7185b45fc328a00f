"""How far the demo's headline accuracy moves with float rounding alone, and with the seed.

    python benchmarks/demo_stability.py [--seeds 0,1,2] [--threads 1,2] [--out runs/demo-stability]

The demo's fine-tune CV (``cellmorph demo``'s own settings, on its own tiny screen prepared once)
is run for every seed × thread count; ``--set mode=linear-probe`` runs its probe instead, and any
``--set FIELD=VALUE`` changes one CVConfig field (``--set lr_schedule=constant``: the demo before
issue 28). ``--compare`` counts the treatment calls that differ between thread counts. The thread count changes only the order of float reductions in
the CPU kernels, which is what a CPU with another instruction set changes too: two runs with the
same seed and different thread counts show how much rounding alone moves the result. The seeds
show the spread that the recipe itself has. Prints one JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cellmorph.cv import load_cv_config, run_cv
from cellmorph.data.bbbc021 import IMAGE_CSV, load_bbbc021
from cellmorph.data.synthetic import generate_bbbc021
from cellmorph.demo import DEMO_MODEL, DemoConfig
from cellmorph.preprocess import PrepareConfig, prepare

KEYS = ("treatment_accuracy", "well_accuracy", "tile_accuracy")


def treatment_calls(run: Path):
    """The run's treatment-level calls, indexed by treatment (``RunDir`` owns the layout)."""
    from cellmorph.cv import RunDir

    table = RunDir(run).read_treatments()
    return table.set_index(["Metadata_Compound", "Metadata_Concentration"])["Predicted_MoA"].sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-stability"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other CVConfig field, e.g. lr_schedule=cosine or mode=linear-probe (repeatable)")
    parser.add_argument("--compare", action="store_true",
                        help="also count the treatment calls that differ between thread counts of a seed")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    demo = DemoConfig() if args.epochs is None else DemoConfig(epochs=args.epochs)
    screen, cache = args.out / "screen", args.out / "cache"
    if not (screen / IMAGE_CSV).is_file():
        generate_bbbc021(screen, preset="tiny", seed=0, progress=False)
    prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=demo.image_size), progress=False)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            settings = {"model": DEMO_MODEL, "init": "imagenet", "epochs": demo.epochs, "cv": demo.cv,
                        "image_size": demo.image_size, "seed": seed, "freeze_stages": demo.freeze_stages,
                        "tta": demo.tta, "num_threads": threads, "frozen_feature_cache": True,
                        "lr_schedule": demo.lr_schedule, "lr": args.lr, **overrides}
            if settings.get("mode") == "linear-probe":
                for name in ("freeze_stages", "frozen_feature_cache", "epochs", "lr_schedule"):
                    settings.pop(name)
            cfg = load_cv_config(None, **settings)
            label = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "demo"
            run = args.out / f"{label}-lr{args.lr}-e{demo.epochs}-seed{seed}-threads{threads}"
            started = time.perf_counter()
            metrics = run_cv(cache, run, cfg, resume=(run / "config.yaml").is_file(), progress=False)
            row = {"seed": seed, "threads": threads, "epochs": demo.epochs, "lr": args.lr, **overrides, "run": str(run),
                   **{k: round(metrics[k], 3) for k in KEYS}, "seconds": round(time.perf_counter() - started)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| seed | threads | treatment | well | tile |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['threads']} | {row['treatment_accuracy']:.3f} | {row['well_accuracy']:.3f} "
              f"| {row['tile_accuracy']:.3f} |")
    if args.compare:
        for seed in sorted({r["seed"] for r in rows}):
            runs = [r for r in rows if r["seed"] == seed]
            calls = [treatment_calls(Path(r["run"])) for r in runs]
            for other, row in zip(calls[1:], runs[1:]):
                differ = int((calls[0] != other).sum())
                print(f"seed {seed}: {differ} of {len(other)} treatment calls differ between {runs[0]['threads']} "
                      f"and {row['threads']} threads")
    for key in KEYS:
        values = [r[key] for r in rows]
        print(f"{key}: median {statistics.median(values):.3f}, range {min(values):.3f}–{max(values):.3f}")


if __name__ == "__main__":
    main()
