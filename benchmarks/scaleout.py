"""Folds serially in one process against a 2-worker Dask LocalCluster, and the cost of a task.

    python benchmarks/scaleout.py --work /tmp/scaleout [--repeats 3] [--overhead-tasks 40]

On the synthetic ``mini`` preset (built in ``--work`` once), with leave-one-compound-out folds:

* ``linear-probe``: tf_efficientnet_lite0 features (default stage 3), a logistic head per fold;
* ``finetune``: a short fine-tune per fold (tf_efficientnet_lite0, 64 px, 1 epoch, 256 tiles per
  fold, 4 frozen stages);

each run three ways: ``serial-2t`` (local executor, 2 torch threads: the whole machine),
``serial-1t`` (local, 1 thread: the reference for bitwise equality) and ``dask-2w`` (LocalCluster
of 2 workers × 1 thread, started inside the timed region, as the CLI does). The Dask run's
predictions are compared byte for byte with ``serial-1t``'s.

Per-task overhead, medians over ``--overhead-tasks`` tasks:

* ``dask_roundtrip_ms``: submit → result of a no-op on the running cluster;
* ``task_fixed_ms``: what every cellmorph fold task pays before training (re-planning the run:
  cache index, folds, building the network, the fingerprint), measured as
  :func:`~cellmorph.cv.run.run_fold_task` on an already finished fold, on a worker;
* ``cluster_start_s``: LocalCluster start to 2 workers ready (worker processes import torch lazily,
  in the first task).

Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def ensure_mini(work: Path) -> Path:
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.data.synthetic import generate_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    screen, cache = work / "mini", work / "mini-cache64"
    if not (screen / "BBBC021_v1_image.csv").is_file():
        log("generating mini …")
        generate_bbbc021(screen, preset="mini", seed=0, progress=False, workers=2)
    if not (cache / "manifest.json").is_file():
        log("preparing mini at 64 px …")
        prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=64), progress=False)
    return cache


CONFIGS = {
    "linear-probe": dict(model="tf_efficientnet_lite0", init="imagenet", mode="linear-probe", cv="loco",
                         image_size=64),
    "finetune": dict(model="tf_efficientnet_lite0", init="imagenet", cv="loco", image_size=64, epochs=1,
                     max_tiles_per_fold=256, freeze_stages=4),
}


def timed_run(cache: Path, out: Path, config: dict, executor) -> float:
    import shutil

    from cellmorph.cv import run_cv

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_cv(cache, out, config, progress=False, executor=executor)
    return time.perf_counter() - t0


def overheads(cache: Path, work: Path, tasks: int) -> dict:
    from distributed import Client, LocalCluster

    from cellmorph.cv import plan_run, run_cv
    from cellmorph.cv.executors import FoldTask
    from cellmorph.cv.run import run_fold_task

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client.wait_for_workers(2)
    start = time.perf_counter() - t0
    try:
        client.submit(sum, [1], pure=False).result()  # warm the connection
        roundtrips = []
        for i in range(tasks):
            t = time.perf_counter()
            client.submit(sum, [i], pure=False).result()
            roundtrips.append(time.perf_counter() - t)
        # A finished run: every task finds its fold done after re-planning, the fixed cost of a fold task.
        small = dict(CONFIGS["finetune"], cv="group-kfold:4", max_tiles_per_fold=32)
        out = work / "overhead-run"
        if not (out / "metrics.json").is_file():
            run_cv(cache, out, small, progress=False)
        plan = plan_run(cache, small)
        task = FoldTask(str(cache), str(out), plan.config.model_dump(mode="json"), plan.fingerprint, 0, 1)
        client.submit(run_fold_task, task, pure=False).result()  # imports torch/timm on the worker
        fixed = []
        for _ in range(tasks):
            t = time.perf_counter()
            assert client.submit(run_fold_task, task, pure=False).result()["written"] is False
            fixed.append(time.perf_counter() - t)
    finally:
        client.close()
        cluster.close()
    return {"cluster_start_s": start, "dask_roundtrip_ms": 1000 * statistics.median(roundtrips),
            "task_fixed_ms": 1000 * statistics.median(fixed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-tasks", type=int, default=40)
    parser.add_argument("--modes", default="linear-probe,finetune")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import matmul_gflops

    from cellmorph.cv.executors import ExecutorConfig

    args.work.mkdir(parents=True, exist_ok=True)
    cache = ensure_mini(args.work)
    torch.set_num_threads(2)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": 2,
                          "matmul_gflops_2t": matmul_gflops()}, "runs": {}}
    ways = {"serial-2t": (2, None), "serial-1t": (1, None),
            "dask-2w": (1, ExecutorConfig(kind="dask", workers=2, threads=1))}
    for mode in args.modes.split(","):
        times: dict[str, list[float]] = {w: [] for w in ways}
        fold_sums: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.repeats):
            for way, (threads, executor) in ways.items():
                out = args.work / f"{mode}-{way}"
                seconds = timed_run(cache, out, dict(CONFIGS[mode], num_threads=threads), executor)
                times[way].append(seconds)
                # the folds' own time (training and scoring), as each fold's marker records it
                fold_sums[way].append(sum(json.loads(m.read_text())["seconds"] for m in out.glob("folds/*/fold.json")))
                log(f"{mode} {way} repeat {r}: {seconds:.1f} s wall, folds {fold_sums[way][-1]:.1f} s")
        a = (args.work / f"{mode}-serial-1t" / "predictions.parquet").read_bytes()
        b = (args.work / f"{mode}-dask-2w" / "predictions.parquet").read_bytes()
        medians = {w: statistics.median(t) for w, t in times.items()}
        metrics = json.loads((args.work / f"{mode}-dask-2w" / "metrics.json").read_text())
        result["runs"][mode] = {
            "median_s": medians, "all_s": times, "folds": metrics["n_folds"],
            "median_fold_seconds_sum": {w: statistics.median(t) for w, t in fold_sums.items()},
            "treatment_accuracy": metrics["treatment_accuracy"],
            "dask_equals_serial_1t_bytes": a == b,
            "speedup_dask_vs_serial_2t": medians["serial-2t"] / medians["dask-2w"],
            "speedup_dask_vs_serial_1t": medians["serial-1t"] / medians["dask-2w"],
        }
    result["overhead"] = overheads(cache, args.work, args.overhead_tasks)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
