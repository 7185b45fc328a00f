"""Where a run's folds execute: in this process, on a Dask cluster, or as one Slurm job array.

The paper's protocol is 38 independent trainings. cellmorph does not schedule them itself:
it hands them to an engine the user already runs. Every executor runs the same task,
:func:`cellmorph.cv.run.run_fold_task`, on a :class:`FoldTask`: the cache and the run
directory by path, the resolved config, the fold number. The task plans the run again from
those (and refuses if the run's fingerprint came out different), trains, writes
``folds/<k>/`` atomically and returns a few numbers. Nothing large crosses the scheduler,
and a fold that runs twice (a retry after a worker was lost) writes nothing twice.

* ``local``: folds one after another in this process, with progress bars (the default).
* ``dask``: ``dask.distributed`` futures on an existing scheduler (``scheduler``) or on a
  :class:`~distributed.LocalCluster` of ``workers`` processes started for the run. Each
  worker runs one fold at a time (one Dask thread) with ``threads`` torch threads, so N
  workers use N × threads cores and never oversubscribe them.
* ``slurm``: a submitit job array, one task per fold, at most ``max_running`` at once, with
  partition, time, CPUs, GPUs and memory from this config. submitit was chosen over
  dask-jobqueue because a job array needs no long-lived scheduler that compute nodes must
  reach over the network (often impossible on air-gapped nodes), jobs survive the login
  session that submitted them, and results go through the shared filesystem, which the
  run directory already is. ``cluster: local`` runs the same jobs as local processes
  (submitit's LocalExecutor), for machines without Slurm.

Shared features (the linear probe's embeddings, the frozen-feature pool) are computed once
before any fold starts, as a task of the same executor, and reach the folds as files.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellmorph.errors import CellmorphError, option, validated
from cellmorph.runinfo import read_yaml_mapping

EXECUTORS = ("local", "dask", "slurm")
SLURM_LOGS = "slurm"  # submitit's folder (scripts, logs, task pickles) inside the run directory


class ExecutorConfig(BaseModel):
    """Where folds run. Loadable from YAML (``--executor-config``); command-line options override it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "dask", "slurm"] = Field("local", description="local | dask | slurm")
    threads: int | None = Field(
        None, ge=1, description="torch threads per fold (default: the run's --threads; on a LocalCluster the "
        "machine's cores shared out over the workers; on Slurm the CPUs per task)")
    # Dask
    scheduler: str | None = Field(None, description="dask: address of a running scheduler, e.g. tcp://HOST:8786")
    workers: int | None = Field(None, ge=1, description="dask: LocalCluster worker processes when no scheduler "
                                "is given (default: the cores / threads per fold)")
    connect_timeout_s: float = Field(20.0, gt=0, description="dask: how long to wait for the scheduler, at the "
                                     "start and to reconnect when the connection drops")
    # Slurm (submitit)
    cluster: Literal["slurm", "local"] = Field(
        "slurm", description="slurm: submit with sbatch; local: run the same jobs as local processes (no Slurm)")
    partition: str | None = Field(None, description="slurm: partition (default: the cluster's default)")
    time_min: int = Field(120, ge=1, description="slurm: wall-time limit per fold, minutes")
    cpus_per_task: int | None = Field(None, ge=1, description="slurm: CPUs per fold (default: threads, else 1)")
    gpus_per_node: int = Field(0, ge=0, description="slurm: GPUs per fold")
    mem_gb: float | None = Field(None, gt=0, description="slurm: memory per fold, GB (default: the partition's)")
    max_running: int | None = Field(None, ge=1, description="slurm: array tasks running at once (%N)")
    account: str | None = Field(None, description="slurm: account to charge")
    qos: str | None = Field(None, description="slurm: quality of service")
    setup: list[str] = Field(default_factory=list, description="slurm: shell lines run before each task, "
                             "e.g. 'module load cuda' or 'export CELLMORPH_HOME=/shared/cellmorph'")
    poll_seconds: float = Field(10.0, gt=0, description="slurm: how often to ask Slurm about the jobs")

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "ExecutorConfig":
        data = read_yaml_mapping(Path(path))
        data = data["executor"] if isinstance(data.get("executor"), dict) else data
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validated(cls, data, str(path))

    def describe(self) -> dict:
        """What a run's ``config.yaml`` records about where its folds ran (not part of its fingerprint)."""
        keep = {"kind", "threads"} | ({"scheduler", "workers", "connect_timeout_s"} if self.kind == "dask" else set()) | (
            set(type(self).model_fields) - {"scheduler", "workers", "connect_timeout_s", "poll_seconds"} if self.kind == "slurm" else set())
        return self.model_dump(mode="json", include=keep)


def executor_config(value: "ExecutorConfig | dict | str | None") -> ExecutorConfig:
    if value is None:
        return ExecutorConfig()
    if isinstance(value, ExecutorConfig):
        return value
    if isinstance(value, str):
        return validated(ExecutorConfig, {"kind": value}, "executor")
    return validated(ExecutorConfig, dict(value), "executor")


