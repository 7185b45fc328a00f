"""Cross-validated training on a tile cache: the public :func:`run_cv` API.

::

    from cellmorph.cv import CVConfig, run_cv
    metrics = run_cv("CACHE", "runs/r50", CVConfig(model="resnet50", cv="loco"))

A run is a short sequence of phases: :func:`plan_run` checks everything that can be
checked before any work (config, data, folds, the network and its input size) and fixes
seeds and fingerprints; the run directory begins (or resumes); features shared by the
folds are computed once; each fold runs or is read back; :func:`summarise` aggregates
tile → well → treatment and writes the results. Each fold's seeds derive from (seed,
fold number) only, so ``resume=True`` after a kill gives exactly the predictions of an
uninterrupted run. The directory layout is :mod:`cellmorph.cv.rundir`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cellmorph.cache import cache_source
from cellmorph.cv.config import RUNTIME_FIELDS, CVConfig, validate_config, with_layout_defaults
from cellmorph.cv.rundir import (
    CONFUSION_PNG,
    CURVES_PNG,
    FROZEN_FEATURES,
    FROZEN_FEATURES_MARKER,
    METRICS_FILE,
    FoldOutput,
    RunDir,
    compute_fields,
    data_fingerprint,
    digest,
    predictions_frame,
)
from cellmorph.config.scheme import parse_cv
from cellmorph.cv.splits import Fold, class_names, make_folds, subsample_rows
from cellmorph.data.table import CONTROL_COMPOUND
from cellmorph.distributed import current as current_data_parallel
from cellmorph.errors import CellmorphError, disk_full_as_error, option
from cellmorph.metrics import (
    ACCURACY_KEYS,
    accuracy,
    aggregate,
    aggregate_compounds,
    bootstrap_interval,
    classification_text,
    compute_metrics,
    confusion,
)
from cellmorph.models import InitRecord, InputSpec
from cellmorph.progress import Progress
from cellmorph.runinfo import created_root, output_lock, require_not_input, require_output_dir, run_info, write_json
from cellmorph.runtime import derive_seeds, deterministic, resolve_device, torch_threads
from cellmorph.schema import HELDOUT_ACCURACY, PREDICTED_COLUMN, TRUE_COLUMN, prob_column

if TYPE_CHECKING:
    from cellmorph.cache import TileCache
    from cellmorph.cv.executors import Executor, ExecutorConfig, FoldTask


@dataclass
class TrainedFold:
    """What training one fold produced, before it is written to the run directory."""

    train_rows: np.ndarray  # the training rows used (after max_tiles_per_fold)
    probs: np.ndarray  # held-out tile probabilities, (len(fold.test), classes)
    history: list[dict]  # per epoch; empty for the linear probe
    state: dict  # weights (plain tensors)
    interim: dict[int, np.ndarray]  # held-out probabilities after the eval_epochs
    choices: dict = field(default_factory=dict)  # what the fold chose for itself (the probe's C), recorded


@dataclass
class RunPlan:
    """Everything a run needs, fixed before any work: what to train, on what, with which seeds."""

    config: CVConfig  # resolved: per-model defaults and the network's input size filled in
    cache: "TileCache"
    classes: list[str]
    targets: np.ndarray  # class number per cache row, -1 for rows no fold uses as a class
    folds: list[Fold]
    skipped: list[dict]
    input: InputSpec
    init: InitRecord
    device: torch.device
    seeds: dict[int, dict]
    data_fingerprint: str
    fingerprint: str
    fold_fingerprints: dict[int, str]

    def header(self, data: Path, threads: int) -> dict:
        """The run's ``config.yaml``: resolved config, seeds, folds, input, provenance."""
        cfg = self.config
        return {
            "config": cfg.model_dump(mode="json"),
            "data": str(Path(data).resolve()),
            "data_fingerprint": self.data_fingerprint,
            "classes": self.classes,
            "model_input": self.input.record(),
            "model_init": self.init.record(),
            "device": str(self.device),
            "threads": threads,
            "seeds": {"seed": cfg.seed, "folds": {str(k): v for k, v in self.seeds.items()}},
            "cv": {"scheme": cfg.cv, "n_folds": len(self.folds), "folds": [f.describe() for f in self.folds],
                   "skipped": self.skipped},
            "provenance": run_info(),
        }


