"""Folds on other engines: a real Dask cluster (started here, killed here) and submitit's jobs.

The contract: whichever executor runs the folds, the run directory holds the same predictions,
bit for bit, as the local executor's with the same threads per fold; a fold is complete or
absent; a lost worker costs a retry, a lost scheduler one error line and a ``--resume``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from cellmorph.cv import RunDir, plan_run, run_cv, run_replicates
from cellmorph.cv.executors import ExecutorConfig, FoldTask
from cellmorph.cv.rundir import FOLD_DONE, FOLDS_DIR
from cellmorph.cv.run import run_fold_task
from tests.conftest import one_line_error, quick_args, quick_config, run_cli_here

QUICK = quick_config(cv="group-kfold:3")
# Folds of a few seconds, to be killed midway: at 3 epochs a fold took under a second on workers warmed by the
# module's earlier tests, too short for the killer below to find one still running 1.5 s after it began.
LONGER_EPOCHS = 8
LONGER = dict(QUICK, epochs=LONGER_EPOCHS, max_tiles_per_fold=None)
QUICK_ARGS = (*quick_args(cv="group-kfold:3"), "--no-progress")
RESULT_FILES = ("predictions.parquet", "wells.csv", "treatments.csv", "confusion_matrix.csv")
DASK = Path(sys.executable).with_name("dask")


def same_results(a: Path, b: Path) -> None:
    """The two run directories scored every tile alike, bit for bit."""
    for name in RESULT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for fold in RunDir(a).finished_folds():
        pd.testing.assert_frame_equal(RunDir(a).read_fold_predictions(fold), RunDir(b).read_fold_predictions(fold))


def clean_folds(run: Path, n_folds: int) -> None:
    """Every fold complete, once, and nothing half-written anywhere."""
    folds = sorted(p.name for p in (run / FOLDS_DIR).iterdir())
    assert folds == [str(k) for k in range(n_folds)], folds
    for k in range(n_folds):
        assert (run / FOLDS_DIR / str(k) / FOLD_DONE).is_file()
    assert not [p for p in run.rglob(".*")], "temporaries or staging folders left behind"


class DaskCluster:
    """A scheduler and workers as separate processes, the way a user starts them (``dask`` CLI)."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.file = folder / "scheduler.json"
        env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        self.scheduler = subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                           "--no-dashboard", "--scheduler-file", str(self.file)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while not self.file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)
        self.address = json.loads(self.file.read_text())["address"]
        self.workers = subprocess.Popen([str(DASK), "worker", self.address, "--nworkers", str(workers), "--nthreads",
                                         "1", "--nanny", "--no-dashboard", "--memory-limit", "0"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        from distributed import Client

        self.client = Client(self.address, timeout="30s")
        self.client.wait_for_workers(workers, timeout=120)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - the scheduler may be gone
            pass
        for proc in (self.workers, self.scheduler):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"), workers=2)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory):
    """Uninterrupted local runs to compare with."""
    root = tmp_path_factory.mktemp("local")
    runs = {}
    for name, config in {"quick": QUICK, "longer": LONGER}.items():
        run_cv(tiny_cache, root / name, config, progress=False)
        runs[name] = root / name
    return runs


@pytest.mark.slow
def test_cli_dask_local_cluster_writes_the_same_run_as_local(tiny_cache, reference, tmp_path):
    """The CLI contract: ``cellmorph cv ... --executor dask --workers N`` on a LocalCluster of N workers."""
    out = tmp_path / "dask"
    proc = run_cli_here("cv", "--data", tiny_cache, "--out", out, *QUICK_ARGS, "--executor", "dask", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    same_results(reference["quick"], out)
    clean_folds(out, 3)
    header = RunDir(out).read_config()
    assert header["executor"]["kind"] == "dask" and header["executor"]["workers"] == 2
    assert header["fingerprint"] == RunDir(reference["quick"]).read_config()["fingerprint"]
    markers = [json.loads((out / FOLDS_DIR / str(k) / FOLD_DONE).read_text()) for k in range(3)]
    assert {m["threads"] for m in markers} == {1}
    # Resuming a run a Dask cluster made, with the local executor: every fold is kept.
    again = run_cv(tiny_cache, out, QUICK, resume=True, progress=False)
    assert again["resumed_folds"] == [0, 1, 2]


@pytest.mark.slow
def test_shared_features_replicates_and_frozen_pool_on_a_dask_cluster(cluster, tiny_cache, tmp_path):
    """The probe's embeddings and the frozen-feature pool are made once, by a task, and read by the folds."""
    executor = ExecutorConfig(kind="dask", scheduler=cluster.address)
    # A fixed C: what is checked is where the embeddings are made, not the nested choice (tests/cv/test_probe.py)
    probe = dict(QUICK, mode="linear-probe", max_tiles_per_fold=None, probe_c=0.1)
    run_cv(tiny_cache, tmp_path / "probe-local", probe, progress=False)
    run_cv(tiny_cache, tmp_path / "probe-dask", probe, progress=False, executor=executor)
    same_results(tmp_path / "probe-local", tmp_path / "probe-dask")

    frozen = dict(QUICK, model="tf_efficientnet_lite0", init="imagenet", image_size=32, freeze_stages=4,
                  frozen_feature_cache=True)
    run_cv(tiny_cache, tmp_path / "frozen-local", frozen, progress=False)
    run_cv(tiny_cache, tmp_path / "frozen-dask", frozen, progress=False, executor=executor)
    same_results(tmp_path / "frozen-local", tmp_path / "frozen-dask")
    assert not (tmp_path / "frozen-dask" / "frozen_features.npy").exists()  # deleted once every fold is done

    summary = run_replicates(tiny_cache, tmp_path / "replicates", QUICK, replicates=2, progress=False,
                             executor=executor)
    assert summary["n_replicates"] == 2
    assert (tmp_path / "replicates" / "replicate-1" / "metrics.json").is_file()


def test_a_worker_killed_mid_fold_costs_a_retry_not_a_result(cluster, tiny_cache, reference, tmp_path):
    out = tmp_path / "run"
    killed: list[int] = []
    errors: list[BaseException] = []

    def kill_a_busy_worker() -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = [w for w, keys in cluster.client.processing().items() if keys]
                if busy:
                    time.sleep(1.5)  # well inside the fold: planning is done, training is under way
                    busy = [w for w, keys in cluster.client.processing().items() if keys]
                    if not busy:
                        continue
                    pid = cluster.client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
                time.sleep(0.1)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    metrics = run_cv(tiny_cache, out, LONGER, progress=False,
                     executor=ExecutorConfig(kind="dask", scheduler=cluster.address))
    killer.join()
    assert not errors, errors
    assert killed, "no worker was killed"
    clean_folds(out, 3)
    same_results(reference["longer"], out)
    assert metrics["resumed_folds"] == []
    cluster.client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker


@pytest.mark.slow
def test_scheduler_lost_mid_run_gives_one_line_and_resume_finishes(tiny_cache, reference, tmp_path):
    dask = DaskCluster(tmp_path, workers=1)
    out = tmp_path / "run"
    args = ("cv", "--data", tiny_cache, "--out", out, "--model", "test_resnet", "--init", "xavier", "--image-size",
            "32", "--epochs", str(LONGER_EPOCHS), "--cv", "group-kfold:3", "--threads", "1", "--no-progress")
    quick_timeout = _yaml(tmp_path / "dask.yaml", {"connect_timeout_s": 3})
    driver = subprocess.Popen([sys.executable, "-m", "cellmorph.cli", *map(str, args), "--executor", "dask",
                               "--scheduler", dask.address, "--executor-config", quick_timeout],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / FOLDS_DIR / "0" / FOLD_DONE).is_file() and driver.poll() is None:
            assert time.monotonic() < deadline, "no fold finished"
            time.sleep(0.1)
        dask.scheduler.send_signal(signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=180)
    finally:
        dask.close()
    proc = subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)
    one_line_error(proc, "lost the Dask scheduler", "--resume")
    finished = RunDir(out).finished_folds()
    assert 1 <= len(finished) < 3, finished
    resumed = run_cli_here(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    clean_folds(out, 3)
    same_results(reference["longer"], out)


def test_unreachable_scheduler_is_one_error_and_leaves_nothing(tiny_cache, tmp_path):
    from cellmorph.errors import CellmorphError

    with pytest.raises(CellmorphError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_cv(tiny_cache, tmp_path / "run", QUICK, progress=False,
               executor=ExecutorConfig(kind="dask", scheduler="tcp://127.0.0.1:9", connect_timeout_s=1))
    assert not (tmp_path / "run").exists()


def test_a_fold_that_runs_twice_is_written_once(tiny_cache, tmp_path):
    """A retried task whose first attempt was not dead after all: the second finds the fold finished,
    and two attempts finishing together leave one complete folder."""
    out = tmp_path / "run"
    run_cv(tiny_cache, out, QUICK, progress=False)
    plan = plan_run(tiny_cache, QUICK)
    before = (out / FOLDS_DIR / "1" / "predictions.parquet").read_bytes()
    task = FoldTask(str(tiny_cache), str(out), plan.config.model_dump(mode="json"), plan.fingerprint, 1, 1)
    assert run_fold_task(task)["written"] is False
    # The race: both attempts trained; the later one to finish sees the earlier one's folder.
    (out / FOLDS_DIR / "1" / FOLD_DONE).unlink()  # as if the first attempt were still writing
    (out / FOLDS_DIR / "1" / "leftover").write_text("from an attempt killed while writing")
    info = run_fold_task(task)
    assert info["written"] is True
    assert (out / FOLDS_DIR / "1" / "predictions.parquet").read_bytes() == before
    assert not (out / FOLDS_DIR / "1" / "leftover").exists()
    clean_folds(out, 3)
    # A task planned from a different config (another release, another cache) is refused.
    stale = FoldTask(str(tiny_cache), str(out), plan.config.model_dump(mode="json") | {"seed": 5},
                     plan.fingerprint, 1, 1)
    from cellmorph.errors import CellmorphError

    with pytest.raises(CellmorphError, match="fingerprint"):
        run_fold_task(stale)


SLURM = dict(kind="slurm", partition="debug", time_min=10, cpus_per_task=1, max_running=2, poll_seconds=0.5)


def test_the_sbatch_script_asks_for_what_the_config_says(tmp_path):
    """No Slurm needed: the script submitit would submit for a 38-fold array."""
    from cellmorph.cv.executors import SlurmExecutor

    config = ExecutorConfig(kind="slurm", partition="gpu", time_min=45, cpus_per_task=6, gpus_per_node=1, mem_gb=16,
                            max_running=10, account="screening", setup=["export CELLMORPH_HOME=/shared/cellmorph"])
    script = SlurmExecutor(config).submission_script(tmp_path / "slurm", "cellmorph-run", 38)
    for line in ("#SBATCH --array=0-37%10", "#SBATCH --cpus-per-task=6", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --mem=16384M", "#SBATCH --partition=gpu", "#SBATCH --time=45", "#SBATCH --account=screening",
                 "#SBATCH --job-name=cellmorph-run", "#SBATCH --nodes=1",
                 f"#SBATCH --output={tmp_path / 'slurm'}/%A_%a_0_log.out",
                 f"#SBATCH --error={tmp_path / 'slurm'}/%A_%a_0_log.err",
                 "export CELLMORPH_HOME=/shared/cellmorph", sys.executable):
        assert line in script, line
    # Loaded from YAML, as --executor-config reads it; unknown keys are refused in one line.
    path = tmp_path / "slurm.yaml"
    path.write_text("executor:\n  kind: slurm\n  partition: gpu\n  max_running: 10\n")
    assert ExecutorConfig.from_yaml(path).max_running == 10
    path.write_text("kind: slurm\npartitoin: gpu\n")
    from cellmorph.errors import CellmorphError

    with pytest.raises(CellmorphError, match="partitoin"):
        ExecutorConfig.from_yaml(path)


@pytest.mark.slow
def test_folds_as_a_job_array_on_a_real_slurm_node(tiny_cache, reference, tmp_path, monkeypatch):
    from tests.support.slurm_node import slurm_unavailable_reason, start_slurm

    reason = slurm_unavailable_reason("none")
    if reason:
        pytest.skip(reason)
    node = start_slurm(tmp_path / "slurm", cpus=2)
    try:
        for key, value in node.env.items():
            monkeypatch.setenv(key, value)
        out = tmp_path / "run"
        proc = run_cli_here("cv", "--data", tiny_cache, "--out", out, *QUICK_ARGS, "--executor", "slurm",
                       "--executor-config", _yaml(tmp_path / "slurm.yaml", dict(SLURM, partition=node.partition)))
        assert proc.returncode == 0, proc.stderr + node.logs()
        same_results(reference["quick"], out)
        header = RunDir(out).read_config()
        assert header["executor"]["kind"] == "slurm" and header["executor"]["max_running"] == 2
        scripts = sorted((out / "slurm").glob("*_submission.sh"))
        assert len(scripts) == 1  # one sbatch: one array for the run's 3 folds
        script = scripts[0].read_text()
        for line in ("#SBATCH --array=0-2%2", "#SBATCH --cpus-per-task=1", f"#SBATCH --partition={node.partition}",
                     "#SBATCH --time=10", f"#SBATCH --output={out / 'slurm'}/%A_%a_0_log.out"):
            assert line in script, line
        logs = sorted((out / "slurm").glob("*_log.err"))
        assert len(logs) == 3
        assert any("fold" in log.read_text() for log in logs)  # each task's plain progress lines
        clean_folds_except_logs(out, 3)
    finally:
        node.stop()


def test_submitit_local_jobs_where_there_is_no_slurm(tiny_cache, reference, tmp_path):
    from tests.support.slurm_node import slurm_unavailable_reason

    if slurm_unavailable_reason("none") is None:
        pytest.skip("a real Slurm node runs here: the job array is tested against it instead")
    out = tmp_path / "run"
    run_cv(tiny_cache, out, QUICK, progress=False,
           executor=ExecutorConfig(kind="slurm", cluster="local", poll_seconds=0.5))
    same_results(reference["quick"], out)


def _yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def clean_folds_except_logs(run: Path, n_folds: int) -> None:
    folds = sorted(p.name for p in (run / FOLDS_DIR).iterdir())
    assert folds == [str(k) for k in range(n_folds)], folds
    assert not [p for p in (run / FOLDS_DIR).rglob(".*")], "staging folders left behind"
