"""Data-parallel training over the processes of a ``torchrun`` launch.

cellmorph starts no processes itself: ``torchrun`` (it ships with torch) does, and sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each::

    torchrun --standalone --nproc-per-node 4 --no-python cellmorph train --data CACHE --out MODEL ...

:func:`init_from_env` reads that environment and joins the process group (gloo on the CPU,
NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``); :func:`current` is the record of
this process's place in it (world size 1 when not launched by torchrun, or launched with
one process: then nothing here is used and training takes its single-process path).

How :func:`cellmorph.train.fit` uses it: every rank draws the same global batches in the
same seeded order and runs the input pipeline (augmentation included) over the whole global
batch, so the augmentation draws are those of one process; then each rank keeps its
:meth:`DataParallel.shard` of the batch. A rank's loss is its samples' weighted losses
summed and divided by the *global* batch size, so the sum of the ranks' gradients
(:meth:`DataParallel.all_reduce_gradients`) is the one-process gradient, up to the order of
float summation, also when the batch does not split evenly.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from cellmorph.errors import CellmorphError, option

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl"; None for one process
    device: torch.device | None = None  # the device this rank trains on; None: the caller's own

    @property
    def active(self) -> bool:
        """More than one process: the collectives below do something."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and prints."""
        return self.rank == 0

    @property
    def sync_batchnorm(self) -> bool:
        """BatchNorm statistics over the whole global batch (torch's SyncBatchNorm: GPU tensors only)."""
        return self.active and self.device is not None and self.device.type == "cuda"

    def record(self) -> dict:
        """What a bundle's training record keeps of it."""
        return {"world_size": self.world_size, "backend": self.backend, "sync_batchnorm": self.sync_batchnorm}

    def shard(self, n: int) -> slice:
        """The part of a global batch of ``n`` samples this rank takes: contiguous, sizes differing
        by at most one (the first ``n % world_size`` ranks take one more); empty if ``n < world_size``
        leaves none for this rank."""
        base, extra = divmod(int(n), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce_gradients(self, params: Iterable[nn.Parameter], extra: torch.Tensor | None = None
                             ) -> torch.Tensor | None:
        """Sum every parameter's gradient over the ranks, in place, with ONE flattened all-reduce;
        ``extra`` (a small float vector, e.g. this rank's loss share and its correct count) rides
        along in the same collective and is returned summed.

        Parameters without a gradient (``requires_grad`` off, e.g. a stage that gradual unfreezing
        has not opened yet) are left out; every rank runs the same network on its shard (an empty
        shard still gives zero gradients), so every rank leaves out the same ones.

        Why not DistributedDataParallel: DDP fixes the parameters it reduces when it wraps the
        model (those with ``requires_grad`` then) and reduces them in hooks of the wrapper's
        forward/backward. cellmorph's training paths change that set between epochs (gradual
        unfreezing opens one stage at a time) and train the frozen-feature tail through
        :meth:`~cellmorph.models.frozen.FrozenSplit.tail`, which swaps submodules of the model and
        calls it directly, not through a wrapper. Reducing after ``backward()`` works for all of
        them; it gives up DDP's overlap of communication with the backward pass, which matters
        little at the batch sizes and network sizes used here.
        """
        if not self.active:
            return extra
        grads = [p.grad for p in params if p.grad is not None]
        parts = [g.reshape(-1).float() for g in grads]
        if extra is not None:
            parts.append(extra.reshape(-1).float().to(grads[0].device if grads else extra.device))
        if not parts:
            return extra
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()
        return None if extra is None else flat[offset:].to(extra.dtype)

    def average_batchnorm_statistics(self, model: nn.Module) -> None:
        """Average the running mean and variance of every BatchNorm in training mode over the ranks
        (one flattened all-reduce). Used on the CPU, where each rank's BatchNorm normalises only its
        shard: the running statistics are exponential moving averages, linear in the batch
        statistics, so averaging them once per epoch equals averaging after every step, and keeps
        the ranks' models identical. BatchNorms in eval mode (frozen or not yet unfrozen stages)
        keep their statistics untouched."""
        if not self.active:
            return
        buffers = [b for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                   for b in (m.running_mean, m.running_var) if b is not None]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view(b.shape))
            offset += b.numel()

    def broadcast_state(self, model: nn.Module) -> None:
        """Every parameter and buffer as rank 0 has it (as DDP does when it wraps a model). Ranks
        build their networks from the same seeds, so this only guards against a difference that
        should not exist (e.g. another weights file on another node)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                data = tensor.data if tensor.is_contiguous() else tensor.detach().contiguous()
                torch.distributed.broadcast(data, src=0)
                if data is not tensor.data:
                    tensor.copy_(data)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def main_only(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 alone (writing an output, say); the others wait for it. A
        :class:`CellmorphError` it raises is raised on every rank, so all of them fail with the
        same line instead of the others waiting for a rank that is gone. None on other ranks."""
        if not self.active:
            return fn()
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except CellmorphError as exc:
                failure = exc
        box = [None if failure is None else str(failure)]
        torch.distributed.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        if box[0] is not None:
            raise CellmorphError(box[0])
        return result