def plan_run(data: Path, config: CVConfig | dict | Path | None, with_folds: bool = True) -> RunPlan:
    """Validate the config against the data and build the network once, before any output exists.

    A missing weights file, a bad checkpoint, too many frozen stages or an input size the
    network cannot take fails here, and the input spec is that of the weights actually resolved.
    ``with_folds=False`` (training one final model on everything) makes no CV folds.
    """
    from cellmorph.cache import TileCache
    from cellmorph.models import build_model, check_input_size, freeze_stages

    cache = TileCache(Path(data))
    base = with_layout_defaults(validate_config(config if config is not None else {}, "config"),
                                cache.manifest.get("source"))
    _check_open_set(base)
    classes = class_names(cache.index, base.include_controls_as_class)
    folds, skipped = [], []
    if with_folds:
        folds, skipped = make_folds(cache.index, base.cv, base.include_controls_as_class, base.split_seed,
                                    base.skip_untrainable_folds, base.strict)
        if not folds:
            raise CellmorphError(f"cv {base.cv}: every fold was skipped; nothing to train")
    elif len(classes) < 2:
        raise CellmorphError(f"{data}: a classifier needs at least 2 classes; the data has {classes}")
    channels = cache.tile_shape[0]
    if channels != 3 and base.init != "xavier":
        raise CellmorphError(f"{data}: tiles have {channels} channels but ImageNet models take 3; "
                             "prepare with pad_channels=3 or use init=xavier")
    network = build_model(base, len(classes), channels)
    if base.freeze_stages and base.mode == "finetune":
        freeze_stages(network.module, base.freeze_stages)  # too many stages → CellmorphError
    check_input_size(network.module, network.input, network.init.model)
    cfg = base.resolved().model_copy(update={"image_size": network.input.size})
    label_of = {c: i for i, c in enumerate(classes)}
    targets = cache.index[TRUE_COLUMN].astype(str).map(label_of).fillna(-1).astype(np.int64).to_numpy()
    seeds = {f.index: derive_seeds(cfg.seed, f.index) for f in folds}
    data_fp = data_fingerprint(cache)
    # The fingerprint's parts and their order are those of every earlier release, so old runs resume.
    run_fp = digest(compute_fields(cfg, RUNTIME_FIELDS), data_fp, classes, network.input.record(), network.init.sha256)
    fold_fps = {f.index: digest(run_fp, f.index, f.train, f.test, seeds[f.index]) for f in folds}
    plan = RunPlan(cfg, cache, classes, targets, folds, skipped, network.input, network.init,
                   resolve_device(cfg.device), seeds, data_fp, run_fp, fold_fps)
    if cfg.open_set_reference and cfg.mode != "linear-probe":  # a lomo run of a network reads it after its folds
        check_open_set_reference(plan)
    return plan


def _check_open_set(config: CVConfig) -> None:
    """A lomo run of a network needs its known side from a LOCO run (:mod:`cellmorph.cv.open_set`), and measures
    one network; the reference is for lomo only."""
    open_set = parse_cv(config.cv).open_set
    if config.open_set_reference and not open_set:
        raise CellmorphError(f"{option('open_set_reference')} is for cv lomo; this run is cv {config.cv}")
    if not open_set or config.mode == "linear-probe":
        return
    if not config.open_set_reference:
        raise CellmorphError(f"cv lomo of a network (mode {config.mode}) needs {option('open_set_reference')}: a "
                             "finished loco run of the same recipe on this cache, whose held-out compounds are the new "
                             f"compounds of known MoAs (the linear probe scores those itself: {option('mode')} "
                             "linear-probe)")
    if config.ensemble:
        raise CellmorphError("cv lomo measures one network, not an ensemble: give an empty ensemble (ensemble: [] "
                             "in a YAML config, --ensemble-seeds 1 on the command line); an ensemble with a probe "
                             f"member flags Novel by that probe, whose open set cv lomo {option('mode')} linear-probe "
                             "measures")