@dataclass(frozen=True)
class FoldTask:
    """One unit of work, self-contained and small: what a worker needs to run one fold.

    ``fold`` None is the run's shared-features step (probe embeddings or frozen-feature pool).
    """

    data: str
    out: str
    config: dict  # the resolved CVConfig as JSON
    fingerprint: str  # the run's: the worker's own plan must reproduce it
    fold: int | None
    threads: int | None
    log: bool = False  # one plain line per epoch on stderr (Slurm job logs)

    def name(self) -> str:
        return "shared features" if self.fold is None else f"fold {self.fold}"


# --------------------------------------------------------------------------- executors
class Executor:
    """Runs fold tasks and reports each finished one to ``on_done(task, info)``."""

    config: ExecutorConfig
    remote = True  # tasks run in other processes (progress of a fold's epochs is not shown here)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def fold_threads(self, run_threads: int | None) -> int | None:
        """Torch threads per fold: the executor's, else the run's, else what the executor's
        workers are given; None lets the worker's own thread policy decide."""
        return self.config.threads or run_threads

    def run(self, tasks: list[FoldTask], on_done: Callable[[FoldTask, dict], None]) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return self.config.describe()


class LocalExecutor(Executor):
    """Folds one after another in this process; :mod:`cellmorph.cv.run` drives them itself."""

    remote = False

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config


class DaskExecutor(Executor):
    """Fold tasks as ``dask.distributed`` futures, on a given scheduler or a LocalCluster."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.client = None
        self.cluster = None

    def _workers(self) -> int:
        if self.config.workers:
            return self.config.workers
        cores = _cores()
        return max(1, cores // (self.config.threads or 1))

    def fold_threads(self, run_threads: int | None) -> int | None:
        given = self.config.threads or run_threads
        if given or self.config.scheduler:
            return given  # on a cluster of the user's, a worker's own policy ($OMP_NUM_THREADS, cores)
        return max(1, _cores() // self._workers())

    def __enter__(self) -> "DaskExecutor":
        try:
            from distributed import Client, LocalCluster
        except ImportError as error:  # pragma: no cover - a dependency of cellmorph
            raise CellmorphError(f"executor dask needs dask.distributed ({error})") from None
        # The driver says in its own words what went wrong (one line); distributed's log records
        # of a lost connection, with their tracebacks, would bury it.
        self._log_levels = _quiet_loggers("distributed")
        if self.config.scheduler:
            try:
                self.client = Client(self.config.scheduler, timeout=f"{self.config.connect_timeout_s}s")
            except (OSError, TimeoutError) as error:
                raise CellmorphError(f"cannot reach the Dask scheduler at {self.config.scheduler}: {error}") from None
        else:
            # One Dask thread per worker: a worker trains one fold at a time, on its own torch threads.
            self.cluster = LocalCluster(n_workers=self._workers(), threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.CRITICAL)
            self.client = Client(self.cluster)
        return self

    def __exit__(self, *exc) -> None:
        for closable in (self.client, self.cluster):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # noqa: BLE001 - the scheduler may be gone already
                    pass
        self.client = self.cluster = None
        for name, level in getattr(self, "_log_levels", {}).items():
            logging.getLogger(name).setLevel(level)

    def describe(self) -> dict:
        record = super().describe()
        record["address"] = self.config.scheduler or getattr(self.cluster, "scheduler_address", None)
        if self.cluster is not None:
            record["workers"] = self._workers()
        return record

    def run(self, tasks: list[FoldTask], on_done: Callable[[FoldTask, dict], None]) -> None:
        from distributed import as_completed

        from cellmorph.cv.rundir import digest
        from cellmorph.cv.run import run_fold_task

        address = self.config.scheduler or self.cluster.scheduler_address
        # Keys name the run directory too: two runs of one config into different folders are different work.
        futures = {self.client.submit(run_fold_task, task, pure=False,
                                      key=f"cellmorph-{task.fold}-{digest(task.out, task.fingerprint)}"): task
                   for task in tasks}
        done = 0
        try:
            for future in as_completed(futures):
                task = futures[future]
                info = _dask_result(future, task, address, done, len(tasks))
                done += 1
                on_done(task, info)
        finally:
            for future in futures:
                if not future.done():
                    try:
                        future.cancel()
                    except Exception:  # noqa: BLE001 - the scheduler may be gone
                        pass


def _dask_result(future, task: FoldTask, address: str, done: int, total: int) -> dict:
    """The task's result, or one CellmorphError line saying what went wrong where."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    lost = (f"lost the Dask scheduler at {address} ({done} of {total} task(s) finished); "
            "run the same command with --resume to finish")
    try:
        return future.result()
    except CellmorphError:
        raise
    except KilledWorker:
        raise CellmorphError(f"{task.name()}: the Dask workers running it died repeatedly (out of memory?); "
                             f"finished folds are kept: {option('resume')} continues") from None
    except (FutureCancelledError, CommClosedError, OSError, TimeoutError) as error:
        raise CellmorphError(f"{lost} [{type(error).__name__}]") from None
    except Exception as error:  # noqa: BLE001 - cancellation types differ across distributed releases
        if "cancel" in type(error).__name__.lower():
            raise CellmorphError(f"{lost} [{type(error).__name__}]") from None
        raise CellmorphError(f"{task.name()} failed on a Dask worker: {type(error).__name__}: {error}") from None


