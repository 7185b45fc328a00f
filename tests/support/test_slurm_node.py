"""A real one-node Slurm cluster (tests/support/slurm_node.py) runs submitit's SlurmExecutor arrays.

Skipped, with the reason, where Slurm is not installed (``apt-get install -y slurm-wlm munge``; the
"slurmdbd" case also needs ``slurmdbd mariadb-server``) or the tests do not run as root."""

from __future__ import annotations

import time

import pytest

from tests.support.slurm_node import slurm_unavailable_reason, start_slurm

submitit = pytest.importorskip("submitit")


def _states(jobs, want: str, within_s: float = 15.0) -> list[str]:
    """Job states as submitit's watcher reads them from ``sacct``, polled until all are ``want``."""
    end = time.monotonic() + within_s
    while True:
        states = [job.watcher.get_state(job.job_id, mode="force") for job in jobs]
        if all(s == want for s in states) or time.monotonic() > end:
            return states
        time.sleep(0.5)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("accounting", ["squeue", "slurmdbd"])  # "none": tests/cv/test_executors.py
def test_map_array_runs_on_a_real_slurm_node(tmp_path, monkeypatch, accounting):
    reason = slurm_unavailable_reason(accounting)
    if reason:
        pytest.skip(reason)
    node = start_slurm(tmp_path / "slurm", cpus=2, accounting=accounting)
    try:
        assert node.startup_s < 30, node.logs()
        for key, value in node.env.items():
            monkeypatch.setenv(key, value)
        executor = submitit.AutoExecutor(folder=tmp_path / "jobs")
        assert executor.cluster == "slurm"
        executor.update_parameters(slurm_partition=node.partition, slurm_array_parallelism=2, cpus_per_task=1,
                                   timeout_min=5)

        def square(x):  # nested: pickled by value, so the job needs nothing of tests/ on its path
            import os
            return x * x, os.environ["SLURM_ARRAY_TASK_ID"]

        jobs = executor.map_array(square, [1, 2, 3])
        assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one sbatch, an array 0-2%2
        assert [job.result() for job in jobs] == [(1, "0"), (4, "1"), (9, "2")], node.logs()
        script = (tmp_path / "jobs" / f"{jobs[0].job_id.split('_')[0]}_submission.sh").read_text()
        assert "#SBATCH --array=0-2%2" in script and f"#SBATCH --partition={node.partition}" in script

        if accounting == "none":  # sacct fails: submitit only ever sees UNKNOWN, the result pickles end the wait
            assert [job.state for job in jobs] == ["UNKNOWN"] * 3
        else:  # a real state for each task, and a job Slurm cancels ends instead of waiting for ever
            assert _states(jobs, "COMPLETED") == ["COMPLETED"] * 3, node.logs()
            sleeper = executor.submit(time.sleep, 600)
            end = time.monotonic() + 20
            while sleeper.watcher.get_state(sleeper.job_id, mode="force") != "RUNNING" and time.monotonic() < end:
                time.sleep(0.2)
            sleeper.cancel()
            sleeper._results_timeout_s = 0  # submitit waits 15 s for a result pickle that cannot come
            assert isinstance(sleeper.exception(), submitit.core.utils.UncompletedJobError)
            assert sleeper.state.startswith("CANCELLED")
    finally:
        node.stop()
    assert all(proc.poll() is not None for _, proc, _ in node._daemons)
    assert not (node.workdir / "spool").exists() and (node.workdir / "log" / "slurmctld.log").exists()