def check_open_set_reference(plan: "RunPlan") -> Path:
    """The LOCO run named by ``open_set_reference``: finished, on this cache, of this recipe (all but the cv)."""
    reference = Path(plan.config.open_set_reference)
    rundir = RunDir(reference)
    if not rundir.has_results():
        raise CellmorphError(f"{option('open_set_reference')} {reference}: not a finished cv run")
    header = rundir.read_config()
    scheme = (header.get("cv") or {}).get("scheme")
    if scheme != "loco":
        raise CellmorphError(f"{option('open_set_reference')} {reference}: a run of cv {scheme}, not loco")
    if header.get("data_fingerprint") != plan.data_fingerprint:
        raise CellmorphError(f"{option('open_set_reference')} {reference}: made on another cache "
                             f"({header.get('data')}), not {plan.cache.root}")
    ignored = ("cv", "fold_seed")  # (open_set_reference is a runtime field: compute_fields leaves it out)
    ours = {k: v for k, v in compute_fields(plan.config, RUNTIME_FIELDS).items() if k not in ignored}
    theirs_config = validate_config(header["config"], str(reference / "config.yaml"))
    theirs = {k: v for k, v in compute_fields(theirs_config, RUNTIME_FIELDS).items() if k not in ignored}
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        raise CellmorphError(f"{option('open_set_reference')} {reference}: another recipe (it differs in "
                             f"{', '.join(differing)})")
    return reference


def run_cv(
    data: Path,
    out: Path,
    config: CVConfig | dict | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    executor: "Executor | ExecutorConfig | dict | str | None" = None,
) -> dict:
    """Cross-validate ``config.model`` on the tile cache ``data``; write the run to ``out``.

    Returns the metrics dict (also in ``out/metrics.json``). ``resume=True`` continues
    a run in ``out`` made with the same config and data, skipping finished folds, whichever
    executor ran them. ``executor`` says where folds run (:mod:`cellmorph.cv.executors`:
    local, dask or slurm; default local); every executor writes the same run directory.
    """
    from cellmorph import distributed
    from cellmorph.cv.executors import executor_scope

    # An ensemble, given or a layout's default (crop fine-tunes), runs its members as runs of their own.
    ensemble = with_layout_defaults(validate_config(config if config is not None else {}, "config"),
                                    cache_source(data))
    _check_open_set(ensemble)
    if ensemble.ensemble:
        from cellmorph.cv.ensemble import run_ensemble_cv

        if distributed.launched_world_size() > 1:
            raise CellmorphError("cv: an ensemble's members run one after another; run it without torchrun")
        require_not_input(out, data=data)
        return run_ensemble_cv(data, out, ensemble, resume=resume, progress=progress, executor=executor)
    started = time.perf_counter()
    # Under torchrun, rank 0 alone checks and writes the run directory; every rank trains each fold.
    launched = distributed.launched_world_size() > 1
    require_not_input(out, data=data)
    rundir = RunDir(Path(out) if launched else require_output_dir(out, "run directory"))
    plan = plan_run(data, config)
    dp = distributed.init_from_env(plan.config.device)
    if dp.active:
        _check_data_parallel(plan, executor)
        dp.main_only(lambda: require_output_dir(out, "run directory"))
        plan = replace(plan, device=dp.device)
    created = created_root(rundir.root)
    lock = output_lock(rundir.root, "cv") if dp.is_main else nullcontext()
    with lock, executor_scope(executor) as engine, torch_threads(plan.config.num_threads) as threads, \
            deterministic(plan.config.deterministic), Progress(progress and dp.is_main) as bar:
        header = plan.header(data, threads) | {"executor": engine.describe(), "data_parallel": dp.record()}
        dp.main_only(lambda: rundir.begin(header, plan.fingerprint, resume, RUNTIME_FIELDS))
        try:
            with disk_full_as_error():
                outputs = run_folds(plan, rundir, resume, bar, engine, data)
        except CellmorphError:
            if dp.is_main and created is not None and not rundir.finished_folds():
                shutil.rmtree(created, ignore_errors=True)  # nothing worth resuming: leave nothing behind
            raise

        def finish() -> dict:
            # Every fold is done: the frozen-stage features were only kept for resuming.
            rundir.remove(FROZEN_FEATURES, FROZEN_FEATURES_MARKER)
            if parse_cv(plan.config.cv).open_set:
                _write_open_set(plan, rundir, bar)
            return summarise(plan, rundir, outputs, time.perf_counter() - started, log=bar.line)

        metrics = dp.main_only(finish)
    return metrics if dp.is_main else json.loads(rundir.path(METRICS_FILE).read_text())


