"""Data-parallel training under torchrun: 2 CPU processes (gloo) train the model 1 process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cellmorph.bundle import load_bundle
from cellmorph.distributed import DataParallel
from tests.support.ports import free_ports

BIN = Path(sys.executable).parent
TORCHRUN, CELLMORPH = BIN / "torchrun", BIN / "cellmorph"

# Weights are O(1) (at most ≈1 here). Two processes compute the same steps as one, except that each
# step's gradient is the sum of two half-batch gradients instead of one whole-batch reduction, so
# only the order of float32 summation differs: ≈1e-7 relative per step, after 12 SGD steps with
# momentum measured at 1.8e-7 max abs difference. 1e-5 leaves a margin of ~50x for other CPUs'
# kernels, and is far below what a wrong split would cost (a rank's mean over its own shard
# instead of its share of the global mean, on the uneven 3/2 last batch; or unreduced gradients),
# which moves weights by ~1e-3 and more; the test checks that training moved them that far.
WEIGHT_TOL = 1e-5
LOSS_RTOL = 1e-5
# Held-out probabilities of those weights: softmax outputs move no more than the weights do.
PROB_TOL = 1e-4

# 45 tiles in batches of 8: five even 4/4 splits and a last batch of 5, split 3/2. ConvNeXt
# normalises with LayerNorm (per sample), so no statistic couples the samples of a batch and the
# split changes nothing but summation order (a BatchNorm network would normalise each half alone).
TRAIN = ("train", "--model", "convnext_atto", "--init", "xavier", "--image-size", "32", "--epochs", "2",
         "--batch-size", "8", "--max-tiles-per-fold", "45", "--threads", "1", "--no-progress")
TRAIN_CONFIG = {"model": "convnext_atto", "init": "xavier", "image_size": 32, "epochs": 2, "batch_size": 8,
                "max_tiles_per_fold": 45, "num_threads": 1}  # the same, as a CVConfig


def test_shard_splits_a_global_batch_contiguously_and_as_evenly_as_possible():
    for world in range(1, 6):
        for n in range(0, 23):
            parts = [range(n)[DataParallel(rank=r, world_size=world).shard(n)] for r in range(world)]
            assert [i for part in parts for i in part] == list(range(n))  # in order, each sample once
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert DataParallel(rank=0, world_size=2).shard(5) == slice(0, 3)
    assert DataParallel(rank=1, world_size=2).shard(5) == slice(3, 5)
    assert DataParallel(rank=2, world_size=3).shard(2) == slice(2, 2)  # nothing left for the last rank
    assert DataParallel().shard(7) == slice(0, 7)


@pytest.mark.slow
def test_cross_validation_folds_train_data_parallel_too(tiny_cache, tmp_path):
    """``train --calibration`` under torchrun: the calibration CV's folds and the final model are
    each trained by both processes; rank 0 alone writes the run directory and the bundle."""
    from cellmorph.cv import RunDir, run_cv

    two = tmp_path / "two"
    parallel = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", str(CELLMORPH),
                               *TRAIN, "--epochs", "1", "--calibration", "group-kfold:2", "--data", str(tiny_cache),
                               "--out", str(two)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert parallel.returncode == 0, parallel.stderr
    one = tmp_path / "one.cv"
    run_cv(tiny_cache, one, dict(TRAIN_CONFIG, epochs=1, cv="group-kfold:2"), progress=False)
    cv_two = Path(str(two) + ".cv")
    assert RunDir(cv_two).read_config()["data_parallel"]["world_size"] == 2
    assert sorted(p.name for p in (cv_two / "folds").iterdir()) == ["0", "1"]
    assert not list(cv_two.rglob(".*")), "temporaries left behind"
    a, b = (pd.read_parquet(run / "predictions.parquet") for run in (one, cv_two))
    probs = [c for c in a.columns if c.startswith("prob_")]
    pd.testing.assert_frame_equal(a.drop(columns=probs), b.drop(columns=probs))
    assert float((a[probs] - b[probs]).abs().max().max()) < PROB_TOL
    assert load_bundle(two).manifest["training"]["calibration"]["cv"] == "group-kfold:2"


def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(tiny_cache, tmp_path):
    from cellmorph.final_model import train_final

    one, two = tmp_path / "one", tmp_path / "two"
    parallel = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", str(CELLMORPH),
                                 *TRAIN, "--data", str(tiny_cache), "--out", str(two)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    # The one-process reference: the same options through the API, in this process while torchrun
    # runs (results do not depend on timing; it saves a process start on a 2-core machine).
    train_final(tiny_cache, one, TRAIN_CONFIG, progress=False)
    stdout, stderr = parallel.communicate(timeout=600)
    assert parallel.returncode == 0, stderr
    assert len(stdout.strip().splitlines()) == 1  # rank 0 alone prints the summary
    assert json.loads(stdout)["model"] == str(two)

    a, b = load_bundle(one), load_bundle(two)
    assert a.manifest["training"]["data_parallel"]["world_size"] == 1
    assert b.manifest["training"]["data_parallel"] == {"world_size": 2, "backend": "gloo", "sync_batchnorm": False}
    assert a.weights.keys() == b.weights.keys()
    diff = {k: float((a.weights[k].double() - b.weights[k].double()).abs().max()) for k in a.weights}
    assert max(diff.values()) < WEIGHT_TOL, sorted(diff.items(), key=lambda kv: -kv[1])[:5]

    # Training moved the weights far beyond the tolerance (the comparison means something): the
    # start is the network run_fold builds from the recorded init seed.
    from cellmorph.models import create_model

    torch.manual_seed(a.manifest["training"]["seeds"]["init"])
    start = create_model("convnext_atto", len(a.classes), init="xavier").state_dict()
    moved = max(float((a.weights[k].double() - start[k].double()).abs().max()) for k in a.weights)
    assert moved > 100 * WEIGHT_TOL, moved

    h1, h2 = a.manifest["training"]["history"], b.manifest["training"]["history"]
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h2] == [1, 2]
    for r1, r2 in zip(h1, h2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=LOSS_RTOL)
        assert (r2["train_accuracy"], r2["n_tiles"]) == (r1["train_accuracy"], r1["n_tiles"]) and r1["n_tiles"] == 45


EXIT_SCRIPT = """
import os, sys, torch
from cellmorph import distributed
dp = distributed.init_from_env("cpu")
if sys.argv[1] == "crash" and dp.rank == 1:
    os._exit(3)  # a peer that dies without leaving the group
distributed.shutdown(barrier_seconds=5)
print("left", dp.rank, torch.distributed.is_initialized(), distributed.current().active, flush=True)
"""


def _two_ranks(how: str) -> list[subprocess.CompletedProcess]:
    port = str(free_ports(1)[0])
    procs = [subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.slow
def test_ranks_meet_at_exit_then_leave_the_group():
    """shutdown(): both ranks pass the exit barrier and destroy the group; each exits 0."""
    for rank, done in enumerate(_two_ranks("normal")):
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["left", str(rank), "False", "False"]


@pytest.mark.slow
def test_a_rank_whose_peer_died_still_leaves_after_the_barrier_times_out():
    """A peer that dies without leaving cannot hang the survivor's exit: its barrier gives up, it
    destroys the group and exits 0 (torchrun reports the dead rank)."""
    survivor, dead = _two_ranks("crash")
    assert dead.returncode == 3
    assert survivor.returncode == 0, survivor.stderr
    assert survivor.stdout.split() == ["left", "0", "False", "False"]
