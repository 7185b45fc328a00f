"""The GPU path, measured in one command: the paper's protocol on one GPU (issue 33).

    python benchmarks/gpu.py --out DIR [--budget 450] [--commit SHA]     # on a GPU machine
    python benchmarks/gpu.py --device cpu --smoke --out DIR             # toy size, any machine

Writes ``DIR/gpu.json`` and ``DIR/gpu.md`` after every section (atomically), so a run cut
short still leaves what it measured. Sections, in the order they run (each one is skipped,
and says so, when too little of ``--budget`` seconds is left):

1. ``environment``: torch, CUDA, cuDNN, driver, GPU, the commit measured.
2. ``peak``: a large bf16 matrix product (8192³), the dense peak the throughputs are compared to.
3. ``screen``: the synthetic ``mini`` screen (Table 1: 38 compounds, 103 treatments, 1,208
   images) written and prepared with cellmorph's own ``synth`` and ``prepare`` at the paper's
   tile size (4 tiles per image resized to 224 px).
4. ``fold``: one LOCO fold of the paper's recipe (ResNet50, 224 px, batch 8, 10 epochs, the
   paper's augmentation, deterministic kernels, cellmorph's defaults: bf16, CUDA-graph steps)
   through cellmorph's own fold code, with the GPU's utilisation sampled while it trains; from
   it, the 38-fold projection at the paper's 4,705 training tiles per fold.
5. ``throughput``: training steps per second of ``resnet50`` at 224 px and ``inception_v3`` at
   299 px on batches already on the GPU (the network's own ceiling) in fp32, fp16 and bf16
   autocast, eager and as one CUDA graph (``--graphed``), channels-last on (and off once), at the
   paper's batch of 8 and at 128; FLOPs per image by benchmarks/run.py's count, so each rate is
   also a fraction of the peak.
6. ``concurrent``: 1, 2 and 4 folds at once on the one GPU (``--concurrent``), each its own
   process, through the Dask executor (``--executor dask``), as a user would run them; the
   aggregate rate and the 38-fold projection at each.
7. ``fold_variants``: the fold for 2 epochs with one setting changed (``--variants``): fp16 with
   the scaler, loader workers, cuDNN autotuning, CUDA graphs on/off, fp32 steps.
8. ``input``: where the input side limits: tile-cache reads (0 and 4 loader workers, pinned),
   resize + augmentation on the GPU and on the CPU, tiles/s against what training consumes.
9. ``correctness``: the same short fold twice with deterministic kernels (largest probability
   difference), and its GPU-trained weights scored on the CPU (largest difference, calls agreeing);
   with CUDA graphs, also against the same fold trained with eager steps.
10. ``bundle``: ``train`` a bundle on the GPU (one epoch, 2-fold calibration), ``predict`` with it
    (which scores on the CPU), and compare its treatment probabilities with the GPU's scoring.
11. ``fold_batches``: 2-epoch folds at batch 32 and 128 (``--fold-batches``; learning rate scaled
    linearly from the paper's), the throughput a larger batch would give the protocol.
12. ``compile``: ``torch.compile`` on the bf16 steps of section 5 (compile time and rate).

``--set FIELD=VALUE`` changes a CVConfig field of every fold the run trains. Timings use
``torch.cuda.synchronize`` around blocks of steps; each rate is the median of three blocks.
``--smoke`` runs the sections at toy size on the CPU (tiny screen, 64 px, one epoch) so that the
suite can call it where no GPU exists (tests/test_benchmarks.py); benchmarks/RESULTS.md 'GPU'
records the H200 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # a bare checkout (e.g. a GPU machine without the package installed)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # benchmarks/run.py's FLOP count
# Deterministic cuBLAS needs its workspace setting before the first matrix product of the process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

LOCO_FOLDS = 38  # BBBC021's MoA subset: one fold per compound
PAPER_EPOCHS = 10
# A LOCO fold of the paper trains on 1,208 images × 4 tiles less one compound's (1/38 on average).
# The synthetic mini screen has one site per well, so its folds hold about a quarter of that;
# projections scale the measured tiles/s to this size.
PAPER_TRAIN_TILES = round(1208 * 4 * 37 / 38)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


class OutOfBudget(Exception):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 1, 2
def environment(device: torch.device, commit: str | None) -> dict:
    from cellmorph.runinfo import git_commit

    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
              "python": platform.python_version(), "cpus": os.cpu_count(), "device": str(device),
              "commit": commit or git_commit()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                   "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                   "bf16_native": torch.cuda.is_bf16_supported()}
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            record["driver"] = None
    return record


def matmul_peak(device: torch.device, n: int) -> dict:
    """The dense peak of the device: benchmarks/run.py's matmul timing, in bf16 on a GPU."""
    from run import matmul_gflops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"n": n, "dtype": str(dtype).removeprefix("torch."),
            "tflops": matmul_gflops(n, repeats=10, device=str(device), dtype=dtype) / 1e3}