def _write_open_set(plan: RunPlan, rundir: RunDir, bar: Progress) -> None:
    """``open_set.json`` of a lomo run (:mod:`cellmorph.cv.open_set`): the probe's from its shared embeddings, a
    network's from its folds' calls and the LOCO run it names."""
    from cellmorph.cv.open_set import OPEN_SET_FILE, ROC_FILE, network_open_set, open_set_evaluation
    from cellmorph.figures import plot_novelty_roc

    if plan.config.mode == "linear-probe":
        from cellmorph.cv.features import control_embeddings

        record = open_set_evaluation(plan, shared_features(plan, rundir, True, bar, compute=False),
                                     controls=control_embeddings(plan, rundir, bar))
    else:
        reference = RunDir(Path(plan.config.open_set_reference)).read_treatments()  # checked by plan_run
        fold_treatments = {fold.name: aggregate(rundir.read_fold_predictions(fold.index), how=plan.config.aggregate)[2]
                           for fold in plan.folds}
        record = network_open_set(fold_treatments, reference) | {"reference": plan.config.open_set_reference}
    write_json(rundir.path(OPEN_SET_FILE), record)
    scores = {kind: np.array([t["score"] for t in record["treatments"] if t["kind"] == kind]) for kind in ("unseen", "known")}
    plot_novelty_roc(scores["unseen"], scores["known"], rundir.path(ROC_FILE), record["auroc"], record["alpha"],
                     record["flagged_at_alpha"], record["false_alarm_rate"])
    bar.line(f"open set: unseen MoAs against new compounds of known MoAs, AUROC {record['auroc']:.3f}; "
             f"{record['flagged_at_alpha']:.3f} of the unseen MoAs' treatments flagged"
             f"{' (each scored by its compound)' if record.get('pool') == 'compound' else ''} at {record['alpha']:g} "
             f"false alarms (measured {record['false_alarm_rate']:.3f})")


def _check_data_parallel(plan: RunPlan, executor) -> None:
    from cellmorph.cv.executors import Executor, executor_config

    kind = executor.config.kind if isinstance(executor, Executor) else executor_config(executor).kind
    if kind != "local":
        raise CellmorphError(f"cv under torchrun trains each fold data-parallel in these processes: use the local "
                             f"executor, not {kind} (or run folds on {kind} without torchrun)")
    if plan.config.mode == "linear-probe":
        raise CellmorphError(f"cv {option('mode')} linear-probe trains no network to share out: run it without torchrun")