class SlurmExecutor(Executor):
    """One submitit job array per batch of tasks (the folds of a run), logs in ``RUN/slurm/``."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    def fold_threads(self, run_threads: int | None) -> int | None:
        return self.config.threads or run_threads or self.config.cpus_per_task

    def sbatch_parameters(self, name: str) -> dict[str, Any]:
        """What each array task asks Slurm for, as submitit's SlurmExecutor parameters."""
        cfg = self.config
        params: dict[str, Any] = {
            "job_name": name, "time": cfg.time_min, "cpus_per_task": cfg.cpus_per_task or cfg.threads or 1,
            "nodes": 1, "ntasks_per_node": 1, "setup": list(cfg.setup),
        }
        optional = {"partition": cfg.partition, "account": cfg.account, "qos": cfg.qos,
                    "array_parallelism": cfg.max_running,
                    "mem": f"{int(cfg.mem_gb * 1024)}M" if cfg.mem_gb else None,
                    "gpus_per_node": cfg.gpus_per_node or None}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def submitit_executor(self, folder: Path, name: str):
        """The configured ``submitit`` executor writing into ``folder`` (scripts, logs, task files)."""
        try:
            import submitit
        except ImportError as error:  # pragma: no cover - a dependency of cellmorph
            raise CellmorphError(f"executor slurm needs submitit ({error})") from None
        cfg = self.config
        # A task that times out is not requeued by submitit (max_num_timeout 0): the driver reports
        # it, and --resume runs it again.
        if cfg.cluster == "slurm":
            if shutil.which("sbatch") is None:
                raise CellmorphError("executor slurm: no sbatch on PATH (run on a Slurm login node, or set "
                                     "cluster: local in the executor config)")
            executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=0)
            executor.update_parameters(**self.sbatch_parameters(name))
        else:
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=0)
            executor.update_parameters(timeout_min=cfg.time_min, gpus_per_node=cfg.gpus_per_node)
        return executor

    def submission_script(self, folder: Path, name: str, n_tasks: int) -> str:
        """The sbatch script an array of ``n_tasks`` folds is submitted with (nothing is submitted,
        no Slurm needed): resources, ``--array=0-(n-1)%max_running``, log paths under ``folder``."""
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}",
                                   folder=str(folder), map_count=n_tasks, **self.sbatch_parameters(name))

    def run(self, tasks: list[FoldTask], on_done: Callable[[FoldTask, dict], None]) -> None:
        import submitit

        from cellmorph.cv.run import run_fold_task

        folder = Path(tasks[0].out) / SLURM_LOGS
        name = f"cellmorph-{Path(tasks[0].out).name}"
        executor = self.submitit_executor(folder, name)
        try:
            jobs = executor.map_array(run_fold_task, tasks)
        except Exception as error:  # noqa: BLE001 - sbatch's own message says what was wrong
            raise CellmorphError(f"could not submit the job array: {str(error).strip().splitlines()[-1]}") from None
        by_id = {job.job_id: task for job, task in zip(jobs, tasks)}
        for job in submitit.helpers.as_completed(jobs, poll_frequency=self.config.poll_seconds):
            task = by_id[job.job_id]
            try:
                info = job.result()
            except CellmorphError:
                raise
            except Exception as error:  # noqa: BLE001 - submitit's job errors carry the log's tail
                log = getattr(job.paths, "stderr", folder)
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CellmorphError(f"{task.name()} (job {job.job_id}) failed: {first} (log: {log}); "
                                     f"finished folds are kept: {option('resume')} continues") from None
            on_done(task, info)


def open_executor(config: "ExecutorConfig | dict | str | None") -> Executor:
    """The executor a config names, not yet started (use it as a context manager)."""
    cfg = executor_config(config)
    return {"local": LocalExecutor, "dask": DaskExecutor, "slurm": SlurmExecutor}[cfg.kind](cfg)


@contextmanager
def executor_scope(value: "Executor | ExecutorConfig | dict | str | None"):
    """A started executor: ``value`` itself when it is one (its owner stops it), else one started
    for the block, so replicates and compare-inits share one cluster across their runs."""
    if isinstance(value, Executor):
        yield value
        return
    with open_executor(value) as executor:
        yield executor


def _quiet_loggers(prefix: str) -> dict[str, int]:
    """Raise ``prefix``'s loggers (and their children, which dask configures one by one) to
    CRITICAL; returns their previous levels."""
    names = [prefix] + [n for n in logging.root.manager.loggerDict if n.startswith(prefix + ".")]
    previous = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return previous


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