# --------------------------------------------------------------------------- 3
def prepare_screen(work: Path, preset: str, tile_size: int, workers: int) -> dict:
    from cellmorph.cache import TileCache
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.data.synthetic import generate_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    screen, cache = work / f"{preset}-screen", work / f"{preset}-cache{tile_size}"
    t = time.perf_counter()
    if not (screen / "BBBC021_v1_image.csv").is_file():
        generate_bbbc021(screen, preset=preset, seed=0, progress=False, workers=workers)
    t_synth = time.perf_counter() - t
    t = time.perf_counter()
    if not (cache / "manifest.json").is_file():
        prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=tile_size), progress=False)
    tiles = TileCache(cache)
    return {"preset": preset, "tile_size": tile_size, "cache": str(cache), "tiles": int(len(tiles.index)),
            "synth_s": t_synth, "prepare_s": time.perf_counter() - t}


# --------------------------------------------------------------------------- 4, 6, 8: folds
def paper_config(device: str, epochs: int, image_size: int, **overrides) -> dict:
    """The paper's recipe as a CVConfig. ``init xavier``: the GPU machine has no ImageNet weights and
    no network; the arithmetic of a step is the same (its default rate is the paper's xavier 1e-3)."""
    return {"model": "resnet50", "init": "xavier", "cv": "loco", "epochs": epochs, "image_size": image_size,
            "keep_checkpoints": "none", "device": device, **overrides}