def run_folds(plan: RunPlan, rundir: RunDir, resume: bool, bar: Progress, executor: "Executor",
              data: Path) -> dict[int, FoldOutput]:
    """Each unfinished fold run by ``executor`` (features shared by folds computed once first);
    then every fold's outputs read back from the run directory, as each executor left them."""
    from cellmorph.cv.executors import FoldTask, SlurmExecutor

    cfg = plan.config
    folds_bar = bar.task("folds", len(plan.folds))
    names = {f.index: f.name for f in plan.folds}
    earlier: dict[int, dict] = {}
    todo: list[Fold] = []
    for fold in plan.folds:
        marker = rundir.finished_fold(fold.index, plan.fold_fingerprints[fold.index]) if resume else None
        if marker:
            earlier[fold.index] = marker
            folds_bar.advance(info=f"({fold.name}) finished earlier", resumed=True)
        else:
            todo.append(fold)
    last = max((f.index for f in todo), default=None)

    def on_done(index: int, info: dict) -> None:
        # keep_checkpoints last: only the last fold's weights stay, whatever order folds finish in.
        if cfg.keep_checkpoints == "last" and index != last and current_data_parallel().is_main:
            rundir.drop_fold_state(index)
        where = f" on {info['host']}" if executor.remote and info.get("host") else ""
        folds_bar.advance(info=f"({names[index]}) held-out tile accuracy {info['accuracy']:.3f} "
                               f"in {info['seconds']:.0f} s{where}")

    if todo and executor.remote:
        threads = executor.fold_threads(cfg.num_threads)

        def task(index: int | None) -> FoldTask:
            return FoldTask(str(Path(data).resolve()), str(rundir.root.resolve()), cfg.model_dump(mode="json"),
                            plan.fingerprint, index, threads, log=isinstance(executor, SlurmExecutor))

        if needs_shared_features(cfg):
            bar.line("shared features: computing once on the executor before the folds")
            executor.run([task(None)], lambda t, info: None)
        executor.run([task(f.index) for f in todo], lambda t, info: on_done(t.fold, info))
    elif todo:
        dp = current_data_parallel()
        # Under torchrun rank 0 computes the shared features; the others read what it wrote.
        shared = dp.main_only(lambda: shared_features(plan, rundir, resume, bar))
        if not dp.is_main:
            shared = shared_features(plan, rundir, resume, bar, compute=False)
        tasks = fold_bars(bar, cfg)
        for fold in todo:
            folds_bar.update(f"fold {fold.index}: {fold.name}")
            on_done(fold.index, execute_fold(plan, rundir, fold, shared, tasks))
    outputs = {}
    for fold in plan.folds:
        marker = earlier.get(fold.index) or rundir.finished_fold(fold.index, plan.fold_fingerprints[fold.index])
        if marker is None:
            raise CellmorphError(f"{rundir.fold_dir(fold.index)}: the executor reported fold {fold.index} done "
                                 "but its results are not in the run directory (is it on shared storage?)")
        outputs[fold.index] = rundir.read_fold(fold.index, marker, cfg.eval_epochs)
        outputs[fold.index].resumed = fold.index in earlier
    return outputs


def needs_shared_features(cfg: CVConfig) -> bool:
    return cfg.mode == "linear-probe" or cfg.frozen_feature_cache


def shared_features(plan: RunPlan, rundir: RunDir, resume: bool, bar: Progress, compute: bool = True):
    """The probe's embeddings or the frozen-feature pool (None if the run uses neither), read from
    the run directory when there, else computed and written there (``compute=False``: an error)."""
    from cellmorph.cv.features import frozen_feature_pool, probe_embeddings

    if plan.config.mode == "linear-probe":
        return probe_embeddings(plan, rundir, bar, compute)
    if plan.config.frozen_feature_cache:
        return frozen_feature_pool(plan, rundir, resume, bar, compute)
    return None


def fold_bars(bar: Progress, cfg: CVConfig) -> dict:
    return {"epochs": bar.task("  epochs", cfg.epochs), "batches": bar.task("  batches", 1, log=False)}


def execute_fold(plan: RunPlan, rundir: RunDir, fold: Fold, shared, tasks: dict) -> dict:
    """Train and score one fold, write ``folds/<k>/`` (atomically); a few numbers about it."""
    import socket

    from threadpoolctl import threadpool_limits

    cfg = plan.config
    t0 = time.perf_counter()
    # BLAS (the probe's solver, NumPy) on the fold's thread count too: the same result in this
    # process as on a Dask worker or a Slurm node given the same --threads.
    with threadpool_limits(torch.get_num_threads()):
        if cfg.mode == "linear-probe":
            from cellmorph.cv.probe import run_probe_fold

            trained = run_probe_fold(plan, fold, shared)
        else:
            trained = run_fold(plan, fold, shared, tasks)
    output = FoldOutput(
        predictions=predictions_frame(plan.cache, fold.test, trained.probs, plan.classes, fold.index),
        history=trained.history,
        interim={e: predictions_frame(plan.cache, fold.test, p, plan.classes, fold.index)
                 for e, p in trained.interim.items()},
    )
    seconds = time.perf_counter() - t0
    info = {"fold": fold.index, "seconds": seconds, "accuracy": _tile_accuracy(trained.probs, plan.targets[fold.test]),
            "threads": torch.get_num_threads(), "host": socket.gethostname(), "pid": os.getpid()}
    marker = fold.describe() | {"fingerprint": plan.fold_fingerprints[fold.index], "seeds": plan.seeds[fold.index],
                                "n_train_used": int(len(trained.train_rows)), "seconds": seconds,
                                "threads": info["threads"], "host": info["host"]} | trained.choices
    record = {"model": trained.state, "model_name": cfg.model, "classes": list(plan.classes),
              "fold": fold.describe(), "seeds": dict(plan.seeds[fold.index]), "input": plan.input.record(),
              "history": trained.history}
    # Under torchrun every rank trained the same model; rank 0 writes it.
    info["written"] = current_data_parallel().main_only(
        lambda: rundir.write_fold(fold.index, output, record, marker, cfg.keep_checkpoints))
    return info