_SINGLE = DataParallel()
_current: DataParallel = _SINGLE


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` torchrun set (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def current() -> DataParallel:
    """This process's record: the one :func:`init_from_env` made, else rank 0 of 1."""
    return _current


def _env_int(name: str) -> int:
    value = os.environ.get(name, "").strip()
    if not value.isdigit():
        raise CellmorphError(f"launched with WORLD_SIZE={os.environ.get('WORLD_SIZE')} but ${name} is "
                             f"{value or 'not set'}; launch with torchrun")
    return int(value)


def init_from_env(device: str = "auto") -> DataParallel:
    """Join the process group torchrun's environment describes; the record of this process.

    ``device`` is the config's (``auto | cpu | cuda``): on CUDA each rank takes
    ``cuda:LOCAL_RANK`` with NCCL, else the CPU with gloo. Without torchrun (or with one
    process) nothing is initialised and the record is rank 0 of 1 with no device. Calling it
    again returns the same record. The group is destroyed when the process exits.
    """
    global _current
    if _current.active:
        return _current
    world_size = launched_world_size()
    if world_size == 1:
        return _current
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise CellmorphError(f"launched with WORLD_SIZE={world_size} but ${name} is not set; launch with torchrun")
    if not torch.distributed.is_available():
        raise CellmorphError("this torch build has no torch.distributed; run without torchrun")
    wanted = str(device or "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise CellmorphError(f"device {wanted!r} under torchrun: each process takes cuda:LOCAL_RANK; "
                             f"give {option('device')} cuda, cpu or auto")
    cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise CellmorphError("device 'cuda' requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise CellmorphError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        where, backend = torch.device("cuda", local_rank), "nccl"
    else:
        where, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size,
                                             device_id=where if backend == "nccl" else None)
        atexit.register(shutdown)
    _current = DataParallel(rank, world_size, local_rank, backend, where)
    return _current


# How long a rank waits at exit for the others to arrive before it leaves without them
# (a peer that crashed never arrives; torchrun then reports that peer's failure).
EXIT_BARRIER_SECONDS = 60.0


def shutdown(barrier_seconds: float | None = None) -> None:
    """Leave the process group (registered to run at exit by :func:`init_from_env`).

    The ranks first meet at a barrier (gloo's ``monitored_barrier``, at most
    ``barrier_seconds``, default :data:`EXIT_BARRIER_SECONDS`), so that no rank tears
    down its gloo connections while a peer's are still in use. A rank that left first is
    the suspected cause of a rare abort at exit after the work had succeeded (SIGABRT,
    "terminate called without an active exception", seen twice in some dozens of suite runs
    and not reproduced since). A peer that never arrives only delays the exit; the
    group is destroyed either way.
    """
    global _current
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() > 1:
            from datetime import timedelta

            seconds = EXIT_BARRIER_SECONDS if barrier_seconds is None else barrier_seconds
            try:
                torch.distributed.monitored_barrier(timeout=timedelta(seconds=seconds))
            except RuntimeError:
                pass  # a peer is gone: leave without it
        torch.distributed.destroy_process_group()
    _current = _SINGLE


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for ``rank``, derived from ``seed`` (for dropout draws)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint32)[0])