def typical_folds(plan, k: int) -> list:
    """``k`` folds of median training size (the time of a fold grows with its training tiles)."""
    order = sorted(plan.folds, key=lambda f: len(f.train))
    mid = len(order) // 2
    return order[max(0, mid - k // 2): max(0, mid - k // 2) + k]


class EpochClock:
    """Stands in for the progress tasks of a fold: records when each epoch ends, and stops the fold
    (OutOfBudget) once the epochs still to come would not fit before ``deadline``."""

    def __init__(self, deadline: float, epochs: int) -> None:
        self.deadline, self.epochs, self.ends = deadline, epochs, []
        self.start = time.perf_counter()

    def reset(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        now = time.perf_counter()
        self.ends.append(now)
        per_epoch = (now - self.start) / len(self.ends)
        if len(self.ends) < self.epochs and now + per_epoch * (self.epochs - len(self.ends)) > self.deadline:
            raise OutOfBudget(f"{len(self.ends)} of {self.epochs} epochs fit the budget")


class Quiet:
    def reset(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


class UtilisationSampler:
    """The GPU's utilisation (NVML, % of time a kernel ran) sampled every 0.2 s on a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # noqa: BLE001 - no NVML binding: no samples
                return

    def __enter__(self) -> "UtilisationSampler":
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def _plan(cache: Path, config: dict, out: Path):
    from cellmorph.cv.config import RUNTIME_FIELDS
    from cellmorph.cv.rundir import RunDir
    from cellmorph.cv.run import plan_run

    plan = plan_run(cache, config)
    out.mkdir(parents=True, exist_ok=True)
    rundir = RunDir(out)
    rundir.begin(plan.header(cache, torch.get_num_threads()), plan.fingerprint, False, RUNTIME_FIELDS)
    return plan, rundir


def one_fold(cache: Path, work: Path, config: dict, deadline: float, device: torch.device) -> dict:
    """One fold through cellmorph's ``execute_fold`` (train, score, write ``folds/<k>/``)."""
    from cellmorph.cv.run import execute_fold
    from cellmorph.runtime import deterministic

    plan, rundir = _plan(cache, config, work / "fold-run")
    fold = typical_folds(plan, 1)[0]
    clock = EpochClock(deadline, plan.config.epochs)
    n_train = min(len(fold.train), plan.config.max_tiles_per_fold or len(fold.train))
    record = {"fold": fold.name, "train_tiles": int(n_train), "test_tiles": int(len(fold.test)),
              "epochs": plan.config.epochs, "batch_size": plan.config.batch_size, "lr": plan.config.lr,
              "amp_dtype": plan.config.amp_dtype, "deterministic": plan.config.deterministic,
              "num_workers": plan.config.num_workers, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    with deterministic(plan.config.deterministic), UtilisationSampler(device) as gpu:
        try:
            info = execute_fold(plan, rundir, fold, None, {"epochs": clock, "batches": Quiet()})
            record |= {"seconds": info["seconds"], "tile_accuracy": info["accuracy"], "complete": True}
        except OutOfBudget as stop:
            record |= {"seconds": time.perf_counter() - t, "complete": False, "stopped": str(stop)}
    epochs = np.diff([clock.start] + clock.ends)
    record |= {"epoch_seconds": [float(e) for e in epochs], "gpu_utilisation_pct": gpu.mean()}
    if len(epochs):
        steady = float(np.median(epochs[1:])) if len(epochs) > 1 else float(epochs[0])
        record["steady_epoch_s"] = steady
        record["tiles_per_s"] = n_train / steady
        # A fold = fixed costs (first-epoch warm-up beyond a steady epoch, scoring, writing) + 10 epochs at
        # the steady rate; the paper's fold has PAPER_TRAIN_TILES training tiles; 38 such folds in a row.
        fixed = (record["seconds"] - float(epochs.sum()) if record["complete"] else 0.0) + float(epochs[0]) - steady
        record["fixed_s"] = fixed
        record["projected_38_folds_s"] = LOCO_FOLDS * (fixed + PAPER_EPOCHS * PAPER_TRAIN_TILES / record["tiles_per_s"])
    return record


def concurrent_folds(cache: Path, work: Path, config: dict, counts: list[int], budget: Budget,
                     per_fold_estimate: float) -> list[dict]:
    """``k`` folds at once through the Dask executor (one process per fold, all on the one GPU)."""
    from cellmorph.cv.executors import DaskExecutor, ExecutorConfig, FoldTask

    rows = []
    cores = os.cpu_count() or 1
    for k in counts:
        # k processes share the GPU: allow each about k times the single fold, plus start-up.
        need = per_fold_estimate * max(1.0, k / 2) + 30
        if budget.left() < need:
            rows.append({"concurrent": k, "skipped": f"budget: {budget.left():.0f} s left, about {need:.0f} s needed"})
            continue
        plan, rundir = _plan(cache, config, work / f"concurrent-{k}")
        folds = typical_folds(plan, k)
        threads = max(1, cores // k)
        tasks = [FoldTask(str(cache.resolve()), str(rundir.root.resolve()), plan.config.model_dump(mode="json"),
                          plan.fingerprint, f.index, threads) for f in folds]
        done: list[dict] = []
        t = time.perf_counter()
        with DaskExecutor(ExecutorConfig(kind="dask", workers=k, threads=threads)) as engine:
            started = time.perf_counter()
            engine.run(tasks, lambda task, info: done.append(info))
        wall = time.perf_counter() - started
        cap = plan.config.max_tiles_per_fold
        tiles = sum(min(len(f.train), cap or len(f.train)) for f in folds) * plan.config.epochs
        span = max(d["seconds"] for d in done)
        fold_s = statistics.fmean(d["seconds"] for d in done)
        row = {"concurrent": k, "epochs": plan.config.epochs, "threads_per_fold": threads,
               "cluster_start_s": started - t, "wall_s": wall, "fold_s_mean": fold_s, "fold_s_max": span,
               "tiles_per_s": tiles / span}
        # 38 paper-size folds of 10 epochs at the aggregate rate (start-up and scoring left out: a few s per fold).
        row["projected_38_folds_s"] = LOCO_FOLDS * PAPER_EPOCHS * PAPER_TRAIN_TILES / row["tiles_per_s"]
        rows.append(row)
        log(f"  {k} at once: {tiles / span:.0f} tiles/s, folds {fold_s:.1f} s, "
            f"38 folds ≈ {row['projected_38_folds_s'] / 60:.1f} min")
    return rows


def correctness(cache: Path, work: Path, config: dict, device: torch.device) -> dict:
    """The same short fold twice (deterministic), then its GPU weights scored on the CPU."""
    from cellmorph.augment import Augmenter
    from cellmorph.cv.run import run_fold
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import build_model
    from cellmorph.runtime import deterministic
    from cellmorph.train import PredictSettings, predict_tiles

    plan, _ = _plan(cache, config, work / "correctness")
    fold = typical_folds(plan, 1)[0]
    tasks = {"epochs": Quiet(), "batches": Quiet()}
    with deterministic(True):
        first = run_fold(plan, fold, None, tasks)
        second = run_fold(plan, fold, None, tasks)
    record = {"fold": fold.name, "train_tiles": int(len(first.train_rows)), "test_tiles": int(len(fold.test)),
              "repeat_max_abs_diff": float(np.abs(first.probs - second.probs).max()),
              "repeat_identical": bool(np.array_equal(first.probs, second.probs))}
    model = build_model(plan.config, len(plan.classes), plan.cache.tile_shape[0]).module
    model.load_state_dict(first.state)
    pipeline = InputPipeline.from_spec(plan.input, Augmenter(plan.config.augment))
    cpu = torch.device("cpu")
    fp32 = PredictSettings(batch_size=64, amp=False)
    on_cpu = predict_tiles(model, pipeline, plan.cache, fold.test, fp32, cpu)
    on_device_fp32 = predict_tiles(model, pipeline, plan.cache, fold.test, fp32, device)
    # first.probs: scored on the device with the default settings (fp16 autocast on CUDA).
    record |= {"cpu_vs_device_max_abs_diff": float(np.abs(on_cpu - first.probs).max()),
               "cpu_vs_device_calls_agree": float(np.mean(on_cpu.argmax(1) == first.probs.argmax(1))),
               "cpu_vs_device_fp32_max_abs_diff": float(np.abs(on_cpu - on_device_fp32).max())}
    if config.get("cuda_graphs") and device.type == "cuda":
        eager_plan, _ = _plan(cache, config | {"cuda_graphs": False}, work / "correctness-eager")
        with deterministic(True):
            eager = run_fold(eager_plan, fold, None, tasks)
        record |= {"graphed_vs_eager_max_abs_diff": float(np.abs(first.probs - eager.probs).max()),
                   "graphed_vs_eager_calls_agree": float(np.mean(first.probs.argmax(1) == eager.probs.argmax(1)))}
    return record


def bundle_check(cache_dir: Path, work: Path, config: dict, device: torch.device) -> dict:
    """``train`` a bundle on ``device``, ``predict`` with it (which scores on the CPU), and compare its
    treatment probabilities with the same bundle scored on ``device`` and aggregated the same way."""
    import pandas as pd

    from cellmorph.bundle import load_bundle
    from cellmorph.cache import TileCache
    from cellmorph.cv.rundir import predictions_frame
    from cellmorph.datasets import InputPipeline
    from cellmorph.final_model import train_final
    from cellmorph.metrics import aggregate
    from cellmorph.predict import PredictConfig, predict
    from cellmorph.schema import CONTROL_COLUMN, PROB_PREFIX, TREATMENT_KEYS
    from cellmorph.train import PredictSettings, predict_tiles

    t = time.perf_counter()
    # predict needs calibration scores: the cheapest honest ones, a 2-fold CV over compounds.
    train_final(cache_dir, work / "bundle", config | {"skip_untrainable_folds": True}, calibration="group-kfold:2",
                progress=False)
    trained = time.perf_counter() - t
    t = time.perf_counter()
    predict(work / "bundle", cache_dir, work / "predicted", PredictConfig(), progress=False, log=lambda *a, **k: None)
    predicted = time.perf_counter() - t
    on_cpu = pd.read_parquet(work / "predicted" / "treatments.parquet")
    bundle, cache = load_bundle(work / "bundle"), TileCache(cache_dir)
    rows = np.flatnonzero(~cache.index[CONTROL_COLUMN].astype(bool).to_numpy())
    tta = bundle.manifest["training"]["config"].get("tta", "none")
    probs = predict_tiles(bundle.network(), InputPipeline.from_spec(bundle.input), cache, rows,
                          PredictSettings(batch_size=64, tta=tta), device)
    frame = predictions_frame(cache, rows, probs, bundle.classes, fold=-1).drop(columns=["Metadata_Fold"])
    how = bundle.manifest["training"]["config"].get("aggregate", "median")
    on_device = aggregate(frame, how=how)[2]
    columns = [c for c in on_cpu.columns if c.startswith(PROB_PREFIX)]
    both = on_cpu[TREATMENT_KEYS + columns].merge(on_device[TREATMENT_KEYS + columns], on=TREATMENT_KEYS,
                                                  suffixes=("_cpu", "_device"))
    cpu = both[[f"{c}_cpu" for c in columns]].to_numpy()
    dev = both[[f"{c}_device" for c in columns]].to_numpy()
    return {"train_s": trained, "predict_cpu_s": predicted, "treatments": int(len(both)),
            "treatments_in_predict": int(len(on_cpu)),
            "max_abs_diff": float(np.abs(cpu - dev).max()), "calls_agree": float(np.mean(cpu.argmax(1) == dev.argmax(1)))}


# --------------------------------------------------------------------------- 5, 9: the network alone
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def flops_per_image(name: str, size: int) -> float:
    """Training FLOPs of one image by the harness's convention (forward as torch counts it, × 3)."""
    import timm

    from run import flops_per_image as counted

    return counted(timm.create_model(name, pretrained=False, num_classes=12), size, train=True)


def step_rate(name: str, size: int, batch: int, precision: str, channels_last: bool, compiled: bool,
              device: torch.device, steps: int, graphed: bool = False, repeats: int = 3) -> dict:
    """Images/s of training steps (forward, class-weighted loss, backward, SGD) on one fixed batch: the median
    of ``repeats`` timings of ``steps`` steps, after ``repeats`` warm-up steps."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=12).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 12, (batch,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model

    def eager() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=not graphed):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step = eager
    t = time.perf_counter()
    if graphed:  # the whole step as one CUDA graph, as cellmorph's cuda_graphs option does (train._GraphedStep)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                eager()
        torch.cuda.current_stream(device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        step = graph.replay
    for _ in range(repeats):
        step()
    sync(device)
    warmup = time.perf_counter() - t
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - t))
    return {"model": name, "size": size, "batch": batch, "precision": precision, "channels_last": channels_last,
            "compile": compiled, "graphed": graphed, "images_per_s": statistics.median(rates), "warmup_s": warmup}


def throughput(device: torch.device, shapes: list[tuple[str, int]], batches: list[int], precisions: list[str],
               steps: int, budget: Budget, peak_flops: float | None, compiled: bool = False,
               graphed: str = "off", nchw: str | None = "bf16", repeats: int = 3) -> list[dict]:
    """``graphed``: off (eager steps), on (CUDA-graph steps only), both; ``nchw``: also this precision
    without channels-last at the largest batch (its share, once; None: no such row); ``repeats``: see
    `step_rate`."""
    rows = []
    graph_modes = {"off": [False], "on": [True], "both": [False, True]}[graphed if device.type == "cuda" else "off"]
    for name, size in shapes:
        flops = flops_per_image(name, size)
        for batch in batches:
            variants = [(p, True, g) for g in graph_modes for p in precisions if not (g and p == "fp16")]
            if nchw in precisions and not compiled and batch == max(batches) and False in graph_modes:
                variants.append((nchw, False, False))
            for precision, channels_last, graph in variants:
                if budget.left() < (90 if compiled else 15):
                    rows.append({"model": name, "batch": batch, "precision": precision, "skipped": "budget"})
                    continue
                try:
                    row = step_rate(name, size, batch, precision, channels_last, compiled, device, steps, graph, repeats)
                except Exception as error:  # noqa: BLE001 - one failing variant must not end the run
                    row = {"model": name, "size": size, "batch": batch, "precision": precision,
                           "channels_last": channels_last, "compile": compiled, "error": f"{type(error).__name__}: {error}"}
                    rows.append(row)
                    log(f"  {name} b{batch} {precision}: {row['error']}")
                    continue
                row["gflops_per_image"] = flops / 1e9
                if peak_flops:
                    row["pct_of_peak"] = 100 * row["images_per_s"] * flops / peak_flops
                rows.append(row)
                log(f"  {name} {size}px b{batch} {precision}{'' if channels_last else ' NCHW'}"
                    f"{' compiled' if compiled else ''}{' graphed' if graph else ''}: {row['images_per_s']:.0f} img/s"
                    + (f" ({row['pct_of_peak']:.1f}% of peak)" if peak_flops else ""))
    return rows


# --------------------------------------------------------------------------- 7: the input side
def input_rates(cache_dir: Path, device: torch.device, batch: int, n_batches: int, workers: list[int]) -> dict:
    from cellmorph.augment import Augmenter
    from cellmorph.cache import TileCache
    from cellmorph.datasets import InputPipeline, iterate_batches
    from cellmorph.models import model_input_spec

    cache = TileCache(cache_dir)
    rows = np.arange(len(cache.index))
    out = {"batch": batch}
    for w in workers:
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        seen = 0
        for tiles, _ in iterate_batches(cache, rows, batch, rng, w, pin_memory=device.type == "cuda"):
            tiles.to(device, non_blocking=True)
            seen += len(tiles)
            if seen >= batch * n_batches:
                break
        sync(device)
        out[f"read_tiles_per_s_workers{w}"] = seen / (time.perf_counter() - t)
    pipeline = InputPipeline.from_spec(model_input_spec("resnet50", cache.tile_shape[-1]), Augmenter(seed=0)).train()
    sample = torch.from_numpy(cache.tiles(rows[:batch]))
    for where in dict.fromkeys([device, torch.device("cpu")]):
        pipeline.to(where)
        x = sample.to(where)
        pipeline(x)
        sync(where)
        t = time.perf_counter()
        for _ in range(n_batches):
            pipeline(x)
        sync(where)
        out[f"augment_tiles_per_s_{where.type}"] = batch * n_batches / (time.perf_counter() - t)
    return out


# --------------------------------------------------------------------------- report
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU benchmark ({env.get('gpu', env.get('device'))}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, driver {env.get('driver')}, commit {env.get('commit')})", ""]
    if "tflops" in results.get("peak", {}):
        p = results["peak"]
        lines += [f"Dense {p['dtype']} matrix product {p['n']}³: **{p['tflops']:.3g} TFLOP/s** (the peak below).", ""]
    if "tiles" in results.get("screen", {}):
        s = results["screen"]
        lines += [f"Screen: synthetic `{s['preset']}`, {s['tiles']} tiles at {s['tile_size']} px "
                  f"(synth {s['synth_s']:.0f} s, prepare {s['prepare_s']:.0f} s).", ""]
    fold = results.get("fold")
    if isinstance(fold, dict) and "seconds" in fold:
        lines += ["## One LOCO fold, the paper's recipe", "",
                  f"38 folds projected at {PAPER_TRAIN_TILES} training tiles per fold (the paper's; mini's folds "
                  "are a quarter of that) from the steady tiles/s, plus each fold's fixed costs.", "",
                  "| fold | training tiles | epochs | batch | amp | seconds | steady epoch s | tiles/s | GPU busy % "
                  "| 38 folds (projected) |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {fold['fold']} | {fold['train_tiles']} | {len(fold['epoch_seconds'])}/{fold['epochs']} | "
                  f"{fold['batch_size']} | {fold['amp_dtype']} | {fold['seconds']:.1f} | "
                  f"{fold.get('steady_epoch_s', float('nan')):.2f} | {fold.get('tiles_per_s', float('nan')):.0f} | "
                  f"{_pct(fold.get('gpu_utilisation_pct'))} | {fold.get('projected_38_folds_s', float('nan')) / 60:.1f} min |",
                  ""]
    for key, title in (("fold_variants", "The same fold, one epoch, one setting changed"),):
        if isinstance(results.get(key), dict) and "skipped" not in results[key] and "error" not in results[key]:
            lines += [f"## {title}", "", "| setting | steady epoch s | tiles/s | GPU busy % |", "|---|---|---|---|"]
            for name, row in results[key].items():
                if "epoch_seconds" not in row:
                    continue
                lines.append(f"| {name} | {row.get('steady_epoch_s', float('nan')):.2f} | "
                             f"{row.get('tiles_per_s', float('nan')):.0f} | {_pct(row.get('gpu_utilisation_pct'))} |")
            lines.append("")
    for key, title in (("throughput", "Training steps, batch on the GPU"), ("compile", "torch.compile (bf16)")):
        rows = [r for r in results.get(key) or [] if isinstance(r, dict) and "images_per_s" in r]
        if rows:
            lines += [f"## {title}", "", "| model | px | batch | precision | layout | compile | CUDA graph | images/s "
                      "| GFLOP/img | % of peak |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | "
                             f"{'NHWC' if r['channels_last'] else 'NCHW'} | {'yes' if r['compile'] else 'no'} | "
                             f"{'yes' if r.get('graphed') else 'no'} | "
                             f"{r['images_per_s']:.0f} | {r['gflops_per_image']:.1f} | {_pct(r.get('pct_of_peak'))} |")
            lines.append("")
    rows = [r for r in results.get("concurrent") or [] if isinstance(r, dict) and "tiles_per_s" in r]
    if rows:
        lines += ["## Folds at once on one GPU (Dask executor)", "",
                  f"38 folds projected at {PAPER_TRAIN_TILES} training tiles per fold from the aggregate tiles/s.", "",
                  "| folds at once | epochs | mean fold s | tiles/s (all) | 38 folds (projected) |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['concurrent']} | {r['epochs']} | {r['fold_s_mean']:.1f} | {r['tiles_per_s']:.0f} | "
                         f"{r['projected_38_folds_s'] / 60:.1f} min |")
        lines.append("")
    if isinstance(results.get("input"), dict) and "batch" in results["input"]:
        lines += ["## Input side (tiles/s)", "", "| what | tiles/s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["input"].items() if k != "batch"]
        lines.append("")
    if isinstance(results.get("bundle"), dict) and "max_abs_diff" in results["bundle"]:
        lines += ["## A bundle trained here, predicted on the CPU", "", "| check | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["bundle"].items()]
        lines.append("")
    if isinstance(results.get("fold_batches"), dict) and "error" not in results["fold_batches"]:
        lines += ["## Larger batches (2-epoch folds, learning rate scaled linearly)", "",
                  "| batch | steady epoch s | tiles/s | GPU busy % | 38 folds (projected) |", "|---|---|---|---|---|"]
        for name, row in results["fold_batches"].items():
            if "tiles_per_s" in row:
                lines.append(f"| {name} | {row['steady_epoch_s']:.2f} | {row['tiles_per_s']:.0f} | "
                             f"{_pct(row.get('gpu_utilisation_pct'))} | {row['projected_38_folds_s'] / 60:.1f} min |")
        lines.append("")
    if isinstance(results.get("correctness"), dict) and "fold" in results["correctness"]:
        lines += ["## Correctness", "", "| check | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["correctness"].items()]
        lines.append("")
    skipped = {k: v for k, v in results.items() if isinstance(v, dict) and ("skipped" in v or "error" in v)}
    for k, v in skipped.items():
        lines.append(f"- {k}: {v.get('skipped') or v.get('error')}")
    lines.append(f"\nTotal {results.get('seconds', 0):.0f} s of a {results.get('budget_s')} s budget.")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1f}"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CPU tests)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--commit", default=None, help="the commit measured (a copied tree has no git)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a CVConfig field of every fold this run trains (YAML value), e.g. cuda_graphs=true")
    parser.add_argument("--concurrent", default=None, help="folds at once, e.g. 1,2,4 (default)")
    parser.add_argument("--precisions", default=None, help="throughput: e.g. fp32,fp16,bf16 (default on CUDA)")
    parser.add_argument("--batches", default=None, help="throughput: e.g. 8,128 (default)")
    parser.add_argument("--graphed", choices=["off", "on", "both"], default="both",
                        help="throughput: eager steps, CUDA-graph steps, or both")
    parser.add_argument("--fold-batches", default=None, help="fold_batches: batch sizes of 2-epoch folds "
                        "(default 32,128 on a GPU, none in --smoke)")
    parser.add_argument("--variants", default=None, help="fold_variants to run, by number: 0 float16, 1 loader "
                        "workers, 2 deterministic off, 3 cuda_graphs, 4 cuda_graphs + fp32, 5 fp32 (default all)")
    args = parser.parse_args(argv)

    from cellmorph.runtime import resolve_device

    device = resolve_device(args.device)
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="cellmorph-gpu-"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    smoke = args.smoke
    size = 64 if smoke else 224
    shapes = [("resnet50", 64), ("inception_v3", 75)] if smoke else [("resnet50", 224), ("inception_v3", 299)]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [2] if smoke else [8, 128]
    precisions = (args.precisions.split(",") if args.precisions else
                  ["fp32", "bf16"] if smoke or device.type != "cuda" else ["fp32", "fp16", "bf16"])
    steps = 1 if smoke else 20
    fold_epochs = 1 if smoke else PAPER_EPOCHS
    import yaml

    # Smoke folds train timm's tiny test_resnet: they check the sections' code, not ResNet50's arithmetic (the
    # throughput section still builds resnet50 and inception_v3), at a fifth of the suite's time.
    extra = {"max_tiles_per_fold": 16, "batch_size": 4, "model": "test_resnet"} if smoke else {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        extra[key.strip()] = yaml.safe_load(value)
    results: dict = {"budget_s": args.budget, "smoke": smoke, "argv": sys.argv, "overrides": extra}

    def save() -> None:
        results["seconds"] = budget.used()
        write_atomic(args.out / "gpu.json", json.dumps(results, indent=1, default=str))
        write_atomic(args.out / "gpu.md", markdown(results))

    def section(name: str, need: float, work_fn):
        if name in skip:
            results[name] = {"skipped": "--skip"}
        elif budget.left() < need:
            results[name] = {"skipped": f"budget: {budget.left():.0f} s left, {need:.0f} s needed"}
        else:
            log(f"[{budget.used():5.0f} s, {budget.left():4.0f} s left] {name}")
            t = time.perf_counter()
            try:
                results[name] = work_fn()
            except Exception as error:  # noqa: BLE001 - keep every other section's figures
                results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
                log(f"  {name} failed: {type(error).__name__}: {error}")
            log(f"  {name}: {time.perf_counter() - t:.1f} s")
        save()
        return results[name]

    section("environment", 0, lambda: environment(device, args.commit))
    peak = section("peak", 5, lambda: matmul_peak(device, 512 if smoke else 8192))
    peak_flops = peak.get("tflops", 0) * 1e12 or None
    screen = section("screen", 30, lambda: prepare_screen(work, "tiny" if smoke else "mini", size, os.cpu_count() or 1))
    cache = Path(screen["cache"]) if "cache" in screen else None
    config = paper_config(str(device), fold_epochs, size, **extra)
    fold = {}
    if cache is not None:
        fold = section("fold", 20, lambda: one_fold(cache, work / "fold", config, time.perf_counter()
                                                    + budget.left() - 150, device))
    section("throughput", 20, lambda: throughput(device, shapes, batches, precisions, steps, budget, peak_flops,
                                                 graphed=args.graphed,
                                                 # a smoke run checks the code: one warm-up step, one timed, and
                                                 # its NCHW row in fp32 (bf16 is emulated on most CPUs, a step of
                                                 # it costs seconds; the layout's code path is the same)
                                                 nchw=None if args.precisions else "fp32" if smoke else "bf16",
                                                 repeats=1 if smoke else 3))
    if cache is not None:
        one = fold.get("seconds", 60.0) if fold.get("complete") else 60.0
        # Concurrency: fewer epochs per fold when a whole fold is long (its epochs cost the same).
        conc_epochs = fold_epochs if one <= 40 else 3
        per_fold = one * conc_epochs / fold_epochs if not smoke else one
        section("concurrent", per_fold + 30, lambda: concurrent_folds(
            cache, work / "concurrent", paper_config(str(device), conc_epochs, size, **extra),
            [int(k) for k in args.concurrent.split(",")] if args.concurrent else [2] if smoke else [1, 2, 4],
            budget, per_fold))
        loaders = 2 if smoke else 4
        every = [("amp_dtype float16 (the earlier default)", {"amp_dtype": "float16"}),
                 (f"num_workers {loaders} (tiles read by worker processes)", {"num_workers": loaders}),
                 ("deterministic off (cuDNN autotuning)", {"deterministic": False}),
                 ("cuda_graphs", {"cuda_graphs": True}),
                 ("cuda_graphs, amp off (fp32 steps)", {"cuda_graphs": True, "amp": False}),
                 ("amp off (fp32 steps), eager", {"amp": False, "cuda_graphs": False})]
        chosen = ([int(v) for v in args.variants.split(",")] if args.variants else
                  [1, 2] if device.type != "cuda" else list(range(len(every))))
        variants = dict(every[i] for i in chosen)

        def fold_variants() -> dict:
            out = {}
            for name, change in variants.items():
                if budget.left() < 60:
                    out[name] = {"skipped": "budget"}
                    continue
                out[name] = one_fold(cache, work / f"variant-{len(out)}", paper_config(
                    str(device), 2 if not smoke else 1, size, **extra | change), time.perf_counter() + 120, device)
            return out

        section("fold_variants", 60, fold_variants)
        section("input", 10, lambda: input_rates(cache, device, 4 if smoke else 128, 2 if smoke else 20,
                                                 [0, 2] if smoke else [0, 4]))
        short = paper_config(str(device), 1, size, **({"max_tiles_per_fold": 512} | extra))
        section("correctness", 30, lambda: correctness(cache, work / "correctness", short, device))
        bundle_config = paper_config(str(device), 1, size, **({"max_tiles_per_fold": 512} | extra))
        bundle_config.pop("cv")
        bundle_config.pop("keep_checkpoints")
        section("bundle", 40, lambda: bundle_check(cache, work / "bundle-check", bundle_config, device))
        batch_rows = [int(b) for b in args.fold_batches.split(",")] if args.fold_batches else [] if smoke else [32, 128]

        def fold_batches() -> dict:
            out = {}
            for b in batch_rows:
                if budget.left() < 60:
                    out[f"batch {b}"] = {"skipped": "budget"}
                    continue
                # The linear scaling rule (Goyal et al. 2017) from the paper's 1e-3 at batch 8: a timing, not a recipe.
                out[f"batch {b}"] = one_fold(cache, work / f"batch-{b}", paper_config(
                    str(device), 2, size, **extra | {"batch_size": b, "lr": 1e-3 * b / 8}), time.perf_counter() + 120,
                    device)
            return out

        if batch_rows:
            section("fold_batches", 60, fold_batches)
    if device.type == "cuda":
        section("compile", 90, lambda: throughput(device, shapes, batches, ["bf16"], steps, budget, peak_flops,
                                                  compiled=True))
    else:
        results["compile"] = {"skipped": "CPU: inductor's C++ compile takes minutes (benchmarks/fastpaths.py)"}
    save()
    log(markdown(results))
    return results


if __name__ == "__main__":
    main()