def run_fold_task(task: "FoldTask") -> dict:
    """One fold (or, with ``task.fold`` None, the shared features) in whatever process runs it:
    a Dask worker, a Slurm array task. The run is planned again from the paths and config in
    ``task`` and must come out with the driver's fingerprint. A fold already finished (a
    duplicate of a retried task) is not run again."""
    from cellmorph.runtime import keep_freed_memory

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ low, so that glibc hands freed memory
    # back at once; for training that means faulting fresh pages in for every batch: 2.9× slower
    # folds on a LocalCluster worker than in the driver, measured (benchmarks/RESULTS.md).
    keep_freed_memory()
    plan = plan_run(Path(task.data), task.config)
    if plan.fingerprint != task.fingerprint:
        raise CellmorphError(f"{task.name()}: the cache {task.data} or cellmorph itself differs on this worker "
                             "from the driver's (the run's fingerprint does not match)")
    rundir = RunDir(Path(task.out))
    with torch_threads(task.threads), deterministic(plan.config.deterministic), Progress(task.log) as bar:
        if task.fold is None:
            shared_features(plan, rundir, False, bar)
            return {"fold": None}
        fold = next((f for f in plan.folds if f.index == task.fold), None)
        if fold is None:
            raise CellmorphError(f"{task.name()}: the run has no such fold")
        marker = rundir.finished_fold(fold.index, plan.fold_fingerprints[fold.index])
        if marker:
            return {"fold": fold.index, "seconds": float(marker.get("seconds", 0.0)), "accuracy": float("nan"),
                    "threads": marker.get("threads"), "host": marker.get("host"), "written": False}
        bar.line(f"{task.name()} ({fold.name}) of {task.out}")
        return execute_fold(plan, rundir, fold, shared_features(plan, rundir, False, bar, compute=False),
                            fold_bars(bar, plan.config))


def run_fold(plan: RunPlan, fold: Fold, frozen, tasks: dict) -> TrainedFold:
    """Fine-tune a fresh network on the fold's training tiles; score its test tiles."""
    from cellmorph.augment import Augmenter
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import build_model
    from cellmorph.train import PredictSettings, TrainSettings, fit, predict_tiles

    cfg, seeds = plan.config, plan.seeds[fold.index]
    train_rows = subsample_rows(fold.train, plan.targets[fold.train], cfg.max_tiles_per_fold, seeds["subsample"])
    torch.manual_seed(seeds["init"])
    model = build_model(cfg, len(plan.classes), plan.cache.tile_shape[0]).module
    pipeline = InputPipeline.from_spec(plan.input, Augmenter(cfg.augment, seed=seeds["augment"]))
    settings, scoring = TrainSettings.from_config(cfg), PredictSettings.from_config(cfg)
    test_targets = plan.targets[fold.test]
    n_batches = max(1, len(train_rows) // cfg.batch_size + (len(train_rows) % cfg.batch_size >= 2))
    n_eval = -(-len(fold.test) // scoring.batch_size)
    tasks["epochs"].reset(cfg.epochs, f"  epochs ({fold.name})")
    tasks["batches"].reset(n_batches, "  batches")
    interim: dict[int, np.ndarray] = {}

    def on_epoch(record: dict) -> None:
        if record["epoch"] in cfg.eval_epochs:
            # Scoring in eval mode draws no random numbers, so the final model is the same with or without it.
            tasks["batches"].reset(n_eval, f"  predicting (epoch {record['epoch']})")
            interim[record["epoch"]] = predict_tiles(model, pipeline, plan.cache, fold.test, scoring, plan.device,
                                                     tasks["batches"].advance)
            record[HELDOUT_ACCURACY] = _tile_accuracy(interim[record["epoch"]], test_targets)
        heldout = record.get(HELDOUT_ACCURACY)
        tasks["epochs"].advance(info=f"loss {record['loss']:.3f}, training accuracy {record['train_accuracy']:.3f}"
                                + ("" if heldout is None else f", held-out tile accuracy {heldout:.3f}"))
        if record["epoch"] < cfg.epochs:
            tasks["batches"].reset(n_batches, "  batches")

    torch.manual_seed(seeds["init"] + 1)  # dropout / stochastic depth draws
    history = fit(model, pipeline, plan.cache, train_rows, plan.targets[train_rows], len(plan.classes), settings,
                  seeds["shuffle"], plan.device, tasks["batches"].advance, on_epoch, frozen)
    tasks["batches"].reset(n_eval, "  predicting")
    probs = predict_tiles(model, pipeline, plan.cache, fold.test, scoring, plan.device, tasks["batches"].advance)
    history[-1][HELDOUT_ACCURACY] = _tile_accuracy(probs, test_targets)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TrainedFold(train_rows, probs, history, state, interim)


def _tile_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == targets)) if len(targets) else float("nan")


