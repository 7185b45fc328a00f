"""How a job runs on this machine: device, CPU threads, seeds and deterministic kernels.

Thread policy (one for every compute command): ``--threads N`` if given; else
``$CELLMORPH_THREADS``; else the CPUs a cluster scheduler granted (``$SLURM_CPUS_PER_TASK``,
then ``$OMP_NUM_THREADS``); else the CPUs this process may run on, at most torch's
own default (the physical cores). On a shared machine
ask for fewer: with another job running, one epoch took 3.5–56 s at 2 threads against
about 1 s at 1 thread, because OpenMP threads spin-wait for each other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from cellmorph.config.runtime import MAX_THREADS
from cellmorph.errors import CellmorphError, option

THREAD_VARIABLES = ("CELLMORPH_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")
# torch's own default (physical cores) before anyone changed it: hyperthreads add spin-waits, not speed.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()



def _thread_count(value, source: str) -> int:
    """``value`` as a thread count in 1..MAX_THREADS, else one error line naming ``source``."""
    try:
        count = int(str(value).strip())
    except ValueError:
        raise CellmorphError(f"{source} must be a whole number of threads, got {value!r}") from None
    if not 1 <= count <= MAX_THREADS:
        raise CellmorphError(f"{source} must be between 1 and {MAX_THREADS}, got {value}")
    return count


def default_threads() -> int:
    """The thread count of the policy above when ``--threads`` is not given.

    ``$CELLMORPH_THREADS`` is cellmorph's own and is checked like ``--threads``; the scheduler's
    variables belong to other tools (``OMP_NUM_THREADS`` may hold a nested list such as ``4,2``),
    so a value that is not one positive count is passed over.
    """
    own = os.environ.get(THREAD_VARIABLES[0], "").strip()
    if own:
        return _thread_count(own, f"${THREAD_VARIABLES[0]}")
    for name in THREAD_VARIABLES[1:]:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and 0 < int(value) <= MAX_THREADS:
            return int(value)
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, _TORCH_DEFAULT_THREADS))


def resolve_threads(threads: int | None) -> int:
    return _thread_count(threads, option("num_threads")) if threads is not None else default_threads()


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``resolve_threads(threads)`` torch CPU threads; restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic(enabled: bool = True):
    """Deterministic kernels (warn-only where none exists); restores the previous state."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def derive_seeds(seed: int, fold: int) -> dict[str, int]:
    """Independent seeds for one fold (init, shuffle, augmentation, subsampling)."""
    ss = np.random.SeedSequence([int(seed), int(fold)])
    init, shuffle, augment, subsample = (int(v) for v in ss.generate_state(4, dtype=np.uint32))
    return {"init": init, "shuffle": shuffle, "augment": augment, "subsample": subsample}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), or a torch device name that this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = check_device_name(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CellmorphError(f"{option('device')} {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CellmorphError(f"{option('device')} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise CellmorphError(f"{option('device')} {device!r} requested but MPS is not available")
    return resolved


def check_device_name(device: str) -> torch.device:
    """``device`` parsed as a device cellmorph can run on (cpu, cuda[:N], mps), else one error line."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise CellmorphError(f"{option('device')} {device!r}: not a device cellmorph runs on; use auto, cpu, cuda, cuda:N or mps")
    return resolved


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in this process for reuse instead of returning it to the kernel.

    Inference allocates and frees tens of MB per batch. By default glibc serves such blocks from
    fresh mmap'd pages that the kernel must fault in and zero each time: about half of `embed`'s
    and `predict`'s CPU time (11–12 M minor page faults for 864 tiles at 224 px; scoring went from
    ~40 to ~80 tiles/s with this, benchmarks/RESULTS.md). The price is that the process keeps its
    peak memory until it exits, so the commands that call it are short-lived. Returns whether it
    applied (False off glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: leave the allocator alone
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
