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
    with pytest.raises(CellmorphError, match="num_threads"):
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


@pytest.mark.parametrize("value", ["abc", "0", "-3", "99999999999999999999", "2.5"])
def test_a_bad_cellmorph_threads_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("CELLMORPH_THREADS", value)
    with pytest.raises(CellmorphError, match=r"\$CELLMORPH_THREADS"):
        default_threads()


def test_other_tools_thread_variables_that_are_not_one_count_are_passed_over(monkeypatch):
    monkeypatch.delenv("CELLMORPH_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form
    assert default_threads() >= 1


@pytest.mark.parametrize("threads", [0, -1, 99999999999999999999])
def test_threads_out_of_range_are_refused_before_torch_sees_them(threads):
    with pytest.raises(CellmorphError, match="num_threads"):
        resolve_threads(threads)


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "meta", "", "cpu:0:1"])
def test_a_device_cellmorph_cannot_run_on_is_one_error(device):
    from cellmorph.runtime import resolve_device

    with pytest.raises(CellmorphError, match="^device "):
        resolve_device(device)
    assert resolve_device("cpu").type == "cpu"