def compound_level(treatments: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each compound called from its treatments together (:func:`cellmorph.metrics.aggregate_compounds`), and those
    of one MoA at every concentration, the ones with a compound-level truth that its accuracy counts. Computed for
    the metrics and again for the tables: a groupby over a run's few hundred treatments, once each at its end."""
    compounds = aggregate_compounds(treatments)
    return compounds, compounds[compounds[TRUE_COLUMN].notna()]


def score_levels(tiles: pd.DataFrame, wells: pd.DataFrame, treatments: pd.DataFrame, classes: list[str],
                 n_folds: int) -> dict:
    """The held-out metrics of a run's three levels, with the treatment accuracy's 95% interval."""
    metrics = compute_metrics(tiles, wells, treatments, classes, n_folds)
    if len(treatments):  # the compound level, beside the treatment level (metrics.aggregate_compounds)
        compounds, labelled = compound_level(treatments)
        metrics["n_compounds"] = int(len(labelled))
        if len(labelled):
            metrics["compound_accuracy"] = accuracy(labelled)
        if len(labelled) < len(compounds):
            metrics["n_compounds_of_several_labels"] = int(len(compounds) - len(labelled))
    # How far the treatment accuracy could move with other treatments of the same kind: on a few
    # dozen treatments, further than the run-to-run changes that float rounding alone causes.
    correct = (treatments[PREDICTED_COLUMN].astype(str) == treatments[TRUE_COLUMN].astype(str)).to_numpy()
    metrics["treatment_accuracy_ci95"] = list(bootstrap_interval(treatments, correct))
    return metrics


def write_levels(rundir: RunDir, predictions: pd.DataFrame, tiles: pd.DataFrame, wells: pd.DataFrame,
                 treatments: pd.DataFrame, classes: list[str], how: str, title: str) -> None:
    """A run's tables, classification report and confusion matrix (``metrics.json`` is the caller's, last)."""
    from cellmorph.figures import plot_confusion

    matrix = confusion(treatments, classes)
    compounds, labelled = compound_level(treatments)
    report = (
        (f"Compound level ({len(labelled)} compounds of one label at every concentration, logmean of their "
         f"treatments)\n" + classification_text(labelled, classes) + "\n" if len(labelled) else "")
        + f"Treatment level ({len(treatments)} treatments, {how} of wells)\n"
        + classification_text(treatments, classes)
        + f"\nWell level ({len(wells)} wells, {how} of tiles)\n"
        + classification_text(wells, classes)
        + f"\nTile level ({len(tiles)} tiles)\n"
        + classification_text(tiles, classes)
    )
    rundir.write_tables(predictions, wells, treatments, compounds, report, matrix, classes)
    plot_confusion(matrix, classes, rundir.path(CONFUSION_PNG), title=title)


def write_retrieval(rundir: RunDir, wells: pd.DataFrame, treatments: pd.DataFrame, classes: list[str],
                    log=None) -> dict:
    """copairs mAP of the held-out probability profiles (:mod:`cellmorph.retrieval`, cosine similarity of the
    ``prob_<class>`` vectors): replicate retrieval of the wells against DMSO wells (held out only where DMSO
    is a class), MoA retrieval of the treatments across compounds; ``map_replicates.csv``/``map_moa.csv``.
    An add-on: without copairs, or where the run's wells cannot support a part, a note and the reason."""
    from cellmorph.retrieval import Retrieval, retrieval_or_note, summary_line
    from cellmorph.retrieval import write_retrieval as write_tables

    features = [prob_column(c) for c in classes]
    # DMSO wells are held out only where DMSO is a class: otherwise replicate retrieval has nothing to rank
    # against by design, which the summary records without a note on every run.
    has_controls = CONTROL_COMPOUND in classes
    found = retrieval_or_note(wells if has_controls else None, treatments, features, distance="cosine", log=log,
                              sources={"replicates": "held-out well probabilities" if has_controls else
                                       "DMSO wells among the held-out wells (DMSO is not a class; cv --include-controls)",
                                       "moa": "held-out treatment probabilities"})
    write_tables(rundir.root, found or Retrieval())
    if found is None:
        return {"skipped": "copairs is not installed"}
    if log is not None and summary_line(found.summary):
        log(summary_line(found.summary))
    return found.summary


def summarise(plan: RunPlan, rundir: RunDir, outputs: dict[int, FoldOutput], seconds: float, log=None) -> dict:
    """Aggregate tile → well → treatment, score, and write tables, figures, the mAP and ``metrics.json`` (last)."""
    from cellmorph.figures import plot_learning_curves

    cfg, classes, n_folds = plan.config, plan.classes, len(plan.folds)
    predictions = pd.concat([o.predictions for o in outputs.values()], ignore_index=True)
    tiles, wells, treatments = aggregate(predictions, how=cfg.aggregate)
    metrics = score_levels(tiles, wells, treatments, classes, n_folds)
    if cfg.eval_epochs:
        by_epoch = {}
        for e in cfg.eval_epochs:
            t, w, tr = aggregate(pd.concat([o.interim[e] for o in outputs.values()], ignore_index=True),
                                 how=cfg.aggregate)
            by_epoch[str(e)] = {k: compute_metrics(t, w, tr, classes, n_folds)[k] for k in ACCURACY_KEYS}
        by_epoch[str(cfg.epochs)] = {k: metrics[k] for k in ACCURACY_KEYS}
        metrics["by_epoch"] = by_epoch
    names = {f.index: f.name for f in plan.folds}
    if cfg.mode == "linear-probe":  # what each fold chose (or was given), from its marker
        markers = {f.index: rundir.finished_fold(f.index, plan.fold_fingerprints[f.index]) or {} for f in plan.folds}
        metrics["probe_head"] = cfg.probe_head
        if cfg.probe_head == "centroid":
            metrics["probe_temperature"] = {names[k]: m.get("probe_temperature") for k, m in markers.items()}
        else:
            metrics["probe_c"] = {names[k]: m.get("probe_c", cfg.probe_c) for k, m in markers.items()}
    histories = {names[k]: o.history for k, o in outputs.items()}
    epoch_seconds = [h["seconds"] for history in histories.values() for h in history]
    metrics.update({
        "cv": cfg.cv,
        "model": cfg.model,
        "init": cfg.init,
        "image_size": plan.input.size,
        "epochs": cfg.epochs,
        "skipped_folds": plan.skipped,
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        # A resumed run's wall time covers only its last invocation; the fold sum covers them all.
        "seconds": seconds,
        "fold_seconds_total": float(sum(o.seconds for o in outputs.values())),
        "resumed_folds": sorted(k for k, o in outputs.items() if o.resumed),
        "device": str(plan.device),
    })
    write_levels(rundir, predictions, tiles, wells, treatments, classes, cfg.aggregate,
                 f"{cfg.model} {cfg.cv}: treatment accuracy {metrics['treatment_accuracy']:.3f}")
    if any(histories.values()):  # a linear probe has no epochs to plot
        plot_learning_curves(histories, rundir.path(CURVES_PNG))
    metrics["map"] = write_retrieval(rundir, wells, treatments, classes, log)
    rundir.write_metrics(metrics)
    return metrics
