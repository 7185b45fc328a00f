"""The one thread policy of every compute command, and seeds."""

from __future__ import annotations

import os

import pytest
import torch

from cellmorph.errors import CellmorphError
from cellmorph.runtime import default_threads, resolve_threads, torch_threads


def test_thread_policy_order(monkeypatch):
    for name in ("CELLMORPH_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    from cellmorph import runtime

    # The CPUs this process may use, capped at torch's own default (physical cores) as imported.
    assert default_threads() == min(len(os.sched_getaffinity(0)), runtime._TORCH_DEFAULT_THREADS)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")  # what the scheduler granted beats OpenMP's setting
    assert default_threads() == 5
    monkeypatch.setenv("CELLMORPH_THREADS", "1")
    assert default_threads() == 1 and resolve_threads(2) == 2
    with pytest.raises(CellmorphError, match="--threads"):
        resolve_threads(0)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_keep_freed_memory_applies_on_glibc_linux():
    """`predict` and `embed` keep freed memory for reuse (mallopt); in a fresh process, as they do."""
    import subprocess
    import sys

    code = "from cellmorph.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import platform

    assert out == ("True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False")
