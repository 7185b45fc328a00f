"""The run directory's contract: fingerprints stable across releases, fold weights kept as asked."""

from __future__ import annotations

import json

import pytest

from cellmorph.cv import RunDir, plan_run, run_cv
from cellmorph.cv.rundir import FOLD_STATE
from tests.conftest import quick_config


def test_fingerprints_are_those_of_earlier_releases(tiny_screen, tmp_path):
    """A run written before the cv/ package existed (release f5ce67d) still resumes.

    The two digests were read from that release's ``config.yaml`` for exactly these settings;
    a change here means every earlier run directory would refuse ``--resume``.
    """
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    cache = tmp_path / "cache"
    prepare(load_bbbc021(tiny_screen, tiny_screen), cache, PrepareConfig(tile_size=32), progress=False)
    plan = plan_run(cache, dict(model="test_resnet", init="xavier", epochs=1, cv="group-kfold:3",
                                max_tiles_per_fold=40, num_threads=1))
    assert plan.data_fingerprint == "762c65e8ed98a7a0"
    assert plan.fingerprint == "954e68abb4539d61"


QUICK = quick_config(cv="group-kfold:3")


@pytest.mark.parametrize("keep, kept", [("none", []), ("last", [2]), ("all", [0, 1, 2])])
def test_keep_checkpoints_decides_which_fold_weights_stay_and_resume_needs_none(keep, kept, tiny_cache, tmp_path):
    out = tmp_path / keep
    metrics = run_cv(tiny_cache, out, dict(QUICK, keep_checkpoints=keep), progress=False)
    rundir = RunDir(out)
    assert sorted(int(p.parent.name) for p in out.glob(f"folds/*/{FOLD_STATE}")) == kept
    assert rundir.finished_folds() == [0, 1, 2]
    # Resuming needs no weights, and keep_checkpoints is not part of what the run computes.
    again = run_cv(tiny_cache, out, dict(QUICK, keep_checkpoints="none"), resume=True, progress=False)
    assert again["resumed_folds"] == [0, 1, 2] and again["tile_accuracy"] == metrics["tile_accuracy"]
    # Weights of folds finished earlier are never deleted by a later invocation's policy.
    assert sorted(int(p.parent.name) for p in out.glob(f"folds/*/{FOLD_STATE}")) == kept
    if kept:
        state = rundir.fold_state(kept[-1])
        assert state["model_name"] == "test_resnet" and state["input"]["input_size"] == 32


def test_history_records_held_out_accuracy_of_the_scored_epochs(tiny_cache, tmp_path):
    out = tmp_path / "run"
    run_cv(tiny_cache, out, dict(QUICK, epochs=2, eval_epochs=[1]), progress=False)
    rundir = RunDir(out)
    for fold in rundir.finished_folds():
        history = json.loads((rundir.fold_dir(fold) / "history.json").read_text())
        for record, epoch in zip(history, (1, None)):
            frame = rundir.read_fold_predictions(fold, epoch)
            probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
            classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
            expected = float((probs.argmax(1) == frame["Metadata_MoA"].map(classes.index).to_numpy()).mean())
            assert record["heldout_tile_accuracy"] == pytest.approx(expected)
